//! One client connection: read a request head, dispatch it (auth endpoint,
//! webhook, or the gate), then answer from keygate or forward it and relay
//! the answer; repeat while both sides keep the connection alive.
//!
//! Nothing the client framed is passed through: the upstream gets a head
//! written by [`forward::request_head`] and a body decoded by
//! [`Decoder`] and re-encoded here (`content-length` when its length is
//! known, else chunked), without trailers; the client gets the answer
//! re-framed the same way. A body whose framing breaks after its head went
//! upstream ends that upstream connection and gets the client a 400.
//!
//! Generic over the client stream (`AsyncRead + AsyncWrite`), so plain TCP
//! and TLS share it.
//!
//! The connection and its loop live here; the rest, each in a file of its
//! own: [`endpoints`] (the gate branch, auth endpoints, webhooks),
//! [`forwarding`] (the upstream exchange and the answer's relay), [`body`]
//! (request bodies, `100 Continue`, linger), [`answers`] (keygate's own
//! JSON answers) and [`record`] (the request record and its log line).

use std::cell::Cell;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::dispatch::{dispatch, Dispatch, Endpoint};
use super::forward::{self, Plan};
use super::refusal::{Failure, Refusal};
use crate::gate::{
    self, header_text, Decision, Denial, HeaderSource, Principal, QuotaNeed, RequestFacts,
};
use crate::http1::body::{encode_chunk, BodyError, Decoder, LAST_CHUNK};
use crate::http1::encode::{header, header_u64, reason, status_line};
use crate::http1::parse::{self, BodyKind, HeadView, Header, RequestHead, ResponseHead, WireError};
use crate::http1::upstream::{self, Conn, Pool};
use crate::issue::{IssueError, Issuer};
use crate::limit::{Limiter, Outcome};
use crate::metrics::{method_label, status_class, status_code, METRICS};
use crate::policy::{OnError, Policy, PolicyStore, Underscores, Webhook};
use crate::proxy::access_log;
use crate::state::fleet::{Answer, Lanes, RedisLimits};
use crate::state::topology::AsyncConn;

/// How long a started request head, or the next piece of a request body,
/// may take to arrive (nginx's `client_header_timeout` / `client_body_timeout`).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an idle keep-alive connection waits for its next request
/// (nginx's `keepalive_timeout` is 75 s).
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an unread request body is drained after an early answer.
const LINGER_TIME: Duration = Duration::from_secs(2);
/// How long a write to the client may make no progress (nginx's
/// `send_timeout` is 60 s): a client that stops reading does not hold its
/// connection, and an upstream connection, forever.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// The whole of a body keygate reads into memory (auth endpoints, webhooks)
/// must arrive within this, however it is dripped.
const BODY_DEADLINE: Duration = Duration::from_secs(60);
/// Interim (1xx) answers skipped before an upstream is deemed broken.
const MAX_INTERIM: usize = 16;
/// A client-sent request id is kept when it is this short and printable.
const MAX_REQUEST_ID_LEN: usize = 128;
const READ_CHUNK: usize = 16 * 1024;
/// nginx's status for a request whose client went away before its answer.
const CLIENT_CLOSED: u16 = 499;

/// What every worker shares.
pub struct Shared {
    pub store: Arc<PolicyStore>,
    /// This process's GCRA: the limiter itself with the embedded store, the
    /// fallback under `on_error_limits = "local"` with Redis.
    pub limiter: Arc<Limiter>,
    pub issuer: Arc<Issuer>,
    /// The limiter shared by a fleet, with `[state] backend = "redis"`.
    pub fleet: Option<Arc<RedisLimits>>,
    /// Client connections open, for `server.max_connections*`.
    pub connections: Arc<super::front::Connections>,
}

/// One proxy thread's state; its connections share it through an `Rc`.
pub struct Worker {
    pub shared: Arc<Shared>,
    pub pool: Pool,
    /// This thread's connection to Redis, in fleet mode; set up on first use.
    pub redis: Rc<std::cell::RefCell<Option<AsyncConn>>>,
    /// This thread's Redis limit calls in flight, batched by account.
    pub lanes: Rc<Lanes>,
    /// Set at shutdown: finish the request in hand, then close.
    pub draining: Cell<bool>,
    /// Wakes idle connections at shutdown.
    pub drain: Notify,
    pub active: Cell<usize>,
}

