//! The auth endpoints keygate serves itself: login, refresh, revoke and
//! JWKS, and the bounded read of a body keygate uses itself.

use std::sync::Arc;

use super::{Downstream, Gone, Refusal, Req, Step};
use crate::gate::header_text;
use crate::http1::parse::{BodyKind, WireError};
use crate::http1::BodyFailure;
use crate::issue::{IssueError, Issuer};
use crate::proxy::dispatch::Endpoint;

/// The whole of a body keygate reads into memory (auth endpoints, webhooks)
/// must arrive within this, however it is dripped.
const BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

impl<D: Downstream> Req<'_, D> {
    /// Login, refresh, revoke and JWKS. The slow work (argon2 on the login
    /// verifiers, Redis and durable commits on the blocking pool) never runs
    /// on this proxy thread.
    pub(super) async fn serve_endpoint(&mut self, endpoint: Endpoint) -> Step {
        let policy = self.x.policy.clone();
        if !endpoint.allows(&self.head.method) {
            let refusal = Refusal::MethodNotAllowed(endpoint.allow_header());
            return self.refuse(refusal).await;
        }
        if matches!(endpoint, Endpoint::Keys | Endpoint::AccountAllow) {
            return self.serve_keys(endpoint).await;
        }
        if endpoint == Endpoint::Jwks {
            let body = policy.jwks.clone().into_bytes();
            return self.answer(200, "public, max-age=300", &body, |_| {}).await;
        }
        let json = self
            .view()
            .values(b"content-type")
            .next()
            .and_then(header_text)
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            let e = IssueError::InvalidRequest(
                "the body must be JSON (Content-Type: application/json)",
            );
            return self.refuse(Refusal::Issue(e)).await;
        }
        let client_ip = self.x.client_ip;
        let body = match self.read_body(crate::issue::MAX_BODY).await? {
            Ok(body) => body,
            Err(refusal) => return self.refuse(refusal).await,
        };
        let issuer: Arc<Issuer> = self.worker.shared.issuer.clone();
        let now = crate::clock::unix_now_us();
        let request_id = self.x.request_id.clone();
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
                self.x.subject = tokens.as_ref().map(|t| t.subject.clone());
                let body = match tokens {
                    Some(t) => serde_json::to_vec(&t).unwrap_or_default(),
                    None => b"{}".to_vec(),
                };
                // RFC 6749 §5.1: token responses are never cached.
                self.answer(200, "no-store", &body, |out| {
                    out.field(b"pragma", b"no-cache");
                })
                .await
            }
            Err(e) => self.refuse(Refusal::Issue(e)).await,
        }
    }

    /// The whole body, decoded, for keygate's own use; refused past `limit`
    /// (checked against Content-Length first, then as bytes arrive), when
    /// malformed, or when not whole within [`BODY_DEADLINE`].
    pub(super) async fn read_body(
        &mut self,
        limit: usize,
    ) -> Result<Result<Vec<u8>, Refusal>, Gone> {
        let too_large = Refusal::Issue(IssueError::PayloadTooLarge(limit));
        if let BodyKind::Length(n) = self.head.body {
            if n > limit as u64 {
                return Ok(Err(too_large));
            }
        }
        if self.down.continue_100().await.is_err() {
            return Err(Gone);
        }
        let mut body = Vec::new();
        let deadline = tokio::time::Instant::now() + BODY_DEADLINE;
        while !self.down.body_done() {
            if body.len() > limit {
                return Ok(Err(too_large));
            }
            match tokio::time::timeout_at(deadline, self.down.pull_body(&mut body)).await {
                Ok(Ok(used)) => self.x.progress.bytes_in += used as u64,
                Ok(Err(BodyFailure::Gone)) => return Err(Gone),
                Ok(Err(BodyFailure::Malformed(why))) => return Ok(Err(Refusal::Body(why))),
                Err(_) => return Ok(Err(Refusal::Wire(WireError::Timeout))),
            }
        }
        if body.len() > limit {
            return Ok(Err(too_large));
        }
        Ok(Ok(body))
    }
}
