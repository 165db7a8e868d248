//! Tier rate limiting with GCRA (the generic cell rate algorithm): one
//! number per account, its theoretical arrival time (TAT), moved forward by
//! compare-and-swap. A fresh account with `burst = 100` gets exactly 100
//! requests at once, then one more every `period / limit`.
//!
//! State is keyed by [`AccountId`] and lives here, outside the policy, so a
//! reload never resets a counter. When an account's tier changes, the debt
//! it carries is converted in *requests*: an account that used 100 of a free
//! tier's 100 has used 100 of a pro tier's 1000, and drains at the pro rate.
//!
//! Each state word packs the rate it was computed under (an index into the
//! process-wide [`rates`] table) with the TAT in microseconds, so a tier
//! change and a request are one atomic step.

pub mod rates;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;

/// An account: a user (with every key it owns), an owner-less API key, or a
/// client address under a public route's tier. See [`account_id`].
pub type AccountId = u128;

/// One unit of `quota` for `account`, under the policy's tier `tier` (its
/// index): the question the gate leaves to the limiter service, local or
/// shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaNeed {
    pub tier: u32,
    pub account: AccountId,
    pub quota: Quota,
}

/// The limiter account of a user (`kind = "user"`), an owner-less key
/// (`"key"`) or an address under a tier (`"ip"`): the first 128 bits of a
/// SHA-256, so it is fixed-size, stable across restarts and never collides
/// in practice.
pub fn account_id(kind: &str, id: &str) -> AccountId {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(kind.as_bytes());
    h.update([0]);
    h.update(id.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    AccountId::from_le_bytes(first)
}

const TAT_BITS: u32 = 52;
const TAT_MASK: u64 = (1 << TAT_BITS) - 1;

/// A limited tier's rate, ready for the limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub limit: NonZeroU32,
    pub period: Duration,
    pub burst: NonZeroU32,
    /// `period / limit`, at least 1 µs.
    interval_us: u64,
    rate: u16,
}

impl Quota {
    pub fn new(limit: NonZeroU32, period: Duration, burst: NonZeroU32) -> Quota {
        let interval_us = (period.as_micros() / u128::from(limit.get())).max(1) as u64;
        Quota {
            limit,
            period,
            burst,
            interval_us,
            rate: rates::intern(interval_us),
        }
    }

    /// `period / limit` in µs: one request's share of the period.
    pub fn interval_us(&self) -> u64 {
        self.interval_us
    }

    /// This quota shared out among `n` (each gets 1/n of the limit and
    /// burst, at least 1): a fleet's local fallback.
    pub fn divided(&self, n: NonZeroU32) -> Quota {
        let part = |v: NonZeroU32| NonZeroU32::new(v.get() / n.get()).unwrap_or(NonZeroU32::MIN);
        Quota::new(part(self.limit), self.period, part(self.burst))
    }

    /// How far ahead of now the TAT may run: `burst` intervals.
    pub fn tolerance_us(&self) -> u64 {
        self.interval_us * u64::from(self.burst.get())
    }
}

/// What one limiter decision says, for the response headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    pub limit: u32,
    /// Requests that could pass right now, after this one.
    pub remaining: u32,
    /// Seconds until the quota is whole again.
    pub reset_secs: u64,
    /// On a refusal: seconds until the next request passes.
    pub retry_after_secs: u64,
}

struct Slot {
    state: AtomicU64,
    /// The state last written to the durable store.
    persisted: AtomicU64,
}

/// One entry of a snapshot, in a form that survives a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub account: AccountId,
    pub interval_us: u64,
    pub tat_us: u64,
}

#[derive(Default)]
pub struct Limiter {
    accounts: DashMap<AccountId, Slot>,
}

impl Limiter {
    pub fn new() -> Limiter {
        Limiter::default()
    }

    /// Decide one request of `account` under `quota` at `now_us` (µs since
    /// the Unix epoch), and count it if it passes.
    pub fn check(&self, account: AccountId, quota: &Quota, now_us: u64) -> Outcome {
        if let Some(slot) = self.accounts.get(&account) {
            return gcra(&slot.state, quota, now_us);
        }
        let slot = self.accounts.entry(account).or_insert_with(|| Slot {
            state: AtomicU64::new(0),
            persisted: AtomicU64::new(0),
        });
        gcra(&slot.state, quota, now_us)
    }

    /// Would a request of `account` pass now? Counts nothing (login
    /// throttling asks first and spends only on a failed attempt).
    pub fn peek(&self, account: AccountId, quota: &Quota, now_us: u64) -> Outcome {
        let current = self
            .accounts
            .get(&account)
            .map_or(0, |slot| slot.state.load(Ordering::Acquire));
        step(current, quota, now_us).0
    }

