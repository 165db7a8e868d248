//! Self-service API keys and account allowlists as stored: [`KeyRecord`]s
//! found by id, by SHA-256 and by owner, and [`KeyStore`], which the
//! embedded store implements here (redb: one write transaction per change,
//! durable when it returns) and Redis in `families`.

use redb::{
    MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable,
    TableDefinition,
};
use serde::{Deserialize, Serialize};

use super::{RedbStore, StateError};

/// One self-service key. The key itself is never stored: its SHA-256 is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    /// The owner's user id.
    pub user: String,
    pub name: String,
    /// The key's first characters, for lists.
    pub start: String,
    #[serde(with = "hex")]
    pub sha256: [u8; 32],
    pub permissions: Vec<String>,
    pub ip_allow: Vec<String>,
    /// Unix seconds, as are the other times.
    pub created_at: u64,
    pub expires_at: Option<u64>,
    #[serde(default)]
    pub revoked_at: Option<u64>,
    #[serde(default)]
    pub last_used_at: Option<u64>,
}

impl KeyRecord {
    /// Neither revoked nor expired at `now`.
    pub fn live(&self, now: u64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|t| now < t)
    }
}

/// What [`KeyStore::create`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    Stored,
    /// The owner holds this many live keys already (the cap).
    TooMany,
}

/// What [`KeyStore::roll`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rolled {
    /// The new key is stored; the old one (as it now is) ends at its new expiry.
    Rolled(Box<KeyRecord>),
    NotFound,
    /// The old key is revoked or expired already.
    NotLive,
}

pub trait KeyStore: Send + Sync {
    /// Store `record` unless its owner holds `max` live keys at `now`;
    /// the count and the write are one step, so parallel creates never
    /// pass the cap. Durable when this returns.
    fn create(&self, record: &KeyRecord, max: u32, now: u64) -> Result<Created, StateError>;
    fn get(&self, id: &str) -> Result<Option<KeyRecord>, StateError>;
    fn by_hash(&self, hash: &[u8; 32]) -> Result<Option<KeyRecord>, StateError>;
    /// Every key of `user`, live or not.
    fn list(&self, user: &str) -> Result<Vec<KeyRecord>, StateError>;
    /// Change key `id` with `change` in one step (which returns false to
    /// leave it as it was); the record as it is afterwards.
    fn update(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut KeyRecord) -> bool,
    ) -> Result<Option<KeyRecord>, StateError>;
    /// Store `new` and end `old_id` at `old_until` (if sooner than its own
    /// expiry), in one step, when `old_id` is live at `now`.
    fn roll(
        &self,
        old_id: &str,
        new: &KeyRecord,
        old_until: u64,
        now: u64,
    ) -> Result<Rolled, StateError>;
    /// Record use times (written behind, to the minute).
    fn touch(&self, used: &[(String, u64)]) -> Result<(), StateError>;
    /// The account allowlist of `user`; empty when it has none.
    fn account_allow(&self, user: &str) -> Result<Vec<String>, StateError>;
    fn set_account_allow(&self, user: &str, list: &[String]) -> Result<(), StateError>;
    /// Every account allowlist held (loaded at start).
    fn account_allows(&self) -> Result<Vec<(String, Vec<String>)>, StateError>;
}

/// key id → the record as JSON
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("selfkeys_v1");
/// SHA-256 → key id
const KEY_HASHES: TableDefinition<&[u8; 32], &str> = TableDefinition::new("selfkey_hashes_v1");
/// user id → its key ids
const USER_KEYS: MultimapTableDefinition<&str, &str> =
    MultimapTableDefinition::new("user_selfkeys_v1");
/// user id → its account allowlist as JSON
const ACCOUNT_ALLOW: TableDefinition<&str, &[u8]> = TableDefinition::new("account_ip_allow_v1");

fn encode(r: &KeyRecord) -> Vec<u8> {
    serde_json::to_vec(r).unwrap_or_default()
}

fn decode(bytes: &[u8]) -> Result<KeyRecord, StateError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StateError::Unavailable(format!("a stored key record is unreadable: {e}")))
}

