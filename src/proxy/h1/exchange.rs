//! One client connection: read a request head, ask the gate, then answer
//! from keygate (refusals, the auth endpoints, webhook refusals) or forward
//! to the upstream and stream its answer back; repeat while both sides keep
//! the connection alive. Every decision is the pure core's; this file only
//! moves bytes and writes the headers the core's answer calls for.

use std::borrow::Cow;
use std::cell::Cell;
use std::io::Write as _;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::upstream::{self, Conn, ConnectError, Pool};
use super::wire::{self, BodyKind, Chunked, HeadView, Header, RequestHead, WireError};
use crate::gate::{
    self, header_text, Decision, Denial, HeaderSource, Principal, RateInfo, RequestFacts,
};
use crate::issue::{IssueError, Issuer};
use crate::limit::Limiter;
use crate::metrics::{method_label, status_class, METRICS};
use crate::policy::{Policy, PolicyStore, Webhook};
use crate::proxy::access_log;

/// How long a started request head, or the next piece of a request body,
/// may take to arrive (nginx's `client_header_timeout` / `client_body_timeout`).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an idle keep-alive connection waits for its next request
/// (nginx's `keepalive_timeout` is 75 s).
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an unread request body is drained after an early answer.
const LINGER_TIME: Duration = Duration::from_secs(2);
/// A client-sent request id is kept when it is this short and printable.
const MAX_REQUEST_ID_LEN: usize = 128;
const READ_CHUNK: usize = 16 * 1024;

/// What every worker shares.
pub struct Shared {
    pub store: Arc<PolicyStore>,
    pub limiter: Arc<Limiter>,
    pub issuer: Arc<Issuer>,
}

/// One proxy thread's state; its connections share it through an `Rc`.
pub struct Worker {
    pub shared: Arc<Shared>,
    pub pool: Pool,
    /// Set at shutdown: finish the request in hand, then close.
    pub draining: Cell<bool>,
    /// Wakes idle connections at shutdown.
    pub drain: Notify,
    pub active: Cell<usize>,
}

/// The endpoints keygate serves itself instead of forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Token,
    Refresh,
    Revoke,
    Jwks,
}

impl Endpoint {
    fn find(policy: &Policy, path: &str) -> Option<Endpoint> {
        let auth = &policy.auth;
        match path {
            p if p == auth.token_path => Some(Endpoint::Token),
            p if p == auth.refresh_path => Some(Endpoint::Refresh),
            p if p == auth.revoke_path => Some(Endpoint::Revoke),
            "/.well-known/jwks.json" => Some(Endpoint::Jwks),
            _ => None,
        }
    }

    /// Its label in metrics and the access log.
    fn label(self) -> &'static str {
        match self {
            Endpoint::Token => "auth:token",
            Endpoint::Refresh => "auth:refresh",
            Endpoint::Revoke => "auth:revoke",
            Endpoint::Jwks => "auth:jwks",
        }
    }
}

/// Why an exchange stopped early. Every variant closes the client connection.
enum Stop {
    /// The client went away or broke the protocol mid-body: nothing to say.
    Gone,
}

type Step<T> = Result<T, Stop>;

/// Serve one accepted connection until either side ends it.
pub async fn serve(worker: Rc<Worker>, stream: TcpStream, peer: IpAddr) {
    worker.active.set(worker.active.get() + 1);
    let mut client = Client {
        stream,
        peer,
        peer_text: peer.to_string(),
        buf: Vec::with_capacity(READ_CHUNK),
        out: Vec::with_capacity(4096),
        scratch: Vec::new(),
        carry: Vec::new(),
        headers: Vec::new(),
        up_buf: Vec::with_capacity(READ_CHUNK),
        up_headers: Vec::new(),
        linger: false,
    };
    while let Some(head) = client.next_head(&worker).await {
        let keep = match head {
            Ok(head) => client.exchange(&worker, head).await,
            Err(e) => {
                client.refuse_malformed(e).await;
                false
            }
        };
        if !keep || worker.draining.get() {
            break;
        }
    }
    let _ = client.stream.shutdown().await;
    if client.linger {
        client.linger().await;
    }
    worker.active.set(worker.active.get() - 1);
}

struct Client {
    stream: TcpStream,
    peer: IpAddr,
    /// `peer` as text, for `X-Forwarded-For`.
    peer_text: String,
    /// Bytes received and not yet consumed; a request head always starts at 0.
    buf: Vec<u8>,
    /// What is written next, to the client or the upstream.
    out: Vec<u8>,
    /// Request body bytes read past the buffered ones.
    scratch: Vec<u8>,
    /// Bytes of the next pipelined request that arrived with a body's end.
    carry: Vec<u8>,
    headers: Vec<Header>,
    up_buf: Vec<u8>,
    up_headers: Vec<Header>,
    /// An answer went out before the request body was read: drain it
    /// before closing, or the kernel resets the connection and the client
    /// may never see the answer (nginx's lingering close).
    linger: bool,
}

