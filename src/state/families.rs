//! Refresh-token families and login throttles in Redis, for a fleet: a
//! token issued by one sidecar rotates on any other, and a reuse or a
//! revocation is seen by all of them at once.
//!
//! Keys (the part in braces is the Cluster hash tag):
//! - `{prefix}:fam:{<family>}`: one small hash per family, so a rotation is
//!   one atomic script on one slot. Fields: `u` (the user), `a` (the
//!   family's start: its login, Unix s), `r` (revoked, until when), and the
//!   family's one live token: `c` (its SHA-256, hex) with `ci`/`ce`
//!   (issued, expires) and `m`, an HMAC-SHA256 under `[state] record_key`
//!   of the family, `u`, `a`, `c` and `ce`. Every other token of the family
//!   is spent by definition, so the hash never grows with rotations and no
//!   script walks it. It expires with its live token or revocation mark.
//!   A revocation also deletes `c` and `m`: a revoked family has no live
//!   token left to revive by deleting `r`.
//!
//! The MAC is keygate's answer to "whoever can write to Redis can mint a
//! refresh family for any user": without the key, nobody can make a record
//! that names a user and a token of their choosing, or extend one. It does
//! not stop a writer from rolling a family back to a state it saw earlier
//! (that needs the token of that state too), nor from deleting or revoking
//! families; protect Redis with ACLs and TLS all the same.
//! - `{prefix}:rt:{<sha256 hex>}` = the family: the index from a presented
//!   token to its family. Written once before the token is handed out and
//!   never changed, so reading it outside the family's script cannot race;
//!   it lives as long as its token could be presented (reuse detection).
//! - `{prefix}:limit:{<account>}`: login throttles, the same GCRA hash as
//!   the tier limiter's (see [`super::fleet`]).
//!
//! Calls block, with `token_timeout` as the socket deadline: the token endpoints
//! run on blocking threads beside argon2. Any failure is
//! [`StateError::Unavailable`], which the endpoints answer with 503
//! `state_unavailable`: refresh and revoke always fail closed.

use std::sync::Arc;

use redis::Script;

use super::migrate::{Item, Record};
use super::topology::{PoolError, SyncPool};
use super::{RefreshRecord, Rotation, StateError, StateStore, TokenHash};
use crate::limit::{AccountId, Outcome, Quota, Snapshot};
use crate::metrics::METRICS;
use crate::policy::RedisSettings;

/// Start a family with its first token. KEYS[1]: the family. ARGV: user,
/// token, issued, expires (Unix s), mode, family start, MAC. Mode 0 sets
/// the live token; 1 (import) sets it only when the family has none and is
/// not revoked; 2 (import of a spent token) only makes sure the family
/// exists.
const INSERT: &str = r#"
local at = tonumber(ARGV[4])
local function keep_until()
  if redis.call('EXPIRETIME', KEYS[1]) < at then redis.call('EXPIREAT', KEYS[1], at) end
end
if ARGV[5] == '2' or (ARGV[5] == '1' and (redis.call('HEXISTS', KEYS[1], 'c') == 1
    or redis.call('HEXISTS', KEYS[1], 'r') == 1)) then
  redis.call('HSETNX', KEYS[1], 'u', ARGV[1])
  redis.call('HSETNX', KEYS[1], 'a', ARGV[6])
  keep_until()
  return 0
end
redis.call('HSET', KEYS[1], 'u', ARGV[1], 'c', ARGV[2], 'ci', ARGV[3], 'ce', ARGV[4],
  'a', ARGV[6], 'm', ARGV[7])
keep_until()
return 1
"#;

/// Spend the family's live token and make its successor live, or detect
/// reuse (any other token of the family). KEYS[1]: the family. ARGV: the
/// presented token, the successor ('' to only look), its issued and
/// expires, now, revoke-until, the successor's MAC. O(1) whatever the
/// family's history. A reuse revokes the family and drops its live token.
const ROTATE: &str = r#"
local f = redis.call('HMGET', KEYS[1], 'u', 'r', 'c', 'ce')
if not f[1] then return 'unknown' end
if f[2] then return 'revoked' end
local now = tonumber(ARGV[5])
if f[3] ~= ARGV[1] then
  local until_ = tonumber(ARGV[6])
  redis.call('HSET', KEYS[1], 'r', until_)
  redis.call('HDEL', KEYS[1], 'c', 'm')
  if redis.call('EXPIRETIME', KEYS[1]) < until_ then redis.call('EXPIREAT', KEYS[1], until_) end
  return 'reuse'