/// The connection's state after an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// The request was read to its end and both sides keep the connection.
    KeepAlive,
    /// Close now.
    Close,
    /// Close after draining what the client still sends: an answer went
    /// out before its request body was read, and closing at once would
    /// make the kernel reset the connection, losing the answer (nginx's
    /// lingering close).
    Linger,
}

/// The client went away (or broke the protocol where no answer can be
/// given): close without a word.
struct Gone;

type Step<T> = Result<T, Gone>;

/// Why a request body could not be read to its end.
enum BodyFailure {
    Gone,
    Malformed(&'static str),
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

/// Serve one accepted connection until either side ends it; `tls` when it
/// came over TLS.
pub async fn serve<S>(worker: Rc<Worker>, stream: S, peer: IpAddr, tls: Option<TlsInfo>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Counted until this future ends or is dropped (an HTTP/2 stream's
    // exchange is aborted when the client resets it).
    let _in_flight = InFlight::new(worker.clone());
    let mut client = Downstream {
        stream,
        tls,
        peer,
        peer_text: peer.to_string(),
        buf: spare::take(READ_CHUNK),
        rest: Vec::new(),
        rest_pos: 0,
        out: spare::take(4096),
        scratch: Vec::new(),
        headers: Vec::new(),
        up_buf: spare::take(READ_CHUNK),
        up_headers: Vec::new(),
    };
    let mut next = Next::Close;
    while let Some(head) = client.next_head(&worker).await {
        next = match head {
            Ok(head) => client.exchange(&worker, head).await,
            Err(e) => {
                client.refuse_head(&worker, e).await;
                Next::Linger
            }
        };
        if next != Next::KeepAlive || worker.draining.get() {
            break;
        }
    }
    let _ = client.stream.shutdown().await;
    if next == Next::Linger {
        client.linger().await;
    }
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

/// The downstream connection: the client's stream and what this side of
/// keygate keeps for it between requests.
struct Downstream<S> {
    stream: S,
    tls: Option<TlsInfo>,
    peer: IpAddr,
    /// `peer` as text, for `X-Forwarded-For`.
    peer_text: String,
    /// The current request head, from offset 0; between requests, what has
    /// arrived of the next head.
    buf: Vec<u8>,
    /// Bytes received after the current head: its body, then whatever the
    /// client pipelined behind it.
    rest: Vec<u8>,
    /// How much of `rest` the current request has used.
    rest_pos: usize,
    /// What is written next, to the client or the upstream.
    out: Vec<u8>,
    /// Re-encoded body bytes on their way to the upstream.
    scratch: Vec<u8>,
    headers: Vec<Header>,
    up_buf: Vec<u8>,
    up_headers: Vec<Header>,
}

impl<S> Drop for Downstream<S> {
    fn drop(&mut self) {
        spare::give(std::mem::take(&mut self.buf));
        spare::give(std::mem::take(&mut self.out));
        spare::give(std::mem::take(&mut self.up_buf));
        spare::give(std::mem::take(&mut self.rest));
    }
}

/// Buffers of finished connections, kept per thread for the next ones: a
/// connection (and an HTTP/2 stream, one request each) starts without
/// three fresh allocations of up to 16 KiB.
mod spare {
    use std::cell::RefCell;

    /// At most this many buffers wait, none larger than [`MAX`].
    const KEEP: usize = 256;
    const MAX: usize = 64 * 1024;

    thread_local! {
        static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }

    /// An empty buffer with room for at least `cap` bytes.
    pub fn take(cap: usize) -> Vec<u8> {
        let reused = SPARE.with(|s| {
            let mut s = s.borrow_mut();
            let i = s.iter().rposition(|b| b.capacity() >= cap)?;
            Some(s.swap_remove(i))
        });
        reused.unwrap_or_else(|| Vec::with_capacity(cap))
    }

    pub fn give(mut buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > MAX {
            return;
        }
        buf.clear();
        SPARE.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < KEEP {
                s.push(buf);
            }
        });
    }
}

/// The request target sent upstream: as received, or rewritten.
enum Target {
    Buf(std::ops::Range<usize>),
    Owned(Vec<u8>),
}

/// How the answer's body reaches the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reframe {
    /// As decoded: `content-length`, or close-delimited for HTTP/1.0.
    Raw,
    /// Re-encoded as chunks (close-delimited and chunked answers to HTTP/1.1).
    Chunks,
}

impl Worker {
    /// The limiter's answer to `need`: this process's GCRA, or the fleet's
    /// in Redis with `on_error_limits` when Redis cannot answer in time.
    /// `None`: refuse with 503 (`closed`).
    async fn quota(&self, need: &QuotaNeed, now_us: u64) -> Option<Outcome> {
        let local = || self.shared.limiter.check(need.account, &need.quota, now_us);
        let Some(fleet) = &self.shared.fleet else {
            METRICS.limit_decisions.local.inc();
            return Some(local());
        };
        let answer = fleet.check(&self.lanes, &self.redis, need).await;
        let counted = &METRICS.limit_decisions;
        let (source, outcome) = match answer {
            Answer::Redis(o) => (&counted.redis, Some(o)),
            Answer::DenyCache(o) => (&counted.deny_cache, Some(o)),
            Answer::Unavailable => match fleet.settings.on_error_limits {
                OnError::Local if fleet.settings.fleet_size.get() > 1 => {
                    let share = need.quota.divided(fleet.settings.fleet_size);
                    let outcome = self.shared.limiter.check(need.account, &share, now_us);
                    (&counted.fallback_local, Some(outcome))
                }
                OnError::Local => (&counted.fallback_local, Some(local())),
                OnError::Open => {
                    let open = Outcome {
                        allowed: true,
                        limit: need.quota.limit.get(),
                        remaining: need.quota.limit.get(),
                        reset_secs: 0,
                        retry_after_secs: 0,
                    };
                    (&counted.fallback_open, Some(open))
                }
                OnError::Closed => (&counted.fallback_closed, None),
            },
        };
        source.inc();
        outcome
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

impl<S: AsyncRead + AsyncWrite + Unpin> Downstream<S> {
    /// The next request head, or `None` when the connection should end
    /// quietly (closed, idle too long, shutting down).
    pub(super) async fn next_head(
        &mut self,
        worker: &Worker,
    ) -> Option<Result<RequestHead, WireError>> {
        // Once a head has started, all of it must arrive by this time (not
        // 30 s per read, which a client sending a byte at a time would stretch).
        let mut deadline = None;
        loop {
            if !self.buf.is_empty() {
                match parse::parse_request(&self.buf, std::mem::take(&mut self.headers)) {
                    Ok(Some(head)) => return Some(Ok(head)),
                    Ok(None) => {}
                    Err(e) => return Some(Err(e)),
                }
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 2 {
                self.buf.reserve(READ_CHUNK);
            }
            let read = if self.buf.is_empty() {
                // Between requests: wait, but give way to shutdown.
                let drain = worker.drain.notified();
                if worker.draining.get() {
                    return None;
                }
                tokio::select! {
                    biased;
                    () = drain => return None,
                    r = tokio::time::timeout(KEEPALIVE_TIMEOUT, self.stream.read_buf(&mut self.buf)) => r,
                }
            } else {
                let by =
                    *deadline.get_or_insert_with(|| tokio::time::Instant::now() + CLIENT_TIMEOUT);
                tokio::time::timeout_at(by, self.stream.read_buf(&mut self.buf)).await
            };
            match read {
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(_)) => {}
                Err(_) if self.buf.is_empty() => return None,
                Err(_) => return Some(Err(WireError::Timeout)),
            }
        }
    }

    /// Answer one parsed request and say what the connection does next.
    pub(super) async fn exchange(&mut self, worker: &Worker, mut head: RequestHead) -> Next {
        // The head stays in `buf` for the exchange; what came after it is
        // the body and perhaps the next request.
        self.rest.clear();
        self.rest.extend_from_slice(&self.buf[head.len..]);
        self.rest_pos = 0;
        self.buf.truncate(head.len);
        let view = HeadView {
            buf: &self.buf,
            headers: &head.headers,
        };
        let request_id = request_id(view.values(b"x-request-id").next());
        let policy = worker.shared.store.load();
        // A client certificate verified under CAs the policy no longer
        // trusts: the gate refuses it, and the connection ends with this
        // answer (a new handshake checks against today's CAs).
        let cert = self.tls.as_ref().and_then(|t| t.client_cert.as_deref());
        if cert.is_some_and(|c| c.is_stale(&policy)) {
            head.keep_alive = false;
        }
        let client_ip = gate::client_ip::resolve(self.peer, &view, &policy.server.trusted_proxies);
        let user_agent = (policy.log.access != crate::policy::AccessLog::Off)
            .then(|| {
                view.values(b"user-agent")
                    .next()
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
            .flatten();
        let mut x = Exchange {
            started: Instant::now(),
            policy,
            client_ip,
            subject: None,
            upstream_status: None,
            user_agent,
            method: head.method.clone(),
            request_id,
            path: String::new(),
            decision: None,
            endpoint: None,
            webhook: None,
            refused: None,
            status: 0,
            upstream_elapsed: None,
            body: Decoder::new(head.body),
            bytes_in: 0,
            bytes_out: 0,
            forwarded: false,
            ended: false,
        };
        let next = match self.route(worker, &head, &mut x).await {
            Ok(next) => {
                x.ended = true;
                next
            }
            Err(Gone) => Next::Close,
        };
        // The access log line and the metrics: written when `x` drops, here
        // or wherever this future is dropped (an HTTP/2 reset aborts it).
        drop(x);
        self.headers = head.headers;
        if next == Next::KeepAlive {
            // What the client sent early is the start of the next head.
            std::mem::swap(&mut self.buf, &mut self.rest);
            self.buf.drain(..self.rest_pos);
            self.rest.clear();
            self.rest_pos = 0;
        }
        next
    }

    pub(super) async fn route(
        &mut self,
        worker: &Worker,
        head: &RequestHead,
        x: &mut Exchange,
    ) -> Step<Next> {
        let policy = x.policy.clone();
        if head.underscore && policy.server.underscore_headers == Underscores::Refuse {
            return self.refuse(x, head, Refusal::Underscore).await;
        }
        let target = head.target.get(&self.buf);
        // The parser let only visible ASCII through.
        let raw_path = std::str::from_utf8(&target[..head.path_len]).unwrap_or("");
        let path = match gate::path::normalize(raw_path) {
            Ok(path) => path,
            Err(why) => {
                let refusal = Refusal::Gate(Denial::InvalidRequest(why));
                return self.refuse(x, head, refusal).await;
            }
        };
        // The upstream sees the normalised path and the query as sent.
        let target_out = match path {
            std::borrow::Cow::Borrowed(_) => {
                let start = target.as_ptr() as usize - self.buf.as_ptr() as usize;
                Target::Buf(start..start + target.len())
            }
            std::borrow::Cow::Owned(ref p) => {
                let mut t = p.clone().into_bytes();
                t.extend_from_slice(&target[head.path_len..]);
                Target::Owned(t)
            }
        };
        x.path = path.into_owned();
        match dispatch(&policy, &x.path) {
            Dispatch::Endpoint(endpoint) => {
                x.endpoint = Some(endpoint);
                self.serve_endpoint(worker, head, x, endpoint).await
            }
            Dispatch::Webhook(hook) => {
                x.webhook = Some(hook.path.clone());
                self.serve_webhook(worker, head, x, hook, target_out).await
            }
            Dispatch::Gate => self.serve_gate(worker, head, x, target_out).await,
        }
    }
}

/// Why relaying an answer stopped early.
enum RelayStop {
    /// The client is gone, or was cut off mid-answer.
    Gone,
    /// The answer's body broke before any of it was written.
    BrokenBeforeHead,
}

/// Why streaming a request body upstream stopped.
enum Streamed {
    Client(BodyFailure),
    Upstream(Failure),
}

fn body_error(e: BodyError) -> &'static str {
    match e {
        BodyError::Malformed(why) => why,
        BodyError::Truncated => "the request body ended early",
    }
}

/// Write all of `bytes` to the client within [`SEND_TIMEOUT`].
async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    match tokio::time::timeout(SEND_TIMEOUT, stream.write_all(bytes)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

mod answers;
mod body;
mod endpoints;
mod forwarding;
mod record;

use record::{request_id, Exchange};

#[cfg(test)]
mod tests;
