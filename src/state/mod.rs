//! State that outlives a request: limiter state, refresh-token families
//! and login throttles. [`StateStore`] is what both stores implement:
//! [`RedbStore`] (embedded, in `server.state_dir`) and, for a fleet, Redis
//! ([`families`]: refresh tokens and login throttles; [`fleet`]: limits;
//! [`topology`]: the connections). [`migrate`] moves the embedded store's
//! state to Redis or to another embedded store.
//!
//! Limiter state is written behind: [`spawn_flusher`] runs on its own
//! thread, so disk latency or errors never reach a proxy thread.

use std::sync::Arc;
use std::time::Duration;

mod embedded;
pub mod families;
pub mod fleet;
pub mod keys;
mod keys_redis;
pub mod migrate;
pub mod topology;

use crate::limit::{AccountId, Limiter, Snapshot};
use crate::metrics::METRICS;
use migrate::{Item, Record};

pub use embedded::RedbStore;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create the state directory {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error("state store: {0}")]
    Store(#[from] redb::Error),
    /// The shared store (Redis) did not answer in time, or failed.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Unsupported(&'static str),
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

    /// Store a new refresh token; durable when this returns.
    fn insert_refresh(&self, hash: &TokenHash, record: &RefreshRecord) -> Result<(), StateError>;
    /// Spend the token `hash` and store its successor, in one transaction
    /// (see [`Rotation`]). `successor` sees the old record and either names
    /// the new token or refuses. Durable when this returns.
    /// A family revoked here stays revoked until `revoke_until` (Unix
    /// seconds), which must outlast the family's newest token.
    fn rotate_refresh(
        &self,
        hash: &TokenHash,
        now: u64,
        revoke_until: u64,
        successor: &mut dyn FnMut(&RefreshRecord) -> Option<(TokenHash, RefreshRecord)>,
    ) -> Result<Rotation, StateError>;
    /// Revoke the family of `hash`, if the token is known, until `revoke_until`.
    fn revoke_refresh(&self, hash: &TokenHash, revoke_until: u64) -> Result<bool, StateError>;
    /// Drop expired tokens and revocation marks. Returns how many.
    fn purge_expired(&self, now: u64) -> Result<usize, StateError>;

    /// Everything held, for `keygate state export`.
    fn export(&self) -> Result<Vec<Record>, StateError>;
    /// Write one exported item as it was (`keygate state import`).
    fn import(&self, item: &Item) -> Result<(), StateError>;
}

/// SHA-256 of a refresh token: the token itself is never stored.
pub type TokenHash = [u8; 32];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshRecord {
    pub user: String,
    /// Every token descending from one login shares it.
    pub family: u128,
    /// Unix seconds.
    pub issued_at: u64,
    pub expires_at: u64,
    pub spent: bool,
    /// When the family started: the login (Unix seconds). Every rotation
    /// carries it on unchanged; a user's `tokens_valid_after` is compared
    /// with it, never with `issued_at`, which each rotation resets.
    pub auth_time: u64,
}

type RefreshRow<'a> = (&'a str, u128, u64, u64, bool, u64);

impl RefreshRecord {
    fn row(&self) -> RefreshRow<'_> {
        (
            self.user.as_str(),
            self.family,
            self.issued_at,
            self.expires_at,
            self.spent,
            self.auth_time,
        )
    }

    fn from_row((user, family, issued_at, expires_at, spent, auth_time): RefreshRow<'_>) -> Self {
        RefreshRecord {
            user: user.to_string(),
            family,
            issued_at,
            expires_at,
            spent,
            auth_time,
        }
    }

    /// What an import leaves of `self` (held) and `imported` (the same
    /// token, from an export): never un-spent, the later expiry, the
    /// earlier family start.
    fn merged(&self, imported: &RefreshRecord) -> RefreshRecord {
        RefreshRecord {
            spent: self.spent || imported.spent,
            issued_at: self.issued_at.max(imported.issued_at),
            expires_at: self.expires_at.max(imported.expires_at),
            auth_time: self.auth_time.min(imported.auth_time),
            ..self.clone()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    /// The old token is spent; the new one is stored.
    Rotated(RefreshRecord),
    Unknown,
    Expired,
    /// The family was revoked (by reuse, by revocation) earlier.
    Revoked,
    /// A spent token came back: its whole family is now revoked.
    ReuseDetected {
        user: String,
    },
    /// `successor` refused (the user is gone, disabled, or cut off).
    Refused,
}

/// How often changed limiter state is written, and idle accounts evicted.
pub const FLUSH_EVERY: Duration = Duration::from_millis(500);
pub const EVICT_EVERY: Duration = Duration::from_secs(10);
/// How often expired refresh tokens and revocation marks are dropped.
pub const PURGE_EVERY: Duration = Duration::from_secs(600);

/// Write changed limiter state every [`FLUSH_EVERY`] and evict whole buckets
/// every [`EVICT_EVERY`], on a thread of its own, for the life of the process.
pub fn spawn_flusher(limiter: Arc<Limiter>, store: Arc<dyn StateStore>) {
    let spawned = std::thread::Builder::new()
        .name("keygate state".into())
        .spawn(move || {
            let mut since_evict = Duration::ZERO;
            let mut since_purge = Duration::ZERO;
            loop {
                std::thread::sleep(FLUSH_EVERY);
                flush(&limiter, store.as_ref());
                since_evict += FLUSH_EVERY;
                if since_evict >= EVICT_EVERY {
                    since_evict = Duration::ZERO;
                    since_purge += EVICT_EVERY;
                    if since_purge >= PURGE_EVERY {
                        since_purge = Duration::ZERO;
                        match store.purge_expired(crate::clock::unix_now()) {
                            Ok(n) if n > 0 => tracing::info!(purged = n, "expired refresh tokens purged"),
                            Ok(_) => {}
                            Err(e) => {
                                METRICS.state_errors.with_label_values(&["purge"]).inc();
                                tracing::error!(error = %e, "could not purge expired refresh tokens");
                            }
                        }
                    }
                    let evicted = limiter.evict_idle(crate::clock::unix_now_us());
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