    /// Give back one unit `check` spent: the TAT moves back one interval,
    /// never before `now_us`, and only under the same rate.
    pub fn refund(&self, account: AccountId, quota: &Quota, now_us: u64) {
        let Some(slot) = self.accounts.get(&account) else {
            return;
        };
        let mut current = slot.state.load(Ordering::Acquire);
        loop {
            let (rate, tat) = unpack(current);
            if current == 0 || rate != quota.rate {
                return;
            }
            let back = tat.saturating_sub(quota.interval_us).max(now_us);
            let next = pack(rate, back);
            match slot.state.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    /// Accounts held in memory.
    pub fn len(&self) -> usize {
        self.accounts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
    }

    /// Forget accounts whose bucket is full again: they carry no information.
    /// Returns them, so the durable store can forget them too.
    pub fn evict_idle(&self, now_us: u64) -> Vec<AccountId> {
        let mut evicted = Vec::new();
        self.accounts.retain(|account, slot| {
            let (_, tat) = unpack(slot.state.load(Ordering::Acquire));
            let keep = tat > now_us;
            if !keep {
                evicted.push(*account);
            }
            keep
        });
        evicted
    }

    /// The accounts whose state changed since the last [`Limiter::mark_persisted`].
    pub fn dirty(&self) -> Vec<(Snapshot, u64)> {
        self.accounts
            .iter()
            .filter_map(|entry| {
                let state = entry.state.load(Ordering::Acquire);
                if state == entry.persisted.load(Ordering::Relaxed) {
                    return None;
                }
                let (rate, tat_us) = unpack(state);
                Some((
                    Snapshot {
                        account: *entry.key(),
                        interval_us: rates::interval(rate),
                        tat_us,
                    },
                    state,
                ))
            })
            .collect()
    }

    /// Record that `state` of `account` is on disk.
    pub fn mark_persisted(&self, account: AccountId, state: u64) {
        if let Some(slot) = self.accounts.get(&account) {
            slot.persisted.store(state, Ordering::Relaxed);
        }
    }

    /// Put back what a snapshot saved; entries already whole are skipped.
    pub fn restore(&self, entries: impl IntoIterator<Item = Snapshot>, now_us: u64) -> usize {
        let mut restored = 0;
        for s in entries {
            if s.tat_us <= now_us || s.interval_us == 0 {
                continue;
            }
            let state = pack(rates::intern(s.interval_us), s.tat_us);
            self.accounts.insert(
                s.account,
                Slot {
                    state: AtomicU64::new(state),
                    persisted: AtomicU64::new(state),
                },
            );
            restored += 1;
        }
        restored
    }
}

fn pack(rate: u16, tat_us: u64) -> u64 {
    (u64::from(rate) << TAT_BITS) | (tat_us & TAT_MASK)
}

fn unpack(state: u64) -> (u16, u64) {
    ((state >> TAT_BITS) as u16, state & TAT_MASK)
}

fn gcra(state: &AtomicU64, quota: &Quota, now_us: u64) -> Outcome {
    let mut current = state.load(Ordering::Acquire);
    loop {
        let (outcome, next) = step(current, quota, now_us);
        let Some(next) = next else {
            return outcome;
        };
        match state.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return outcome,
            Err(actual) => current = actual,
        }
    }
}

/// One GCRA step from state `current`: the outcome, and the state to store
/// if the request passes.
fn step(current: u64, quota: &Quota, now_us: u64) -> (Outcome, Option<u64>) {
    let interval = quota.interval_us;
    let tolerance = quota.tolerance_us();
    let (rate, stored) = unpack(current);
    let tat = if current == 0 {
        now_us
    } else if rate == quota.rate {
        stored.max(now_us)
    } else {
        // The tier changed: carry the debt over in requests, not in time.
        let debt = u128::from(stored.saturating_sub(now_us));
        let converted = debt * u128::from(interval) / u128::from(rates::interval(rate).max(1));
        now_us + converted.min(u128::from(tolerance)) as u64
    };
    let new_tat = tat + interval;
    if new_tat - now_us > tolerance {
        let outcome = Outcome {
            allowed: false,
            limit: quota.limit.get(),
            remaining: 0,
            reset_secs: secs_ceil(tat - now_us),
            retry_after_secs: secs_ceil(new_tat - now_us - tolerance),
        };
        return (outcome, None);
    }
    let outcome = Outcome {
        allowed: true,
        limit: quota.limit.get(),
        remaining: ((tolerance - (new_tat - now_us)) / interval) as u32,
        reset_secs: secs_ceil(new_tat - now_us),
        retry_after_secs: 0,
    };
    (outcome, Some(pack(quota.rate, new_tat)))
}

fn secs_ceil(us: u64) -> u64 {
    us.div_ceil(1_000_000)
}

#[cfg(test)]
mod tests;
