//! keygate's own answers on a connection: refusals of unreadable heads,
//! JSON refusals and answers, each with its `Cache-Control` and request id.

use std::time::Instant;

use http::Method;
use tokio::io::{AsyncRead, AsyncWrite};

use super::*;

impl<S: AsyncRead + AsyncWrite + Unpin> Downstream<S> {
    /// A malformed head: the documented JSON error, then close.
    pub(super) async fn refuse_head(&mut self, worker: &Worker, e: WireError) {
        let started = Instant::now();
        let request_id = request_id(None);
        let refusal = Refusal::Wire(e);
        let status = refusal.status();
        let body = gate::error_body(status, refusal.code(), &refusal.message(), &request_id);
        json_head(
            &mut self.out,
            self.tls.as_ref().and_then(|t| t.hsts.as_deref()),
            status,
            "no-store",
            &request_id,
            body.len(),
            true,
        );
        self.out.extend_from_slice(b"\r\n");
        self.out.extend_from_slice(&body);
        let sent = send(&mut self.stream, &self.out).await.is_ok();
        METRICS
            .auth_denials
            .with_label_values(&["invalid_request"])
            .inc();
        // Its line too: a request that could not be read is still one.
        let policy = worker.shared.store.load();
        if policy.log.access != crate::policy::AccessLog::Off {
            let bytes_out = if sent { self.out.len() as u64 } else { 0 };
            access_log::with_now(|time| {
                access_log::write(
                    policy.log.access,
                    &access_log::Entry {
                        time,
                        request_id: &request_id,
                        client_ip: Some(self.peer),
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
    }

    /// Every answer keygate writes for a refused request.
    pub(super) async fn refuse(
        &mut self,
        x: &mut Exchange,
        head: &RequestHead,
        r: Refusal,
    ) -> Step<Next> {
        if let Some(label) = r.denial_label() {
            METRICS.auth_denials.with_label_values(&[label]).inc();
        }
        if let Some(kind) = r.upstream_label() {
            METRICS.upstream_errors.with_label_values(&[kind]).inc();
        }
        let status = r.status();
        x.refused = Some((status, r.code()));
        let body = gate::error_body(status, r.code(), &r.message(), &x.request_id);
        let rate = match &r {
            Refusal::Gate(_) => x.decision.as_ref().and_then(|d| d.rate),
            _ => None,
        };
        let policy = x.policy.clone();
        self.answer(x, head, status, "no-store", &body, |out| {
            r.headers(out);
            if let Some(rate) = rate {
                forward::rate_headers(out, &policy, &rate);
            }
        })
        .await
    }

    /// Every JSON answer keygate writes itself goes out here: content type
    /// and length, `Cache-Control`, `X-Request-Id`, then what `extra` adds.
    pub(super) async fn answer(
        &mut self,
        x: &mut Exchange,
        head: &RequestHead,
        status: u16,
        cache_control: &str,
        body: &[u8],
        extra: impl FnOnce(&mut Vec<u8>),
    ) -> Step<Next> {
        x.status = status;
        // An unread request body cannot be skipped safely: end the connection.
        let next = if !x.body.is_done() {
            Next::Linger
        } else if status == 413 {
            // A body too large is the end of the connection (nginx too):
            // whether the client sent it all or stopped early must not
            // decide whether the connection lives on.
            Next::Close
        } else if head.keep_alive {
            Next::KeepAlive
        } else {
            Next::Close
        };
        json_head(
            &mut self.out,
            self.tls.as_ref().and_then(|t| t.hsts.as_deref()),
            status,
            cache_control,
            &x.request_id,
            body.len(),
            next != Next::KeepAlive,
        );
        extra(&mut self.out);
        self.out.extend_from_slice(b"\r\n");
        if head.method != Method::HEAD {
            self.out.extend_from_slice(body);
        }
        if send(&mut self.stream, &self.out).await.is_err() {
            return Err(Gone);
        }
        x.bytes_out += self.out.len() as u64;
        Ok(next)
    }
}

/// Status line and the headers every JSON answer carries; no blank line.
pub(super) fn json_head(
    out: &mut Vec<u8>,
    hsts: Option<&str>,
    status: u16,
    cache_control: &str,
    request_id: &str,
    len: usize,
    close: bool,
) {
    out.clear();
    status_line(out, status, reason(status).as_bytes());
    header(out, b"content-type", b"application/json");
    header_u64(out, b"content-length", len as u64);
    header(out, b"cache-control", cache_control.as_bytes());
    header(out, b"x-request-id", request_id.as_bytes());
    if let Some(hsts) = hsts {
        header(out, b"strict-transport-security", hsts.as_bytes());
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
}
