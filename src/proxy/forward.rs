//! The forward plan: which headers the upstream receives and which the
//! client gets back. Pure functions writing head bytes; the framing lines
//! (`content-length` / `transfer-encoding`), `connection` and the blank
//! line are the caller's, since they depend on how the body is re-framed.
//!
//! Upstream-bound: the normalised target, one `Host`, no hop-by-hop fields
//! (including those the request's `Connection` names), no client-made
//! `X-Auth-*`, no header name with `_` (see `Underscores`), no method
//! override, no client-address or original-URL claims unless the peer is a
//! trusted proxy, credentials stripped unless forwarded, then keygate's
//! identity and forwarding headers.

use std::net::IpAddr;

use crate::gate::{Principal, RateInfo};
use crate::http1::encode::{header, push_u64, HopByHop};
use crate::http1::parse::{HeadView, RequestHead, ResponseHead};
use crate::http1::Fields;
use crate::policy::Policy;

/// Headers that ask the upstream to run another method than the one the
/// gate checked (Rails, Laravel, Symfony and Express honour them): never
/// forwarded.
const METHOD_OVERRIDES: [&[u8]; 3] = [
    b"x-http-method-override",
    b"x-http-method",
    b"x-method-override",
];

/// Headers through which upstreams learn the client's address or the
/// original URL; believed only from a trusted proxy, like `X-Forwarded-For`.
/// `X-Original-URL` and `X-Rewrite-URL` make IIS and Symfony route by a
/// path the gate never matched.
const CLIENT_CLAIMS: [&[u8]; 10] = [
    b"forwarded",
    b"x-real-ip",
    b"true-client-ip",
    b"x-client-ip",
    b"x-forwarded-host",
    b"x-forwarded-port",
    b"x-forwarded-prefix",
    b"x-forwarded-server",
    b"x-original-url",
    b"x-rewrite-url",
];

fn is_one_of(name: &[u8], list: &[&[u8]]) -> bool {
    list.iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// What the upstream-bound head is made of besides the request itself.
pub struct Plan<'a> {
    pub policy: &'a Policy,
    pub peer: IpAddr,
    /// `peer` as text, for `X-Forwarded-For`.
    pub peer_text: &'a str,
    pub principal: Option<Principal>,
    pub request_id: &'a str,
    /// The protocol of an allowed `Upgrade` (lower case).
    pub upgrade: Option<&'a str>,
    /// The request came over TLS: `X-Forwarded-Proto: https`.
    pub https: bool,
}

/// Write the request head the upstream receives into `out` (cleared):
/// request line, headers, no framing and no blank line.
pub fn request_head(
    out: &mut Vec<u8>,
    plan: &Plan<'_>,
    head: &RequestHead,
    buf: &[u8],
    target: &[u8],
) {
    let policy = plan.policy;
    let view = HeadView {
        buf,
        headers: &head.headers,
    };
    let hop = HopByHop::of(&view);
    out.clear();
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // RFC 9112 §3.2.2: an absolute-form target's authority replaces Host; an
    // HTTP/1.0 request without one gets the upstream's.
    let host = match (head.authority, head.host) {
        (Some(a), _) | (None, Some(a)) => a.get(buf),
        (None, None) => policy.upstream.authority.as_bytes(),
    };
    header(out, b"host", host);
    let trusted_peer = policy.server.trusted_proxies.contains(plan.peer);
    let api_key_header = policy.auth.api_key_header.as_str().as_bytes();
    let mut chain: Vec<&[u8]> = Vec::new();
    let mut proto_sent = false;
    for h in &head.headers {
        let name = h.name.get(buf);
        let value = h.value.get(buf);
        let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
        if is(b"x-forwarded-for") {
            chain.push(value);
            continue;
        }
        if is(b"x-forwarded-proto") && trusted_peer {
            proto_sent = true;
        } else if hop.drops(name)
            || name.contains(&b'_')
            || is_one_of(name, &METHOD_OVERRIDES)
            || (!trusted_peer && is_one_of(name, &CLIENT_CLAIMS))
            || is(b"x-forwarded-proto")
            || is(b"x-request-id")
            || (name.len() >= 7 && name[..7].eq_ignore_ascii_case(b"x-auth-"))
            || (!policy.upstream.forward_credentials
                && (is(b"authorization") || is(api_key_header)))
        {
            continue;
        }
        header(out, name, value);
    }
    if let Some(p) = &plan.principal {
        let tier = policy.tier(p.tier(policy));
        header(out, b"x-auth-subject", p.subject(policy).as_bytes());
        if let Some(user) = p.user() {
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
        if let Some(key) = p.key_id_header(policy) {
            header(out, b"x-auth-key-id", key.as_bytes());
        }
    }
    header(out, b"x-request-id", plan.request_id.as_bytes());
    // Behind a trusted proxy the chain so far is kept and the proxy
    // appended; otherwise the client's own claims are dropped.
    out.extend_from_slice(b"x-forwarded-for: ");
    if trusted_peer {
        for part in &chain {
            out.extend_from_slice(part);
            out.extend_from_slice(b", ");
        }
    }
    out.extend_from_slice(plan.peer_text.as_bytes());
    out.extend_from_slice(b"\r\n");
    if !proto_sent {
        let proto: &[u8] = if plan.https { b"https" } else { b"http" };
        header(out, b"x-forwarded-proto", proto);
    }
    if let Some(protocol) = plan.upgrade {
        header(out, b"connection", b"upgrade");
        header(out, b"upgrade", protocol.as_bytes());
    }
}

/// The protocol of a request's `Upgrade` when it may be forwarded: exactly
/// one protocol, listed in `server.upgrades`, and no request body (bytes
/// after the head belong to the new protocol, not to this request).
pub fn allowed_upgrade<'p>(policy: &'p Policy, head: &RequestHead, buf: &[u8]) -> Option<&'p str> {
    if !head.upgrade || head.body != crate::http1::parse::BodyKind::None {
        return None;
    }
    let view = HeadView {
        buf,
        headers: &head.headers,
    };
    let mut values = view.values(b"upgrade");
    let value = values.next()?;
    if values.next().is_some() || value.contains(&b',') {
        return None;
    }
    // `websocket`, or `name/version`: the name decides.
    let name = value.trim_ascii().split(|&b| b == b'/').next()?;
    policy
        .server
        .upgrades
        .iter()
        .find(|p| p.as_bytes().eq_ignore_ascii_case(name))
        .map(|p| &**p)
}

