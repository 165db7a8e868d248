//! The tier limiter shared by a fleet of sidecars through Redis.
//!
//! - **Exact**: one atomic Lua GCRA script per call (a client-side
//!   read-then-write would race and let floods through), on Redis' own
//!   clock (`TIME`), so sidecars' clock skew does not matter. One hash per
//!   account (`{prefix}:limit:{<account>}`, hash-tagged so it works on a
//!   Cluster slot), expiring when the bucket is full again. A tier change
//!   carries the debt over in requests, as the local limiter does.
//! - **Deny cache**: once Redis refuses an account, this process refuses it
//!   locally until the retry time Redis gave. Exactness holds (the allowed
//!   time only moves forward), and abusive traffic stays off Redis.
//! - **Batched**: on one proxy thread, decisions for one account that
//!   arrive while its call is in flight wait for it and then go together,
//!   as one call asking for n units ([`Lanes`], group commit). The script
//!   grants the first k ≤ n in order, so exactness holds, and a hot account
//!   costs one call per round trip instead of one per request.
//! - **Bounded**: every call has keygate's own deadline (`timeout`);
//!   [`BREAKER_FAILURES`] failures in a row open a breaker for
//!   [`BREAKER_OPEN`], during which decisions take the `on_error_limits`
//!   path at once instead of waiting. One slow answer does not switch
//!   every account to the fallback.
//! - **A request that goes away takes nothing with it**: a batch's call
//!   runs as a task of its own (see [`Lanes::decide`]).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::Notify;

use super::topology::AsyncConn;

use crate::limit::QuotaNeed;
use crate::limit::{AccountId, Outcome, Quota};
use crate::metrics::METRICS;
use crate::policy::RedisSettings;

/// After [`BREAKER_FAILURES`] failed calls in a row, Redis is not asked
/// again for this long.
pub const BREAKER_OPEN: Duration = Duration::from_millis(250);
pub const BREAKER_FAILURES: u32 = 3;
/// At most this many refusals are cached (about 100 bytes each); past it,
/// Redis answers the rest. Expired entries go at each [`RedisLimits::sweep`].
const DENY_CACHE_MAX: usize = 250_000;
/// How often the deny cache is swept of expired entries.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// GCRA for n units at once. `KEYS[1]`: the account's hash. ARGV: the
/// emission interval and the tolerance (burst × interval), in µs, and n
/// (0 only looks: login throttles look before they spend). Grants the
/// first k ≤ n units that fit and returns `{k, base_us}`, where `base_us`
/// is how far the TAT ran ahead of now before them; [`unit()`] turns that
/// into each unit's answer. Numbers are written with `%.0f`: Lua would
/// print a µs timestamp as `1.7e+15`.
pub const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 't', 'i')
local tat = tonumber(state[1])
local was = tonumber(state[2])
if tat == nil then
  tat = now
elseif was ~= interval then
  local debt = tat - now
  if debt < 0 then debt = 0 end
  debt = math.floor(debt * interval / was)
  if debt > tolerance then debt = tolerance end
  tat = now + debt
elseif tat < now then
  tat = now
end
local base = tat - now
local k = math.floor((tolerance - base) / interval)
if k > n then k = n end
if k < 0 then k = 0 end
if k > 0 then
  local new_tat = tat + k * interval
  redis.call('HSET', KEYS[1], 't', string.format('%.0f', new_tat), 'i', string.format('%.0f', interval))
  redis.call('PEXPIRE', KEYS[1], math.ceil((new_tat - now) / 1000) + 1000)
end
return {k, base}
"#;

/// The limiter's Redis side, shared by the worker threads of one process.
pub struct RedisLimits {
    pub settings: Arc<RedisSettings>,
    script: redis::Script,
    /// By account and quota: a tier change (a reload) starts afresh.
    deny: DashMap<LaneKey, Denied>,
    /// No call before this instant (µs on the process clock); 0 = closed.
    open_until_us: AtomicU64,
    /// Calls failed in a row.
    failures: AtomicU32,
    epoch: Instant,
}

struct Denied {
    until_us: u64,
    outcome: Outcome,
}

/// Where a decision came from.
pub enum Answer {
    Redis(Outcome),
    DenyCache(Outcome),
    /// Redis did not answer in time, or the breaker is open.
    Unavailable,
}

