//! Self-service API keys at run time: [`SelfKeys`] holds the cache of
//! looked-up key hashes (found and unknown, each for a short while), the
//! accounts' own allowlists (all of them, in memory), the write-behind of
//! `last_used_at`, and the throttle on unknown keys from one address. It
//! answers the gate's [`StoredKeys`] without waiting; the proxy asks the
//! store on a miss ([`SelfKeys::fetch`]). [`manage`] is the key API.

pub mod manage;

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;

use crate::gate::stored::{Lookup, StoredKey, StoredKeys};
use crate::limit::{Limiter, Quota};
use crate::metrics::METRICS;
use crate::policy::{Allowlist, IpSet, Permissions};
use crate::state::keys::{KeyRecord, KeyStore};

/// How long a found key is trusted without asking the store again. Changes
/// made through this sidecar (and, in a fleet, announced through Redis)
/// drop the entry at once; this bounds what a missed announcement costs.
pub const FOUND_TTL: Duration = Duration::from_secs(60);
/// How long an unknown key stays unknown without asking again. A key made
/// here drops its entry at once.
pub const UNKNOWN_TTL: Duration = Duration::from_secs(10);
/// Cached hashes at most; past it, expired entries go, then all.
pub const CACHE_CAPACITY: usize = 100_000;
/// Unknown well-formed keys one address may present per minute before
/// its further unknown keys are refused without a store lookup.
pub const UNKNOWN_PER_MINUTE: u32 = 100;
/// How often noted uses are written as `last_used_at`.
pub const TOUCH_EVERY: Duration = Duration::from_secs(10);
/// How often a fleet sidecar reads the changes the others announced.
pub const FOLLOW_EVERY: Duration = Duration::from_millis(200);

/// Reads the fleet's change stream after an id: the newest id and the
/// changes (key hashes in hex, `acct:<user>`), or `None` when changes were
/// missed.
pub type Changes =
    dyn Fn(&str) -> Result<(String, Option<Vec<String>>), crate::state::StateError> + Send + Sync;

struct Entry {
    key: Option<Arc<StoredKey>>,
    until_us: u64,
}

pub struct SelfKeys {
    pub store: Arc<dyn KeyStore>,
    cache: DashMap<[u8; 32], Entry>,
    allows: DashMap<Box<str>, Arc<Allowlist>>,
    /// How many users have an account allowlist: none, and the per-request
    /// check is one atomic load.
    restricted: AtomicUsize,
    /// key id → minute of last use, not yet written.
    used: Mutex<HashMap<Box<str>, u64>>,
    unknown: Limiter,
    unknown_quota: Quota,
    /// Grows with every invalidation: a lookup that raced one is not
    /// cached (what it read may be what was just invalidated).
    generation: AtomicU64,
}

