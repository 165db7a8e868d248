//! keygate's own answers on the public listener: refusals of unreadable
//! heads, JSON refusals and answers, each with its `Cache-Control` and
//! request id. Every one goes out through [`json_fields`], whichever
//! protocol carries it.

use std::time::Instant;

use http::Method;

use super::{record::request_id, Downstream, Gone, Origin, Refusal, Req, Step, Worker};
use crate::gate;
use crate::http1::encode::reason;
use crate::http1::parse::WireError;
use crate::http1::{AnswerBody, Fields};
use crate::metrics::{status_class, status_code, METRICS};
use crate::proxy::access_log;
use crate::proxy::forward;

/// The fields every JSON answer carries (its length is the framing's).
pub fn json_fields(
    out: &mut dyn Fields,
    hsts: Option<&str>,
    cache_control: &str,
    request_id: &str,
) {
    out.field(b"content-type", b"application/json");
    out.field(b"cache-control", cache_control.as_bytes());
    out.field(b"x-request-id", request_id.as_bytes());
    if let Some(hsts) = hsts {
        out.field(b"strict-transport-security", hsts.as_bytes());
    }
}

/// A refusal in the documented JSON shape as an `http` response, for the
/// listeners served by pingora (the admin listener): the same body and
/// fields as the public listener's, with a fresh request id.
pub fn error_response(
    status: u16,
    code: &str,
    message: &str,
    extra: impl FnOnce(&mut dyn Fields),
) -> http::Response<Vec<u8>> {
    let request_id = request_id(None);
    let body = gate::error_body(status, code, message, &request_id);
    let mut response = http::Response::new(Vec::new());
    *response.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    json_fields(headers, None, "no-store", &request_id);
    headers.field_u64(b"content-length", body.len() as u64);
    extra(headers);
    *response.body_mut() = body;
    response
}

/// A head that could not be read: the documented JSON error, then close;
/// `head_method` when the request is known to be a HEAD (an HTTP/2
/// stream's method is known even when its head is refused): no body then.
pub async fn refuse_head<D: Downstream>(
    worker: &Worker,
    origin: &Origin,
    down: &mut D,
    e: WireError,
    head_method: bool,
) -> Step {
    let started = Instant::now();
    let request_id = request_id(None);
    let refusal = Refusal::Wire(e);
    let status = refusal.status();
    let body = gate::error_body(status, refusal.code(), &refusal.message(), &request_id);
    let fields = down.answer(status, reason(status).as_bytes());
    json_fields(fields, origin.hsts(), "no-store", &request_id);
    down.end_head(AnswerBody::Length(body.len() as u64), true, None);
    let sent = down.send(if head_method { &[] } else { &body }, true).await;
    METRICS
        .auth_denials
        .with_label_values(&["invalid_request"])
        .inc();
    // Its line too: a request that could not be read is still one.
    let policy = worker.shared.store.load();
    if policy.log.access != crate::policy::AccessLog::Off {
        let bytes_out = *sent.as_ref().unwrap_or(&0);
        access_log::with_now(|time| {
            access_log::write(
                policy.log.access,
                &access_log::Entry {
                    time,
                    request_id: &request_id,
                    client_ip: Some(origin.peer),
                    method: "-",
                    path: "-",
                    route: "unmatched",
                    status,
                    upstream_status: None,
                    forwarded: false,
                    principal: None,
                    auth_method: None,
                    key_id: None,
                    tier: None,
                    code: Some(refusal.code()),
                    bytes_in: 0,
                    bytes_out,
                    user_agent: None,
                    upstream_ms: None,
                    total_ms: access_log::ms(started.elapsed()),
                },
            )
        });
    }
    METRICS
        .requests
        .with_label_values(&[
            "unmatched",
            "OTHER",
            status_class(status),
            status_code(status),
        ])
        .inc();
    sent.map(drop).map_err(|_| Gone)
}

impl<D: Downstream> Req<'_, D> {
    /// Every answer keygate writes for a refused request.
    pub(super) async fn refuse(&mut self, r: Refusal) -> Step {
        if let Some(label) = r.denial_label() {
            METRICS.auth_denials.with_label_values(&[label]).inc();
        }
        if let Some(kind) = r.upstream_label() {
            METRICS.upstream_errors.with_label_values(&[kind]).inc();
        }
        let status = r.status();
        self.x.refused = Some((status, r.code()));
        let body = gate::error_body(status, r.code(), &r.message(), &self.x.request_id);
        let rate = match &r {
            Refusal::Gate(_) => self.x.decision.as_ref().and_then(|d| d.rate),
            _ => None,
        };
        // A body too large is the end of the connection (nginx too):
        // whether the client sent it all or stopped early must not decide
        // whether the connection lives on.
        if status == 413 {
            self.close = true;
        }
        let policy = self.x.policy.clone();
        self.answer(status, "no-store", &body, |out| {
            r.headers(out);
            if let Some(rate) = rate {
                forward::rate_headers(out, &policy, &rate);
            }
        })
        .await
    }

    /// Every JSON answer keygate writes itself goes out here: the fields
    /// of [`json_fields`], then what `extra` adds.
    pub(super) async fn answer(
        &mut self,
        status: u16,
        cache_control: &str,
        body: &[u8],
        extra: impl FnOnce(&mut dyn Fields),
    ) -> Step {
        self.x.status = status;
        let close = self.close || self.worker.draining.get();
        let hsts = self.origin.hsts();
        let fields = self.down.answer(status, reason(status).as_bytes());
        json_fields(fields, hsts, cache_control, &self.x.request_id);
        extra(fields);
        let framing = if status == 204 {
            AnswerBody::Empty
        } else {
            AnswerBody::Length(body.len() as u64)
        };
        self.down.end_head(framing, close, None);
        let body = if self.head.method == Method::HEAD {
            &[][..]
        } else {
            body
        };
        match self.down.send(body, true).await {
            Ok(n) => {
                self.x.progress.bytes_out += n;
                Ok(())
            }
            Err(_) => Err(Gone),
        }
    }
}