impl RedisLimits {
    pub fn new(settings: Arc<RedisSettings>) -> RedisLimits {
        METRICS.state_up.set(1);
        RedisLimits {
            settings,
            script: redis::Script::new(GCRA),
            deny: DashMap::new(),
            open_until_us: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            epoch: Instant::now(),
        }
    }

    fn clock_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// One unit of `need.quota` for `need.account`, batched with the
    /// thread's other decisions for that account (see [`Lanes`]). `conn`
    /// is the thread's connection, set up here on first use.
    pub async fn check(
        self: &Arc<Self>,
        lanes: &Rc<Lanes>,
        conn: &Rc<RefCell<Option<AsyncConn>>>,
        need: &QuotaNeed,
    ) -> Answer {
        let key = (
            need.account,
            need.quota.interval_us(),
            need.quota.tolerance_us(),
        );
        if let Some(cached) = self.cached_refusal(key, self.clock_us()) {
            return Answer::DenyCache(cached);
        }
        if self.breaker_open() {
            return Answer::Unavailable;
        }
        let (me, conn, need) = (self.clone(), conn.clone(), *need);
        let (reply, j) = lanes
            .decide(key, move |n| async move { me.call(&conn, &need, n).await })
            .await;
        let Reply::Granted {
            granted,
            base_us,
            at_us,
        } = reply
        else {
            return Answer::Unavailable;
        };
        let outcome = unit(&need.quota, granted, base_us, j);
        if !outcome.allowed {
            // Exactly when Redis would grant the next unit (on this
            // process's clock, from when the answer came).
            let ahead = base_us + granted * need.quota.interval_us();
            let retry_us =
                (ahead + need.quota.interval_us()).saturating_sub(need.quota.tolerance_us());
            self.remember_refusal(key, at_us + retry_us, outcome);
        }
        Answer::Redis(outcome)
    }

    fn breaker_open(&self) -> bool {
        let open = self.clock_us() < self.open_until_us.load(Ordering::Relaxed);
        if open {
            METRICS
                .redis_calls
                .with_label_values(&["gcra", "skipped"])
                .inc();
        }
        open
    }

    /// One script call for `n` units.
    async fn call(&self, conn: &RefCell<Option<AsyncConn>>, need: &QuotaNeed, n: u64) -> Reply {
        if self.breaker_open() {
            return Reply::Failed;
        }
        let key = format!(
            "{}:limit:{{{:032x}}}",
            self.settings.key_prefix, need.account
        );
        let mut call = self.script.key(key);
        call.arg(need.quota.interval_us())
            .arg(need.quota.tolerance_us())
            .arg(n);
        let mut c = conn.borrow().clone();
        if c.is_none() {
            // Setting up (a Cluster's slot map, a Sentinel's answer) gets
            // connect_timeout, not the per-call deadline, or a slow link
            // would never finish it.
            let opened = tokio::time::timeout(
                self.settings.connect_timeout,
                AsyncConn::open(&self.settings),
            )
            .await;
            match opened {
                Ok(Ok(new)) => {
                    *conn.borrow_mut() = Some(new.clone());
                    c = Some(new);
                }
                Ok(Err(e)) => return self.failed("error", &e.to_string()),
                Err(_) => return self.failed("timeout", "no connection in time"),
            }
        }
        let Some(mut c) = c else {
            return Reply::Failed;
        };
        let started = Instant::now();
        let answer = tokio::time::timeout(
            self.settings.timeout,
            call.invoke_async::<(u64, u64)>(&mut c),
        )
        .await;
        let (granted, base_us) = match answer {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => return self.failed("error", &e.to_string()),
            Err(_) => return self.failed("timeout", "no answer in time"),
        };
        METRICS
            .redis_call_duration
            .observe(started.elapsed().as_secs_f64());
        METRICS.redis_calls.with_label_values(&["gcra", "ok"]).inc();
        self.failures.store(0, Ordering::Relaxed);
        if self.open_until_us.swap(0, Ordering::Relaxed) != 0 {
            METRICS.redis_breaker_open.set(0);
            tracing::info!("Redis answers again");
        }
        METRICS.state_up.set(1);
        Reply::Granted {
            granted,
            base_us,
            at_us: self.clock_us(),
        }
    }