end
if tonumber(f[4]) <= now then return 'expired' end
if ARGV[2] == '' then return 'valid' end
redis.call('HSET', KEYS[1], 'c', ARGV[2], 'ci', ARGV[3], 'ce', ARGV[4], 'm', ARGV[7])
local at = tonumber(ARGV[4])
if redis.call('EXPIRETIME', KEYS[1]) < at then redis.call('EXPIREAT', KEYS[1], at) end
return 'rotated'
"#;

/// Revoke a family until ARGV[1] (Unix s), creating the mark if the family
/// is not there yet (an import writes revocations first). KEYS[1]: the
/// family. Returns whether the family existed.
const REVOKE: &str = r#"
local existed = redis.call('EXISTS', KEYS[1])
local at = tonumber(ARGV[1])
local was = tonumber(redis.call('HGET', KEYS[1], 'r') or '0')
if was < at then redis.call('HSET', KEYS[1], 'r', at) end
redis.call('HDEL', KEYS[1], 'c', 'm')
if redis.call('EXPIRETIME', KEYS[1]) < at then redis.call('EXPIREAT', KEYS[1], at) end
return existed
"#;

pub struct RedisStore {
    pool: SyncPool,
    pub(super) prefix: Box<str>,
    /// `[state] record_key`: authenticates family records; with the
    /// previous key (a rotation) and whether unsigned records pass.
    record_key: Box<[u8]>,
    previous_record_key: Option<Box<[u8]>>,
    accept_unsigned: bool,
    insert: Script,
    rotate: Script,
    revoke: Script,
    gcra: Script,
    refund: Script,
}

impl RedisStore {
    pub fn new(settings: Arc<RedisSettings>) -> Result<RedisStore, StateError> {
        let prefix = settings.key_prefix.clone();
        let record_key = settings.record_key.clone();
        let previous_record_key = settings.previous_record_key.clone();
        let accept_unsigned = settings.accept_unsigned_records;
        Ok(RedisStore {
            pool: SyncPool::new(settings).map_err(|e| unavailable("setup", &e))?,
            prefix,
            record_key,
            previous_record_key,
            accept_unsigned,
            insert: Script::new(INSERT),
            rotate: Script::new(ROTATE),
            revoke: Script::new(REVOKE),
            gcra: Script::new(super::fleet::GCRA),
            refund: Script::new(REFUND),
        })
    }

    pub fn family_key(&self, family: u128) -> String {
        format!("{}:fam:{{{family:032x}}}", self.prefix)
    }

    pub fn index_key(&self, hash: &TokenHash) -> String {
        format!("{}:rt:{{{}}}", self.prefix, hex(hash))
    }

