//! The application's rooms on a connection: the gate branch (decide, limit,
//! then forward or refuse), the auth endpoints, and verified webhooks.

use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};

use super::*;

impl<S: AsyncRead + AsyncWrite + Unpin> Downstream<S> {
    pub(super) async fn serve_gate(
        &mut self,
        worker: &Worker,
        head: &RequestHead,
        x: &mut Exchange,
        target: Target,
    ) -> Step<Next> {
        let policy = x.policy.clone();
        // One clock reading for the decision and its quota.
        let now_us = crate::clock::unix_now_us();
        let decision = {
            let view = HeadView {
                buf: &self.buf,
                headers: &head.headers,
            };
            let facts = RequestFacts {
                peer: self.peer,
                client_ip: Some(x.client_ip),
                method: &head.method,
                path: &x.path,
                headers: &view,
                client_cert: self.tls.as_ref().and_then(|t| t.client_cert.as_deref()),
            };
            let started = Instant::now();
            let decision = gate::assess(&policy, &facts, now_us);
            METRICS
                .gate_duration
                .observe(started.elapsed().as_secs_f64());
            decision
        };
        // The pure decision leaves the quota to the limiter service.
        let mut decision = decision;
        if let Some(need) = decision.pending {
            match worker.quota(&need, now_us).await {
                Some(outcome) => decision.settle(outcome),
                None => decision.unavailable(),
            }
        }
        let verdict = decision.verdict.clone();
        let principal = decision.principal;
        x.decision = Some(decision);
        if let Err(denial) = verdict {
            if denial == Denial::RateLimited {
                if let Some(rate) = x.decision.as_ref().and_then(|d| d.rate) {
                    let tier = &*policy.tier(rate.tier).name;
                    METRICS.rate_limited.with_label_values(&[tier]).inc();
                }
            }
            return self.refuse(x, head, Refusal::Gate(denial)).await;
        }
        self.forward(worker, head, x, target, principal, None).await
    }

    /// Login, refresh, revoke and JWKS. The slow work (argon2 on the login
    /// verifiers, Redis and durable commits on the blocking pool) never runs
    /// on this proxy thread.
    pub(super) async fn serve_endpoint(
        &mut self,
        worker: &Worker,
        head: &RequestHead,
        x: &mut Exchange,
        endpoint: Endpoint,
    ) -> Step<Next> {
        let policy = x.policy.clone();
        if !endpoint.allows(&head.method) {
            let refusal = Refusal::MethodNotAllowed(endpoint.allow_header());
            return self.refuse(x, head, refusal).await;
        }
        if endpoint == Endpoint::Jwks {
            let body = policy.jwks.clone().into_bytes();
            return self
                .answer(x, head, 200, "public, max-age=300", &body, |_| {})
                .await;
        }
        let view = HeadView {
            buf: &self.buf,
            headers: &head.headers,
        };
        let json = view
            .values(b"content-type")
            .next()
            .and_then(header_text)
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            let e = IssueError::InvalidRequest(
                "the body must be JSON (Content-Type: application/json)",
            );
            return self.refuse(x, head, Refusal::Issue(e)).await;
        }
        let client_ip = x.client_ip;
        let body = match self.read_body(head, x, crate::issue::MAX_BODY).await? {
            Ok(body) => body,
            Err(refusal) => return self.refuse(x, head, refusal).await,
        };
        let issuer: Arc<Issuer> = worker.shared.issuer.clone();
        let now = crate::clock::unix_now_us();
        let request_id = x.request_id.clone();
        let answer = if endpoint == Endpoint::Token {
            // Bounded and put on the blocking pool by the issuer itself.
            issuer.login(policy, client_ip, body, now).await.map(Some)
        } else {
            tokio::task::spawn_blocking(move || match endpoint {
                Endpoint::Refresh => issuer
                    .refresh(&policy, client_ip, &request_id, &body, now)
                    .map(Some),
                _ => issuer.revoke(&policy, &body, now).map(|()| None),
            })
            .await
            .unwrap_or(Err(IssueError::Internal))
        };
        match answer {
            Ok(tokens) => {
                x.subject = tokens.as_ref().map(|t| t.subject.clone());
                let body = match tokens {
                    Some(t) => serde_json::to_vec(&t).unwrap_or_default(),
                    None => b"{}".to_vec(),
                };
                // RFC 6749 §5.1: token responses are never cached.
                self.answer(x, head, 200, "no-store", &body, |out| {
                    header(out, b"pragma", b"no-cache");
                })
                .await
            }
            Err(e) => self.refuse(x, head, Refusal::Issue(e)).await,
        }
    }

    /// A `[[webhooks]]` path: read the whole body (bounded), check its
    /// signature, and only then contact the upstream with that body.
    pub(super) async fn serve_webhook(
        &mut self,
        worker: &Worker,
        head: &RequestHead,
        x: &mut Exchange,
        hook: &Webhook,
        target: Target,
    ) -> Step<Next> {
        let count = |result: &str| {
            METRICS
                .webhook_verifications
                .with_label_values(&[&hook.path, result])
                .inc();
        };
        let policy = x.policy.clone();
        let client_ip = x.client_ip;
        if !policy.server.ip_allow.permits(client_ip) {
            return self
                .refuse(x, head, Refusal::Gate(Denial::IpNotAllowed))
                .await;
        }
        let body = match self.read_body(head, x, hook.max_body).await? {
            Ok(body) => body,
            Err(refusal) => {
                if matches!(refusal, Refusal::Issue(IssueError::PayloadTooLarge(_))) {
                    count("too_large");
                }
                return self.refuse(x, head, refusal).await;
            }
        };
        let verdict = {
            let view = HeadView {
                buf: &self.buf,
                headers: &head.headers,
            };
            fn text<'v>(view: &'v HeadView<'_>, name: &'v http::HeaderName) -> Option<&'v str> {
                HeaderSource::values(view, name.as_str())
                    .next()
                    .and_then(header_text)
            }
            let timestamp = match &hook.timestamp {
                Some((ts_header, tolerance)) => crate::webhook::check_timestamp(
                    text(&view, ts_header),
                    crate::clock::unix_now(),
                    tolerance.as_secs(),
                )
                .map(Some),
                None => Ok(None),
            };
            timestamp.and_then(|ts| {
                crate::webhook::verify(&hook.secrets, text(&view, &hook.header), ts, &body)
            })
        };
        if let Err(refusal) = verdict {
            count(refusal.label());
            let refusal = Refusal::Signature {
                refusal,
                header: hook.header.clone(),
            };
            return self.refuse(x, head, refusal).await;
        }
        count("valid");
        self.forward(worker, head, x, target, None, Some(&body))
            .await
    }
}