/// Write the fields of the answer the client receives into `out`: the
/// upstream's headers minus hop-by-hop ones and those keygate
/// sets (`X-Request-Id`, and the rate-limit headers when it sends its own).
pub fn response_head(
    out: &mut dyn Fields,
    resp: &ResponseHead,
    buf: &[u8],
    request_id: &str,
    rate: Option<(&Policy, &RateInfo)>,
    hsts: Option<&str>,
) {
    let view = HeadView {
        buf,
        headers: &resp.headers,
    };
    let hop = HopByHop::of(&view);
    let refused = rate.is_some_and(|(_, r)| !r.outcome.allowed);
    for h in &resp.headers {
        let name = h.name.get(buf);
        let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
        if hop.drops(name)
            || is(b"x-request-id")
            || (hsts.is_some() && is(b"strict-transport-security"))
            || (rate.is_some()
                && (is(b"x-ratelimit-limit")
                    || is(b"x-ratelimit-remaining")
                    || is(b"x-ratelimit-reset")
                    || is(b"ratelimit-policy")
                    || is(b"ratelimit")
                    || (is(b"retry-after") && refused)))
        {
            continue;
        }
        out.field(name, h.value.get(buf));
    }
    out.field(b"x-request-id", request_id.as_bytes());
    if let Some(hsts) = hsts {
        out.field(b"strict-transport-security", hsts.as_bytes());
    }
    if let Some((policy, rate)) = rate {
        rate_headers(out, policy, rate);
    }
}

/// `X-RateLimit-*`, and the IETF pair `RateLimit-Policy` / `RateLimit`
/// (draft-ietf-httpapi-ratelimit-headers-09); on a refusal also `Retry-After`.
pub fn rate_headers(out: &mut dyn Fields, policy: &Policy, rate: &RateInfo) {
    let o = rate.outcome;
    let tier = policy.tier(rate.tier);
    out.field_u64(b"x-ratelimit-limit", o.limit.into());
    out.field_u64(b"x-ratelimit-remaining", o.remaining.into());
    out.field_u64(b"x-ratelimit-reset", o.reset_secs);
    if let Some(p) = &tier.policy_header {
        out.field(b"ratelimit-policy", p.as_bytes());
    }
    let mut value = Vec::with_capacity(tier.name.len() + 32);
    value.push(b'"');
    value.extend_from_slice(tier.name.as_bytes());
    value.extend_from_slice(b"\";r=");
    push_u64(&mut value, o.remaining.into());
    value.extend_from_slice(b";t=");
    push_u64(&mut value, o.reset_secs);
    out.field(b"ratelimit", &value);
    if !o.allowed {
        out.field_u64(b"retry-after", o.retry_after_secs);
    }
}

#[cfg(test)]
mod tests;
