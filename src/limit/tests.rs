//! The limiter under an injected clock: `now` is just a number, nothing sleeps.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use super::*;

const HOUR: Duration = Duration::from_secs(3600);
const SEC: u64 = 1_000_000;
const T0: u64 = 1_780_000_000 * SEC;

fn quota(limit: u32, period: Duration, burst: u32) -> Quota {
    Quota::new(
        NonZeroU32::new(limit).unwrap(),
        period,
        NonZeroU32::new(burst).unwrap(),
    )
}

fn free() -> Quota {
    quota(100, HOUR, 100)
}

fn pro() -> Quota {
    quota(1000, HOUR, 1000)
}

#[test]
fn fresh_account_gets_exactly_its_burst_then_one_per_interval() {
    let l = Limiter::new();
    for i in 0..100 {
        let o = l.check(1, &free(), T0);
        assert!(o.allowed, "request {i}");
        assert_eq!(o.remaining, 99 - i);
        assert_eq!(o.limit, 100);
    }
    let refused = l.check(1, &free(), T0);
    assert!(!refused.allowed);
    assert_eq!(refused.remaining, 0);
    assert_eq!(refused.retry_after_secs, 36);
    assert_eq!(refused.reset_secs, 3600);
    // 35.9 s later: still refused; at 36 s: one passes, and only one.
    assert!(!l.check(1, &free(), T0 + 35_900_000).allowed);
    assert!(l.check(1, &free(), T0 + 36 * SEC).allowed);
    assert!(!l.check(1, &free(), T0 + 36 * SEC).allowed);
}

#[test]
fn refill_is_gradual_and_capped_at_the_burst() {
    let l = Limiter::new();
    for _ in 0..100 {
        l.check(7, &free(), T0);
    }
    // Ten intervals later, ten pass.
    let later = T0 + 360 * SEC;
    let passed = (0..20)
        .filter(|_| l.check(7, &free(), later).allowed)
        .count();
    assert_eq!(passed, 10);
    // A day idle: the bucket is whole again, never more than the burst.
    let tomorrow = T0 + 24 * 3600 * SEC;
    let passed = (0..150)
        .filter(|_| l.check(7, &free(), tomorrow).allowed)
        .count();
    assert_eq!(passed, 100);
}

#[test]
fn burst_smaller_than_limit_spreads_requests() {
    let l = Limiter::new();
    let q = quota(100, HOUR, 10);
    assert_eq!((0..20).filter(|_| l.check(3, &q, T0).allowed).count(), 10);
    assert!(l.check(3, &q, T0 + 36 * SEC).allowed);
}

#[test]
fn accounts_are_independent() {
    let l = Limiter::new();
    for _ in 0..100 {
        l.check(1, &free(), T0);
    }
    assert!(!l.check(1, &free(), T0).allowed);
    assert!(l.check(2, &free(), T0).allowed);
}

#[test]
fn tier_change_keeps_the_used_count_and_takes_the_new_rate() {
    let l = Limiter::new();
    for _ in 0..100 {
        l.check(9, &free(), T0);
    }
    // Now pro: 100 of 1000 used, so 900 more pass, then 429.
    let first = l.check(9, &pro(), T0);
    assert!(first.allowed);
    assert_eq!(first.remaining, 899);
    let passed = 1 + (0..1000).filter(|_| l.check(9, &pro(), T0).allowed).count();
    assert_eq!(passed, 900);
    // The pro rate refills one per 3.6 s.
    assert!(l.check(9, &pro(), T0 + 3_600_000).allowed);
    // And back to free: 1000 of 1000 used is 100 of 100, refilling per 36 s.
    let back = l.check(9, &free(), T0 + 3_600_000);
    assert!(!back.allowed);
    assert_eq!(back.retry_after_secs, 36);
}

#[test]
fn whole_buckets_are_evicted_and_used_ones_kept() {
    let l = Limiter::new();
    l.check(1, &free(), T0);
    for _ in 0..50 {
        l.check(2, &free(), T0);
    }
    assert_eq!(l.len(), 2);
    // After 36 s account 1 is whole again; account 2 still owes 49 intervals.
    let evicted = l.evict_idle(T0 + 36 * SEC);
    assert_eq!(evicted, vec![1]);
    assert_eq!(l.len(), 1);
    assert_eq!(l.check(2, &free(), T0 + 36 * SEC).remaining, 50);
}

#[test]
fn snapshot_and_restore_keep_the_debt() {
    let l = Limiter::new();
    for _ in 0..100 {
        l.check(5, &free(), T0);
    }
    let dirty = l.dirty();
    assert_eq!(dirty.len(), 1);
    let (snapshot, state) = dirty[0];
    l.mark_persisted(snapshot.account, state);
    assert!(l.dirty().is_empty());

    let restarted = Limiter::new();
    assert_eq!(restarted.restore([snapshot], T0 + 2 * SEC), 1);
    let o = restarted.check(5, &free(), T0 + 2 * SEC);
    assert!(!o.allowed);
    // Whole snapshots are not restored.
    let again = Limiter::new();
    assert_eq!(again.restore([snapshot], T0 + 4000 * SEC), 0);
}

#[test]
fn concurrent_requests_never_over_admit() {
    let l = Arc::new(Limiter::new());
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let l = l.clone();
            std::thread::spawn(move || {
                (0..1000)
                    .filter(|_| l.check(42, &free(), T0).allowed)
                    .count()
            })
        })
        .collect();
    let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(total, 100);
}

#[test]
fn same_interval_interns_to_the_same_rate() {
    assert_eq!(quota(100, HOUR, 100).rate, quota(200, 2 * HOUR, 5).rate);
    assert_ne!(free().rate, pro().rate);
}

#[test]
fn peek_answers_without_counting() {
    let l = Limiter::new();
    let q = quota(2, HOUR, 2);
    for _ in 0..10 {
        assert!(l.peek(4, &q, T0).allowed);
    }
    l.check(4, &q, T0);
    l.check(4, &q, T0);
    let o = l.peek(4, &q, T0);
    assert!(!o.allowed);
    assert_eq!(o.retry_after_secs, 1800);
}

#[test]
fn a_divided_quota_keeps_the_period_and_never_reaches_zero() {
    let n = |v| NonZeroU32::new(v).unwrap();
    let q = Quota::new(n(100), Duration::from_secs(3600), n(10));
    let share = q.divided(n(4));
    assert_eq!(
        (share.limit.get(), share.burst.get(), share.period),
        (25, 2, q.period)
    );
    let tiny = Quota::new(n(3), Duration::from_secs(60), n(1)).divided(n(8));
    assert_eq!((tiny.limit.get(), tiny.burst.get()), (1, 1));
}

#[test]
fn a_refund_gives_back_one_unit_and_never_more() {
    let q = quota(3, Duration::from_secs(60), 3);
    let l = Limiter::new();
    for _ in 0..3 {
        assert!(l.check(1, &q, T0).allowed);
    }
    assert!(!l.check(1, &q, T0).allowed);
    l.refund(1, &q, T0);
    assert!(l.check(1, &q, T0).allowed, "the refunded unit");
    assert!(!l.check(1, &q, T0).allowed);
    // Refunds on a whole bucket, or an unknown account, give nothing extra.
    let fresh = Limiter::new();
    fresh.refund(2, &q, T0);
    fresh.check(3, &q, T0);
    for _ in 0..5 {
        fresh.refund(3, &q, T0);
    }
    let passed = (0..10).filter(|_| fresh.check(3, &q, T0).allowed).count();
    assert_eq!(passed, 3);
}
