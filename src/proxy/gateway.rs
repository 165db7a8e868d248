//! The pingora `ProxyHttp` adapter. Each filter asks the pure core one
//! question and turns the answer into headers or a response; nothing here
//! decides anything on its own.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};

use super::access_log;
use crate::gate::{self, Decision, Denial, RateInfo, RequestFacts};
use crate::issue::{IssueError, Issuer};
use crate::limit::Limiter;
use crate::metrics::{method_label, status_class, METRICS};
use crate::policy::{Policy, PolicyStore, Webhook};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_AUTH_SUBJECT: HeaderName = HeaderName::from_static("x-auth-subject");
const X_AUTH_EMAIL: HeaderName = HeaderName::from_static("x-auth-email");
const X_AUTH_TIER: HeaderName = HeaderName::from_static("x-auth-tier");
const X_AUTH_PERMISSIONS: HeaderName = HeaderName::from_static("x-auth-permissions");
const X_AUTH_METHOD: HeaderName = HeaderName::from_static("x-auth-method");
const X_AUTH_KEY_ID: HeaderName = HeaderName::from_static("x-auth-key-id");
const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// A client-sent request id is kept when it is this short and printable.
const MAX_REQUEST_ID_LEN: usize = 128;

pub struct Gateway {
    pub store: Arc<PolicyStore>,
    pub limiter: Arc<Limiter>,
    pub issuer: Arc<Issuer>,
    /// For webhook bodies, which are read whole before the upstream is
    /// contacted and so cannot go through pingora's proxy loop (it replays
    /// at most 64 KiB of an already-read body).
    pub connector: pingora::connectors::http::v1::Connector,
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

/// Per-request state, from the first filter to `logging`.
pub struct Ctx {
    started: Instant,
    policy: Option<Arc<Policy>>,
    request_id: HeaderValue,
    decision: Option<Decision>,
    /// The normalised path, when it differs from the one received.
    rewritten_path: Option<String>,
    /// Status and code of a response keygate wrote itself.
    refused: Option<(u16, &'static str)>,
    /// Set when the request was for one of keygate's own endpoints.
    endpoint: Option<Endpoint>,
    /// Set when the path is a `[[webhooks]]` path (its label).
    webhook: Option<Box<str>>,
    upstream_sent: Option<Instant>,
    upstream_elapsed: Option<Duration>,
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            started: Instant::now(),
            policy: None,
            request_id: HeaderValue::from_static(""),
            decision: None,
            rewritten_path: None,
            refused: None,
            endpoint: None,
            webhook: None,
            upstream_sent: None,
            upstream_elapsed: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let policy = self.store.load();
        ctx.request_id = request_id(session.req_header().headers.get(X_REQUEST_ID));
        ctx.policy = Some(policy.clone());

        let raw_path = session.req_header().uri.path();
        let path = match gate::path::normalize(raw_path) {
            Ok(path) => path,
            Err(why) => {
                let denial = Denial::InvalidRequest(why);
                respond_denial(session, ctx, &denial).await?;
                return Ok(true);
            }
        };
        let peer = peer_ip(session);
        if let Some(endpoint) = Endpoint::find(&policy, &path) {
            ctx.endpoint = Some(endpoint);
            self.serve_endpoint(session, ctx, &policy, endpoint, peer)
                .await?;
            return Ok(true);
        }
        if let std::borrow::Cow::Owned(p) = &path {
            ctx.rewritten_path = Some(p.clone());
        }
        if let Some(hook) = policy.webhook(&path) {
            ctx.webhook = Some(hook.path.clone());
            self.serve_webhook(session, ctx, &policy, hook, peer)
                .await?;
            return Ok(true);
        }
        let decision = {
            let req = session.req_header();
            let facts = RequestFacts {
                peer,
                method: &req.method,
                path: &path,
                headers: &req.headers,
            };
            let started = Instant::now();
            let decision =
                gate::decide(&policy, &self.limiter, &facts, crate::policy::unix_now_us());
            METRICS
                .gate_duration
                .observe(started.elapsed().as_secs_f64());
            decision
        };
        let verdict = decision.verdict.clone();
        ctx.decision = Some(decision);
        match verdict {
            Ok(()) => Ok(false),
            Err(denial) => {
                if denial == Denial::RateLimited {
                    if let Some(rate) = ctx.decision.as_ref().and_then(|d| d.rate) {
                        let tier = &*policy.tier(rate.tier).name;
                        METRICS.rate_limited.with_label_values(&[tier]).inc();
                    }
                }
                respond_denial(session, ctx, &denial).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let policy = ctx.policy.as_ref().ok_or_else(|| {
            Error::explain(
                ErrorType::InternalError,
                "no policy loaded for this request",
            )
        })?;
        Ok(Box::new(upstream_http_peer(&policy.upstream)))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let (Some(policy), Some(decision)) = (ctx.policy.as_ref(), ctx.decision.as_ref()) else {
            return Error::e_explain(
                ErrorType::InternalError,
                "request reached upstream undecided",
            );
        };
        prepare_upstream_request(upstream, policy, decision.principal, ctx, peer_ip(session))?;
        ctx.upstream_sent = Some(Instant::now());
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        _upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.upstream_elapsed = ctx.upstream_sent.map(|t| t.elapsed());
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        response.insert_header(X_REQUEST_ID, ctx.request_id.clone())?;
        if let (Some(policy), Some(rate)) =
            (&ctx.policy, ctx.decision.as_ref().and_then(|d| d.rate))
        {
            rate_headers(response, policy, &rate)?;
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let (status, code, message, kind) = classify_failure(e);
        if let Some(kind) = kind {
            METRICS.upstream_errors.with_label_values(&[kind]).inc();
        }
        if status > 0 && session.response_written().is_none() {
            ctx.refused = Some((status, code));
            let body = gate::error_body(status, code, message, request_id_str(&ctx.request_id));
            if let Err(write) = write_json(session, &ctx.request_id, status, None, None, body).await
            {
                tracing::debug!(error = %write, "could not send the error response");
            }
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        let status = session
            .response_written()
            .map_or(ctx.refused.map_or(0, |(s, _)| s), |r| r.status.as_u16());
        let elapsed = ctx.started.elapsed();
        let Some(policy) = ctx.policy.as_deref() else {
            return;
        };
        let decision = ctx.decision.as_ref();
        let route = match (ctx.endpoint, &ctx.webhook, decision.and_then(|d| d.route)) {
            (Some(endpoint), _, _) => endpoint.label(),
            (None, Some(hook), _) => hook,
            (None, None, Some(r)) => &*policy.route(r).pattern,
            (None, None, None) => "unmatched",
        };
        let method = method_label(&session.req_header().method);
        METRICS
            .requests
            .with_label_values(&[route, method, status_class(status)])
            .inc();
        METRICS
            .request_duration
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
        if let Some(up) = ctx.upstream_elapsed {
            METRICS
                .upstream_duration
                .with_label_values(&[route])
                .observe(up.as_secs_f64());
        }

        if policy.log.access == crate::policy::AccessLog::Off {
            return;
        }
        let principal = decision.and_then(|d| d.principal);
        let path = ctx
            .rewritten_path
            .as_deref()
            .unwrap_or_else(|| session.req_header().uri.path());
        access_log::write(
            policy.log.access,
            &access_log::Entry {
                time: access_log::now(),
                request_id: request_id_str(&ctx.request_id),
                client_ip: decision.map(|d| d.client_ip),
                method: session.req_header().method.as_str(),
                path,
                route,
                status,
                principal: principal.map(|p| p.subject_str(policy)),
                auth_method: principal.map(|p| p.method.as_str()),
                key_id: principal
                    .and_then(|p| p.key)
                    .map(|k| &*policy.api_key(k).id),
                tier: principal.map(|p| &*policy.tier(p.tier(policy)).name),
                code: ctx.refused.map(|(_, code)| code),
                upstream_ms: ctx.upstream_elapsed.map(access_log::ms),
                total_ms: access_log::ms(elapsed),
            },
        );
    }
}

impl Gateway {
    /// Login, refresh, revoke and JWKS. The blocking work (argon2, durable
    /// commits) runs on the blocking pool, never on this proxy thread.
    async fn serve_endpoint(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        policy: &Arc<Policy>,
        endpoint: Endpoint,
        peer: IpAddr,
    ) -> Result<()> {
        let method = session.req_header().method.clone();
        if endpoint == Endpoint::Jwks {
            if method != http::Method::GET && method != http::Method::HEAD {
                return respond_issue(session, ctx, IssueError::InvalidRequest("use GET")).await;
            }
            let body = policy.jwks.clone().into_bytes();
            return send_json(
                session,
                &ctx.request_id,
                200,
                "public, max-age=300",
                body,
                |_| Ok(()),
            )
            .await;
        }
        if method != http::Method::POST {
            return respond_issue(session, ctx, IssueError::InvalidRequest("use POST")).await;
        }
        let json = session
            .req_header()
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            let e = IssueError::InvalidRequest(
                "the body must be JSON (Content-Type: application/json)",
            );
            return respond_issue(session, ctx, e).await;
        }
        let body = match read_body(session, crate::issue::MAX_BODY).await? {
            Ok(body) => body,
            Err(e) => return respond_issue(session, ctx, e).await,
        };
        let client_ip = {
            let headers = &session.req_header().headers;
            gate::client_ip::resolve(peer, headers, &policy.server.trusted_proxies)
        };
        let (issuer, policy) = (self.issuer.clone(), policy.clone());
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
                send_json(session, &ctx.request_id, 200, "no-store", body, |r| {
                    r.insert_header(http::header::PRAGMA, "no-cache")
                        .map(|_| ())
                })
                .await
            }
            Err(e) => respond_issue(session, ctx, e).await,
        }
    }
}

impl Gateway {
    /// A `[[webhooks]]` path: read the whole body (bounded), check its
    /// signature, and only then contact the upstream with the untouched body.
    async fn serve_webhook(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        policy: &Policy,
        hook: &Webhook,
        peer: IpAddr,
    ) -> Result<()> {
        let count = |result: &str| {
            METRICS
                .webhook_verifications
                .with_label_values(&[&hook.path, result])
                .inc();
        };
        let client_ip = gate::client_ip::resolve(
            peer,
            &session.req_header().headers,
            &policy.server.trusted_proxies,
        );
        if !policy.server.ip_allow.permits(client_ip) {
            return respond_denial(session, ctx, &Denial::IpNotAllowed).await;
        }
        let body = match read_body(session, hook.max_body).await? {
            Ok(body) => body,
            Err(e) => {
                count("too_large");
                return respond_issue(session, ctx, e).await;
            }
        };
        let headers = &session.req_header().headers;
        let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        let verdict = match &hook.timestamp {
            Some((ts_header, tolerance)) => crate::webhook::check_timestamp(
                text(ts_header),
                crate::policy::unix_now(),
                tolerance.as_secs(),
            )
            .and_then(|ts| {
                crate::webhook::verify(&hook.secrets, text(&hook.header), Some(ts), &body)
            }),
            None => crate::webhook::verify(&hook.secrets, text(&hook.header), None, &body),
        };
        if let Err(refusal) = verdict {
            count(refusal.label());
            METRICS
                .auth_denials
                .with_label_values(&["invalid_signature"])
                .inc();
            ctx.refused = Some((401, "invalid_signature"));
            let body = gate::error_body(
                401,
                "invalid_signature",
                refusal.message(),
                request_id_str(&ctx.request_id),
            );
            let challenge = format!(r#"HMAC-SHA256 realm="keygate", header="{}""#, hook.header);
            return write_json(session, &ctx.request_id, 401, Some(challenge), None, body).await;
        }
        count("valid");
        self.forward_buffered(session, ctx, policy, peer, Bytes::from(body))
            .await
    }

    /// Send a request whose body keygate already holds, and relay the answer.
    async fn forward_buffered(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        policy: &Policy,
        peer: IpAddr,
        body: Bytes,
    ) -> Result<()> {
        let target = upstream_http_peer(&policy.upstream);
        let mut request = session.req_header().clone();
        prepare_upstream_request(&mut request, policy, None, ctx, peer)?;
        request.remove_header(&http::header::TRANSFER_ENCODING);
        request.insert_header(CONTENT_LENGTH, body.len())?;
        ctx.upstream_sent = Some(Instant::now());
        let exchange = async {
            let (mut http, _reused) = self.connector.get_http_session(&target).await?;
            http.write_request_header(Box::new(request)).await?;
            http.write_body(&body).await?;
            http.finish_body().await?;
            http.read_response().await?;
            Ok::<_, Box<Error>>(http)
        };
        let mut http = match exchange.await {
            Ok(http) => http,
            Err(e) => {
                let e = e.into_up();
                let (status, code, message, kind) = classify_failure(&e);
                if let Some(kind) = kind {
                    METRICS.upstream_errors.with_label_values(&[kind]).inc();
                }
                ctx.refused = Some((status, code));
                let body = gate::error_body(status, code, message, request_id_str(&ctx.request_id));
                return write_json(session, &ctx.request_id, status, None, None, body).await;
            }
        };
        ctx.upstream_elapsed = ctx.upstream_sent.map(|t| t.elapsed());
        let Some(header) = http.resp_header() else {
            return Error::e_explain(ErrorType::InternalError, "upstream answer without a header");
        };
        let mut response = header.clone();
        response.insert_header(X_REQUEST_ID, ctx.request_id.clone())?;
        session
            .write_response_header(Box::new(response), false)
            .await?;
        while let Some(chunk) = http.read_body_bytes().await? {
            session.write_response_body(Some(chunk), false).await?;
        }
        session.write_response_body(None, true).await?;
        self.connector
            .release_http_session(http, &target, None)
            .await;
        Ok(())
    }
}

/// The whole request body, or `413` past `limit` (checked against
/// Content-Length first, then as chunks arrive, so chunked bodies are bounded too).
async fn read_body(
    session: &mut Session,
    limit: usize,
) -> Result<std::result::Result<Vec<u8>, IssueError>> {
    let declared = session
        .req_header()
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Ok(Err(IssueError::PayloadTooLarge));
    }
    let mut body = Vec::new();
    while let Some(chunk) = session.read_request_body().await? {
        if body.len() + chunk.len() > limit {
            return Ok(Err(IssueError::PayloadTooLarge));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Ok(body))
}

async fn respond_issue(session: &mut Session, ctx: &mut Ctx, e: IssueError) -> Result<()> {
    let status = e.status();
    ctx.refused = Some((status, e.code()));
    let body = gate::error_body(
        status,
        e.code(),
        &e.message(),
        request_id_str(&ctx.request_id),
    );
    send_json(session, &ctx.request_id, status, "no-store", body, |r| {
        if let Some(challenge) = e.challenge() {
            r.insert_header(WWW_AUTHENTICATE, challenge)?;
        }
        if let Some(secs) = e.retry_after() {
            r.insert_header(http::header::RETRY_AFTER, HeaderValue::from(secs))?;
        }
        Ok(())
    })
    .await
}

/// The request the upstream receives: normalised path, no client-made
/// `X-Auth-*`, credentials stripped unless forwarded, identity and
/// forwarding headers added. Used by the proxy and by the webhook path.
fn prepare_upstream_request(
    upstream: &mut RequestHeader,
    policy: &Policy,
    principal: Option<gate::Principal>,
    ctx: &Ctx,
    peer: IpAddr,
) -> Result<()> {
    if let Some(path) = &ctx.rewritten_path {
        let target = match upstream.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        };
        upstream.set_raw_path(target.as_bytes())?;
    }

