//! The admin listener: `/healthz`, `/readyz`, `/metrics` and `POST /reload`.
//! It runs on its own pingora service (and runtime), so a scrape or a reload
//! never competes with proxy threads.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{Encoder, TextEncoder};

use super::reload::{reload_now, Status};
use crate::policy::PolicyStore;

pub struct Admin {
    pub store: Arc<PolicyStore>,
    pub status: Arc<Status>,
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
                json(
                    StatusCode::OK,
                    serde_json::json!({
                        "status": "ready",
                        "config": self.store.path().display().to_string(),
                        "policy": {
                            "users": counts.users,
                            "api_keys": counts.api_keys,
                            "routes": counts.routes,
                            "tiers": counts.tiers,
                            "jwt_keys": counts.jwt_keys,
                        },
                        "last_reload": last,
                    }),
                )
            }
            (Method::GET | Method::HEAD, "/metrics") => {
                let encoder = TextEncoder::new();
                let mut buf = Vec::new();
                if let Err(e) = encoder.encode(&prometheus::gather(), &mut buf) {
                    return json(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        serde_json::json!({"error": e.to_string()}),
                    );
                }
                Response::builder()
                    .status(StatusCode::OK)
                    .header(http::header::CONTENT_TYPE, encoder.format_type())
                    .header(http::header::CONTENT_LENGTH, buf.len())
                    .body(buf)
                    .unwrap_or_default()
            }
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
            (_, "/healthz" | "/readyz" | "/metrics" | "/reload") => json(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({"error": "method not allowed"}),
            ),
            _ => json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not found"}),
            ),
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
