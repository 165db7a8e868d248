//! The tier limiter shared by a fleet of sidecars through Redis.
//!
//! - **Exact**: one atomic Lua GCRA script per decision (a client-side
//!   read-then-write would race and let floods through), on Redis' own
//!   clock (`TIME`), so sidecars' clock skew does not matter. One hash per
//!   account (`{prefix}:limit:{<account>}`, hash-tagged so it works on a
//!   Cluster slot), expiring when the bucket is full again. A tier change
//!   carries the debt over in requests, as the local limiter does.
//! - **Deny cache**: once Redis refuses an account, this process refuses it
//!   locally until the retry time Redis gave. Exactness holds (the allowed
//!   time only moves forward), and abusive traffic stays off Redis.
//! - **Bounded**: every call has keygate's own deadline (`timeout`); a
//!   failure opens a breaker for [`BREAKER_OPEN`], during which decisions
//!   take the `on_error_limits` path at once instead of waiting.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::sync::Arc;

use dashmap::DashMap;

use super::topology::AsyncConn;

use crate::gate::QuotaNeed;
use crate::limit::{AccountId, Outcome, Quota};
use crate::metrics::METRICS;
use crate::policy::RedisSettings;

/// After a failed call, Redis is not asked again for this long.
pub const BREAKER_OPEN: Duration = Duration::from_millis(250);
/// Deny-cache entries above this are swept of expired ones.
const DENY_CACHE_SWEEP: usize = 100_000;

/// GCRA in one step. KEYS[1]: the account's hash. ARGV: the emission
/// interval and the tolerance (burst × interval), in µs, and optionally
/// `1` to only look (login throttles look before they spend). Returns
/// `{allowed, reset_us, retry_us, remaining}`. Numbers are written with
/// `%.0f`: Lua would print a µs timestamp as `1.7e+15`.
pub const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
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
local new_tat = tat + interval
if new_tat - now > tolerance then
  return {0, tat - now, new_tat - now - tolerance, 0}
end
if ARGV[3] == '1' then
  return {1, new_tat - now, 0, math.floor((tolerance - (new_tat - now)) / interval)}
end
redis.call('HSET', KEYS[1], 't', string.format('%.0f', new_tat), 'i', string.format('%.0f', interval))
redis.call('PEXPIRE', KEYS[1], math.ceil((new_tat - now) / 1000) + 1000)
return {1, new_tat - now, 0, math.floor((tolerance - (new_tat - now)) / interval)}
"#;

/// The limiter's Redis side, shared by the worker threads of one process.
pub struct RedisLimits {
    pub settings: Arc<RedisSettings>,
    script: redis::Script,
    deny: DashMap<AccountId, Denied>,
    /// No call before this instant (µs on the process clock); 0 = closed.
    open_until_us: AtomicU64,
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
            epoch: Instant::now(),
        }
    }

    fn clock_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// One unit of `need.quota` for `need.account`. `conn` is the calling
    /// thread's connection, set up here on first use.
    pub async fn check(&self, conn: &mut Option<AsyncConn>, need: &QuotaNeed) -> Answer {
        let now = self.clock_us();
        if let Some(cached) = self.cached_refusal(need.account, now) {
            return Answer::DenyCache(cached);
        }
        if now < self.open_until_us.load(Ordering::Relaxed) {
            METRICS
                .redis_calls
                .with_label_values(&["gcra", "skipped"])
                .inc();
            return Answer::Unavailable;
        }
        let key = format!(
            "{}:limit:{{{:032x}}}",
            self.settings.key_prefix, need.account
        );
        let mut call = self.script.key(key);
        call.arg(need.quota.interval_us())
            .arg(need.quota.tolerance_us());
        let started = Instant::now();
        let answer = tokio::time::timeout(self.settings.timeout, async {
            if conn.is_none() {
                *conn = Some(AsyncConn::open(&self.settings).await?);
            }
            let conn = conn.as_mut().expect("just set");
            call.invoke_async::<(i64, i64, i64, i64)>(conn).await
        })
        .await;
        let (allowed, reset_us, retry_us, remaining) = match answer {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => return self.failed("error", &e.to_string()),
            Err(_) => return self.failed("timeout", "no answer in time"),
        };
        METRICS
            .redis_call_duration
            .observe(started.elapsed().as_secs_f64());
        METRICS.redis_calls.with_label_values(&["gcra", "ok"]).inc();
        if self.open_until_us.swap(0, Ordering::Relaxed) != 0 {
            tracing::info!("Redis answers again");
        }
        METRICS.state_up.set(1);
        let outcome = outcome(&need.quota, allowed, reset_us, retry_us, remaining);
        if !outcome.allowed {
            self.remember_refusal(need.account, now + retry_us.max(0) as u64, outcome);
        }
        Answer::Redis(outcome)
    }

    fn failed(&self, outcome: &str, why: &str) -> Answer {
        METRICS
            .redis_calls
            .with_label_values(&["gcra", outcome])
            .inc();
        METRICS.state_up.set(0);
        let until = self.clock_us() + BREAKER_OPEN.as_micros() as u64;
        if self.open_until_us.swap(until, Ordering::Relaxed) == 0 {
            tracing::warn!(
                error = why,
                "Redis call failed; rate limits follow on_error_limits until it answers"
            );
        }
        Answer::Unavailable
    }

    fn cached_refusal(&self, account: AccountId, now: u64) -> Option<Outcome> {
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

    fn remember_refusal(&self, account: AccountId, until_us: u64, outcome: Outcome) {
        if self.deny.len() >= DENY_CACHE_SWEEP {
            let now = self.clock_us();
            self.deny.retain(|_, d| d.until_us > now);
        }
        self.deny.insert(account, Denied { until_us, outcome });
    }
}

/// The script's answer as an [`Outcome`].
pub fn outcome(
    quota: &Quota,
    allowed: i64,
    reset_us: i64,
    retry_us: i64,
    remaining: i64,
) -> Outcome {
    Outcome {
        allowed: allowed == 1,
        limit: quota.limit.get(),
        remaining: remaining.clamp(0, i64::from(u32::MAX)) as u32,
        reset_secs: secs_ceil(reset_us),
        retry_after_secs: secs_ceil(retry_us),
    }
}

fn secs_ceil(us: i64) -> u64 {
    (us.max(0) as u64).div_ceil(1_000_000)
}