    // Whatever the client sent under our names is never believed.
    let spoofed: Vec<HeaderName> = upstream
        .headers
        .keys()
        .filter(|n| n.as_str().starts_with("x-auth-"))
        .cloned()
        .collect();
    for name in &spoofed {
        upstream.remove_header(name);
    }
    if !policy.upstream.forward_credentials {
        upstream.remove_header(&AUTHORIZATION);
        upstream.remove_header(&policy.auth.api_key_header);
    }

    if let Some(principal) = principal {
        let tier = policy.tier(principal.tier(policy));
        upstream.insert_header(X_AUTH_SUBJECT, principal.subject(policy).clone())?;
        if let Some(user) = principal.user {
            upstream.insert_header(X_AUTH_EMAIL, policy.user(user).email_header.clone())?;
        }
        upstream.insert_header(X_AUTH_TIER, tier.header.clone())?;
        upstream.insert_header(
            X_AUTH_PERMISSIONS,
            principal.permissions(policy).header().clone(),
        )?;
        upstream.insert_header(X_AUTH_METHOD, principal.method.header())?;
        if let Some(key) = principal.key {
            upstream.insert_header(X_AUTH_KEY_ID, policy.api_key(key).id_header.clone())?;
        }
    }
    upstream.insert_header(X_REQUEST_ID, ctx.request_id.clone())?;