    fn failed(&self, outcome: &str, why: &str) -> Reply {
        METRICS
            .redis_calls
            .with_label_values(&["gcra", outcome])
            .inc();
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 < BREAKER_FAILURES {
            // This decision takes the fallback; the next ones ask again.
            return Reply::Failed;
        }
        METRICS.state_up.set(0);
        METRICS.redis_breaker_open.set(1);
        let until = self.clock_us() + BREAKER_OPEN.as_micros() as u64;
        if self.open_until_us.swap(until, Ordering::Relaxed) == 0 {
            tracing::warn!(
                error = why,
                "Redis call failed; rate limits follow on_error_limits until it answers"
            );
        }
        Reply::Failed
    }

    fn cached_refusal(&self, account: LaneKey, now: u64) -> Option<Outcome> {
        let entry = self.deny.get(&account)?;
        if now >= entry.until_us {
            drop(entry);
            self.deny.remove_if(&account, |_, d| now >= d.until_us);
            return None;
        }
        let left = entry.until_us - now;
        let mut outcome = entry.outcome;
        outcome.retry_after_secs = secs_ceil(left as i64);
        outcome.reset_secs = outcome.reset_secs.max(outcome.retry_after_secs);
        Some(outcome)
    }

    /// O(1): the cache is swept by [`RedisLimits::sweep`] on a timer, never
    /// by the request that happens to fill it.
    fn remember_refusal(&self, account: LaneKey, until_us: u64, outcome: Outcome) {
        if self.deny.len() >= DENY_CACHE_MAX {
            return;
        }
        self.deny.insert(account, Denied { until_us, outcome });
    }

    /// Drop expired refusals; run every [`SWEEP_EVERY`] off the proxy
    /// threads. Returns how many are left.
    pub fn sweep(&self) -> usize {
        let now = self.clock_us();
        self.deny.retain(|_, d| d.until_us > now);
        self.deny.len()
    }
}

/// What one call answered.
#[derive(Debug, Clone, Copy)]
pub enum Reply {
    Granted {
        granted: u64,
        base_us: u64,
        /// When the answer came, on the process clock.
        at_us: u64,
    },
    Failed,
}

pub type LaneKey = (AccountId, u64, u64);

/// One proxy thread's decisions in flight, by account and quota: a group
/// commit. The first decision for an account opens a batch and leads it;
/// those arriving while the account's previous call is in flight join the
/// open batch, whose leader then asks for all of them in one call.
#[derive(Default)]
pub struct Lanes {
    lanes: RefCell<HashMap<LaneKey, Lane>>,
}

#[derive(Default)]
struct Lane {
    /// A call for this account is in flight.
    busy: bool,
    idle: Rc<Notify>,
    /// The batch new decisions join.
    open: Option<Rc<Batch>>,
}

#[derive(Default)]
struct Batch {
    members: Cell<u64>,
    reply: Cell<Option<Reply>>,
    done: Notify,
}

impl Batch {
    async fn wait(&self) -> Reply {
        loop {
            // Registered before the check: no wake-up can fall in between.
            let done = self.done.notified();
            if let Some(reply) = self.reply.get() {
                return reply;
            }
            done.await;
        }
    }
}

impl Lanes {
    /// One decision's reply and its place in its batch. The first of a
    /// batch starts the batch's call as a task of its own, which every
    /// member (the first included) then waits for: a member whose request
    /// goes away (an HTTP/2 stream reset, a client that closed) takes
    /// nothing from the others. Were the call the first member's own work,
    /// dropping that request would fail the whole batch, and every member
    /// would fall to `on_error_limits`: a client could switch its limits
    /// off by resetting one stream per burst.
    pub async fn decide<F, Fut>(self: &Rc<Self>, key: LaneKey, call: F) -> (Reply, u64)
    where
        F: FnOnce(u64) -> Fut + 'static,
        Fut: std::future::Future<Output = Reply> + 'static,
    {
        let (batch, j) = self.join(key);
        if j == 1 {
            let (lanes, leading) = (self.clone(), batch.clone());
            tokio::task::spawn_local(async move {
                lanes.lead(key, &leading, call).await;
            });
        }
        (batch.wait().await, j)
    }

