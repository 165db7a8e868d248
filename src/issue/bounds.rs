//! What bounds the work of logins, whoever sends them: one attempt in
//! flight per email and per client address ([`InFlight`]), and a fixed
//! pool of verifier threads with a short queue in front of it ([`Work`]).
//! Each verifier keeps argon2's memory (`m_cost`, 19 MiB with the
//! defaults), so the memory logins can take is `permits × m_cost`,
//! whatever the load.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use crate::limit::AccountId;
use crate::metrics::METRICS;

/// Throttle accounts with an attempt in flight.
#[derive(Default)]
pub struct InFlight {
    busy: Mutex<HashSet<AccountId>>,
}

/// Held while an attempt runs; frees its account when dropped.
pub struct Busy {
    owner: Arc<InFlight>,
    account: AccountId,
}

impl InFlight {
    /// Mark `account` busy, or `None` when it already is.
    pub fn claim(self: &Arc<Self>, account: AccountId) -> Option<Busy> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        if !busy.insert(account) {
            return None;
        }
        Some(Busy {
            owner: self.clone(),
            account,
        })
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut busy = self.owner.busy.lock().unwrap_or_else(|e| e.into_inner());
        busy.remove(&self.account);
    }
}

/// A counted stage: at most `capacity` inside at once.
pub struct Stage {
    inside: AtomicUsize,
    capacity: usize,
    gauge: bool,
}

/// A place in a [`Stage`], given back when dropped.
pub struct Entered(Arc<Stage>);

impl Stage {
    fn new(capacity: usize, gauge: bool) -> Arc<Stage> {
        Arc::new(Stage {
            inside: AtomicUsize::new(0),
            capacity,
            gauge,
        })
    }

    /// A place, or `None` when the stage is full.
    pub fn enter(self: &Arc<Self>) -> Option<Entered> {
        if self.inside.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.inside.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        if self.gauge {
            METRICS.login_admitted.inc();
        }
        Some(Entered(self.clone()))
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        self.0.inside.fetch_sub(1, Ordering::AcqRel);
        if self.0.gauge {
            METRICS.login_admitted.dec();
        }
    }
}

/// Logins admitted at once, in two stages: spending their throttle units
/// (a Redis call in a fleet: at most `16 × permits`, so a slow Redis does
/// not pile up blocking threads), then verifying: at most `permits` at
/// once, each on a thread of a fixed pool of that size, and at most
/// `queue` more waiting for one. Past either, 503 `overloaded`; an attempt
/// the throttles refused never takes a verification place.
pub struct Work {
    jobs: mpsc::Sender<Job>,
    pub spending: Arc<Stage>,
    pub verifying: Arc<Stage>,
    pub permits_total: usize,
}

type Job = Box<dyn FnOnce() + Send>;

impl Work {
    /// `permits` verifier threads (at least 1), `queue` logins waiting.
    pub fn new(permits: usize, queue: usize) -> Work {
        let permits = permits.max(1);
        let (jobs, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut started = 0;
        for i in 0..permits {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("keygate login-{i}"))
                .spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                });
            match spawned {
                Ok(_) => started += 1,
                Err(e) => tracing::error!(error = %e, "cannot start a login verifier thread"),
            }
        }
        let permits = started.max(1);
        Work {
            jobs,
            spending: Stage::new(16 * permits, false),
            verifying: Stage::new(permits + queue, true),
            permits_total: permits,
        }
    }

    /// Sized to the machine: one verifier per core, a queue of four per
    /// core (with argon2's defaults, about 40 ms of waiting).
    pub fn for_this_machine() -> Work {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Work::new(cores, 4 * cores)
    }

    /// Run `f` on a verifier thread, in turn. `f` is told whether anyone
    /// still waits for its answer (a login whose client went away while
    /// it queued need not be verified). `None` if the pool is gone.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(bool) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let wanted = !tx.is_closed();
            let _ = tx.send(f(wanted));
        });
        self.jobs.send(job).ok()?;
        rx.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_attempt_per_account_at_a_time() {
        let f = Arc::new(InFlight::default());
        let a = f.claim(1).expect("free");
        assert!(f.claim(1).is_none());
        let b = f.claim(2).expect("others are free");
        drop(a);
        assert!(f.claim(1).is_some());
        drop(b);
    }

    #[test]
    fn admissions_past_permits_and_queue_are_refused() {
        let w = Work::new(2, 3);
        let held: Vec<_> = (0..5).map(|_| w.verifying.enter().expect("room")).collect();
        assert!(w.verifying.enter().is_none());
        drop(held);
        assert!(w.verifying.enter().is_some());
        let spending: Vec<_> = (0..40).filter_map(|_| w.spending.enter()).collect();
        assert_eq!(spending.len(), 32, "16 per verifier spend at once");
    }
}

#[cfg(test)]
mod pool_tests {
    use super::*;

    #[test]
    fn jobs_run_on_the_pool_and_abandoned_ones_know_it() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let w = Work::new(2, 0);
        let name = rt.block_on(w.run(|wanted| {
            assert!(wanted);
            std::thread::current().name().map(str::to_string)
        }));
        assert!(name.flatten().unwrap().starts_with("keygate login-"));
        let (seen_tx, seen_rx) = std::sync::mpsc::channel();
        let one = Work::new(1, 0);
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        rt.block_on(async {
            // The only verifier is busy until the gate opens.
            let busy = one.run(move |_| gate_rx.recv().ok());
            let _ = tokio::time::timeout(std::time::Duration::from_millis(10), busy).await;
            // A job given up on while it queued: it runs, told so.
            let abandoned = one.run(move |wanted| seen_tx.send(wanted).unwrap());
            let _ = tokio::time::timeout(std::time::Duration::from_millis(10), abandoned).await;
        });
        gate_tx.send(()).unwrap();
        assert_eq!(
            seen_rx.recv_timeout(std::time::Duration::from_secs(5)),
            Ok(false)
        );
    }
}