    /// Run one call, counted by `op` and outcome.
    pub(super) fn call<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut dyn redis::ConnectionLike) -> redis::RedisResult<T>,
    ) -> Result<T, StateError> {
        let started = std::time::Instant::now();
        match self.pool.with(f) {
            Ok(v) => {
                METRICS.redis_calls.with_label_values(&[op, "ok"]).inc();
                METRICS
                    .redis_call_duration
                    .observe(started.elapsed().as_secs_f64());
                Ok(v)
            }
            // Contention for the pool is not Redis being down: state_up
            // stays as it is.
            Err(PoolError::Busy) => {
                METRICS.redis_calls.with_label_values(&[op, "busy"]).inc();
                Err(StateError::Unavailable(format!(
                    "Redis {op}: every connection of the token endpoints stayed busy"
                )))
            }
            Err(PoolError::Redis(e)) => {
                let outcome = if e.is_timeout() { "timeout" } else { "error" };
                METRICS.redis_calls.with_label_values(&[op, outcome]).inc();
                Err(unavailable(op, &e))
            }
        }
    }

    fn family_of(&self, hash: &TokenHash) -> Result<Option<u128>, StateError> {
        let key = self.index_key(hash);
        let family: Option<String> =
            self.call("refresh_index", |c| redis::cmd("GET").arg(&key).query(c))?;
        Ok(family.and_then(|f| u128::from_str_radix(&f, 16).ok()))
    }

    /// The MAC of a family record whose live token is `token` (hex).
    fn mac(&self, family: u128, user: &str, auth_time: u64, token: &str, expires: u64) -> String {
        mac_under(&self.record_key, family, user, auth_time, token, expires)
    }

    /// Whether `mac` (as read) authenticates the record under the key or
    /// the previous one; a record without one passes only under
    /// `accept_unsigned_records`.
    fn authentic(&self, mac: Option<&str>, record: &RefreshRecord, token: &str) -> bool {
        let Some(mac) = mac else {
            return self.accept_unsigned;
        };
        let r = record;
        [Some(&self.record_key), self.previous_record_key.as_ref()]
            .into_iter()
            .flatten()
            .any(|key| {
                let expected = mac_under(key, r.family, &r.user, r.auth_time, token, r.expires_at);
                subtle::ConstantTimeEq::ct_eq(mac.as_bytes(), expected.as_bytes()).into()
            })
    }

    /// The record of `hash` in `family` (spent unless it is the live
    /// token), and whether the family is revoked. A live token whose
    /// record does not authenticate under `record_key` is unknown.
    fn lookup(
        &self,
        family: u128,
        hash: &TokenHash,
    ) -> Result<Option<(RefreshRecord, bool)>, StateError> {
        let key = self.family_key(family);
        type Fields = (
            Option<String>,
            Option<String>,
            Option<String>,
            Option<u64>,
            Option<u64>,
            Option<u64>,
            Option<String>,
        );
        let (user, revoked, current, issued, expires, auth_time, mac): Fields =
            self.call("refresh_read", |c| {
                redis::cmd("HMGET")
                    .arg(&key)
                    .arg("u")
                    .arg("r")
                    .arg("c")
                    .arg("ci")
                    .arg("ce")
                    .arg("a")
                    .arg("m")
                    .query(c)
            })?;
        let Some(user) = user else {
            return Ok(None);
        };
        let presented = hex(hash);
        let live = current.as_deref() == Some(presented.as_str());
        let record = RefreshRecord {
            user,
            family,
            issued_at: issued.unwrap_or(0),
            expires_at: expires.unwrap_or(0),
            spent: !live,
            // Unknown: before any cutoff a user's tokens_valid_after sets.
            auth_time: auth_time.unwrap_or(0),
        };
        if live && revoked.is_none() && !self.authentic(mac.as_deref(), &record, &presented) {
            METRICS
                .state_errors
                .with_label_values(&["unauthenticated_record"])
                .inc();
            tracing::warn!(
                family = %format!("{family:032x}"),
                "a refresh family in Redis does not authenticate under [state] record_key \
                 (written without the key, or before keygate signed its records); refused"
            );
            return Ok(None);
        }
        Ok(Some((record, revoked.is_some())))
    }

    fn write_index(
        &self,
        hash: &TokenHash,
        family: u128,
        expires_at: u64,
    ) -> Result<(), StateError> {
        let key = self.index_key(hash);
        self.call("refresh_index", |c| {
            redis::cmd("SET")
                .arg(&key)
                .arg(format!("{family:032x}"))
                .arg("EXAT")
                .arg(expires_at)
                .query::<()>(c)
        })
    }

    /// One GCRA step (or a look, with `peek`) on Redis' clock.
    fn gcra(&self, account: AccountId, quota: &Quota, peek: bool) -> Result<Outcome, StateError> {
        let key = format!("{}:limit:{{{account:032x}}}", self.prefix);
        let mut inv = self.gcra.key(key);
        inv.arg(quota.interval_us())
            .arg(quota.tolerance_us())
            .arg(u8::from(!peek));
        let (granted, base_us): (u64, u64) = self.call("throttle", |c| inv.invoke(c))?;
        Ok(if peek {
            super::fleet::look(quota, base_us)
        } else {
            super::fleet::unit(quota, granted, base_us, 1)
        })
    }

    /// Make `hash` its family's live token. `mode` 1: only if the family
    /// has none; 2: only make sure the family (and its user) exists.
    fn set_live(&self, hash: &TokenHash, r: &RefreshRecord, mode: u8) -> Result<(), StateError> {
        let key = self.family_key(r.family);
        let token = hex(hash);
        let mac = self.mac(r.family, &r.user, r.auth_time, &token, r.expires_at);
        let mut inv = self.insert.key(key);
        inv.arg(&r.user)
            .arg(token)
            .arg(r.issued_at)
            .arg(r.expires_at)
            .arg(mode)
            .arg(r.auth_time)
            .arg(mac);
        self.call("refresh_insert", |c| inv.invoke::<i64>(c))
            .map(|_| ())
    }

    /// Write one exported record (see `keygate state import`).
    pub fn import_limit(&self, s: &Snapshot) -> Result<(), StateError> {
        let key = format!("{}:limit:{{{:032x}}}", self.prefix, s.account);
        // Expire when the bucket is full again, as the script does.
        let now_us = crate::clock::unix_now_us();
        let ms = s.tat_us.saturating_sub(now_us) / 1000 + 1000;
        self.call("import", |c| {
            redis::pipe()
                .atomic()
                .cmd("HSET")
                .arg(&key)
                .arg("t")
                .arg(s.tat_us)
                .arg("i")
                .arg(s.interval_us)
                .ignore()
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(ms)
                .ignore()
                .query::<()>(c)
        })
    }

    /// `PING`, for `/readyz` and `keygate check --connect`: on a spare
    /// connection when the pool's are all busy.
    pub fn ping(&self) -> Result<(), StateError> {
        match self
            .pool
            .with_spare(|c| redis::cmd("PING").query::<String>(c))
        {
            Ok(_) => {
                METRICS.redis_calls.with_label_values(&["ping", "ok"]).inc();
                Ok(())
            }
            Err(e) => {
                let outcome = if e.is_timeout() { "timeout" } else { "error" };
                METRICS
                    .redis_calls
                    .with_label_values(&["ping", outcome])
                    .inc();
                Err(unavailable("ping", &e))
            }
        }
    }
}

