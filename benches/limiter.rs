//! One limiter decision: uncontended, and with two threads on one account.
//! Before the benches, prints how much memory one million active accounts
//! take (resident set growth, from /proc/self/statm).

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::resident_bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use keygate::limit::{Limiter, Quota};

const NOW: u64 = 1_780_000_000_000_000;

/// A quota that always has room, so every call takes the compare-and-swap path.
fn roomy() -> Quota {
    let max = NonZeroU32::new(u32::MAX).unwrap();
    Quota::new(max, Duration::from_secs(3600 * 1000), max)
}

fn free() -> Quota {
    let hundred = NonZeroU32::new(100).unwrap();
    Quota::new(hundred, Duration::from_secs(3600), hundred)
}

fn report_memory() {
    let before = resident_bytes();
    let limiter = Limiter::new();
    let q = free();
    for account in 0..1_000_000u128 {
        limiter.check(account.wrapping_mul(0x9E37_79B9_7F4A_7C15), &q, NOW);
    }
    let after = resident_bytes();
    println!(
        "limiter memory: {} accounts, {:.1} MiB resident growth, {:.0} bytes per account",
        limiter.len(),
        (after - before) as f64 / (1024.0 * 1024.0),
        (after - before) as f64 / limiter.len() as f64
    );
}

fn bench_limiter(c: &mut Criterion) {
    report_memory();
    let limiter = Limiter::new();
    let q = roomy();
    // A realistic table: 100 000 other accounts present.
    for a in 0..100_000u128 {
        limiter.check(a + 1_000_000, &q, NOW);
    }
    c.bench_function("limiter/uncontended", |b| {
        b.iter(|| limiter.check(black_box(7), &q, NOW))
    });
    c.bench_function("limiter/denied", |b| {
        let f = free();
        for _ in 0..100 {
            limiter.check(8, &f, NOW);
        }
        b.iter(|| limiter.check(black_box(8), &f, NOW))
    });

    let shared = Arc::new(limiter);
    c.bench_function("limiter/two_threads_one_account", |b| {
        b.iter_custom(|iters| {
            let other = {
                let l = shared.clone();
                std::thread::spawn(move || {
                    let q = roomy();
                    for _ in 0..iters {
                        l.check(9, &q, NOW);
                    }
                })
            };
            let start = Instant::now();
            for _ in 0..iters {
                shared.check(black_box(9), &q, NOW);
            }
            let elapsed = start.elapsed();
            other.join().unwrap();
            elapsed
        })
    });
}

criterion_group!(benches, bench_limiter);
criterion_main!(benches);
