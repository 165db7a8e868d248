//! The gate branch: decide (the pure `gate::assess`), ask the limiter
//! service for the quota, then forward or refuse.

use std::time::Instant;

use super::{Downstream, Refusal, Req, Step, Target};
use crate::gate::{self, Denial, RequestFacts};
use crate::metrics::METRICS;

impl<D: Downstream> Req<'_, D> {
    pub(super) async fn serve_gate(&mut self, target: Target) -> Step {
        let policy = self.x.policy.clone();
        // One clock reading for the decision and its quota.
        let mut now_us = crate::clock::unix_now_us();
        let mut decision = self.assess(&policy, now_us);
        // A self-service key the cache did not know: ask the store, then
        // decide again (once: the answer is cached now).
        if let Some(hash) = decision.lookup {
            let keys = self.worker.shared.keys.clone();
            let found = keys.fetch(hash, self.x.client_ip, now_us).await;
            now_us = crate::clock::unix_now_us();
            decision = self.assess(&policy, now_us);
            if matches!(found, gate::Lookup::Refused) {
                decision.pending = None;
                decision.verdict = Err(Denial::KeyLookupsThrottled);
            }
        }
        if let Some(gate::Principal {
            holder: gate::Holder::Stored { key, .. },
            ..
        }) = &decision.principal
        {
            self.worker.shared.keys.used(key, now_us / 1_000_000);
        }
        // The pure decision leaves the quota to the limiter service.
        if let Some(need) = decision.pending {
            match self.worker.limits.decide(&need, now_us).await {
                Some(outcome) => decision.settle(outcome),
                None => decision.unavailable(),
            }
        }
        let verdict = decision.verdict.clone();
        let principal = decision.principal.clone();
        if verdict == Err(Denial::RateLimited) {
            if let Some(rate) = decision.rate {
                let tier = &*policy.tier(rate.tier).name;
                METRICS.rate_limited.with_label_values(&[tier]).inc();
            }
        }
        self.x.decision = Some(decision);
        if let Err(denial) = verdict {
            return self.refuse(Refusal::Gate(denial)).await;
        }
        self.forward(target, principal, None).await
    }

    /// The pure decision, timed.
    fn assess(&self, policy: &crate::policy::Policy, now_us: u64) -> gate::Decision {
        let view = self.view();
        let facts = RequestFacts {
            peer: self.origin.peer,
            client_ip: Some(self.x.client_ip),
            method: &self.head.method,
            path: &self.x.path,
            headers: &view,
            client_cert: self.origin.client_cert(),
            stored: Some(&*self.worker.shared.keys),
        };
        let started = Instant::now();
        let decision = gate::assess(policy, &facts, now_us);
        METRICS
            .gate_duration
            .observe(started.elapsed().as_secs_f64());
        decision
    }
}
