//! Durable state in `server.state_dir`: limiter snapshots now, refresh
//! tokens later. Behind [`StateStore`] so a networked backend can be added;
//! the embedded one is redb (pure Rust, ACID, copy-on-write B-trees, crash
//! safe by default: a commit is durable when it returns).
//!
//! Limiter state is written behind: [`spawn_flusher`] runs on its own
//! thread, so disk latency or errors never reach a proxy thread.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::limit::{AccountId, Limiter, Snapshot};
use crate::metrics::METRICS;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create the state directory {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error("state store: {0}")]
    Store(#[from] redb::Error),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StateError {
            fn from(e: $t) -> Self {
                StateError::Store(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub trait StateStore: Send + Sync {
    fn load_limits(&self) -> Result<Vec<Snapshot>, StateError>;
    fn save_limits(&self, entries: &[Snapshot]) -> Result<(), StateError>;
    fn forget_limits(&self, accounts: &[AccountId]) -> Result<(), StateError>;
}

/// account → (emission interval µs, TAT µs since the Unix epoch)
const LIMITS: TableDefinition<u128, (u64, u64)> = TableDefinition::new("limits_v1");

pub struct RedbStore {
    db: Database,
}

impl RedbStore {
    pub fn open(dir: &Path) -> Result<RedbStore, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        let db = Database::create(dir.join("keygate.redb"))?;
        let txn = db.begin_write()?;
        txn.open_table(LIMITS)?;
        txn.commit()?;
        Ok(RedbStore { db })
    }
}

impl StateStore for RedbStore {
    fn load_limits(&self) -> Result<Vec<Snapshot>, StateError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LIMITS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            let (interval_us, tat_us) = v.value();
            out.push(Snapshot {
                account: k.value(),
                interval_us,
                tat_us,
            });
        }
        Ok(out)
    }

    fn save_limits(&self, entries: &[Snapshot]) -> Result<(), StateError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(LIMITS)?;
            for s in entries {
                table.insert(s.account, (s.interval_us, s.tat_us))?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn forget_limits(&self, accounts: &[AccountId]) -> Result<(), StateError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(LIMITS)?;
            for a in accounts {
                table.remove(*a)?;
            }
        }
        txn.commit()?;
        Ok(())
    }
}

/// How often changed limiter state is written, and idle accounts evicted.
pub const FLUSH_EVERY: Duration = Duration::from_millis(500);
pub const EVICT_EVERY: Duration = Duration::from_secs(10);

/// Write changed limiter state every [`FLUSH_EVERY`] and evict whole buckets
/// every [`EVICT_EVERY`], on a thread of its own, for the life of the process.
pub fn spawn_flusher(limiter: Arc<Limiter>, store: Arc<dyn StateStore>) {
    let spawned = std::thread::Builder::new()
        .name("keygate state".into())
        .spawn(move || {
            let mut since_evict = Duration::ZERO;
            loop {
                std::thread::sleep(FLUSH_EVERY);
                flush(&limiter, store.as_ref());
                since_evict += FLUSH_EVERY;
                if since_evict >= EVICT_EVERY {
                    since_evict = Duration::ZERO;
                    let evicted = limiter.evict_idle(crate::policy::unix_now_us());
                    if !evicted.is_empty() {
                        if let Err(e) = store.forget_limits(&evicted) {
                            METRICS.state_errors.with_label_values(&["evict"]).inc();
                            tracing::error!(error = %e, "could not drop evicted limiter state");
                        }
                    }
                }
                METRICS.limiter_accounts.set(limiter.len() as i64);
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the state writer; limiter state will not survive a restart");
    }
}

/// Write every changed account once. Public so tests and shutdown can call it.
pub fn flush(limiter: &Limiter, store: &dyn StateStore) {
    let dirty = limiter.dirty();
    if dirty.is_empty() {
        return;
    }
    let snapshots: Vec<Snapshot> = dirty.iter().map(|(s, _)| *s).collect();
    match store.save_limits(&snapshots) {
        Ok(()) => {
            for (s, state) in dirty {
                limiter.mark_persisted(s.account, state);
            }
        }
        Err(e) => {
            METRICS.state_errors.with_label_values(&["write"]).inc();
            tracing::error!(error = %e, "could not write limiter state; will retry");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    #[test]
    fn limiter_state_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let q = crate::limit::Quota::new(
            NonZeroU32::new(100).unwrap(),
            Duration::from_secs(3600),
            NonZeroU32::new(100).unwrap(),
        );
        let now = 1_780_000_000_000_000;
        let limiter = Limiter::new();
        for _ in 0..100 {
            limiter.check(11, &q, now);
        }
        {
            let store = RedbStore::open(dir.path()).unwrap();
            flush(&limiter, &store);
            assert!(limiter.dirty().is_empty());
        }
        let store = RedbStore::open(dir.path()).unwrap();
        let restored = Limiter::new();
        assert_eq!(
            restored.restore(store.load_limits().unwrap(), now + 1_000_000),
            1
        );
        assert!(!restored.check(11, &q, now + 1_000_000).allowed);
        store.forget_limits(&[11]).unwrap();
        assert!(store.load_limits().unwrap().is_empty());
    }
}