impl SelfKeys {
    /// Over `store`, with every account allowlist it holds loaded.
    pub fn new(store: Arc<dyn KeyStore>) -> SelfKeys {
        let per_minute = NonZeroU32::new(UNKNOWN_PER_MINUTE).unwrap_or(NonZeroU32::MIN);
        let keys = SelfKeys {
            store,
            cache: DashMap::new(),
            allows: DashMap::new(),
            restricted: AtomicUsize::new(0),
            used: Mutex::default(),
            unknown: Limiter::new(),
            unknown_quota: Quota::new(per_minute, Duration::from_secs(60), per_minute),
            generation: AtomicU64::new(0),
        };
        match keys.store.account_allows() {
            Ok(all) => {
                for (user, list) in all {
                    keys.set_allow(&user, &list);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot load the account allowlists"),
        }
        keys
    }

    /// Ask the store about `hash` (on the blocking pool), cache the answer
    /// and return it. `client` has presented too many unknown keys lately:
    /// refused as unknown without asking.
    pub async fn fetch(self: &Arc<Self>, hash: [u8; 32], client: IpAddr, now_us: u64) -> Lookup {
        let account = crate::limit::account_id("selfkey-unknown", &client.to_string());
        if !self
            .unknown
            .peek(account, &self.unknown_quota, now_us)
            .allowed
        {
            METRICS.key_lookups.with_label_values(&["refused"]).inc();
            return Lookup::Refused;
        }
        let generation = self.generation.load(Ordering::Acquire);
        let keys = self.clone();
        let found = tokio::task::spawn_blocking(move || keys.store.by_hash(&hash))
            .await
            .unwrap_or_else(|_| Err(crate::state::StateError::Unavailable("lookup".into())));
        let now = now_us / 1_000_000;
        match found {
            Err(e) => {
                METRICS.key_lookups.with_label_values(&["error"]).inc();
                tracing::warn!(error = %e, "self-service key lookup failed");
                Lookup::Unavailable
            }
            Ok(Some(record)) if record.live(now) => {
                METRICS.key_lookups.with_label_values(&["found"]).inc();
                let key = Arc::new(stored_key(&record));
                let until = now_us + FOUND_TTL.as_micros() as u64;
                self.insert(generation, hash, Some(key.clone()), until);
                Lookup::Found(key)
            }
            Ok(_) => {
                METRICS.key_lookups.with_label_values(&["unknown"]).inc();
                self.unknown.check(account, &self.unknown_quota, now_us);
                let until = now_us + UNKNOWN_TTL.as_micros() as u64;
                self.insert(generation, hash, None, until);
                Lookup::Unknown
            }
        }
    }

    /// Cache what a lookup that started at `generation` found, unless an
    /// invalidation came in between.
    fn insert(&self, generation: u64, hash: [u8; 32], key: Option<Arc<StoredKey>>, until_us: u64) {
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if self.cache.len() >= CACHE_CAPACITY {
            let now = crate::clock::unix_now_us();
            self.cache.retain(|_, e| e.until_us > now);
            if self.cache.len() >= CACHE_CAPACITY {
                self.cache.clear();
            }
        }
        self.cache.insert(hash, Entry { key, until_us });
    }

    /// Forget what is cached of `hash` (its key changed, or was made).
    pub fn invalidate(&self, hash: &[u8; 32]) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.cache.remove(hash);
    }

    /// Forget everything cached.
    fn clear(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.cache.clear();
    }

    /// Entries held, for tests and metrics.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Replace the account allowlist of `user` in memory (CIDRs already valid).
    pub fn set_allow(&self, user: &str, list: &[String]) {
        let had = if list.is_empty() {
            self.allows.remove(user).is_some()
        } else {
            let set = Arc::new(Allowlist(ip_set(list)));
            self.allows.insert(user.into(), set).is_some()
        };
        match (had, list.is_empty()) {
            (false, false) => {
                self.restricted.fetch_add(1, Ordering::Relaxed);
            }
            (true, true) => {
                self.restricted.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// Note a use of `key` at `now` (seconds): written behind, to the minute.
    pub fn used(&self, key: &StoredKey, now: u64) {
        let minute = now / 60 * 60;
        if key.used_minute.swap(minute, Ordering::Relaxed) == minute {
            return;
        }
        if let Ok(mut used) = self.used.lock() {
            used.insert(key.id.clone(), minute);
        }
    }

    /// Write the noted uses.
    pub fn write_uses(&self) {
        let used: Vec<(String, u64)> = match self.used.lock() {
            Ok(mut used) => used.drain().map(|(k, v)| (k.into(), v)).collect(),
            Err(_) => return,
        };
        if used.is_empty() {
            return;
        }
        if let Err(e) = self.store.touch(&used) {
            METRICS.state_errors.with_label_values(&["write"]).inc();
            tracing::warn!(error = %e, "could not write last_used_at of self-service keys");
        }
    }

    /// Write noted uses every [`TOUCH_EVERY`] on a thread of its own.
    pub fn spawn_writer(self: &Arc<Self>) {
        let keys = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("keygate key uses".into())
            .spawn(move || loop {
                std::thread::sleep(TOUCH_EVERY);
                match keys.upgrade() {
                    Some(keys) => {
                        keys.write_uses();
                        keys.unknown.evict_idle(crate::clock::unix_now_us());
                    }
                    None => return,
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the last_used_at writer");
        }
    }
}

impl SelfKeys {
    /// Follow the fleet's announcements every [`FOLLOW_EVERY`] on a thread
    /// of its own: drop each changed hash, reload each changed account
    /// allowlist; drop everything when changes were missed. While Redis
    /// cannot be read, cached entries live out their time.
    /// `active` says whether self-service keys are on (reads are skipped
    /// while they are off).
    pub fn follow(self: &Arc<Self>, changes: Box<Changes>, active: Box<dyn Fn() -> bool + Send>) {
        let keys = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("keygate key changes".into())
            .spawn(move || {
                let mut after = "$".to_string();
                let mut failing = false;
                loop {
                    let Some(keys) = keys.upgrade() else { return };
                    if !active() {
                        // Nothing is looked up meanwhile; start afresh when on.
                        keys.clear();
                        after = "$".to_string();
                        drop(keys);
                        std::thread::sleep(FOLLOW_EVERY);
                        continue;
                    }
                    match changes(&after) {
                        Ok((last, changed)) => {
                            if failing {
                                tracing::info!("reading key changes from Redis again");
                                failing = false;
                                // What changed meanwhile is unknown.
                                keys.clear();
                            }
                            after = last;
                            keys.apply(changed);
                        }
                        Err(e) => {
                            if !failing {
                                tracing::warn!(error = %e, "cannot read key changes from Redis; cached keys live out their time");
                            }
                            failing = true;
                        }
                    }
                    drop(keys);
                    std::thread::sleep(FOLLOW_EVERY);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the key change follower");
        }
    }

    fn apply(&self, changed: Option<Vec<String>>) {
        let Some(changed) = changed else {
            self.clear();
            if let Ok(all) = self.store.account_allows() {
                for (user, list) in all {
                    self.set_allow(&user, &list);
                }
            }
            return;
        };
        for c in changed {
            if let Some(user) = c.strip_prefix("acct:") {
                if let Ok(list) = self.store.account_allow(user) {
                    self.set_allow(user, &list);
                }
            } else if let Ok(bytes) = hex::decode(&c) {
                if let Ok(hash) = <[u8; 32]>::try_from(bytes.as_slice()) {
                    self.invalidate(&hash);
                }
            }
        }
    }
}

impl StoredKeys for SelfKeys {
    fn lookup(&self, hash: &[u8; 32], now_us: u64) -> Lookup {
        match self.cache.get(hash) {
            Some(e) if e.until_us > now_us => match &e.key {
                Some(key) => {
                    METRICS.key_cache.with_label_values(&["hit"]).inc();
                    Lookup::Found(key.clone())
                }
                None => {
                    METRICS.key_cache.with_label_values(&["negative_hit"]).inc();
                    Lookup::Unknown
                }
            },
            _ => {
                METRICS.key_cache.with_label_values(&["miss"]).inc();
                Lookup::Miss
            }
        }
    }

    fn account_permits(&self, user: &str, ip: IpAddr) -> bool {
        if self.restricted.load(Ordering::Relaxed) == 0 {
            return true;
        }
        self.allows.get(user).is_none_or(|a| a.permits(ip))
    }
}

/// A record as the gate uses it.
pub fn stored_key(r: &KeyRecord) -> StoredKey {
    StoredKey {
        id: r.id.as_str().into(),
        id_header: http::HeaderValue::from_str(&r.id)
            .unwrap_or_else(|_| http::HeaderValue::from_static("-")),
        owner: r.user.as_str().into(),
        permissions: Permissions::new(r.permissions.iter().map(|p| p.as_str().into()).collect()),
        ip_allow: Allowlist(ip_set(&r.ip_allow)),
        expires_at: r.expires_at,
        used_minute: AtomicU64::new(r.last_used_at.unwrap_or(0)),
    }
}

/// CIDRs (or single addresses) as a set; what does not parse is left out
/// (the API refuses it before it is stored).
pub fn ip_set(list: &[String]) -> IpSet {
    IpSet::new(list.iter().filter_map(|s| parse_net(s)).collect())
}

/// A CIDR like `10.0.0.0/8`, or one address.
pub fn parse_net(s: &str) -> Option<ipnet::IpNet> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
}