    /// Join the open batch for `key`, or open one; returns it and this
    /// decision's place in it (1 leads).
    fn join(&self, key: LaneKey) -> (Rc<Batch>, u64) {
        let mut lanes = self.lanes.borrow_mut();
        let lane = lanes.entry(key).or_default();
        let batch = lane.open.get_or_insert_with(Rc::default).clone();
        batch.members.set(batch.members.get() + 1);
        let place = batch.members.get();
        (batch, place)
    }

    /// Wait for the lane, close the batch, make its call, hand out the reply.
    async fn lead<F, Fut>(&self, key: LaneKey, batch: &Rc<Batch>, call: F) -> Reply
    where
        F: FnOnce(u64) -> Fut,
        Fut: std::future::Future<Output = Reply>,
    {
        // From here on, dropping this future (while waiting or calling: the
        // worker's runtime ends) fails the batch and frees the lane instead
        // of stranding either.
        let mut release = Release {
            lanes: self,
            key,
            batch,
            holds_lane: false,
        };
        loop {
            let idle = {
                let lanes = self.lanes.borrow();
                let lane = &lanes[&key];
                if !lane.busy {
                    break;
                }
                lane.idle.clone()
            };
            let notified = idle.notified();
            // Re-checked: the lane may have gone idle since the borrow.
            if !self.lanes.borrow()[&key].busy {
                break;
            }
            notified.await;
        }
        let n = {
            let mut lanes = self.lanes.borrow_mut();
            let lane = lanes.get_mut(&key).expect("a lane with an open batch");
            lane.busy = true;
            release.holds_lane = true;
            if lane.open.as_ref().is_some_and(|b| Rc::ptr_eq(b, batch)) {
                lane.open = None;
            }
            batch.members.get()
        };
        let reply = call(n).await;
        batch.reply.set(Some(reply));
        drop(release);
        reply
    }
}

struct Release<'a> {
    lanes: &'a Lanes,
    key: LaneKey,
    batch: &'a Rc<Batch>,
    /// Whether this leader made the lane busy (and so must free it).
    holds_lane: bool,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        if self.batch.reply.get().is_none() {
            self.batch.reply.set(Some(Reply::Failed));
        }
        self.batch.done.notify_waiters();
        let mut lanes = self.lanes.lanes.borrow_mut();
        if let Some(lane) = lanes.get_mut(&self.key) {
            // A leader dropped before its call: its batch is closed too, so
            // nobody joins a batch nobody leads.
            if lane
                .open
                .as_ref()
                .is_some_and(|b| Rc::ptr_eq(b, self.batch))
            {
                lane.open = None;
            }
            if self.holds_lane {
                lane.busy = false;
                lane.idle.notify_waiters();
            }
            if lane.open.is_none() && !lane.busy {
                lanes.remove(&self.key);
            }
        }
    }
}

/// The answer for the `j`-th (1-based) of the units a call asked for, of
/// which the first `granted` passed, the TAT having been `base_us` ahead.
pub fn unit(quota: &Quota, granted: u64, base_us: u64, j: u64) -> Outcome {
    let interval = quota.interval_us();
    let tolerance = quota.tolerance_us();
    if j <= granted {
        let ahead = base_us + j * interval;
        Outcome {
            allowed: true,
            limit: quota.limit.get(),
            remaining: (tolerance.saturating_sub(ahead) / interval).min(u64::from(u32::MAX)) as u32,
            reset_secs: secs_ceil(ahead as i64),
            retry_after_secs: 0,
        }
    } else {
        let ahead = base_us + granted * interval;
        Outcome {
            allowed: false,
            limit: quota.limit.get(),
            remaining: 0,
            reset_secs: secs_ceil(ahead as i64),
            retry_after_secs: secs_ceil((ahead + interval).saturating_sub(tolerance) as i64),
        }
    }
}

/// What a look (n = 0) says of the next unit.
pub fn look(quota: &Quota, base_us: u64) -> Outcome {
    let fits = base_us + quota.interval_us() <= quota.tolerance_us();
    unit(quota, u64::from(fits), base_us, 1)
}

fn secs_ceil(us: i64) -> u64 {
    (us.max(0) as u64).div_ceil(1_000_000)
}

#[cfg(test)]
mod tests;
