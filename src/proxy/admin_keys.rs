//! The key API on the admin listener, for the operator (and `keygate keys`):
//! the same operations as the public one for any user, behind the admin
//! token, without the lock-out guard or the create throttle.
//!
//! `POST /keys` (the create body plus `"user"`), `GET /keys?user=EMAIL`,
//! `GET|PATCH|DELETE /keys/{id}`, `POST /keys/{id}/roll`,
//! `GET|PUT /accounts/{user}/ip-allow`.

use std::sync::Arc;

use http::{Method, Response};
use pingora::protocols::http::ServerSession;

use super::exchange::error_response;
use crate::keys::manage::{Actor, KeyError, Op};
use crate::keys::SelfKeys;
use crate::policy::{Policy, UserIdx};

/// Largest body the admin key API reads.
const MAX_BODY: usize = 64 * 1024;

/// Whether `path` belongs to the admin key API.
pub fn is_key_path(path: &str) -> bool {
    path == "/keys" || path.starts_with("/keys/") || path.starts_with("/accounts/")
}

/// Answer one admin key request (the admin token is checked already).
pub async fn serve(
    keys: &Arc<SelfKeys>,
    policy: Arc<Policy>,
    session: &mut ServerSession,
) -> Response<Vec<u8>> {
    let method = session.req_header().method.clone();
    let uri = session.req_header().uri.clone();
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or("").to_string();
    let Some(settings) = policy.auth.self_service.clone() else {
        return refuse(&KeyError::InvalidRequest(
            "self-service keys are off ([auth.self_service] enabled = false)".into(),
        ));
    };
    let body = match read_body(session).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let store = keys.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let now = crate::clock::unix_now();
        // Which user, and which operation.
        let (owner, op) = match (parts.as_slice(), &method) {
            (["keys"], &Method::POST) => {
                let named = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["user"].as_str().map(str::to_string))
                    .ok_or_else(|| KeyError::InvalidRequest("name the key's \"user\"".into()))?;
                (user(&policy, &named)?, Op::Create(&body))
            }
            (["keys"], &Method::GET) => {
                let named = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("user="))
                    .map(percent_decode)
                    .ok_or_else(|| KeyError::InvalidRequest("give ?user=EMAIL".into()))?;
                (user(&policy, &named)?, Op::List)
            }
            (["keys", id], m) | (["keys", id, "roll"], m) => {
                let record = store.store.get(id)?.ok_or(KeyError::NotFound)?;
                let (owner, _) = policy.user_by_id(&record.user).ok_or(KeyError::NotFound)?;
                let roll = parts.len() == 3;
                let op = match (roll, m) {
                    (true, &Method::POST) => Op::Roll(id, &body),
                    (false, &Method::GET) => Op::Get(id),
                    (false, &Method::PATCH) => Op::Update(id, &body),
                    (false, &Method::DELETE) => Op::Revoke(id),
                    _ => return Err(KeyError::InvalidRequest("method".into())),
                };
                (owner, op)
            }
            (["accounts", named, "ip-allow"], m) => {
                let owner = user(&policy, &percent_decode(named))?;
                match *m {
                    Method::GET => (owner, Op::GetAllow),
                    Method::PUT => (owner, Op::PutAllow(&body)),
                    _ => return Err(KeyError::InvalidRequest("method".into())),
                }
            }
            _ => return Err(KeyError::NotFound),
        };
        let actor = Actor {
            owner,
            label: "admin".into(),
            ceiling: policy.user(owner).permissions.clone(),
            client_ip: None,
            operator: true,
        };
        store.run(&policy, &settings, &actor, op, now, &|_| Ok(()))
    })
    .await
    .unwrap_or(Err(KeyError::Unavailable));
    match answer {
        Ok(reply) => {
            let length = reply.body.len();
            let mut response = Response::new(reply.body);
            *response.status_mut() =
                http::StatusCode::from_u16(reply.status).unwrap_or(http::StatusCode::OK);
            let h = response.headers_mut();
            h.insert(
                http::header::CACHE_CONTROL,
                http::HeaderValue::from_static("no-store"),
            );
            if reply.status != 204 {
                h.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                h.insert(http::header::CONTENT_LENGTH, length.into());
            }
            response
        }
        Err(e) => refuse(&e),
    }
}

fn refuse(e: &KeyError) -> Response<Vec<u8>> {
    error_response(e.status(), e.code(), &e.message(), |out| {
        if let Some(secs) = e.retry_after() {
            out.field_u64(b"retry-after", secs);
        }
    })
}

/// A user named by id or email.
fn user(policy: &Policy, named: &str) -> Result<UserIdx, KeyError> {
    policy
        .user_by_id(named)
        .or_else(|| policy.user_by_email(named))
        .map(|(idx, _)| idx)
        .ok_or_else(|| KeyError::InvalidRequest(format!("no user {named:?} in the policy")))
}

/// `%40` and the like in a query or path segment (an email's `@`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, Response<Vec<u8>>> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY {
                    return Err(error_response(
                        413,
                        "payload_too_large",
                        &format!("the body is larger than {MAX_BODY} bytes"),
                        |_| {},
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(_) => {
                return Err(error_response(
                    400,
                    "invalid_request",
                    "the body could not be read",
                    |_| {},
                ))
            }
        }
    }
}
