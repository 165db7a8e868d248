//! The verified-token cache of a policy (see `gate::jwt`).

use super::UserIdx;

/// Verified tokens and what the gate needs to re-check on each use: the
/// time claims. Keyed by the whole token, so only a byte-identical token
/// hits. Bounded: when full it is emptied and refills with tokens in use.
pub struct TokenCache {
    map: dashmap::DashMap<Box<str>, VerifiedToken>,
    capacity: usize,
    /// Entries inserted since the last clear (`DashMap::len` locks every shard).
    count: std::sync::atomic::AtomicUsize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VerifiedToken {
    pub user: UserIdx,
    pub exp: f64,
    pub nbf: Option<f64>,
    pub iat: Option<f64>,
}

impl TokenCache {
    pub const CAPACITY: usize = 50_000;

    pub fn new(capacity: usize) -> TokenCache {
        TokenCache {
            map: dashmap::DashMap::new(),
            capacity,
            count: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    pub fn get(&self, token: &str) -> Option<VerifiedToken> {
        self.map.get(token).map(|v| *v)
    }

    /// Past capacity the whole cache is dropped: cheap, and a client
    /// re-verifies its token once.
    pub fn insert(&self, token: &str, verified: VerifiedToken) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.count.fetch_add(1, Relaxed) >= self.capacity {
            self.clear();
            self.count.store(1, Relaxed);
        }
        self.map.insert(token.into(), verified);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn clear(&self) {
        self.map.clear();
        self.count.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenCache({} of {})", self.map.len(), self.capacity)
    }
}