    // Behind a trusted proxy the chain so far is kept and the proxy
    // appended; otherwise the client's own claims are dropped.
    if policy.server.trusted_proxies.contains(peer) {
        let chain = upstream
            .headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ");
        let value = if chain.is_empty() {
            peer.to_string()
        } else {
            format!("{chain}, {peer}")
        };
        upstream.insert_header(X_FORWARDED_FOR, value)?;
        if upstream.headers.get(X_FORWARDED_PROTO).is_none() {
            upstream.insert_header(X_FORWARDED_PROTO, "http")?;
        }
    } else {
        upstream.insert_header(X_FORWARDED_FOR, peer.to_string())?;
        upstream.insert_header(X_FORWARDED_PROTO, "http")?;
    }
    Ok(())
}

/// The upstream as pingora connects to it, with the configured timeouts.
fn upstream_http_peer(up: &crate::policy::Upstream) -> HttpPeer {
    let mut peer = HttpPeer::new(up.addr, up.tls, up.sni.clone());
    peer.options.connection_timeout = Some(up.connect_timeout);
    peer.options.read_timeout = Some(up.read_timeout);
    peer.options.write_timeout = Some(up.read_timeout);
    peer
}

fn peer_ip(session: &Session) -> IpAddr {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip().to_canonical())
}

/// The client's `X-Request-Id` when it is sane, else a fresh random one.
fn request_id(sent: Option<&HeaderValue>) -> HeaderValue {
    if let Some(v) = sent {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= MAX_REQUEST_ID_LEN && b.iter().all(u8::is_ascii_graphic) {
            return v.clone();
        }
    }
    let id: u128 = rand::random();
    HeaderValue::from_str(&format!("{id:032x}")).unwrap_or(HeaderValue::from_static("-"))
}

fn request_id_str(v: &HeaderValue) -> &str {
    v.to_str().unwrap_or("-")
}

async fn respond_denial(session: &mut Session, ctx: &mut Ctx, denial: &Denial) -> Result<()> {
    let status = denial.status();
    METRICS
        .auth_denials
        .with_label_values(&[denial.code()])
        .inc();
    ctx.refused = Some((status, denial.code()));
    let body = gate::error_body(
        status,
        denial.code(),
        &denial.message(),
        request_id_str(&ctx.request_id),
    );
    let rate = ctx
        .policy
        .as_deref()
        .zip(ctx.decision.as_ref().and_then(|d| d.rate));
    write_json(
        session,
        &ctx.request_id,
        status,
        denial.challenge(),
        rate,
        body,
    )
    .await
}

/// `X-RateLimit-*`, and the IETF pair `RateLimit-Policy` / `RateLimit`
/// (draft-ietf-httpapi-ratelimit-headers-09); on a refusal also `Retry-After`.
fn rate_headers(resp: &mut ResponseHeader, policy: &Policy, rate: &RateInfo) -> Result<()> {
    let o = rate.outcome;
    let tier = policy.tier(rate.tier);
    resp.insert_header(X_RATELIMIT_LIMIT, HeaderValue::from(o.limit))?;
    resp.insert_header(X_RATELIMIT_REMAINING, HeaderValue::from(o.remaining))?;
    resp.insert_header(X_RATELIMIT_RESET, HeaderValue::from(o.reset_secs))?;
    if let Some(p) = &tier.policy_header {
        resp.insert_header(RATELIMIT_POLICY, p.clone())?;
    }
    resp.insert_header(
        RATELIMIT,
        format!("\"{}\";r={};t={}", tier.name, o.remaining, o.reset_secs),
    )?;
    if !o.allowed {
        resp.insert_header(
            http::header::RETRY_AFTER,
            HeaderValue::from(o.retry_after_secs),
        )?;
    }
    Ok(())
}

/// An error answer with an optional challenge and rate-limit headers.
async fn write_json(
    session: &mut Session,
    request_id: &HeaderValue,
    status: u16,
    challenge: Option<String>,
    rate: Option<(&Policy, RateInfo)>,
    body: Vec<u8>,
) -> Result<()> {
    send_json(session, request_id, status, "no-store", body, |r| {
        if let Some(challenge) = challenge {
            r.insert_header(WWW_AUTHENTICATE, challenge)?;
        }
        if let Some((policy, rate)) = rate {
            rate_headers(r, policy, &rate)?;
        }
        Ok(())
    })
    .await
}

/// Every JSON answer keygate writes itself goes out here: content type and
/// length, `Cache-Control`, `X-Request-Id`, then what `extra` adds.
async fn send_json(
    session: &mut Session,
    request_id: &HeaderValue,
    status: u16,
    cache_control: &'static str,
    body: Vec<u8>,
    extra: impl FnOnce(&mut ResponseHeader) -> Result<()>,
) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(6))?;
    resp.insert_header(CONTENT_TYPE, "application/json")?;
    resp.insert_header(CONTENT_LENGTH, body.len())?;
    resp.insert_header(CACHE_CONTROL, cache_control)?;
    resp.insert_header(X_REQUEST_ID, request_id.clone())?;
    extra(&mut resp)?;
    if status >= 400 {
        // A refusal may leave the request body unread: do not reuse the connection.
        session.set_keepalive(None);
    }
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await
}

