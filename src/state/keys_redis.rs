//! Self-service keys in Redis, for a fleet. Keys (braces: the Cluster hash
//! tag):
//! - `{prefix}:keys:{<user>}`: a hash, key id → the record as JSON; one
//!   slot per user, so the cap check and a roll are one script each.
//! - `{prefix}:kh:{<sha256 hex>}` = `<user> <id>`: the index a presented
//!   key is found by, written after its record and never changed.
//! - `{prefix}:kid:{<id>}` = the user: for the operator's calls by id.
//! - `{prefix}:acct`: a hash, user → account allowlist as JSON.
//! - `{prefix}:keys:changes`: a stream of changed key hashes and accounts,
//!   read by every sidecar to drop what its cache holds (see
//!   `crate::keys::SelfKeys::follow`).

use std::sync::LazyLock;

use redis::Script;

use super::families::RedisStore;
use super::keys::{Created, KeyRecord, KeyStore, Rolled};
use super::StateError;

/// Store ARGV[2] (a record) as field ARGV[1] unless the hash holds ARGV[3]
/// live records at ARGV[4] (Unix s). KEYS[1]: the user's hash.
const CREATE: &str = r#"
local now = tonumber(ARGV[4])
local live = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do
  local r = cjson.decode(v)
  if r.revoked_at == cjson.null and (r.expires_at == cjson.null or r.expires_at > now) then
    live = live + 1
  end
end
if live >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"#;

/// Set field ARGV[1] to ARGV[3] if it still holds ARGV[2].
const SWAP: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"#;

/// A roll: if field ARGV[1] still holds ARGV[2], set it to ARGV[3] (the
/// old key with its grace end) and store ARGV[5] as field ARGV[4].
const ROLL: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3], ARGV[4], ARGV[5])
return 1
"#;

static CREATE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(CREATE));
static SWAP_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(SWAP));
static ROLL_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ROLL));

fn hex(hash: &[u8; 32]) -> String {
    hex::encode(hash)
}

fn encode(r: &KeyRecord) -> String {
    serde_json::to_string(r).unwrap_or_default()
}

fn decode(s: &str) -> Result<KeyRecord, StateError> {
    serde_json::from_str(s)
        .map_err(|e| StateError::Unavailable(format!("a stored key record is unreadable: {e}")))
}

impl RedisStore {
    fn user_keys(&self, user: &str) -> String {
        format!("{}:keys:{{{user}}}", self.prefix)
    }

    fn hash_index(&self, hash: &[u8; 32]) -> String {
        format!("{}:kh:{{{}}}", self.prefix, hex(hash))
    }

    fn id_index(&self, id: &str) -> String {
        format!("{}:kid:{{{id}}}", self.prefix)
    }

    fn accounts(&self) -> String {
        format!("{}:acct", self.prefix)
    }

    /// The stream every change is announced on.
    pub fn key_changes(&self) -> String {
        format!("{}:keys:changes", self.prefix)
    }