/// HMAC-SHA256 under `key` of a family record: a version tag, then each
/// field fixed-width or length-prefixed, so no two records read the same.
fn mac_under(
    key: &[u8],
    family: u128,
    user: &str,
    auth_time: u64,
    token: &str,
    expires: u64,
) -> String {
    use hmac::{Hmac, Mac};
    let mut m = <Hmac<sha2::Sha256>>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(b"keygate refresh family v1");
    m.update(&family.to_be_bytes());
    m.update(&(user.len() as u64).to_be_bytes());
    m.update(user.as_bytes());
    m.update(&auth_time.to_be_bytes());
    m.update(&(token.len() as u64).to_be_bytes());
    m.update(token.as_bytes());
    m.update(&expires.to_be_bytes());
    hex(&m.finalize().into_bytes().into())
}

fn unavailable(op: &str, e: &redis::RedisError) -> StateError {
    METRICS.state_up.set(0);
    // A redis error never holds the password; the URL is not in it either.
    StateError::Unavailable(format!("Redis {op}: {e}"))
}

fn hex(hash: &TokenHash) -> String {
    use std::fmt::Write;
    hash.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

impl StateStore for RedisStore {
    /// Limits live in Redis itself; the local fallback limiter is not kept.
    fn load_limits(&self) -> Result<Vec<Snapshot>, StateError> {
        Ok(Vec::new())
    }

    fn save_limits(&self, _entries: &[Snapshot]) -> Result<(), StateError> {
        Ok(())
    }

    fn forget_limits(&self, _accounts: &[AccountId]) -> Result<(), StateError> {
        Ok(())
    }

    fn insert_refresh(&self, hash: &TokenHash, r: &RefreshRecord) -> Result<(), StateError> {
        // The index first: a token whose family write failed is never
        // handed out, and its index entry expires unused.
        self.write_index(hash, r.family, r.expires_at)?;
        self.set_live(hash, r, 0)
    }

    fn rotate_refresh(
        &self,
        hash: &TokenHash,
        now: u64,
        revoke_until: u64,
        successor: &mut dyn FnMut(&RefreshRecord) -> Option<(TokenHash, RefreshRecord)>,
    ) -> Result<Rotation, StateError> {
        let Some(family) = self.family_of(hash)? else {
            return Ok(Rotation::Unknown);
        };
        let Some((old, revoked)) = self.lookup(family, hash)? else {
            return Ok(Rotation::Unknown);
        };
        // Checked again, atomically, by the script; these only decide
        // whether a successor is worth making.
        let next = if revoked || old.spent || old.expires_at <= now {
            None
        } else {
            match successor(&old) {
                None => return Ok(Rotation::Refused),
                Some((new_hash, new)) => {
                    // The family's user and start, whatever the successor says.
                    let new = RefreshRecord {
                        user: old.user.clone(),
                        auth_time: old.auth_time,
                        ..new
                    };
                    self.write_index(&new_hash, new.family, new.expires_at)?;
                    Some((new_hash, new))
                }
            }
        };
        let (new_token, issued, expires, mac) = match &next {
            Some((h, r)) => {
                let token = hex(h);
                let mac = self.mac(family, &r.user, r.auth_time, &token, r.expires_at);
                (token, r.issued_at, r.expires_at, mac)
            }
            None => (String::new(), 0, 0, String::new()),
        };
        let key = self.family_key(family);
        let mut inv = self.rotate.key(key);
        inv.arg(hex(hash))
            .arg(new_token)
            .arg(issued)
            .arg(expires)
            .arg(now)
            .arg(revoke_until)
            .arg(mac);
        let verdict: String = self.call("refresh_rotate", |c| inv.invoke(c))?;
        Ok(match verdict.as_str() {
            "rotated" => match next {
                Some((_, new)) => Rotation::Rotated(new),
                None => Rotation::Unknown,
            },
            "reuse" => Rotation::ReuseDetected { user: old.user },
            "revoked" => Rotation::Revoked,
            "expired" => Rotation::Expired,
            // 'valid' (only looked) cannot follow a look that saw it
            // spent, revoked or expired: none of those is ever undone.
            _ => Rotation::Unknown,
        })
    }

    fn revoke_refresh(&self, hash: &TokenHash, revoke_until: u64) -> Result<bool, StateError> {
        let Some(family) = self.family_of(hash)? else {
            return Ok(false);
        };
        let key = self.family_key(family);
        let mut inv = self.revoke.key(key);
        inv.arg(revoke_until);
        let found: i64 = self.call("refresh_revoke", |c| inv.invoke(c))?;
        Ok(found == 1)
    }

    /// Redis expires tokens, families and throttles by itself.
    fn purge_expired(&self, _now: u64) -> Result<usize, StateError> {
        Ok(0)
    }

    fn export(&self) -> Result<Vec<Record>, StateError> {
        Err(StateError::Unsupported(
            "export reads the embedded store; back Redis up with its own RDB/AOF files",
        ))
    }

    fn import(&self, item: &Item) -> Result<(), StateError> {
        match item {
            Item::Limit(s) => self.import_limit(s),
            Item::Refresh(hash, r) => {
                // Never let an import undo a rotation or a spend: a spent
                // token only gets its index (so presenting it is reuse), a
                // live one becomes live only in a family without one.
                self.write_index(hash, r.family, r.expires_at)?;
                self.set_live(hash, r, if r.spent { 2 } else { 1 })
            }
            Item::Revoked { family, until } => {
                let key = self.family_key(*family);
                let mut inv = self.revoke.key(key);
                inv.arg(*until);
                self.call("import", |c| inv.invoke::<i64>(c)).map(|_| ())
            }
        }
    }
}

/// Login throttles: the process's limiter, or the fleet's in Redis. An
/// attempt spends its unit before the password is verified, and a login
/// that passes gets it back.
pub trait Throttles: Send + Sync {
    /// How `account` stands, without spending anything.
    fn peek(&self, account: AccountId, quota: &Quota, now_us: u64) -> Result<Outcome, StateError>;
    /// Spend one unit.
    fn hit(&self, account: AccountId, quota: &Quota, now_us: u64) -> Result<Outcome, StateError>;
    /// Give one unit back (never more than was spent).
    fn refund(&self, account: AccountId, quota: &Quota, now_us: u64) -> Result<(), StateError>;
}

impl Throttles for crate::limit::Limiter {
    fn peek(&self, account: AccountId, quota: &Quota, now_us: u64) -> Result<Outcome, StateError> {
        Ok(crate::limit::Limiter::peek(self, account, quota, now_us))
    }

    fn hit(&self, account: AccountId, quota: &Quota, now_us: u64) -> Result<Outcome, StateError> {
        Ok(self.check(account, quota, now_us))
    }

    fn refund(&self, account: AccountId, quota: &Quota, now_us: u64) -> Result<(), StateError> {
        crate::limit::Limiter::refund(self, account, quota, now_us);
        Ok(())
    }
}

impl Throttles for RedisStore {
    fn peek(&self, account: AccountId, quota: &Quota, _now_us: u64) -> Result<Outcome, StateError> {
        self.gcra(account, quota, true)
    }

    fn hit(&self, account: AccountId, quota: &Quota, _now_us: u64) -> Result<Outcome, StateError> {
        self.gcra(account, quota, false)
    }

    fn refund(&self, account: AccountId, quota: &Quota, _now_us: u64) -> Result<(), StateError> {
        let key = format!("{}:limit:{{{account:032x}}}", self.prefix);
        let mut inv = self.refund.key(key);
        inv.arg(quota.interval_us());
        self.call("throttle", |c| inv.invoke::<i64>(c)).map(|_| ())
    }
}

/// Move an account's TAT back by one interval, not before now, and only
/// under the same rate (a tier change in between owes nothing back).
/// KEYS[1]: the account's hash. ARGV[1]: the interval (µs).
const REFUND: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = redis.call('HMGET', KEYS[1], 't', 'i')
local tat = tonumber(state[1])
if tat == nil or state[2] ~= ARGV[1] then return 0 end
local back = tat - tonumber(ARGV[1])
if back < now then back = now end
redis.call('HSET', KEYS[1], 't', string.format('%.0f', back))
return 1
"#;
