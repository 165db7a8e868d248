use super::*;
use crate::limit::Limiter;
use std::num::NonZeroU32;

/// Run `f` as a proxy thread runs its work: one thread, local tasks.
fn on_one_thread<F: std::future::Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, f)
}

fn quota(limit: u32, burst: u32) -> Quota {
    Quota::new(
        NonZeroU32::new(limit).unwrap(),
        Duration::from_secs(60),
        NonZeroU32::new(burst).unwrap(),
    )
}

#[test]
fn a_batch_answers_as_the_same_requests_one_by_one() {
    let now = 1_780_000_000_000_000;
    for (limit, burst, spent, n) in [(5, 5, 2, 6), (5, 5, 0, 1), (100, 10, 9, 4), (7, 3, 3, 2)] {
        let q = quota(limit, burst);
        let local = Limiter::new();
        for _ in 0..spent {
            local.check(1, &q, now);
        }
        // What the script computes from the same state.
        let base = spent * q.interval_us();
        let granted = ((q.tolerance_us() - base) / q.interval_us()).min(n);
        assert_eq!(look(&q, base), local.peek(1, &q, now), "look");
        for j in 1..=n {
            assert_eq!(
                unit(&q, granted, base, j),
                local.check(1, &q, now),
                "limit {limit} burst {burst} spent {spent}: unit {j} of {n}"
            );
        }
    }
}

#[test]
fn decisions_arriving_during_a_call_go_together_in_the_next() {
    on_one_thread(async {
        let lanes = Rc::new(Lanes::default());
        let calls = Rc::new(RefCell::new(Vec::new()));
        let key = (7, 1, 1);
        let decide = |lanes: Rc<Lanes>, calls: Rc<RefCell<Vec<u64>>>| async move {
            let (batch, j) = lanes.join(key);
            let reply = if j == 1 {
                let call = |n| {
                    let calls = calls.clone();
                    async move {
                        calls.borrow_mut().push(n);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Reply::Granted {
                            granted: n,
                            base_us: 0,
                            at_us: 0,
                        }
                    }
                };
                lanes.lead(key, &batch, call).await
            } else {
                batch.wait().await
            };
            (j, reply)
        };
        let first = tokio::task::spawn_local(decide(lanes.clone(), calls.clone()));
        tokio::task::yield_now().await;
        // Nine more while the first call is in flight.
        let rest: Vec<_> = (0..9)
            .map(|_| tokio::task::spawn_local(decide(lanes.clone(), calls.clone())))
            .collect();
        let (j, _) = first.await.unwrap();
        assert_eq!(j, 1);
        let mut places = Vec::new();
        for r in rest {
            let (j, reply) = r.await.unwrap();
            assert!(
                matches!(reply, Reply::Granted { granted: 9, .. }),
                "{reply:?}"
            );
            places.push(j);
        }
        places.sort();
        assert_eq!(places, (1..=9).collect::<Vec<u64>>());
        assert_eq!(*calls.borrow(), vec![1, 9], "two calls for ten decisions");
        assert!(
            lanes.lanes.borrow().is_empty(),
            "the lane is dropped when idle"
        );
    });
}

#[test]
fn a_dropped_first_request_leaves_its_batch_answered() {
    on_one_thread(async {
        let lanes = Rc::new(Lanes::default());
        let key = (3, 1, 1);
        let call = |n| async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            Reply::Granted {
                granted: n,
                base_us: 0,
                at_us: 0,
            }
        };
        // The first request opens the batch and is then dropped, as a
        // reset HTTP/2 stream's exchange is; the second joined it.
        let first = lanes.decide(key, call);
        let second = tokio::task::spawn_local({
            let lanes = lanes.clone();
            async move { lanes.decide(key, call).await }
        });
        assert!(tokio::time::timeout(Duration::from_millis(5), first)
            .await
            .is_err());
        let (reply, j) = second.await.unwrap();
        assert_eq!(j, 2);
        assert!(
            matches!(reply, Reply::Granted { granted: 2, .. }),
            "the batch's call went on without its first member: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(lanes.lanes.borrow().is_empty(), "the lane is freed");
    });
}

fn settings() -> Arc<RedisSettings> {
    let toml = crate::policy::testing::base_toml()
        + "\n[state]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nrecord_key = \"0123456789abcdef0123456789abcdef\"\n";
    match crate::policy::testing::compile_str(&toml)
        .unwrap()
        .policy
        .state
    {
        crate::policy::StateBackend::Redis(s) => Arc::new(*s),
        _ => unreachable!(),
    }
}

#[test]
fn filling_the_deny_cache_costs_the_request_nothing_and_the_timer_sweeps() {
    let limits = RedisLimits::new(settings());
    let refused = unit(&quota(1, 1), 0, 60_000_000, 1);
    // 100,001 refusals that have run out, then one more.
    for a in 0..100_001u128 {
        limits.deny.insert(
            (a, 1, 1),
            Denied {
                until_us: 0,
                outcome: refused,
            },
        );
    }
    limits.remember_refusal((u128::MAX, 1, 1), u64::MAX, refused);
    assert_eq!(limits.deny.len(), 100_002, "the insert walked the map");
    assert_eq!(limits.sweep(), 1);
}

#[test]
fn one_failed_call_does_not_open_the_breaker() {
    let limits = RedisLimits::new(settings());
    for _ in 1..BREAKER_FAILURES {
        assert!(matches!(limits.failed("timeout", "slow"), Reply::Failed));
        assert!(
            !limits.breaker_open(),
            "open after fewer than {BREAKER_FAILURES}"
        );
    }
    limits.failed("timeout", "slow");
    assert!(limits.breaker_open());
}

#[test]
fn a_dropped_leader_fails_its_batch_instead_of_stranding_it() {
    on_one_thread(async {
        let lanes = Lanes::default();
        let key = (1, 1, 1);
        let (batch, j) = lanes.join(key);
        assert_eq!(j, 1);
        let (member, k) = lanes.join(key);
        assert_eq!(k, 2);
        let never = lanes.lead(key, &batch, |_| std::future::pending::<Reply>());
        let _ = tokio::time::timeout(Duration::from_millis(10), never).await;
        assert!(matches!(member.wait().await, Reply::Failed));
        assert!(lanes.lanes.borrow().is_empty());
    });
}