    /// Announce a changed key hash (hex) or account (`acct:<user>`).
    fn announce(&self, what: &str) -> Result<(), StateError> {
        let stream = self.key_changes();
        self.call("key_announce", |c| {
            redis::cmd("XADD")
                .arg(&stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(100_000)
                .arg("*")
                .arg("c")
                .arg(what)
                .query::<String>(c)
        })
        .map(drop)
    }

    /// Changes after stream id `after` (`$`: none, only the newest id):
    /// the newest id seen and the changes; `None` when `after` is older
    /// than what the stream still holds (drop the whole cache).
    pub fn changes_after(&self, after: &str) -> Result<(String, Option<Vec<String>>), StateError> {
        let stream = self.key_changes();
        if after == "$" {
            let last: Vec<(String, Vec<(String, String)>)> = self.call("key_changes", |c| {
                redis::cmd("XREVRANGE")
                    .arg(&stream)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query(c)
            })?;
            let id = last
                .into_iter()
                .next()
                .map_or("0-0".to_string(), |(id, _)| id);
            return Ok((id, Some(Vec::new())));
        }
        let entries: Vec<(String, Vec<(String, String)>)> = self.call("key_changes", |c| {
            redis::cmd("XRANGE")
                .arg(&stream)
                .arg(format!("({after}"))
                .arg("+")
                .arg("COUNT")
                .arg(10_000)
                .query(c)
        })?;
        if entries.is_empty() {
            return Ok((after.to_string(), Some(Vec::new())));
        }
        // The oldest entry held: if ours was trimmed away, changes were missed.
        let first: Vec<(String, Vec<(String, String)>)> = self.call("key_changes", |c| {
            redis::cmd("XRANGE")
                .arg(&stream)
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(1)
                .query(c)
        })?;
        let missed = after != "0-0"
            && first
                .first()
                .is_some_and(|(id, _)| stream_id(id) > stream_id(after));
        let last = entries
            .last()
            .map_or(after.to_string(), |(id, _)| id.clone());
        if missed {
            return Ok((last, None));
        }
        let changed = entries
            .into_iter()
            .flat_map(|(_, fields)| fields.into_iter().map(|(_, v)| v))
            .collect();
        Ok((last, Some(changed)))
    }

    fn record(&self, user: &str, id: &str) -> Result<Option<(String, KeyRecord)>, StateError> {
        let key = self.user_keys(user);
        let raw: Option<String> =
            self.call("key_get", |c| redis::cmd("HGET").arg(&key).arg(id).query(c))?;
        raw.map(|s| decode(&s).map(|r| (s, r))).transpose()
    }

    fn owner_of(&self, id: &str) -> Result<Option<String>, StateError> {
        let key = self.id_index(id);
        self.call("key_index", |c| redis::cmd("GET").arg(&key).query(c))
    }

    /// Read, change, and write key `id` only if nobody wrote in between;
    /// `announce` the change to the fleet's caches.
    fn change(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut KeyRecord) -> bool,
        announce: bool,
    ) -> Result<Option<KeyRecord>, StateError> {
        let Some(user) = self.owner_of(id)? else {
            return Ok(None);
        };
        // Read, change, and write only if nobody wrote in between.
        for _ in 0..8 {
            let Some((raw, mut record)) = self.record(&user, id)? else {
                return Ok(None);
            };
            if !change(&mut record) {
                return Ok(Some(record));
            }
            let mut inv = SWAP_SCRIPT.key(self.user_keys(&user));
            inv.arg(id).arg(&raw).arg(encode(&record));
            let swapped: i64 = self.call("key_update", |c| inv.invoke(c))?;
            if swapped == 1 {
                if announce {
                    self.announce(&hex(&record.sha256))?;
                }
                return Ok(Some(record));
            }
        }
        Err(StateError::Unavailable(
            "a key changed too often to update".into(),
        ))
    }

    fn write_indexes(&self, r: &KeyRecord) -> Result<(), StateError> {
        let (h, i) = (self.hash_index(&r.sha256), self.id_index(&r.id));
        let by_hash = format!("{} {}", r.user, r.id);
        self.call("key_index", |c| {
            redis::cmd("SET").arg(&h).arg(&by_hash).query::<()>(c)
        })?;
        self.call("key_index", |c| {
            redis::cmd("SET").arg(&i).arg(&r.user).query::<()>(c)
        })
    }
}

/// A stream id (`ms-seq`) as a pair, for ordering.
fn stream_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

impl KeyStore for RedisStore {
    fn create(&self, r: &KeyRecord, max: u32, now: u64) -> Result<Created, StateError> {
        // The indexes first: a key is never handed out whose hash cannot
        // be found, and an index without its record finds nothing.
        self.write_indexes(r)?;
        let key = self.user_keys(&r.user);
        let json = encode(r);
        let mut inv = CREATE_SCRIPT.key(key);
        inv.arg(&r.id).arg(&json).arg(max).arg(now);
        let stored: i64 = self.call("key_create", |c| inv.invoke(c))?;
        if stored == 0 {
            // Its indexes name no record; take them back (best effort: an
            // index without its record finds nothing anyway).
            let (h, i) = (self.hash_index(&r.sha256), self.id_index(&r.id));
            let _ = self.call("key_index", |c| {
                redis::cmd("DEL").arg(&h).arg(&i).query::<()>(c)
            });
            return Ok(Created::TooMany);
        }
        self.announce(&hex(&r.sha256))?;
        Ok(Created::Stored)
    }