/// Per-request facts, from the head to the log line.
struct Exchange {
    started: Instant,
    policy: Arc<Policy>,
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
    /// Bytes of `buf` the request (head and body) took.
    consumed: usize,
    /// The whole request body has been read (or there was none).
    body_done: bool,
}

/// A request body as read for keygate's own use, or why not.
enum BodyRead {
    Whole(Vec<u8>),
    TooLarge,
}

impl Client {
    /// The next request head, or `None` when the connection should end
    /// quietly (closed, idle too long, shutting down).
    async fn next_head(&mut self, worker: &Worker) -> Option<Result<RequestHead, WireError>> {
        // Once a head has started, all of it must arrive by this time (not
        // 30 s per read, which a client sending a byte at a time would stretch).
        let mut deadline = None;
        loop {
            if !self.buf.is_empty() {
                match wire::parse_request(&self.buf, std::mem::take(&mut self.headers)) {
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

    /// Answer one parsed request; `true` when the connection may carry another.
    async fn exchange(&mut self, worker: &Worker, head: RequestHead) -> bool {
        let view = HeadView {
            buf: &self.buf,
            headers: &head.headers,
        };
        let request_id = request_id(view.values("x-request-id").next());
        let mut x = Exchange {
            started: Instant::now(),
            policy: worker.shared.store.load(),
            method: head.method.clone(),
            request_id,
            path: String::new(),
            decision: None,
            endpoint: None,
            webhook: None,
            refused: None,
            status: 0,
            upstream_elapsed: None,
            consumed: head.len,
            body_done: head.body == BodyKind::None,
        };
        let keep = self.route(worker, &head, &mut x).await.unwrap_or(false);
        x.log();
        // Drop what this request took; keep what the next one sent early.
        let keep = keep && x.body_done && head.keep_alive;
        if keep {
            self.buf.drain(..x.consumed.min(self.buf.len()));
            self.buf.append(&mut self.carry);
        }
        self.headers = head.headers;
        keep
    }

    async fn route(&mut self, worker: &Worker, head: &RequestHead, x: &mut Exchange) -> Step<bool> {
        let policy = x.policy.clone();
        let target = head.target.get(&self.buf);
        let (raw_path, query) = match split_target(target) {
            Some(parts) => parts,
            None => {
                let denial = Denial::InvalidRequest("the request target must be a path");
                return self.deny(x, head, &denial).await;
            }
        };
        let path = match gate::path::normalize(raw_path) {
            Ok(path) => path,
            Err(why) => return self.deny(x, head, &Denial::InvalidRequest(why)).await,
        };
        let rewritten = matches!(path, Cow::Owned(_));
        x.path = path.into_owned();
        if let Some(endpoint) = Endpoint::find(&policy, &x.path) {
            x.endpoint = Some(endpoint);
            return self.serve_endpoint(worker, head, x, endpoint).await;
        }
        // The upstream sees the normalised path and the query as sent.
        let target_out = if rewritten {
            let mut t = x.path.clone().into_bytes();
            if let Some(q) = query {
                t.push(b'?');
                t.extend_from_slice(q.as_bytes());
            }
            Target::Owned(t)
        } else {
            let path = target_as_path(target);
            let start = path.as_ptr() as usize - self.buf.as_ptr() as usize;
            Target::Buf(start..start + path.len())
        };
        if let Some(hook) = policy.webhook(&x.path) {
            x.webhook = Some(hook.path.clone());
            return self.serve_webhook(worker, head, x, hook, target_out).await;
        }
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
            };
            let started = Instant::now();
            let decision = gate::decide(
                &policy,
                &worker.shared.limiter,
                &facts,
                crate::policy::unix_now_us(),
            );
            METRICS
                .gate_duration
                .observe(started.elapsed().as_secs_f64());
            decision
        };
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
            return self.deny(x, head, &denial).await;
        }
        self.forward(worker, head, x, target_out, principal, None)
            .await
    }

    /// Login, refresh, revoke and JWKS. The blocking work (argon2, durable
    /// commits) runs on the blocking pool, never on this proxy thread.
    async fn serve_endpoint(
        &mut self,
        worker: &Worker,
        head: &RequestHead,
        x: &mut Exchange,
        endpoint: Endpoint,
    ) -> Step<bool> {
        let policy = x.policy.clone();
        if endpoint == Endpoint::Jwks {
            if head.method != Method::GET && head.method != Method::HEAD {
                return self
                    .issue_error(x, head, IssueError::InvalidRequest("use GET"))
                    .await;
            }
            let body = policy.jwks.clone().into_bytes();
            return self
                .send_json(x, head, 200, "public, max-age=300", &body, |_| {})
                .await;
        }
        if head.method != Method::POST {
            return self
                .issue_error(x, head, IssueError::InvalidRequest("use POST"))
                .await;
        }
        let view = HeadView {
            buf: &self.buf,
            headers: &head.headers,
        };
        let json = view
            .values("content-type")
            .next()
            .and_then(header_text)
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            let e = IssueError::InvalidRequest(
                "the body must be JSON (Content-Type: application/json)",
            );
            return self.issue_error(x, head, e).await;
        }
        let client_ip = gate::client_ip::resolve(self.peer, &view, &policy.server.trusted_proxies);
        let body = match self.read_body(head, x, crate::issue::MAX_BODY).await? {
            BodyRead::Whole(body) => body,
            BodyRead::TooLarge => {
                return self.issue_error(x, head, IssueError::PayloadTooLarge).await
            }
        };
        let issuer: Arc<Issuer> = worker.shared.issuer.clone();
        let now = crate::policy::unix_now_us();
        let answer = tokio::task::spawn_blocking(move || match endpoint {
            Endpoint::Token => issuer.login(&policy, client_ip, &body, now).map(Some),
            Endpoint::Refresh => issuer.refresh(&policy, client_ip, &body, now).map(Some),
            _ => issuer.revoke(&policy, &body, now).map(|()| None),
        })
        .await
        .unwrap_or(Err(IssueError::Internal));
        match answer {
            Ok(tokens) => {
                let body = match tokens {
                    Some(t) => serde_json::to_vec(&t).unwrap_or_default(),
                    None => b"{}".to_vec(),
                };
                // RFC 6749 §5.1: token responses are never cached.
                self.send_json(x, head, 200, "no-store", &body, |out| {
                    header(out, b"pragma", b"no-cache");
                })
                .await
            }
            Err(e) => self.issue_error(x, head, e).await,
        }
    }