/// Status, code, message and metric kind for a failure pingora reports.
fn classify_failure(e: &Error) -> (u16, &'static str, &'static str, Option<&'static str>) {
    use ErrorType::*;
    match (e.esource(), e.etype()) {
        (_, HTTPStatus(code)) if (400..500).contains(code) => (
            *code,
            "invalid_request",
            "the request could not be read",
            None,
        ),
        (ErrorSource::Downstream, ReadError | WriteError | ConnectionClosed) => (0, "", "", None),
        (ErrorSource::Downstream, ReadTimedout) => (
            408,
            "invalid_request",
            "the request was not received in time",
            None,
        ),
        (ErrorSource::Downstream, _) => (
            400,
            "invalid_request",
            "the request could not be read",
            None,
        ),
        (_, ConnectTimedout | ReadTimedout | WriteTimedout) => (
            504,
            "upstream_timeout",
            "the upstream did not answer in time",
            Some("timeout"),
        ),
        (_, ConnectRefused | ConnectNoRoute | ConnectError | ConnectProxyFailure | SocketError) => {
            (
                502,
                "upstream_unavailable",
                "the upstream could not be reached",
                Some("connect"),
            )
        }
        (ErrorSource::Upstream, _) => (
            502,
            "upstream_unavailable",
            "the upstream failed to answer",
            Some("other"),
        ),
        _ => (
            500,
            "internal_error",
            "keygate failed to handle the request",
            None,
        ),
    }
}