impl RedbStore {
    /// Create the key tables (at open).
    pub(super) fn open_key_tables(txn: &redb::WriteTransaction) -> Result<(), StateError> {
        txn.open_table(KEYS)?;
        txn.open_table(KEY_HASHES)?;
        txn.open_multimap_table(USER_KEYS)?;
        txn.open_table(ACCOUNT_ALLOW)?;
        Ok(())
    }
}

fn insert(txn: &redb::WriteTransaction, r: &KeyRecord) -> Result<(), StateError> {
    txn.open_table(KEYS)?
        .insert(r.id.as_str(), encode(r).as_slice())?;
    txn.open_table(KEY_HASHES)?
        .insert(&r.sha256, r.id.as_str())?;
    txn.open_multimap_table(USER_KEYS)?
        .insert(r.user.as_str(), r.id.as_str())?;
    Ok(())
}

fn live_count(txn: &redb::WriteTransaction, user: &str, now: u64) -> Result<u32, StateError> {
    let ids = txn.open_multimap_table(USER_KEYS)?;
    let keys = txn.open_table(KEYS)?;
    let mut n = 0;
    for id in ids.get(user)? {
        let id = id?;
        if let Some(bytes) = keys.get(id.value())? {
            if decode(bytes.value())?.live(now) {
                n += 1;
            }
        }
    }
    Ok(n)
}

impl KeyStore for RedbStore {
    fn create(&self, record: &KeyRecord, max: u32, now: u64) -> Result<Created, StateError> {
        let txn = self.db.begin_write()?;
        if live_count(&txn, &record.user, now)? >= max {
            return Ok(Created::TooMany);
        }
        insert(&txn, record)?;
        txn.commit()?;
        Ok(Created::Stored)
    }

    fn get(&self, id: &str) -> Result<Option<KeyRecord>, StateError> {
        let txn = self.db.begin_read()?;
        let keys = txn.open_table(KEYS)?;
        let row = keys.get(id)?;
        row.map(|b| decode(b.value())).transpose()
    }

    fn by_hash(&self, hash: &[u8; 32]) -> Result<Option<KeyRecord>, StateError> {
        let txn = self.db.begin_read()?;
        let Some(id) = txn.open_table(KEY_HASHES)?.get(hash)? else {
            return Ok(None);
        };
        let keys = txn.open_table(KEYS)?;
        let row = keys.get(id.value())?;
        row.map(|b| decode(b.value())).transpose()
    }

    fn list(&self, user: &str) -> Result<Vec<KeyRecord>, StateError> {
        let txn = self.db.begin_read()?;
        let ids = txn.open_multimap_table(USER_KEYS)?;
        let keys = txn.open_table(KEYS)?;
        let mut out = Vec::new();
        for id in ids.get(user)? {
            if let Some(bytes) = keys.get(id?.value())? {
                out.push(decode(bytes.value())?);
            }
        }
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    fn update(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut KeyRecord) -> bool,
    ) -> Result<Option<KeyRecord>, StateError> {
        let txn = self.db.begin_write()?;
        let mut record = {
            let keys = txn.open_table(KEYS)?;
            let row = keys.get(id)?;
            match row {
                None => return Ok(None),
                Some(b) => decode(b.value())?,
            }
        };
        if change(&mut record) {
            txn.open_table(KEYS)?
                .insert(id, encode(&record).as_slice())?;
            txn.commit()?;
        }
        Ok(Some(record))
    }

    fn roll(
        &self,
        old_id: &str,
        new: &KeyRecord,
        old_until: u64,
        now: u64,
    ) -> Result<Rolled, StateError> {
        let txn = self.db.begin_write()?;
        let mut old = {
            let keys = txn.open_table(KEYS)?;
            let row = keys.get(old_id)?;
            match row {
                None => return Ok(Rolled::NotFound),
                Some(b) => decode(b.value())?,
            }
        };
        if !old.live(now) {
            return Ok(Rolled::NotLive);
        }
        old.expires_at = Some(old.expires_at.map_or(old_until, |t| t.min(old_until)));
        txn.open_table(KEYS)?
            .insert(old_id, encode(&old).as_slice())?;
        insert(&txn, new)?;
        txn.commit()?;
        Ok(Rolled::Rolled(Box::new(old)))
    }

