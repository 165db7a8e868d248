//! The application, one request at a time: dispatch a parsed head (auth
//! endpoint, webhook, or the gate), then answer from keygate or forward it
//! and relay the answer. It sees a request through the engine's
//! [`Downstream`], so HTTP/1.1 connections ([`serve`]) and HTTP/2 streams
//! (`super::h2`) take the very same path: one dispatch, gate, forward
//! plan, access log and metrics.
//!
//! Nothing the client framed is passed through: the upstream gets a head
//! written by [`forward::request_head`] and a body the engine decoded and
//! re-encodes; the client gets the answer re-framed by its downstream.
//!
//! The rooms, each in a file of its own: [`gate_branch`] (decide, limit,
//! then forward or refuse), [`endpoints`] (login, refresh, revoke, JWKS),
//! [`keys`] (the self-service key API),
//! [`webhooks`] (verified webhook paths), [`forwarding`] (the upstream
//! exchange and the answer's relay), [`answers`] (keygate's own JSON
//! answers) and [`record`] (the request record and its log line). The
//! limiter is `super::limiter`.

use std::cell::Cell;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

use super::dispatch::{dispatch, Dispatch};
use super::limiter::LimitService;
use super::refusal::Refusal;
use crate::gate::{self, Denial, HeaderSource};
use crate::http1::conn::{Conn, Shutdown};
use crate::http1::parse::{HeadView, RequestHead};
use crate::http1::upstream::Pool;
use crate::http1::Downstream;
use crate::issue::Issuer;
use crate::limit::Limiter;
use crate::policy::{PolicyStore, Underscores};

mod answers;
mod endpoints;
mod forwarding;
mod gate_branch;
mod keys;
mod record;
mod webhooks;

pub use answers::{error_response, refuse_head};
use record::{request_id, Exchange};

/// What every worker shares.
pub struct Shared {
    pub store: Arc<PolicyStore>,
    /// This process's GCRA (the issuer's login throttle uses it too).
    pub limiter: Arc<Limiter>,
    pub issuer: Arc<Issuer>,
    /// The limiter shared by a fleet, with `[state] backend = "redis"`.
    pub fleet: Option<Arc<crate::state::fleet::RedisLimits>>,
    /// Client connections open, for `server.max_connections*`.
    pub connections: Arc<super::front::Connections>,
    /// Self-service keys and account allowlists.
    pub keys: Arc<crate::keys::SelfKeys>,
}

/// One proxy thread's state; its connections share it through an `Rc`.
pub struct Worker {
    pub shared: Arc<Shared>,
    pub pool: Pool,
    /// This thread's limiter service.
    pub limits: LimitService,
    /// Set at shutdown: finish the request in hand, then close.
    pub draining: Cell<bool>,
    /// Wakes idle connections at shutdown.
    pub drain: Notify,
    pub active: Cell<usize>,
}

impl Worker {
    pub fn new(shared: Arc<Shared>) -> Worker {
        Worker {
            limits: LimitService::new(shared.limiter.clone(), shared.fleet.clone()),
            shared,
            pool: Pool::new(),
            draining: Cell::new(false),
            drain: Notify::new(),
            active: Cell::new(0),
        }
    }
}

/// What a TLS connection brings to its requests.
#[derive(Default)]
pub struct TlsInfo {
    /// `Strict-Transport-Security` for every answer, as the policy said
    /// when the connection was accepted.
    pub hsts: Option<Box<str>>,
    /// The client certificate verified in the handshake (mTLS).
    pub client_cert: Option<Rc<gate::PeerCert>>,
}

/// Where a request came from: the same for every request of a connection.
pub struct Origin {
    pub peer: IpAddr,
    /// `peer` as text, for `X-Forwarded-For`.
    pub peer_text: String,
    /// When it came over TLS.
    pub tls: Option<TlsInfo>,
}

impl Origin {
    pub fn new(peer: IpAddr, tls: Option<TlsInfo>) -> Origin {
        Origin {
            peer,
            peer_text: peer.to_string(),
            tls,
        }
    }

    fn hsts(&self) -> Option<&str> {
        self.tls.as_ref().and_then(|t| t.hsts.as_deref())
    }

    fn client_cert(&self) -> Option<&gate::PeerCert> {
        self.tls.as_ref().and_then(|t| t.client_cert.as_deref())
    }
}

/// The client went away (or broke the protocol where no answer can be
/// given): close without a word.
pub struct Gone;

type Step = Result<(), Gone>;

