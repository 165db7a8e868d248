//! One client connection: read a request head, dispatch it (auth endpoint,
//! webhook, or the gate), then answer from keygate or forward it and relay
//! the answer; repeat while both sides keep the connection alive.
//!
//! Nothing the client framed is passed through: the upstream gets a head
//! written by [`forward::request_head`] and a body decoded by
//! [`Decoder`] and re-encoded here (`content-length` when the whole body is
//! in hand, else chunked), without trailers; the client gets the answer
//! re-framed the same way. A body whose framing breaks after its head went
//! upstream ends that upstream connection and gets the client a 400.
//!
//! Generic over the client stream (`AsyncRead + AsyncWrite`), so plain TCP
//! and TLS share it.

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
    let mut client = Client {
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

struct Client<S> {
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

impl<S> Drop for Client<S> {
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

/// Per-request facts, from the head to the log line.
struct Exchange {
    started: Instant,
    policy: Arc<Policy>,
    /// As the gate sees it: the peer, or the trusted proxies' client.
    client_ip: IpAddr,
    /// Who an auth endpoint issued tokens to (the gate's principal is in
    /// `decision`).
    subject: Option<String>,
    upstream_status: Option<u16>,
    /// Only kept when the access log is on.
    user_agent: Option<String>,
    method: Method,
    request_id: String,
    /// The normalised path.
    path: String,
    decision: Option<Decision>,
    endpoint: Option<Endpoint>,
    webhook: Option<Box<str>>,
    /// Status and code of a response keygate wrote itself.
    refused: Option<(u16, &'static str)>,
    status: u16,
    upstream_elapsed: Option<Duration>,
    /// The request body; done once read to its end (or when there is none).
    body: Decoder,
    /// Request body bytes read, and answer bytes written.
    bytes_in: u64,
    bytes_out: u64,
    /// The request head went to the upstream.
    forwarded: bool,
    /// The exchange ran to its end (else the client went away: 499).
    ended: bool,
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

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// The next request head, or `None` when the connection should end
    /// quietly (closed, idle too long, shutting down).
    async fn next_head(&mut self, worker: &Worker) -> Option<Result<RequestHead, WireError>> {
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
    async fn exchange(&mut self, worker: &Worker, mut head: RequestHead) -> Next {
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

    async fn route(&mut self, worker: &Worker, head: &RequestHead, x: &mut Exchange) -> Step<Next> {
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

    async fn serve_gate(
        &mut self,
        worker: &Worker,
        head: &RequestHead,
        x: &mut Exchange,
        target: Target,
    ) -> Step<Next> {
        let policy = x.policy.clone();
        let decision = {
            let view = HeadView {
                buf: &self.buf,
                headers: &head.headers,
            };
            let facts = RequestFacts {
                peer: self.peer,
                method: &head.method,
                path: &x.path,
                headers: &view,
                client_cert: self.tls.as_ref().and_then(|t| t.client_cert.as_deref()),
            };
            let started = Instant::now();
            let now_us = crate::clock::unix_now_us();
            let decision = gate::assess(&policy, &facts, now_us);
            METRICS
                .gate_duration
                .observe(started.elapsed().as_secs_f64());
            decision
        };
        // The pure decision leaves the quota to the limiter service.
        let mut decision = decision;
        if let Some(need) = decision.pending {
            match worker.quota(&need, crate::clock::unix_now_us()).await {
                Some(outcome) => decision.settle(outcome),
                None => decision.unavailable(),
            }
        }
        let verdict = decision.verdict.clone();
        let principal = decision.principal;
        x.decision = Some(decision);
        if let Err(denial) = verdict {
            if denial == Denial::RateLimited {
                if let Some(rate) = x.decision.as_ref().and_then(|d| d.rate) {
                    let tier = &*policy.tier(rate.tier).name;
                    METRICS.rate_limited.with_label_values(&[tier]).inc();
                }
            }
            return self.refuse(x, head, Refusal::Gate(denial)).await;
        }
        self.forward(worker, head, x, target, principal, None).await
    }

    /// Login, refresh, revoke and JWKS. The blocking work (argon2, durable
    /// commits) runs on the blocking pool, never on this proxy thread.
    async fn serve_endpoint(
        &mut self,
        worker: &Worker,
        head: &RequestHead,
        x: &mut Exchange,
        endpoint: Endpoint,
    ) -> Step<Next> {
        let policy = x.policy.clone();
        if !endpoint.allows(&head.method) {
            let refusal = Refusal::MethodNotAllowed(endpoint.allow_header());
            return self.refuse(x, head, refusal).await;
        }
        if endpoint == Endpoint::Jwks {
            let body = policy.jwks.clone().into_bytes();
            return self
                .answer(x, head, 200, "public, max-age=300", &body, |_| {})
                .await;
        }
        let view = HeadView {
            buf: &self.buf,
            headers: &head.headers,
        };
        let json = view
            .values(b"content-type")
            .next()
            .and_then(header_text)
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            let e = IssueError::InvalidRequest(
                "the body must be JSON (Content-Type: application/json)",
            );
            return self.refuse(x, head, Refusal::Issue(e)).await;
        }
        let client_ip = gate::client_ip::resolve(self.peer, &view, &policy.server.trusted_proxies);
        let body = match self.read_body(head, x, crate::issue::MAX_BODY).await? {
            Ok(body) => body,
            Err(refusal) => return self.refuse(x, head, refusal).await,
        };
        let issuer: Arc<Issuer> = worker.shared.issuer.clone();
        let now = crate::clock::unix_now_us();
        let request_id = x.request_id.clone();
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
                x.subject = tokens.as_ref().map(|t| t.subject.clone());
                let body = match tokens {
                    Some(t) => serde_json::to_vec(&t).unwrap_or_default(),
                    None => b"{}".to_vec(),
                };
                // RFC 6749 §5.1: token responses are never cached.
                self.answer(x, head, 200, "no-store", &body, |out| {
                    header(out, b"pragma", b"no-cache");
                })
                .await
            }
            Err(e) => self.refuse(x, head, Refusal::Issue(e)).await,
        }
    }

    /// A `[[webhooks]]` path: read the whole body (bounded), check its
    /// signature, and only then contact the upstream with that body.
    async fn serve_webhook(
        &mut self,
        worker: &Worker,
        head: &RequestHead,
        x: &mut Exchange,
        hook: &Webhook,
        target: Target,
    ) -> Step<Next> {
        let count = |result: &str| {
            METRICS
                .webhook_verifications
                .with_label_values(&[&hook.path, result])
                .inc();
        };
        let policy = x.policy.clone();
        let client_ip = {
            let view = HeadView {
                buf: &self.buf,
                headers: &head.headers,
            };
            gate::client_ip::resolve(self.peer, &view, &policy.server.trusted_proxies)
        };
        if !policy.server.ip_allow.permits(client_ip) {
            return self
                .refuse(x, head, Refusal::Gate(Denial::IpNotAllowed))
                .await;
        }
        let body = match self.read_body(head, x, hook.max_body).await? {
            Ok(body) => body,
            Err(refusal) => {
                if matches!(refusal, Refusal::Issue(IssueError::PayloadTooLarge(_))) {
                    count("too_large");
                }
                return self.refuse(x, head, refusal).await;
            }
        };
        let verdict = {
            let view = HeadView {
                buf: &self.buf,
                headers: &head.headers,
            };
            fn text<'v>(view: &'v HeadView<'_>, name: &'v http::HeaderName) -> Option<&'v str> {
                HeaderSource::values(view, name.as_str())
                    .next()
                    .and_then(header_text)
            }
            let timestamp = match &hook.timestamp {
                Some((ts_header, tolerance)) => crate::webhook::check_timestamp(
                    text(&view, ts_header),
                    crate::clock::unix_now(),
                    tolerance.as_secs(),
                )
                .map(Some),
                None => Ok(None),
            };
            timestamp.and_then(|ts| {
                crate::webhook::verify(&hook.secrets, text(&view, &hook.header), ts, &body)
            })
        };
        if let Err(refusal) = verdict {
            count(refusal.label());
            let refusal = Refusal::Signature {
                refusal,
                header: hook.header.clone(),
            };
            return self.refuse(x, head, refusal).await;
        }
        count("valid");
        self.forward(worker, head, x, target, None, Some(&body))
            .await
    }

    /// Send the request upstream (its body re-framed from the client's, or
    /// `buffered`), then relay the answer.
    async fn forward(
        &mut self,
        worker: &Worker,
        head: &RequestHead,
        x: &mut Exchange,
        target: Target,
        principal: Option<Principal>,
        buffered: Option<&[u8]>,
    ) -> Step<Next> {
        let policy = x.policy.clone();
        let up = &policy.upstream;
        let upgrade = forward::allowed_upgrade(&policy, head, &self.buf);
        {
            let plan = Plan {
                policy: &policy,
                peer: self.peer,
                peer_text: &self.peer_text,
                principal,
                request_id: &x.request_id,
                upgrade,
                https: self.tls.is_some(),
            };
            let target = match &target {
                Target::Buf(range) => &self.buf[range.clone()],
                Target::Owned(t) => t,
            };
            forward::request_head(&mut self.out, &plan, head, &self.buf, target);
        }
        // The body as far as it is here; wholly here, it goes out with the
        // head under a `content-length`, and can be sent again.
        let chunked_out;
        if let Some(body) = buffered {
            header_u64(&mut self.out, b"content-length", body.len() as u64);
            self.out.extend_from_slice(b"\r\n");
            self.out.extend_from_slice(body);
            chunked_out = false;
        } else if head.body == BodyKind::None {
            if matches!(head.method, Method::POST | Method::PUT | Method::PATCH) {
                header_u64(&mut self.out, b"content-length", 0);
            }
            self.out.extend_from_slice(b"\r\n");
            chunked_out = false;
        } else {
            let mut payload = std::mem::take(&mut self.scratch);
            payload.clear();
            let decoded = x.body.decode(&self.rest[self.rest_pos..], |p| {
                payload.extend_from_slice(p)
            });
            let used = match decoded {
                Ok(n) => n,
                Err(e) => {
                    self.scratch = payload;
                    return self.refuse(x, head, Refusal::Body(body_error(e))).await;
                }
            };
            self.rest_pos += used;
            x.bytes_in += used as u64;
            chunked_out = match head.body {
                _ if x.body.is_done() => {
                    header_u64(&mut self.out, b"content-length", payload.len() as u64);
                    false
                }
                BodyKind::Length(n) => {
                    header_u64(&mut self.out, b"content-length", n);
                    false
                }
                _ => {
                    header(&mut self.out, b"transfer-encoding", b"chunked");
                    true
                }
            };
            self.out.extend_from_slice(b"\r\n");
            if chunked_out {
                encode_chunk(&mut self.out, &payload);
            } else {
                self.out.extend_from_slice(&payload);
            }
            self.scratch = payload;
        }
        let in_hand = x.body.is_done();
        if head.expect_continue && !in_hand && self.continue_100().await.is_err() {
            return Err(Gone);
        }
        let sent = Instant::now();
        let mut retried = false;
        let (mut up_conn, resp) = loop {
            // A retry never goes back to the pool: a fresh connection.
            let pooled = if retried {
                None
            } else {
                worker.pool.take(&up.endpoint)
            };
            let (conn, reused) = match pooled {
                Some(conn) => (conn, true),
                None => match upstream::connect(&up.endpoint).await {
                    Ok(conn) => (conn, false),
                    Err(e) => return self.upstream_failed(x, head, Failure::Connect(e)).await,
                },
            };
            // Sent again only if the upstream cannot have acted on it twice.
            let may_retry = reused && in_hand && !retried && upstream::may_retry(&head.method);
            let mut conn = conn;
            let wrote = tokio::time::timeout(up.read_timeout, conn.write_all(&self.out)).await;
            match wrote {
                Ok(Ok(())) => x.forwarded = true,
                Ok(Err(_)) if may_retry => {
                    retried = true;
                    continue;
                }
                Ok(Err(_)) => return self.upstream_failed(x, head, Failure::Broken).await,
                Err(_) => return self.upstream_failed(x, head, Failure::Timeout).await,
            }
            if !in_hand {
                match self
                    .stream_body(x, &mut conn, chunked_out, up.read_timeout)
                    .await
                {
                    Ok(()) => {}
                    Err(Streamed::Client(BodyFailure::Gone)) => return Err(Gone),
                    // The upstream connection holds half a request: dropped.
                    Err(Streamed::Client(BodyFailure::Malformed(why))) => {
                        return self.refuse(x, head, Refusal::Body(why)).await
                    }
                    Err(Streamed::Upstream(f)) => return self.upstream_failed(x, head, f).await,
                }
            }
            self.up_buf.clear();
            match self
                .read_response_head(head, &mut conn, up.read_timeout)
                .await
            {
                Ok(resp) => break (conn, resp),
                Err(Failure::Broken) if may_retry && self.up_buf.is_empty() => {
                    retried = true;
                    continue;
                }
                Err(f) => return self.upstream_failed(x, head, f).await,
            }
        };
        x.upstream_elapsed = Some(sent.elapsed());
        // A switch of protocols only when one was asked for and allowed,
        // and the upstream switched to that one.
        let switching = resp.status == 101;
        if switching {
            let view = HeadView {
                buf: &self.up_buf,
                headers: &resp.headers,
            };
            let agreed = upgrade.is_some_and(|p| {
                view.values(b"upgrade")
                    .next()
                    .is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(p.as_bytes()))
            });
            if !agreed {
                self.up_headers = resp.headers;
                return self.upstream_failed(x, head, Failure::Protocol).await;
            }
        }
        x.status = resp.status;
        x.upstream_status = Some(resp.status);
        let http10 = head.minor == 0;
        let reframe = match resp.body {
            BodyKind::Chunked | BodyKind::Close if !http10 => Reframe::Chunks,
            _ => Reframe::Raw,
        };
        let close = !head.keep_alive
            || worker.draining.get()
            || !x.body.is_done()
            || (http10 && matches!(resp.body, BodyKind::Chunked | BodyKind::Close));
        let switched_to = upgrade.filter(|_| switching);
        self.response_head(x, &resp, close, switched_to, reframe, http10);
        let body_start = resp.len;
        let (body, keep_alive) = (resp.body, resp.keep_alive);
        self.up_headers = resp.headers;
        if switching {
            return self.switch(&mut up_conn, body_start, up.read_timeout).await;
        }
        let ended_clean = match self
            .relay_response(
                &mut up_conn,
                body,
                body_start,
                reframe,
                up.read_timeout,
                &mut x.bytes_out,
            )
            .await
        {
            Ok(clean) => clean,
            Err(Relay::Gone) => return Err(Gone),
            // Nothing reached the client yet: it can still be told.
            Err(Relay::BrokenBeforeHead) => {
                self.out.clear();
                return self.upstream_failed(x, head, Failure::Protocol).await;
            }
        };
        if keep_alive && ended_clean {
            worker.pool.put(&up.endpoint, up_conn);
        }
        Ok(if close { Next::Close } else { Next::KeepAlive })
    }

    /// After a `101`: the bytes each side sent early, then bytes both ways
    /// until either side ends or both stay quiet for `idle`.
    async fn switch(
        &mut self,
        up_conn: &mut Conn,
        body_start: usize,
        idle: Duration,
    ) -> Step<Next> {
        self.out.extend_from_slice(&self.up_buf[body_start..]);
        if send(&mut self.stream, &self.out).await.is_err() {
            return Err(Gone);
        }
        let early = &self.rest[self.rest_pos..];
        if !early.is_empty() && up_conn.write_all(early).await.is_err() {
            return Ok(Next::Close);
        }
        if super::tunnel::run(&mut self.stream, up_conn, idle).await == super::tunnel::Ended::Idle {
            tracing::debug!(peer = %self.peer, "upgraded connection idle for {idle:?}; closed");
        }
        Ok(Next::Close)
    }

    /// Decode the rest of the request body and send it on, re-encoded.
    async fn stream_body(
        &mut self,
        x: &mut Exchange,
        conn: &mut Conn,
        chunked: bool,
        timeout: Duration,
    ) -> Result<(), Streamed> {
        while !x.body.is_done() {
            let mut out = std::mem::take(&mut self.scratch);
            out.clear();
            let pulled = self.pull_body(&mut x.body, &mut out, chunked).await;
            if pulled.is_ok() && chunked && x.body.is_done() {
                out.extend_from_slice(LAST_CHUNK);
            }
            let wrote = match pulled {
                Ok(used) if !out.is_empty() => {
                    x.bytes_in += used as u64;
                    tokio::time::timeout(timeout, conn.write_all(&out)).await
                }
                Ok(used) => {
                    x.bytes_in += used as u64;
                    Ok(Ok(()))
                }
                Err(e) => {
                    self.scratch = out;
                    return Err(Streamed::Client(e));
                }
            };
            self.scratch = out;
            match wrote {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Streamed::Upstream(Failure::Broken)),
                Err(_) => return Err(Streamed::Upstream(Failure::Timeout)),
            }
        }
        Ok(())
    }

    /// Decode the next run of request body into `out` (as chunks when
    /// `chunked`): first what is in hand, else one read from the client.
    async fn pull_body(
        &mut self,
        body: &mut Decoder,
        out: &mut Vec<u8>,
        chunked: bool,
    ) -> Result<usize, BodyFailure> {
        if self.rest_pos == self.rest.len() {
            self.rest.clear();
            self.rest_pos = 0;
            self.rest.reserve(READ_CHUNK);
            let read =
                tokio::time::timeout(CLIENT_TIMEOUT, self.stream.read_buf(&mut self.rest)).await;
            match read {
                Ok(Ok(n)) if n > 0 => {}
                Ok(Ok(_)) => {
                    return match body.eof() {
                        Ok(()) => Ok(0),
                        Err(_) => Err(BodyFailure::Gone),
                    }
                }
                _ => return Err(BodyFailure::Gone),
            }
        }
        let input = &self.rest[self.rest_pos..];
        let used = body
            .decode(input, |p| {
                if chunked {
                    encode_chunk(out, p);
                } else {
                    out.extend_from_slice(p);
                }
            })
            .map_err(|e| BodyFailure::Malformed(body_error(e)))?;
        self.rest_pos += used;
        Ok(used)
    }

    /// The whole body, decoded, for keygate's own use; refused past `limit`
    /// (checked against Content-Length first, then as bytes arrive), when
    /// malformed, or when not whole within [`BODY_DEADLINE`].
    async fn read_body(
        &mut self,
        head: &RequestHead,
        x: &mut Exchange,
        limit: usize,
    ) -> Step<Result<Vec<u8>, Refusal>> {
        let too_large = Refusal::Issue(IssueError::PayloadTooLarge(limit));
        if let BodyKind::Length(n) = head.body {
            if n > limit as u64 {
                return Ok(Err(too_large));
            }
        }
        if head.expect_continue && self.continue_100().await.is_err() {
            return Err(Gone);
        }
        let mut body = Vec::new();
        let deadline = tokio::time::Instant::now() + BODY_DEADLINE;
        while !x.body.is_done() {
            let pulled =
                tokio::time::timeout_at(deadline, self.pull_body(&mut x.body, &mut body, false));
            match pulled.await {
                Ok(Ok(used)) => x.bytes_in += used as u64,
                Ok(Err(BodyFailure::Gone)) => return Err(Gone),
                Ok(Err(BodyFailure::Malformed(why))) => return Ok(Err(Refusal::Body(why))),
                Err(_) => return Ok(Err(Refusal::Wire(WireError::Timeout))),
            }
            if body.len() > limit {
                return Ok(Err(too_large));
            }
        }
        Ok(Ok(body))
    }

    async fn read_response_head(
        &mut self,
        head: &RequestHead,
        conn: &mut Conn,
        timeout: Duration,
    ) -> Result<ResponseHead, Failure> {
        let mut interim = 0;
        loop {
            if !self.up_buf.is_empty() {
                let headers = std::mem::take(&mut self.up_headers);
                match parse::parse_response(&self.up_buf, &head.method, headers) {
                    Ok(Some(resp)) if resp.status < 200 && resp.status != 101 => {
                        // Interim answers (100, 103) are not relayed; a
                        // stream of them is a broken upstream.
                        interim += 1;
                        if interim > MAX_INTERIM {
                            return Err(Failure::Protocol);
                        }
                        self.up_buf.drain(..resp.len);
                        self.up_headers = resp.headers;
                        continue;
                    }
                    Ok(Some(resp)) => return Ok(resp),
                    Ok(None) => {}
                    Err(_) => return Err(Failure::Protocol),
                }
            }
            self.up_buf.reserve(READ_CHUNK);
            match tokio::time::timeout(timeout, conn.read_buf(&mut self.up_buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Err(Failure::Broken),
                Ok(Ok(_)) => {}
                Err(_) => return Err(Failure::Timeout),
            }
        }
    }

    /// The answer's head for the client, with keygate's own framing.
    fn response_head(
        &mut self,
        x: &Exchange,
        resp: &ResponseHead,
        close: bool,
        switched_to: Option<&str>,
        reframe: Reframe,
        http10: bool,
    ) {
        let rate = x.decision.as_ref().and_then(|d| d.rate);
        let out = &mut self.out;
        forward::response_head(
            out,
            resp,
            &self.up_buf,
            &x.request_id,
            rate.as_ref().map(|r| (&*x.policy, r)),
            self.tls.as_ref().and_then(|t| t.hsts.as_deref()),
        );
        match resp.body {
            BodyKind::Length(n) => header_u64(out, b"content-length", n),
            BodyKind::Chunked | BodyKind::Close if reframe == Reframe::Chunks => {
                header(out, b"transfer-encoding", b"chunked")
            }
            BodyKind::Chunked | BodyKind::Close => {}
            // HEAD and 304: the length the upstream declared, as it declared it.
            BodyKind::None if resp.status >= 200 && resp.status != 204 => {
                if let Some(n) = resp.declared_length {
                    header_u64(out, b"content-length", n);
                } else if resp.declared_chunked && !http10 {
                    header(out, b"transfer-encoding", b"chunked");
                }
            }
            BodyKind::None => {}
        }
        if let Some(protocol) = switched_to {
            header(out, b"connection", b"upgrade");
            header(out, b"upgrade", protocol.as_bytes());
        } else if close {
            header(out, b"connection", b"close");
        }
        out.extend_from_slice(b"\r\n");
    }

    /// Relay the upstream's body after the head in `out`, re-framed.
    /// `Ok(true)` when the upstream connection ended exactly at the body's end.
    async fn relay_response(
        &mut self,
        conn: &mut Conn,
        kind: BodyKind,
        start: usize,
        reframe: Reframe,
        timeout: Duration,
        bytes_out: &mut u64,
    ) -> Result<bool, Relay> {
        let mut decoder = Decoder::new(kind);
        let mut pos = start;
        let mut head_sent = false;
        loop {
            let avail = &self.up_buf[pos..];
            let out = &mut self.out;
            let decoded = decoder.decode(avail, |p| match reframe {
                Reframe::Chunks => encode_chunk(out, p),
                Reframe::Raw => out.extend_from_slice(p),
            });
            let used = match decoded {
                Ok(n) => n,
                Err(_) if !head_sent => return Err(Relay::BrokenBeforeHead),
                // Broken framing: the client sees the answer cut off.
                Err(_) => return Err(self.cut_off()),
            };
            let extra = avail.len() > used;
            if decoder.is_done() && reframe == Reframe::Chunks {
                self.out.extend_from_slice(LAST_CHUNK);
            }
            if !self.out.is_empty() {
                if send(&mut self.stream, &self.out).await.is_err() {
                    return Err(Relay::Gone);
                }
                *bytes_out += self.out.len() as u64;
                self.out.clear();
                head_sent = true;
            }
            if decoder.is_done() {
                return Ok(!extra);
            }
            pos = 0;
            self.up_buf.clear();
            self.up_buf.reserve(READ_CHUNK);
            match tokio::time::timeout(timeout, conn.read_buf(&mut self.up_buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(Ok(_)) if decoder.eof().is_ok() => {
                    // A close-delimited answer ended.
                    if reframe == Reframe::Chunks {
                        if send(&mut self.stream, LAST_CHUNK).await.is_err() {
                            return Err(Relay::Gone);
                        }
                        *bytes_out += LAST_CHUNK.len() as u64;
                    }
                    return Ok(false);
                }
                // Cut off mid-body, reset, or too slow: never a complete answer.
                _ => return Err(self.cut_off()),
            }
        }
    }

    /// An answer broke after its head went out: count it and end the
    /// client connection without the body's end.
    fn cut_off(&self) -> Relay {
        METRICS.upstream_errors.with_label_values(&["other"]).inc();
        Relay::Gone
    }

    /// 502 or 504 when nothing of the answer has reached the client yet.
    async fn upstream_failed(
        &mut self,
        x: &mut Exchange,
        head: &RequestHead,
        f: Failure,
    ) -> Step<Next> {
        if let Failure::Connect(
            crate::http1::upstream::ConnectError::Refused(e)
            | crate::http1::upstream::ConnectError::Tls(e),
        ) = &f
        {
            tracing::warn!(upstream = %x.policy.upstream.endpoint.url, error = %e, "upstream connection failed");
        }
        let next = self.refuse(x, head, Refusal::Upstream(f)).await?;
        // The request may be half sent: never reuse this client connection.
        Ok(if next == Next::KeepAlive {
            Next::Close
        } else {
            next
        })
    }

    /// A malformed head: the documented JSON error, then close.
    async fn refuse_head(&mut self, worker: &Worker, e: WireError) {
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
    async fn refuse(&mut self, x: &mut Exchange, head: &RequestHead, r: Refusal) -> Step<Next> {
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
    async fn answer(
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

    /// The interim answer to `Expect: 100-continue`, sent just before keygate
    /// reads the body (the upstream never sees the expectation).
    async fn continue_100(&mut self) -> std::io::Result<()> {
        send(&mut self.stream, b"HTTP/1.1 100 Continue\r\n\r\n").await
    }

    /// Read and drop what the client still sends, for a bounded time.
    async fn linger(&mut self) {
        let deadline = tokio::time::Instant::now() + LINGER_TIME;
        // On the heap: an array here would make every connection's future
        // (moved at each spawn) 16 KiB larger.
        let mut sink = vec![0u8; 16 * 1024];
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, self.stream.read(&mut sink)).await {
            if n == 0 {
                break;
            }
        }
    }
}

/// Why relaying an answer stopped early.
enum Relay {
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

impl Drop for Exchange {
    /// Every request leaves its access-log line and its metrics, however
    /// it ends: answered, refused, or abandoned by its client (a closed
    /// connection, an HTTP/2 reset that aborts this exchange mid-way).
    fn drop(&mut self) {
        self.log();
    }
}

impl Exchange {
    /// Metrics and the access log line for this request. A client that went
    /// away before any of the answer reached it is logged as nginx does:
    /// `499`, with whether the upstream got the request.
    fn log(&self) {
        let policy = &*self.policy;
        let (bytes_in, bytes_out) = (self.bytes_in, self.bytes_out);
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
        METRICS
            .requests
            .with_label_values(&[route, method, status_class(status), status_code(status)])
            .inc();
        METRICS
            .request_duration
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
        if let Some(up) = self.upstream_elapsed {
            METRICS
                .upstream_duration
                .with_label_values(&[route])
                .observe(up.as_secs_f64());
            // What keygate itself adds: everything but the upstream's time.
            METRICS
                .added_latency
                .observe(elapsed.saturating_sub(up).as_secs_f64());
        }
        if policy.log.access == crate::policy::AccessLog::Off {
            return;
        }
        let principal = decision.and_then(|d| d.principal);
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
                    forwarded: self.forwarded,
                    principal: principal
                        .map(|p| p.subject_str(policy))
                        .or(self.subject.as_deref()),
                    auth_method: principal.map(|p| p.method.as_str()),
                    key_id: principal
                        .and_then(|p| p.key)
                        .map(|k| &*policy.api_key(k).id),
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

/// Write all of `bytes` to the client within [`SEND_TIMEOUT`].
async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    match tokio::time::timeout(SEND_TIMEOUT, stream.write_all(bytes)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// The client's `X-Request-Id` when it is sane, else a fresh random one.
fn request_id(sent: Option<&[u8]>) -> String {
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

/// Status line and the headers every JSON answer carries; no blank line.
fn json_head(
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

#[cfg(test)]
mod tests;