    /// A `[[webhooks]]` path: read the whole body (bounded), check its
    /// signature, and only then contact the upstream with the untouched body.
    async fn serve_webhook(
        &mut self,
        worker: &Worker,
        head: &RequestHead,
        x: &mut Exchange,
        hook: &Webhook,
        target: Target,
    ) -> Step<bool> {
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
            return self.deny(x, head, &Denial::IpNotAllowed).await;
        }
        let body = match self.read_body(head, x, hook.max_body).await? {
            BodyRead::Whole(body) => body,
            BodyRead::TooLarge => {
                count("too_large");
                return self.issue_error(x, head, IssueError::PayloadTooLarge).await;
            }
        };
        let verdict = {
            let view = HeadView {
                buf: &self.buf,
                headers: &head.headers,
            };
            fn text<'v>(view: &'v HeadView<'_>, name: &'v http::HeaderName) -> Option<&'v str> {
                view.values(name.as_str()).next().and_then(header_text)
            }
            match &hook.timestamp {
                Some((ts_header, tolerance)) => crate::webhook::check_timestamp(
                    text(&view, ts_header),
                    crate::policy::unix_now(),
                    tolerance.as_secs(),
                )
                .and_then(|ts| {
                    crate::webhook::verify(
                        &hook.secrets,
                        text(&view, &hook.header),
                        Some(ts),
                        &body,
                    )
                }),
                None => {
                    crate::webhook::verify(&hook.secrets, text(&view, &hook.header), None, &body)
                }
            }
        };
        if let Err(refusal) = verdict {
            count(refusal.label());
            METRICS
                .auth_denials
                .with_label_values(&["invalid_signature"])
                .inc();
            let challenge = format!(r#"HMAC-SHA256 realm="keygate", header="{}""#, hook.header);
            return self
                .error(
                    x,
                    head,
                    401,
                    "invalid_signature",
                    refusal.message(),
                    |out| {
                        header(out, b"www-authenticate", challenge.as_bytes());
                    },
                )
                .await;
        }
        count("valid");
        self.forward(worker, head, x, target, None, Some(&body))
            .await
    }

    /// Send the request upstream (its body streamed from the client, or
    /// `buffered`), then stream the answer back.
    async fn forward(
        &mut self,
        worker: &Worker,
        head: &RequestHead,
        x: &mut Exchange,
        target: Target,
        principal: Option<Principal>,
        buffered: Option<&[u8]>,
    ) -> Step<bool> {
        let policy = x.policy.clone();
        let up = &policy.upstream;
        self.upstream_head(head, x, &target, principal, buffered.map(<[u8]>::len));
        // A body wholly in hand goes out with the head, and can be sent again.
        let in_buf = match (buffered, head.body) {
            (Some(body), _) => {
                self.out.extend_from_slice(body);
                true
            }
            (None, BodyKind::None) => true,
            (None, BodyKind::Length(n)) if (self.buf.len() - head.len) as u64 >= n => {
                let end = head.len + n as usize;
                self.out.extend_from_slice(&self.buf[head.len..end]);
                x.consumed = end;
                x.body_done = true;
                true
            }
            _ => false,
        };
        if head.expect_continue && !in_buf && self.continue_100().await.is_err() {
            return Err(Stop::Gone);
        }
        let sent = Instant::now();
        let mut retried = false;
        let conn = loop {
            let (conn, reused) = match worker.pool.take(up) {
                Some(conn) => (conn, true),
                None => match upstream::connect(up).await {
                    Ok(conn) => (conn, false),
                    Err(e) => return self.upstream_failed(x, head, Failure::Connect(e)).await,
                },
            };
            let mut conn = conn;
            let wrote = tokio::time::timeout(up.read_timeout, conn.write_all(&self.out)).await;
            match wrote {
                Ok(Ok(())) => {}
                // A pooled connection the upstream had closed: once more on a fresh one.
                Ok(Err(_)) if reused && in_buf && !retried => {
                    retried = true;
                    continue;
                }
                Ok(Err(_)) => return self.upstream_failed(x, head, Failure::Broken).await,
                Err(_) => return self.upstream_failed(x, head, Failure::Timeout).await,
            }
            if !in_buf {
                if let Err(f) = self.stream_body(head, x, &mut conn, up.read_timeout).await {
                    return match f {
                        BodyFailure::Client => Err(Stop::Gone),
                        BodyFailure::Upstream(f) => self.upstream_failed(x, head, f).await,
                    };
                }
            }
            // The answer's head; skip interim 1xx answers other than 101.
            self.up_buf.clear();
            match self
                .read_response_head(head, &mut conn, up.read_timeout)
                .await
            {
                Ok(resp) => break (conn, resp),
                Err(Failure::Broken) if reused && in_buf && !retried && self.up_buf.is_empty() => {
                    retried = true;
                    continue;
                }
                Err(f) => return self.upstream_failed(x, head, f).await,
            }
        };
        x.upstream_elapsed = Some(sent.elapsed());
        let (mut up_conn, resp) = conn;
        x.status = resp.status;
        let switching = resp.status == 101 && head.upgrade;
        let client_close = !head.keep_alive || worker.draining.get() || !x.body_done;
        // An HTTP/1.0 client cannot take chunks: decode, and end with the connection.
        let dechunk = resp.body == BodyKind::Chunked && head.minor == 0;
        let close = client_close
            || resp.body == BodyKind::Close
            || dechunk
            || (resp.status == 101 && !switching);
        self.response_head(x, &resp, close && !switching, switching, dechunk);
        let reusable = resp.keep_alive && !switching;
        let (body, body_start) = (resp.body, resp.len);
        self.up_headers = resp.headers;
        let ended_clean = self
            .relay_response(&mut up_conn, body, body_start, dechunk, up.read_timeout)
            .await?;
        if switching {
            // WebSocket and other upgrades: from here on, bytes both ways.
            let early = self.buf.split_off(x.consumed.min(self.buf.len()));
            if !early.is_empty() && up_conn.write_all(&early).await.is_err() {
                return Ok(false);
            }
            let _ = tokio::io::copy_bidirectional(&mut self.stream, &mut up_conn).await;
            return Ok(false);
        }
        if reusable && ended_clean {
            worker.pool.put(up, up_conn);
        }
        Ok(!close)
    }

    /// The request head the upstream receives: normalised path, no
    /// client-made `X-Auth-*`, credentials stripped unless forwarded,
    /// hop-by-hop headers dropped, identity and forwarding headers added.
    fn upstream_head(
        &mut self,
        head: &RequestHead,
        x: &Exchange,
        target: &Target,
        principal: Option<Principal>,
        buffered_len: Option<usize>,
    ) {
        let policy = &*x.policy;
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(head.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(match target {
            Target::Buf(range) => &self.buf[range.clone()],
            Target::Owned(t) => t,
        });
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let trusted_peer = policy.server.trusted_proxies.contains(self.peer);
        let api_key_header = policy.auth.api_key_header.as_str().as_bytes();
        let mut chain: Vec<&[u8]> = Vec::new();
        let mut proto_sent = false;
        for h in &head.headers {
            let name = h.name.get(&self.buf);
            let value = h.value.get(&self.buf);
            let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
            if is(b"x-forwarded-for") {
                chain.push(value);
                continue;
            }
            if is(b"x-forwarded-proto") && trusted_peer {
                proto_sent = true;
            } else if is(b"x-forwarded-proto")
                || is(b"connection")
                || is(b"keep-alive")
                || is(b"proxy-connection")
                || is(b"te")
                || is(b"trailer")
                || (is(b"upgrade") && !head.upgrade)
                || (is(b"expect") && head.expect_continue)
                || is(b"x-request-id")
                || (name.len() >= 7 && name[..7].eq_ignore_ascii_case(b"x-auth-"))
                || (!policy.upstream.forward_credentials
                    && (is(b"authorization") || is(api_key_header)))
                || (buffered_len.is_some() && (is(b"content-length") || is(b"transfer-encoding")))
            {
                continue;
            }
            header(out, name, value);
        }
        if let Some(p) = principal {
            let tier = policy.tier(p.tier(policy));
            header(out, b"x-auth-subject", p.subject(policy).as_bytes());
            if let Some(user) = p.user {
                header(
                    out,
                    b"x-auth-email",
                    policy.user(user).email_header.as_bytes(),
                );
            }
            header(out, b"x-auth-tier", tier.header.as_bytes());
            header(
                out,
                b"x-auth-permissions",
                p.permissions(policy).header().as_bytes(),
            );
            header(out, b"x-auth-method", p.method.header().as_bytes());
            if let Some(key) = p.key {
                header(
                    out,
                    b"x-auth-key-id",
                    policy.api_key(key).id_header.as_bytes(),
                );
            }
        }
        header(out, b"x-request-id", x.request_id.as_bytes());
        // Behind a trusted proxy the chain so far is kept and the proxy
        // appended; otherwise the client's own claims are dropped.
        out.extend_from_slice(b"x-forwarded-for: ");
        if trusted_peer {
            for part in &chain {
                out.extend_from_slice(part);
                out.extend_from_slice(b", ");
            }
        }
        out.extend_from_slice(self.peer_text.as_bytes());
        out.extend_from_slice(b"\r\n");
        if !proto_sent {
            header(out, b"x-forwarded-proto", b"http");
        }
        if head.upgrade {
            header(out, b"connection", b"upgrade");
        }
        if let Some(n) = buffered_len {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }

    /// Copy the rest of the request body to the upstream, as sent.
    async fn stream_body(
        &mut self,
        head: &RequestHead,
        x: &mut Exchange,
        conn: &mut Conn,
        timeout: Duration,
    ) -> Result<(), BodyFailure> {
        let mut reader = BodyReader::new(head);
        loop {
            self.scratch.clear();
            let more = self
                .pull(&mut reader, x, None)
                .await
                .map_err(|_| BodyFailure::Client)?;
            if !self.scratch.is_empty() {
                match tokio::time::timeout(timeout, conn.write_all(&self.scratch)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Err(BodyFailure::Upstream(Failure::Broken)),
                    Err(_) => return Err(BodyFailure::Upstream(Failure::Timeout)),
                }
            }
            if !more {
                return Ok(());
            }
        }
    }

    /// The whole body, decoded, or `TooLarge` past `limit` (checked against
    /// Content-Length first, then as bytes arrive).
    async fn read_body(
        &mut self,
        head: &RequestHead,
        x: &mut Exchange,
        limit: usize,
    ) -> Step<BodyRead> {
        if let BodyKind::Length(n) = head.body {
            if n > limit as u64 {
                return Ok(BodyRead::TooLarge);
            }
        }
        if head.expect_continue && self.continue_100().await.is_err() {
            return Err(Stop::Gone);
        }
        let mut reader = BodyReader::new(head);
        let mut body = Vec::new();
        loop {
            self.scratch.clear();
            let more = self.pull(&mut reader, x, Some(&mut body)).await?;
            if body.len() > limit {
                return Ok(BodyRead::TooLarge);
            }
            if !more {
                return Ok(BodyRead::Whole(body));
            }
        }
    }

    /// Put the next run of body bytes (as sent) into `scratch`, and their
    /// payload into `decoded`; `false` once the body has ended.
    async fn pull(
        &mut self,
        r: &mut BodyReader,
        x: &mut Exchange,
        decoded: Option<&mut Vec<u8>>,
    ) -> Step<bool> {
        // First what arrived with the head, then the socket.
        let from_buf = x.consumed < self.buf.len();
        if !from_buf {
            let mut fresh = std::mem::take(&mut self.carry);
            fresh.clear();
            fresh.reserve(READ_CHUNK);
            match tokio::time::timeout(CLIENT_TIMEOUT, self.stream.read_buf(&mut fresh)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return Err(Stop::Gone),
            }
            self.carry = fresh;
        }
        let avail: &[u8] = if from_buf {
            &self.buf[x.consumed..]
        } else {
            &self.carry
        };
        let mut decoded = decoded;
        let mut sink = |d: &[u8]| {
            if let Some(out) = decoded.as_deref_mut() {
                out.extend_from_slice(d)
            }
        };
        let (used, done) = match r {
            BodyReader::Length(left) => {
                let n = (*left).min(avail.len() as u64) as usize;
                sink(&avail[..n]);
                *left -= n as u64;
                (n, *left == 0)
            }
            BodyReader::Chunked(c) => {
                let n = c.feed(avail, &mut sink).map_err(|_| Stop::Gone)?;
                (n, c.done())
            }
        };
        self.scratch.extend_from_slice(&avail[..used]);
        if from_buf {
            x.consumed += used;
        } else {
            // Whatever follows the body is the next request's.
            self.carry.drain(..used);
            x.consumed = self.buf.len();
        }
        x.body_done = done;
        Ok(!done)
    }

    async fn read_response_head(
        &mut self,
        head: &RequestHead,
        conn: &mut Conn,
        timeout: Duration,
    ) -> Result<wire::ResponseHead, Failure> {
        let mut start = 0;
        loop {
            if self.up_buf.len() > start {
                let headers = std::mem::take(&mut self.up_headers);
                match wire::parse_response(&self.up_buf[start..], &head.method, headers) {
                    Ok(Some(resp)) if resp.status < 200 && resp.status != 101 => {
                        // Interim answers (100, 103) are not relayed.
                        start += resp.len;
                        self.up_headers = resp.headers;
                        continue;
                    }
                    Ok(Some(mut resp)) => {
                        if start > 0 {
                            self.up_buf.drain(..start);
                            resp = wire::parse_response(&self.up_buf, &head.method, resp.headers)
                                .ok()
                                .flatten()
                                .ok_or(Failure::Protocol)?;
                        }
                        return Ok(resp);
                    }
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

    /// The response head the client receives: the upstream's, minus
    /// hop-by-hop headers, plus `X-Request-Id` and the rate-limit headers.
    fn response_head(
        &mut self,
        x: &Exchange,
        resp: &wire::ResponseHead,
        close: bool,
        switching: bool,
        dechunk: bool,
    ) {
        let rate = x.decision.as_ref().and_then(|d| d.rate);
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        push_u64(out, resp.status.into());
        out.push(b' ');
        out.extend_from_slice(resp.reason.get(&self.up_buf));
        out.extend_from_slice(b"\r\n");
        for h in &resp.headers {
            let name = h.name.get(&self.up_buf);
            let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
            if is(b"connection")
                || is(b"keep-alive")
                || is(b"proxy-connection")
                || is(b"x-request-id")
                || (is(b"upgrade") && !switching)
                || (is(b"transfer-encoding") && dechunk)
                || (rate.is_some()
                    && (is(b"x-ratelimit-limit")
                        || is(b"x-ratelimit-remaining")
                        || is(b"x-ratelimit-reset")
                        || is(b"ratelimit-policy")
                        || is(b"ratelimit")
                        || (is(b"retry-after") && rate.is_some_and(|r| !r.outcome.allowed))))
            {
                continue;
            }
            header(out, name, h.value.get(&self.up_buf));
        }
        header(out, b"x-request-id", x.request_id.as_bytes());
        if let Some(rate) = rate {
            rate_headers(out, &x.policy, &rate);
        }
        if switching {
            header(out, b"connection", b"upgrade");
        } else if close {
            header(out, b"connection", b"close");
        }
        out.extend_from_slice(b"\r\n");
    }

    /// Stream the upstream's body to the client after the head in `out`.
    /// `Ok(true)` when the upstream connection ended exactly at the body's end.
    async fn relay_response(
        &mut self,
        conn: &mut Conn,
        kind: BodyKind,
        start: usize,
        dechunk: bool,
        timeout: Duration,
    ) -> Step<bool> {
        let mut chunked = Chunked::default();
        let mut left = match kind {
            BodyKind::Length(n) => n,
            _ => 0,
        };
        let mut first = true;
        loop {
            // The bytes in hand: after the head the first time, then each read.
            let avail: &[u8] = if first {
                &self.up_buf[start..]
            } else {
                &self.up_buf
            };
            let (used, done) = match kind {
                BodyKind::None | BodyKind::Length(0) => (0, true),
                BodyKind::Length(_) => {
                    let n = left.min(avail.len() as u64) as usize;
                    self.out.extend_from_slice(&avail[..n]);
                    left -= n as u64;
                    (n, left == 0)
                }
                BodyKind::Chunked => {
                    let out = &mut self.out;
                    let n = if dechunk {
                        chunked.feed(avail, |d| out.extend_from_slice(d))
                    } else {
                        chunked
                            .feed(avail, |_| {})
                            .inspect(|&n| out.extend_from_slice(&avail[..n]))
                    };
                    let Ok(n) = n else {
                        let _ = self.stream.write_all(&self.out).await;
                        return Err(Stop::Gone);
                    };
                    (n, chunked.done())
                }
                BodyKind::Close => {
                    self.out.extend_from_slice(avail);
                    (avail.len(), false)
                }
            };
            let extra = avail.len() > used;
            if !self.out.is_empty() {
                if self.stream.write_all(&self.out).await.is_err() {
                    return Err(Stop::Gone);
                }
                self.out.clear();
            }
            if done {
                return Ok(!extra);
            }
            first = false;
            self.up_buf.clear();
            self.up_buf.reserve(READ_CHUNK);
            match tokio::time::timeout(timeout, conn.read_buf(&mut self.up_buf)).await {
                Ok(Ok(0)) if kind == BodyKind::Close => return Ok(false),
                Ok(Ok(n)) if n > 0 => {}
                // Cut off mid-body: the client must see the connection end.
                _ => {
                    METRICS.upstream_errors.with_label_values(&["other"]).inc();
                    return Err(Stop::Gone);
                }
            }
        }
    }

    /// 502 or 504 when nothing of the answer has reached the client yet.
    async fn upstream_failed(
        &mut self,
        x: &mut Exchange,
        head: &RequestHead,
        f: Failure,
    ) -> Step<bool> {
        let (status, code, message, kind) = f.describe();
        METRICS.upstream_errors.with_label_values(&[kind]).inc();
        if let Failure::Connect(ConnectError::Refused(e) | ConnectError::Tls(e)) = &f {
            tracing::warn!(upstream = %x.policy.upstream.url, error = %e, "upstream connection failed");
        }
        x.body_done = false;
        self.error(x, head, status, code, message, |_| {}).await
    }

    async fn refuse_malformed(&mut self, e: WireError) {
        let request_id = request_id(None);
        let status = e.status();
        let body = gate::error_body(status, "invalid_request", e.message(), &request_id);
        json_head(
            &mut self.out,
            status,
            "no-store",
            &request_id,
            body.len(),
            true,
        );
        self.out.extend_from_slice(b"\r\n");
        self.out.extend_from_slice(&body);
        let _ = self.stream.write_all(&self.out).await;
        METRICS
            .auth_denials
            .with_label_values(&["invalid_request"])
            .inc();
        METRICS
            .requests
            .with_label_values(&["unmatched", "OTHER", status_class(status)])
            .inc();
    }

    async fn deny(&mut self, x: &mut Exchange, head: &RequestHead, denial: &Denial) -> Step<bool> {
        METRICS
            .auth_denials
            .with_label_values(&[denial.code()])
            .inc();
        let rate = x.decision.as_ref().and_then(|d| d.rate);
        let challenge = denial.challenge();
        let policy = x.policy.clone();
        self.error(
            x,
            head,
            denial.status(),
            denial.code(),
            &denial.message(),
            |out| {
                if let Some(c) = &challenge {
                    header(out, b"www-authenticate", c.as_bytes());
                }
                if let Some(rate) = rate {
                    rate_headers(out, &policy, &rate);
                }
            },
        )
        .await
    }

    async fn issue_error(
        &mut self,
        x: &mut Exchange,
        head: &RequestHead,
        e: IssueError,
    ) -> Step<bool> {
        self.error(x, head, e.status(), e.code(), &e.message(), |out| {
            if let Some(c) = e.challenge() {
                header(out, b"www-authenticate", c.as_bytes());
            }
            if let Some(secs) = e.retry_after() {
                let _ = write!(out, "retry-after: {secs}\r\n");
            }
        })
        .await
    }

    /// A JSON error answer in the documented shape.
    async fn error(
        &mut self,
        x: &mut Exchange,
        head: &RequestHead,
        status: u16,
        code: &'static str,
        message: &str,
        extra: impl FnOnce(&mut Vec<u8>),
    ) -> Step<bool> {
        x.refused = Some((status, code));
        let body = gate::error_body(status, code, message, &x.request_id);
        self.send_json(x, head, status, "no-store", &body, extra)
            .await
    }

    /// Every JSON answer keygate writes itself goes out here: content type
    /// and length, `Cache-Control`, `X-Request-Id`, then what `extra` adds.
    async fn send_json(
        &mut self,
        x: &mut Exchange,
        head: &RequestHead,
        status: u16,
        cache_control: &str,
        body: &[u8],
        extra: impl FnOnce(&mut Vec<u8>),
    ) -> Step<bool> {
        x.status = status;
        // An unread request body cannot be skipped safely: end the connection.
        let keep = head.keep_alive && x.body_done;
        self.linger = !x.body_done;
        json_head(
            &mut self.out,
            status,
            cache_control,
            &x.request_id,
            body.len(),
            !keep,
        );
        extra(&mut self.out);
        self.out.extend_from_slice(b"\r\n");
        if head.method != Method::HEAD {
            self.out.extend_from_slice(body);
        }
        if self.stream.write_all(&self.out).await.is_err() {
            return Err(Stop::Gone);
        }
        Ok(keep)
    }
}

/// The request target sent upstream: as received, or rewritten.
enum Target {
    Buf(std::ops::Range<usize>),
    Owned(Vec<u8>),
}

impl Client {
    /// The interim answer to `Expect: 100-continue`, sent just before keygate
    /// reads the body (the upstream never sees the expectation).
    async fn continue_100(&mut self) -> std::io::Result<()> {
        self.stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
    }

    /// Read and drop what the client still sends, for a bounded time.
    async fn linger(&mut self) {
        let deadline = tokio::time::Instant::now() + LINGER_TIME;
        let mut sink = [0u8; 16 * 1024];
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, self.stream.read(&mut sink)).await {
            if n == 0 {
                break;
            }
        }
    }
}

enum BodyReader {
    Length(u64),
    Chunked(Chunked),
}

impl BodyReader {
    fn new(head: &RequestHead) -> BodyReader {
        match head.body {
            BodyKind::Chunked => BodyReader::Chunked(Chunked::default()),
            BodyKind::Length(n) => BodyReader::Length(n),
            BodyKind::None | BodyKind::Close => BodyReader::Length(0),
        }
    }
}

enum BodyFailure {
    Client,
    Upstream(Failure),
}

/// What went wrong on the way to the upstream's answer.
enum Failure {
    Connect(ConnectError),
    /// Closed or reset before a whole answer head arrived.
    Broken,
    Timeout,
    /// The answer was not HTTP/1.x.
    Protocol,
}

impl Failure {
    /// Status, code, message and metric kind.
    fn describe(&self) -> (u16, &'static str, &'static str, &'static str) {
        match self {
            Failure::Connect(ConnectError::Timeout) | Failure::Timeout => (
                504,
                "upstream_timeout",
                "the upstream did not answer in time",
                "timeout",
            ),
            Failure::Connect(_) => (
                502,
                "upstream_unavailable",
                "the upstream could not be reached",
                "connect",
            ),
            Failure::Broken | Failure::Protocol => (
                502,
                "upstream_unavailable",
                "the upstream failed to answer",
                "other",
            ),
        }
    }
}

impl Exchange {
    /// Metrics and the access log line for this request.
    fn log(&self) {
        let policy = &*self.policy;
        let status = if self.status == 0 {
            self.refused.map_or(0, |(s, _)| s)
        } else {
            self.status
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
            .with_label_values(&[route, method, status_class(status)])
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
        }
        if policy.log.access == crate::policy::AccessLog::Off {
            return;
        }
        let principal = decision.and_then(|d| d.principal);
        access_log::write(
            policy.log.access,
            &access_log::Entry {
                time: access_log::now(),
                request_id: &self.request_id,
                client_ip: decision.map(|d| d.client_ip),
                method: self.method.as_str(),
                path: &self.path,
                route,
                status,
                principal: principal.map(|p| p.subject_str(policy)),
                auth_method: principal.map(|p| p.method.as_str()),
                key_id: principal
                    .and_then(|p| p.key)
                    .map(|k| &*policy.api_key(k).id),
                tier: principal.map(|p| &*policy.tier(p.tier(policy)).name),
                code: self.refused.map(|(_, code)| code),
                upstream_ms: self.upstream_elapsed.map(access_log::ms),
                total_ms: access_log::ms(elapsed),
            },
        );
    }
}

/// Path and query of an origin-form target; an absolute-form target
/// (`http://host/path`, RFC 9112 §3.2.2) is reduced to its path.
fn split_target(target: &[u8]) -> Option<(&str, Option<&str>)> {
    let target = std::str::from_utf8(target_as_path(target)).ok()?;
    if !target.starts_with('/') {
        return None;
    }
    Some(match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    })
}

fn target_as_path(target: &[u8]) -> &[u8] {
    for scheme in [&b"http://"[..], b"https://"] {
        if target.len() > scheme.len() && target[..scheme.len()].eq_ignore_ascii_case(scheme) {
            let rest = &target[scheme.len()..];
            return match rest.iter().position(|&b| b == b'/') {
                Some(i) => &rest[i..],
                None => b"/",
            };
        }
    }
    target
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

fn header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Status line and the headers every JSON answer carries; no blank line.
fn json_head(
    out: &mut Vec<u8>,
    status: u16,
    cache_control: &str,
    request_id: &str,
    len: usize,
    close: bool,
) {
    out.clear();
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let _ = write!(
        out,
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len}\r\ncache-control: {cache_control}\r\nx-request-id: {request_id}\r\n"
    );
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
}

/// `X-RateLimit-*`, and the IETF pair `RateLimit-Policy` / `RateLimit`
/// (draft-ietf-httpapi-ratelimit-headers-09); on a refusal also `Retry-After`.
fn rate_headers(out: &mut Vec<u8>, policy: &Policy, rate: &RateInfo) {
    let o = rate.outcome;
    let tier = policy.tier(rate.tier);
    out.extend_from_slice(b"x-ratelimit-limit: ");
    push_u64(out, o.limit.into());
    out.extend_from_slice(b"\r\nx-ratelimit-remaining: ");
    push_u64(out, o.remaining.into());
    out.extend_from_slice(b"\r\nx-ratelimit-reset: ");
    push_u64(out, o.reset_secs);
    out.extend_from_slice(b"\r\n");
    if let Some(p) = &tier.policy_header {
        header(out, b"ratelimit-policy", p.as_bytes());
    }
    out.extend_from_slice(b"ratelimit: \"");
    out.extend_from_slice(tier.name.as_bytes());
    out.extend_from_slice(b"\";r=");
    push_u64(out, o.remaining.into());
    out.extend_from_slice(b";t=");
    push_u64(out, o.reset_secs);
    out.extend_from_slice(b"\r\n");
    if !o.allowed {
        out.extend_from_slice(b"retry-after: ");
        push_u64(out, o.retry_after_secs);
        out.extend_from_slice(b"\r\n");
    }
}

/// Decimal digits of `n`, without `fmt` (a few header values per request).
fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}
