//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `POST /reload`
//! and the operator's key API (`super::admin_keys`).
//! It runs on its own pingora service (and runtime), so a scrape or a reload
//! never competes with proxy threads.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{Encoder, TextEncoder};

use super::exchange::error_response;
use super::reload::{reload_now, Status};
use crate::metrics::METRICS;
use crate::policy::{OnError, PolicyStore, StateBackend};
use crate::state::families::RedisStore;

pub struct Admin {
    pub store: Arc<PolicyStore>,
    pub status: Arc<Status>,
    /// The fleet's Redis, asked with a `PING` at every `/readyz`.
    pub state: Option<Arc<RedisStore>>,
    pub keys: Arc<crate::keys::SelfKeys>,
}

impl Admin {
    /// With `server.admin_token_*` set, `/reload` and the key API need that
    /// bearer token (compared in constant time); the policy in force
    /// decides, so a new token applies from the reload that sets it.
    fn may_reload(&self, session: &ServerSession) -> bool {
        let policy = self.store.load();
        let Some(token) = &policy.server.admin_token else {
            return true;
        };
        let given = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(rest.trim())
            });
        given.is_some_and(|g| {
            use subtle::ConstantTimeEq;
            g.len() == token.len() && bool::from(g.as_bytes().ct_eq(token))
        })
    }

    /// The store's part of `/readyz`, and whether it makes keygate unready:
    /// only when limited requests would all be refused anyway
    /// (`on_error_limits = "closed"`); with `local` or `open` the sidecar
    /// still serves, and pulling every replica out of a load balancer at
    /// once because Redis blinked would turn a degraded fleet into an outage.
    async fn state_readiness(&self) -> (serde_json::Value, bool) {
        let policy = self.store.load();
        let Some(redis) = &self.state else {
            return (serde_json::json!({"backend": "embedded", "up": true}), true);
        };
        let redis = redis.clone();
        // Bounded even if a blocking call hangs: a readiness probe that
        // times out on every replica at once is the outage to avoid.
        let deadline = match &policy.state {
            StateBackend::Redis(s) => s.token_timeout + s.connect_timeout,
            StateBackend::Embedded => std::time::Duration::from_secs(2),
        };
        let up = tokio::time::timeout(deadline, tokio::task::spawn_blocking(move || redis.ping()))
            .await
            .is_ok_and(|r| r.is_ok_and(|r| r.is_ok()));
        METRICS.state_up.set(i64::from(up));
        let closed = match &policy.state {
            StateBackend::Redis(s) => s.on_error_limits == OnError::Closed,
            StateBackend::Embedded => false,
        };
        let detail = serde_json::json!({
            "backend": "redis",
            "up": up,
            "refresh_tokens": if up { "available" } else { "503 state_unavailable" },
        });
        (detail, up || !closed)
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        match (method, path.as_str()) {
            (Method::GET | Method::HEAD, "/healthz") => {
                json(StatusCode::OK, serde_json::json!({"status": "ok"}))
            }
            (Method::GET | Method::HEAD, "/readyz") => {
                let policy = self.store.load();
                let counts = policy.counts();
                let last = self.status.snapshot();
                let (state, ready) = self.state_readiness().await;
                let (code, word) = match (ready, state["up"].as_bool()) {
                    (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "unready"),
                    (true, Some(false)) => (StatusCode::OK, "degraded"),
                    _ => (StatusCode::OK, "ready"),
                };
                json(
                    code,
                    serde_json::json!({
                        "status": word,
                        "state": state,
                        "config": self.store.path().display().to_string(),
                        "policy": {
                            "users": counts.users,
                            "api_keys": counts.api_keys,
                            "client_certs": counts.client_certs,
                            "routes": counts.routes,
                            "tiers": counts.tiers,
                            "jwt_keys": counts.jwt_keys,
                        },
                        "last_reload": last,
                        "restart_needed_for": self.store.restart_needed(),
                    }),
                )
            }
            (Method::GET | Method::HEAD, "/metrics") => {
                let encoder = TextEncoder::new();
                let mut buf = Vec::new();
                if let Err(e) = encoder.encode(&prometheus::gather(), &mut buf) {
                    tracing::error!(error = %e, "metrics could not be encoded");
                    return error_response(
                        500,
                        "internal_error",
                        "the metrics could not be encoded",
                        |_| {},
                    );
                }
                Response::builder()
                    .status(StatusCode::OK)
                    .header(http::header::CONTENT_TYPE, encoder.format_type())
                    .header(http::header::CONTENT_LENGTH, buf.len())
                    .body(buf)
                    .unwrap_or_default()
            }
            (_, p) if super::admin_keys::is_key_path(p) && !self.may_reload(session) => {
                error_response(
                    401,
                    "invalid_credentials",
                    "the key API needs the admin token (Authorization: Bearer …)",
                    |out| out.field(b"www-authenticate", br#"Bearer realm="keygate admin""#),
                )
            }
            (_, p) if super::admin_keys::is_key_path(p) => {
                super::admin_keys::serve(&self.keys, self.store.load(), session).await
            }
            (Method::POST, "/reload") if !self.may_reload(session) => error_response(
                401,
                "invalid_credentials",
                "POST /reload needs the admin token (Authorization: Bearer …)",
                |out| out.field(b"www-authenticate", br#"Bearer realm="keygate admin""#),
            ),
            (Method::POST, "/reload") => {
                let store = self.store.clone();
                let status = self.status.clone();
                let result =
                    tokio::task::spawn_blocking(move || reload_now(&store, &status, "admin")).await;
                match result {
                    Ok(Ok(summary)) => json(StatusCode::OK, summary),
                    Ok(Err(summary)) => json(StatusCode::UNPROCESSABLE_ENTITY, summary),
                    Err(e) => json(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        serde_json::json!({"result": "failure", "errors": [e.to_string()]}),
                    ),
                }
            }
            (_, "/healthz" | "/readyz" | "/metrics" | "/reload") => {
                let allow = if path == "/reload" {
                    "POST"
                } else {
                    "GET, HEAD"
                };
                error_response(
                    405,
                    "method_not_allowed",
                    &format!("this endpoint answers {allow}"),
                    |out| out.field(b"allow", allow.as_bytes()),
                )
            }
            _ => error_response(404, "not_found", "no such admin endpoint", |_| {}),
        }
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Vec<u8>> {
    let body = serde_json::to_vec_pretty(&value).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .unwrap_or_default()
}