/// Serve one accepted HTTP/1.1 connection until either side ends it;
/// `tls` when it came over TLS.
pub async fn serve<S>(worker: Rc<Worker>, stream: S, peer: IpAddr, tls: Option<TlsInfo>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _in_flight = InFlight::new(worker.clone());
    let origin = Origin::new(peer, tls);
    let mut conn = Conn::new(stream);
    let shutdown = Shutdown {
        draining: &worker.draining,
        notify: &worker.drain,
    };
    let mut next = crate::http1::conn::Next::Close;
    while let Some(head) = conn.next_head(&shutdown).await {
        next = match head {
            Ok(head) => {
                let served = handle(&worker, &origin, &mut conn, &head).await;
                conn.finish(Some(head), served.is_err())
            }
            Err(e) => {
                let served = answers::refuse_head(&worker, &origin, &mut conn, e, false).await;
                conn.finish(None, served.is_err())
            }
        };
        if next != crate::http1::conn::Next::KeepAlive || worker.draining.get() {
            break;
        }
    }
    conn.close(next).await;
}

/// One connection (or stream) in flight on a worker, for the drain.
pub struct InFlight(Rc<Worker>);

impl InFlight {
    pub fn new(worker: Rc<Worker>) -> InFlight {
        worker.active.set(worker.active.get() + 1);
        InFlight(worker)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.set(self.0.active.get() - 1);
    }
}

/// The request target sent upstream: as received, or rewritten.
enum Target {
    Buf(std::ops::Range<usize>),
    Owned(Vec<u8>),
}

/// One request on its way through the application.
struct Req<'a, D> {
    worker: &'a Worker,
    origin: &'a Origin,
    down: &'a mut D,
    head: &'a RequestHead,
    /// The record: written to the log when it drops, however this ends.
    x: Exchange,
    /// The connection ends after this answer.
    close: bool,
}

impl<D: Downstream> Req<'_, D> {
    fn view(&self) -> HeadView<'_> {
        HeadView {
            buf: self.down.head_buf(),
            headers: &self.head.headers,
        }
    }
}

/// Answer one parsed request, from whichever downstream it came.
pub async fn handle<D: Downstream>(
    worker: &Worker,
    origin: &Origin,
    down: &mut D,
    head: &RequestHead,
) -> Step {
    let policy = worker.shared.store.load();
    let (request_id, client_ip, user_agent) = {
        let view = HeadView {
            buf: down.head_buf(),
            headers: &head.headers,
        };
        let request_id = request_id(view.values(b"x-request-id").next());
        let client_ip =
            gate::client_ip::resolve(origin.peer, &view, &policy.server.trusted_proxies);
        let user_agent = (policy.log.access != crate::policy::AccessLog::Off)
            .then(|| {
                view.values(b"user-agent")
                    .next()
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
            .flatten();
        (request_id, client_ip, user_agent)
    };
    // A client certificate verified under CAs the policy no longer trusts:
    // the gate refuses it, and the connection ends with this answer (a new
    // handshake checks against today's CAs).
    let close = origin.client_cert().is_some_and(|c| c.is_stale(&policy));
    let x = Exchange::new(
        policy,
        client_ip,
        head.method.clone(),
        request_id,
        user_agent,
    );
    let mut req = Req {
        worker,
        origin,
        down,
        head,
        x,
        close,
    };
    let served = req.route().await;
    if served.is_ok() {
        req.x.ended = true;
    }
    served
}

impl<D: Downstream> Req<'_, D> {
    async fn route(&mut self) -> Step {
        let policy = self.x.policy.clone();
        let head = self.head;
        if head.underscore && policy.server.underscore_headers == Underscores::Refuse {
            return self.refuse(Refusal::Underscore).await;
        }
        let buf = self.down.head_buf();
        let target = head.target.get(buf);
        // The parser let only visible ASCII through.
        let raw_path = std::str::from_utf8(&target[..head.path_len]).unwrap_or("");
        let path = match gate::path::normalize(raw_path) {
            Ok(path) => path,
            Err(why) => {
                let refusal = Refusal::Gate(Denial::InvalidRequest(why));
                return self.refuse(refusal).await;
            }
        };
        // The upstream sees the normalised path and the query as sent.
        let target_out = match path {
            std::borrow::Cow::Borrowed(_) => {
                let start = target.as_ptr() as usize - buf.as_ptr() as usize;
                Target::Buf(start..start + target.len())
            }
            std::borrow::Cow::Owned(ref p) => {
                let mut t = p.clone().into_bytes();
                t.extend_from_slice(&target[head.path_len..]);
                Target::Owned(t)
            }
        };
        self.x.path = path.into_owned();
        match dispatch(&policy, &self.x.path) {
            Dispatch::Endpoint(endpoint) => {
                self.x.endpoint = Some(endpoint);
                self.serve_endpoint(endpoint).await
            }
            Dispatch::Webhook(hook) => {
                self.x.webhook = Some(hook.path.clone());
                self.serve_webhook(hook, target_out).await
            }
            Dispatch::Gate => self.serve_gate(target_out).await,
        }
    }
}

impl HeaderSource for HeadView<'_> {
    fn values<'s>(&'s self, name: &'s str) -> impl DoubleEndedIterator<Item = &'s [u8]> + 's {
        self.headers
            .iter()
            .filter(move |h| h.name.get(self.buf).eq_ignore_ascii_case(name.as_bytes()))
            .map(move |h| h.value.get(self.buf))
    }
}

#[cfg(test)]
mod tests;