    fn get(&self, id: &str) -> Result<Option<KeyRecord>, StateError> {
        let Some(user) = self.owner_of(id)? else {
            return Ok(None);
        };
        Ok(self.record(&user, id)?.map(|(_, r)| r))
    }

    fn by_hash(&self, hash: &[u8; 32]) -> Result<Option<KeyRecord>, StateError> {
        let key = self.hash_index(hash);
        let index: Option<String> =
            self.call("key_lookup", |c| redis::cmd("GET").arg(&key).query(c))?;
        let Some((user, id)) = index.as_deref().and_then(|i| i.rsplit_once(' ')) else {
            return Ok(None);
        };
        Ok(self
            .record(user, id)?
            .map(|(_, r)| r)
            .filter(|r| r.sha256 == *hash))
    }

    fn list(&self, user: &str) -> Result<Vec<KeyRecord>, StateError> {
        let key = self.user_keys(user);
        let all: Vec<String> = self.call("key_list", |c| redis::cmd("HVALS").arg(&key).query(c))?;
        let mut out = all
            .iter()
            .map(|s| decode(s))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    fn update(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut KeyRecord) -> bool,
    ) -> Result<Option<KeyRecord>, StateError> {
        self.change(id, change, true)
    }

    fn roll(
        &self,
        old_id: &str,
        new: &KeyRecord,
        until: u64,
        now: u64,
    ) -> Result<Rolled, StateError> {
        for _ in 0..8 {
            let Some((raw, mut old)) = self.record(&new.user, old_id)? else {
                return Ok(Rolled::NotFound);
            };
            if !old.live(now) {
                return Ok(Rolled::NotLive);
            }
            old.expires_at = Some(old.expires_at.map_or(until, |t| t.min(until)));
            self.write_indexes(new)?;
            let mut inv = ROLL_SCRIPT.key(self.user_keys(&new.user));
            inv.arg(old_id)
                .arg(&raw)
                .arg(encode(&old))
                .arg(&new.id)
                .arg(encode(new));
            let rolled: i64 = self.call("key_roll", |c| inv.invoke(c))?;
            if rolled == 1 {
                self.announce(&hex(&old.sha256))?;
                self.announce(&hex(&new.sha256))?;
                return Ok(Rolled::Rolled(Box::new(old)));
            }
        }
        Err(StateError::Unavailable(
            "a key changed too often to roll".into(),
        ))
    }

    fn touch(&self, used: &[(String, u64)]) -> Result<(), StateError> {
        for (id, at) in used {
            // Not announced: nothing the gate caches of a key changes.
            self.change(
                id,
                &mut |r| {
                    let later = r.last_used_at.is_none_or(|t| t < *at);
                    if later {
                        r.last_used_at = Some(*at);
                    }
                    later
                },
                false,
            )?;
        }
        Ok(())
    }

    fn account_allow(&self, user: &str) -> Result<Vec<String>, StateError> {
        let key = self.accounts();
        let raw: Option<String> = self.call("key_account", |c| {
            redis::cmd("HGET").arg(&key).arg(user).query(c)
        })?;
        Ok(raw
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default())
    }

    fn set_account_allow(&self, user: &str, list: &[String]) -> Result<(), StateError> {
        let key = self.accounts();
        if list.is_empty() {
            self.call("key_account", |c| {
                redis::cmd("HDEL").arg(&key).arg(user).query::<()>(c)
            })?;
        } else {
            let json = serde_json::to_string(list).unwrap_or_default();
            self.call("key_account", |c| {
                redis::cmd("HSET")
                    .arg(&key)
                    .arg(user)
                    .arg(&json)
                    .query::<()>(c)
            })?;
        }
        self.announce(&format!("acct:{user}"))
    }

    fn account_allows(&self) -> Result<Vec<(String, Vec<String>)>, StateError> {
        let key = self.accounts();
        let all: Vec<(String, String)> =
            self.call("key_account", |c| redis::cmd("HGETALL").arg(&key).query(c))?;
        Ok(all
            .into_iter()
            .map(|(u, s)| (u, serde_json::from_str(&s).unwrap_or_default()))
            .collect())
    }
}
