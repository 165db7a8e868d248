//! The request record: what one exchange learned, from its head to its
//! access-log line and metrics, written however the exchange ends.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;

use crate::gate::Decision;
use crate::http1::client::Progress;
use crate::metrics::{method_label, METRICS};
use crate::policy::Policy;
use crate::proxy::access_log;
use crate::proxy::dispatch::Endpoint;

/// A client-sent request id is kept when it is this short and printable.
const MAX_REQUEST_ID_LEN: usize = 128;
/// nginx's status for a request whose client went away before its answer.
const CLIENT_CLOSED: u16 = 499;

/// Per-request facts, from the head to the log line.
pub(super) struct Exchange {
    pub(super) started: Instant,
    pub(super) policy: Arc<Policy>,
    /// As the gate sees it: the peer, or the trusted proxies' client.
    pub(super) client_ip: IpAddr,
    /// Who an auth endpoint issued tokens to (the gate's principal is in
    /// `decision`).
    pub(super) subject: Option<String>,
    pub(super) upstream_status: Option<u16>,
    /// Only kept when the access log is on.
    pub(super) user_agent: Option<String>,
    pub(super) method: Method,
    pub(super) request_id: String,
    /// The normalised path.
    pub(super) path: String,
    pub(super) decision: Option<Decision>,
    pub(super) endpoint: Option<Endpoint>,
    pub(super) webhook: Option<Box<str>>,
    /// Status and code of a response keygate wrote itself.
    pub(super) refused: Option<(u16, &'static str)>,
    pub(super) status: u16,
    pub(super) upstream_elapsed: Option<Duration>,
    /// Whether the head went upstream; body bytes read, answer bytes written.
    pub(super) progress: Progress,
    /// The exchange ran to its end (else the client went away: 499).
    pub(super) ended: bool,
}

impl Drop for Exchange {
    /// Every request leaves its access-log line and its metrics, however
    /// it ends: answered, refused, or abandoned by its client (a closed
    /// connection, an HTTP/2 reset that aborts this exchange mid-way).
    fn drop(&mut self) {
        self.log();
    }
}

impl Exchange {
    pub(super) fn new(
        policy: Arc<Policy>,
        client_ip: IpAddr,
        method: Method,
        request_id: String,
        user_agent: Option<String>,
    ) -> Exchange {
        Exchange {
            started: Instant::now(),
            policy,
            client_ip,
            subject: None,
            upstream_status: None,
            user_agent,
            method,
            request_id,
            path: String::new(),
            decision: None,
            endpoint: None,
            webhook: None,
            refused: None,
            status: 0,
            upstream_elapsed: None,
            progress: Progress::default(),
            ended: false,
        }
    }

    /// Metrics and the access log line for this request. A client that went
    /// away before any of the answer reached it is logged as nginx does:
    /// `499`, with whether the upstream got the request.
    fn log(&self) {
        let policy = &*self.policy;
        let (bytes_in, bytes_out) = (self.progress.bytes_in, self.progress.bytes_out);
        let abandoned = !self.ended && bytes_out == 0;
        let status = if abandoned {
            CLIENT_CLOSED
        } else if self.status == 0 {
            self.refused.map_or(0, |(s, _)| s)
        } else {
            self.status
        };
        let code = if abandoned {
            Some("client_closed_request")
        } else {
            self.refused.map(|(_, code)| code)
        };
        let elapsed = self.started.elapsed();
        let decision = self.decision.as_ref();
        let route = match (self.endpoint, &self.webhook, decision.and_then(|d| d.route)) {
            (Some(endpoint), _, _) => endpoint.label(),
            (None, Some(hook), _) => hook,
            (None, None, Some(r)) => &*policy.route(r).pattern,
            (None, None, None) => "unmatched",
        };
        let method = method_label(&self.method);
        let upstream = self.upstream_elapsed;
        crate::metrics::with_request_series(route, method, status, upstream.is_some(), |s| {
            s.count.inc();
            s.duration.observe(elapsed.as_secs_f64());
            if let (Some(h), Some(up)) = (&s.upstream, upstream) {
                h.observe(up.as_secs_f64());
            }
        });
        if let Some(up) = upstream {
            // What keygate itself adds: everything but the upstream's time.
            METRICS
                .added_latency
                .observe(elapsed.saturating_sub(up).as_secs_f64());
        }
        if policy.log.access == crate::policy::AccessLog::Off {
            return;
        }
        let principal = decision.and_then(|d| d.principal.as_ref());
        access_log::with_now(|time| {
            access_log::write(
                policy.log.access,
                &access_log::Entry {
                    time,
                    request_id: &self.request_id,
                    client_ip: Some(decision.map_or(self.client_ip, |d| d.client_ip)),
                    method: self.method.as_str(),
                    path: access_log::clip(&self.path),
                    route,
                    status,
                    upstream_status: self.upstream_status,
                    forwarded: self.progress.forwarded,
                    principal: principal
                        .map(|p| p.subject_str(policy))
                        .or(self.subject.as_deref()),
                    auth_method: principal.map(|p| p.method.as_str()),
                    key_id: principal.and_then(|p| p.key_id(policy)),
                    tier: principal.map(|p| &*policy.tier(p.tier(policy)).name),
                    code,
                    bytes_in,
                    bytes_out,
                    user_agent: self.user_agent.as_deref().map(access_log::clip),
                    upstream_ms: self.upstream_elapsed.map(access_log::ms),
                    total_ms: access_log::ms(elapsed),
                },
            )
        });
    }
}

/// The client's `X-Request-Id` when it is sane, else a fresh random one.
pub(super) fn request_id(sent: Option<&[u8]>) -> String {
    if let Some(b) = sent {
        if !b.is_empty() && b.len() <= MAX_REQUEST_ID_LEN && b.iter().all(u8::is_ascii_graphic) {
            return String::from_utf8_lossy(b).into_owned();
        }
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes: [u8; 16] = rand::random();
    bytes
        .iter()
        .flat_map(|b| {
            [
                HEX[usize::from(b >> 4)] as char,
                HEX[usize::from(b & 15)] as char,
            ]
        })
        .collect()
}