    fn touch(&self, used: &[(String, u64)]) -> Result<(), StateError> {
        let txn = self.db.begin_write()?;
        {
            let mut keys = txn.open_table(KEYS)?;
            for (id, at) in used {
                let record = match keys.get(id.as_str())? {
                    None => continue,
                    Some(b) => decode(b.value())?,
                };
                if record.last_used_at.is_none_or(|t| t < *at) {
                    let record = KeyRecord {
                        last_used_at: Some(*at),
                        ..record
                    };
                    keys.insert(id.as_str(), encode(&record).as_slice())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn account_allow(&self, user: &str) -> Result<Vec<String>, StateError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ACCOUNT_ALLOW)?;
        let row = table.get(user)?;
        Ok(row
            .and_then(|b| serde_json::from_slice(b.value()).ok())
            .unwrap_or_default())
    }

    fn set_account_allow(&self, user: &str, list: &[String]) -> Result<(), StateError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(ACCOUNT_ALLOW)?;
            if list.is_empty() {
                table.remove(user)?;
            } else {
                let json = serde_json::to_vec(list).unwrap_or_default();
                table.insert(user, json.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn account_allows(&self) -> Result<Vec<(String, Vec<String>)>, StateError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ACCOUNT_ALLOW)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            let list: Vec<String> = serde_json::from_slice(v.value()).unwrap_or_default();
            out.push((k.value().to_string(), list));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, user: &str, hash: u8) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            user: user.into(),
            name: "ci".into(),
            start: "kg_abcd".into(),
            sha256: [hash; 32],
            permissions: vec!["vms:read".into()],
            ip_allow: vec![],
            created_at: 100,
            expires_at: None,
            revoked_at: None,
            last_used_at: None,
        }
    }

    #[test]
    fn the_cap_counts_live_keys_only_and_roll_ends_the_old_key() {
        let dir = std::env::temp_dir().join(format!("kg-keys-{}", rand::random::<u64>()));
        let store = RedbStore::open(&dir).unwrap();
        assert_eq!(
            store.create(&record("key_a", "u1", 1), 2, 100).unwrap(),
            Created::Stored
        );
        assert_eq!(
            store.create(&record("key_b", "u1", 2), 2, 100).unwrap(),
            Created::Stored
        );
        assert_eq!(
            store.create(&record("key_c", "u1", 3), 2, 100).unwrap(),
            Created::TooMany
        );
        assert_eq!(
            store.create(&record("key_d", "u2", 4), 2, 100).unwrap(),
            Created::Stored
        );
        store
            .update("key_a", &mut |r| {
                r.revoked_at = Some(150);
                true
            })
            .unwrap();
        assert_eq!(
            store.create(&record("key_c", "u1", 3), 2, 200).unwrap(),
            Created::Stored
        );
        assert_eq!(store.by_hash(&[3; 32]).unwrap().unwrap().id, "key_c");
        assert_eq!(store.list("u1").unwrap().len(), 3);
        match store
            .roll("key_b", &record("key_e", "u1", 5), 260, 200)
            .unwrap()
        {
            Rolled::Rolled(old) => assert_eq!(old.expires_at, Some(260)),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            store
                .roll("key_a", &record("key_f", "u1", 6), 260, 200)
                .unwrap(),
            Rolled::NotLive
        );
        assert!(!store.get("key_b").unwrap().unwrap().live(260));
        store.touch(&[("key_e".into(), 240)]).unwrap();
        assert_eq!(store.get("key_e").unwrap().unwrap().last_used_at, Some(240));
        store
            .set_account_allow("u1", &["10.0.0.0/8".into()])
            .unwrap();
        assert_eq!(store.account_allows().unwrap().len(), 1);
        store.set_account_allow("u1", &[]).unwrap();
        assert!(store.account_allow("u1").unwrap().is_empty());
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
    }
}
