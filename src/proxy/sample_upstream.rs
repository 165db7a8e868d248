//! The fake VM API that `keygate demo` puts behind keygate: a few JSON
//! endpoints, and in every answer the identity headers keygate sent, so a
//! newcomer can see what the upstream learns about the caller.

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};

pub struct SampleVmApi;

#[async_trait]
impl ServeHttp for SampleVmApi {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().to_string();
        let seen: serde_json::Map<String, Value> = req
            .headers
            .iter()
            .filter(|(name, _)| {
                let n = name.as_str();
                n.starts_with("x-auth-") || n.starts_with("x-forwarded-") || n == "x-request-id"
            })
            .map(|(n, v)| (n.to_string(), json!(v.to_str().unwrap_or("?"))))
            .collect();
        // Drain any body so the connection stays reusable.
        while let Ok(Some(_)) = session.read_request_body().await {}

        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (status, body) = match (&method, segments.as_slice()) {
            (&Method::GET, ["v1", "status"]) => (StatusCode::OK, json!({"status": "ok"})),
            (&Method::GET, ["v1", "vms"]) => (
                StatusCode::OK,
                json!({"vms": [
                    {"id": "vm-1", "name": "web-1", "state": "running"},
                    {"id": "vm-2", "name": "db-1", "state": "stopped"},
                ]}),
            ),
            (&Method::POST, ["v1", "vms"]) => (
                StatusCode::CREATED,
                json!({"id": "vm-3", "name": "new-vm", "state": "provisioning"}),
            ),
            (&Method::GET, ["v1", "vms", id]) => (
                StatusCode::OK,
                json!({"id": id, "name": format!("{id}-name"), "state": "running"}),
            ),
            (&Method::DELETE, ["v1", "vms", id]) => {
                (StatusCode::OK, json!({"id": id, "state": "deleting"}))
            }
            _ => (StatusCode::NOT_FOUND, json!({"error": "no such endpoint"})),
        };
        let mut body = body;
        body["seen_by_upstream"] = Value::Object(seen);
        let bytes = serde_json::to_vec_pretty(&body).unwrap_or_default();
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::CONTENT_LENGTH, bytes.len())
            .body(bytes)
            .unwrap_or_default()
    }
}
