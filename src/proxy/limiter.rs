//! The limiter as the application asks it (DESIGN.md's limiter service):
//! one async decision for a quota need, answered by this process's GCRA
//! (the embedded store) or by the fleet's in Redis, with `on_error_limits`
//! when Redis cannot answer in time. One per proxy thread: the Redis
//! connection and the batching lanes are the thread's.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use crate::gate::QuotaNeed;
use crate::limit::{Limiter, Outcome};
use crate::metrics::METRICS;
use crate::policy::OnError;
use crate::state::fleet::{Answer, Lanes, RedisLimits};
use crate::state::topology::AsyncConn;

pub struct LimitService {
    /// This process's GCRA: the limiter itself with the embedded store, the
    /// fallback under `on_error_limits = "local"` with Redis.
    local: Arc<Limiter>,
    /// The limiter shared by a fleet, with `[state] backend = "redis"`.
    fleet: Option<Arc<RedisLimits>>,
    /// This thread's connection to Redis; set up on first use.
    redis: Rc<RefCell<Option<AsyncConn>>>,
    /// This thread's Redis calls in flight, batched by account.
    lanes: Rc<Lanes>,
}

impl LimitService {
    pub fn new(local: Arc<Limiter>, fleet: Option<Arc<RedisLimits>>) -> LimitService {
        LimitService {
            local,
            fleet,
            redis: Rc::default(),
            lanes: Rc::default(),
        }
    }

    /// The answer to `need` at `now_us`; `None`: refuse with 503 (Redis
    /// unreachable under `on_error_limits = "closed"`).
    pub async fn decide(&self, need: &QuotaNeed, now_us: u64) -> Option<Outcome> {
        let local = || self.local.check(need.account, &need.quota, now_us);
        let Some(fleet) = &self.fleet else {
            METRICS.limit_decisions.local.inc();
            return Some(local());
        };
        let answer = fleet.check(&self.lanes, &self.redis, need).await;
        let counted = &METRICS.limit_decisions;
        let (source, outcome) = match answer {
            Answer::Redis(o) => (&counted.redis, Some(o)),
            Answer::DenyCache(o) => (&counted.deny_cache, Some(o)),
            Answer::Unavailable => match fleet.settings.on_error_limits {
                OnError::Local if fleet.settings.fleet_size.get() > 1 => {
                    let share = need.quota.divided(fleet.settings.fleet_size);
                    let outcome = self.local.check(need.account, &share, now_us);
                    (&counted.fallback_local, Some(outcome))
                }
                OnError::Local => (&counted.fallback_local, Some(local())),
                OnError::Open => {
                    let open = Outcome {
                        allowed: true,
                        limit: need.quota.limit.get(),
                        remaining: need.quota.limit.get(),
                        reset_secs: 0,
                        retry_after_secs: 0,
                    };
                    (&counted.fallback_open, Some(open))
                }
                OnError::Closed => (&counted.fallback_closed, None),
            },
        };
        source.inc();
        outcome
    }
}
