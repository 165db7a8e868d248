//! `keygate explain`: run the proxy's own decision for one described request
//! and print each step, so an operator can test a policy edit before saving.

use std::fmt::Write;
use std::net::IpAddr;
use std::path::Path;

use anyhow::{bail, Context};
use http::{HeaderMap, HeaderName, HeaderValue, Method};

use crate::gate::{self, AuthMethod, Decision, Denial, Holder, PeerCert, RequestFacts};
use crate::limit::Limiter;
use crate::policy::{Access, Policy, Rate};
use crate::proxy::dispatch::{dispatch, Dispatch};
use crate::proxy::refusal::Refusal;
use crate::tls::ClientAuth;

pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub ip: IpAddr,
    pub token: Option<&'a str>,
    pub api_key: Option<&'a str>,
    /// `Name: value` lines.
    pub headers: &'a [String],
    /// A client certificate (PEM, leaf first), as if the TLS handshake had
    /// verified it.
    pub client_cert: Option<&'a Path>,
}

/// Print the explanation of `req` under the file at `path`. `Ok(true)` when
/// the proxy would let it through.
pub fn run(path: &Path, req: &Request<'_>) -> anyhow::Result<bool> {
    let policy = super::load(path)?.policy;
    let (text, allowed) = explain(&policy, req, crate::clock::unix_now_us())?;
    print!("{text}");
    Ok(allowed)
}

/// The explanation as text, and whether the request passes.
pub fn explain(policy: &Policy, req: &Request<'_>, now_us: u64) -> anyhow::Result<(String, bool)> {
    let method = Method::from_bytes(req.method.to_ascii_uppercase().as_bytes())
        .with_context(|| format!("{:?} is not an HTTP method", req.method))?;
    let raw_path = req.path.split('?').next().unwrap_or("/");
    let headers = headers(policy, req)?;
    let mut client_cert = req
        .client_cert
        .map(|f| read_client_cert(policy, f))
        .transpose()?;
    let mut out = String::new();
    let line = |out: &mut String, step: &str, text: &str| {
        let _ = writeln!(out, "{step:<13} {text}");
    };
    line(
        &mut out,
        "request",
        &format!("{method} {} from {}", req.path, req.ip),
    );
    if let Some(cert) = &client_cert {
        let asked = policy
            .server
            .tls
            .as_ref()
            .is_some_and(|t| t.client_auth != ClientAuth::Off);
        let names: Vec<String> = cert.sans.iter().map(|n| format!("{n:?}")).collect();
        let names = if names.is_empty() {
            String::new()
        } else {
            format!(", names {}", names.join(" "))
        };
        line(
            &mut out,
            "client cert",
            &format!(
                "subject {:?}{names}, sha256 {}; {}",
                cert.subject,
                hex::encode(cert.sha256),
                if asked {
                    "explain does not check that client_ca_file signed it, the handshake does"
                } else {
                    "IGNORED: no client_ca_file is set, so the handshake never asks for one"
                }
            ),
        );
        if !asked {
            client_cert = None;
        }
    }

    let path = match gate::path::normalize(raw_path) {
        Ok(p) => p,
        Err(why) => {
            let d = Denial::InvalidRequest(why);
            line(&mut out, "path", &format!("FAIL: {why}"));
            line(
                &mut out,
                "decision",
                &format!("DENY {} {}: {}", d.status(), d.code(), d.message()),
            );
            return Ok((out, false));
        }
    };
    if path != raw_path {
        line(&mut out, "path", &format!("normalised to {path}"));
    }
    match dispatch(policy, &path) {
        Dispatch::Endpoint(endpoint) => {
            line(
                &mut out,
                "route",
                &format!(
                    "served by keygate itself ({}; nothing is forwarded)",
                    endpoint.label()
                ),
            );
            if !endpoint.allows(&method) {
                let r = Refusal::MethodNotAllowed(endpoint.allow_header());
                line(
                    &mut out,
                    "decision",
                    &format!(
                        "DENY {} {}: {method} is not served here (Allow: {})",
                        r.status(),
                        r.code(),
                        endpoint.allow_header()
                    ),
                );
                return Ok((out, false));
            }
            line(&mut out, "decision", "ALLOW (keygate answers)");
            return Ok((out, true));
        }
        Dispatch::Webhook(hook) => {
            let replay = match &hook.timestamp {
                Some((h, tolerance)) => {
                    format!(", {h} within {}", humantime::format_duration(*tolerance))
                }
                None => String::new(),
            };
            line(
                &mut out,
                "route",
                &format!(
                    "webhook {}: the body must be signed (header {}{replay}, at most {} bytes); no credential is checked",
                    hook.path, hook.header, hook.max_body
                ),
            );
            if !policy.server.ip_allow.permits(req.ip) {
                let d = Denial::IpNotAllowed;
                line(
                    &mut out,
                    "decision",
                    &format!("DENY {} {}: {}", d.status(), d.code(), d.message()),
                );
                return Ok((out, false));
            }
            line(
                &mut out,
                "decision",
                "ALLOW if the signature verifies (explain cannot check a body)",
            );
            return Ok((out, true));
        }
        Dispatch::Gate => {}
    }

    let facts = RequestFacts {
        peer: req.ip,
        client_ip: None,
        method: &method,
        path: &path,
        headers: &headers,
        client_cert: client_cert.as_ref(),
        stored: None,
    };
    // A fresh limiter: explain shows the tier that would apply, not live counters.
    let d = gate::decide(policy, &Limiter::new(), &facts, now_us);
    steps(&mut out, policy, req, &d);
    Ok((out, d.allowed()))
}

/// The leaf of a PEM certificate file, as the handshake hands it to the gate.
fn read_client_cert(policy: &Policy, file: &Path) -> anyhow::Result<PeerCert> {
    let pem = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let chain =
        crate::tls::certificates(&pem).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let leaf = chain
        .first()
        .with_context(|| format!("{}: no certificate in it", file.display()))?;
    // As verified by the CAs the policy trusts now.
    let trust = policy
        .server
        .tls
        .as_ref()
        .map_or([0; 32], |t| t.client_trust);
    crate::proxy::tls::peer_cert(leaf, trust)
        .with_context(|| format!("{}: not an X.509 certificate", file.display()))
}

fn headers(policy: &Policy, req: &Request<'_>) -> anyhow::Result<HeaderMap> {
    let mut h = HeaderMap::new();
    for raw in req.headers {
        let (name, value) = raw
            .split_once(':')
            .with_context(|| format!("--header {raw:?} is not 'Name: value'"))?;
        h.append(
            HeaderName::from_bytes(name.trim().as_bytes()).context("invalid header name")?,
            HeaderValue::from_str(value.trim()).context("invalid header value")?,
        );
    }
    match (req.token, req.api_key) {
        (Some(_), Some(_)) => bail!("give --token or --api-key, not both"),
        (Some(t), None) => {
            h.insert(
                http::header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {t}"))?,
            );
        }
        (None, Some(k)) => {
            h.insert(
                policy.auth.api_key_header.clone(),
                HeaderValue::from_str(k)?,
            );
        }
        (None, None) => {}
    }
    Ok(h)
}

fn steps(out: &mut String, policy: &Policy, req: &Request<'_>, d: &Decision) {
    let mut line = |step: &str, text: String| {
        let _ = writeln!(out, "{step:<13} {text}");
    };
    let denial = d.verdict.as_ref().err();
    let failed_at = |step: &str| match (denial, step) {
        (Some(Denial::IpNotAllowed), "global") => d.principal.is_none(),
        (Some(Denial::IpNotAllowed), "ip") => d.principal.is_some(),
        (Some(Denial::Forbidden), "route") => true,
        (
            Some(
                Denial::MissingCredentials
                | Denial::InvalidToken(_)
                | Denial::TokenExpired
                | Denial::InvalidApiKey(_)
                | Denial::InvalidClientCert(_)
                | Denial::InvalidRequest(_),
            ),
            "credential",
        ) => true,
        (Some(Denial::InsufficientPermissions(_)), "permissions") => true,
        (Some(Denial::RateLimited), "tier") => true,
        _ => false,
    };
    let verdict = |failed: bool| if failed { "FAIL" } else { "pass" };

    let source = if d.client_ip == req.ip.to_canonical() {
        "the socket peer".to_string()
    } else {
        format!("from X-Forwarded-For, via trusted proxy {}", req.ip)
    };
    line("client ip", format!("{} ({source})", d.client_ip));
    let global = if policy.server.ip_allow.is_restricted() {
        "server.ip_allow"
    } else {
        "no global allowlist"
    };
    line(
        "global allow",
        format!("{} ({global})", verdict(failed_at("global"))),
    );
    if failed_at("global") {
        return decision(&mut line, policy, d);
    }

    match d.route {
        Some(r) => {
            let route = policy.route(r);
            let methods = route
                .methods
                .as_ref()
                .map_or("any method".to_string(), |m| {
                    m.iter().map(Method::as_str).collect::<Vec<_>>().join(", ")
                });
            let needs = if route.permissions.is_empty() {
                String::new()
            } else {
                format!(", needs {}", route.permissions.join(", "))
            };
            line(
                "route",
                format!(
                    "{:?} [{methods}]: {}{needs}",
                    route.pattern,
                    route.access.as_str()
                ),
            );
        }
        None => line(
            "route",
            format!("none matched: default_access = {}", d.access.as_str()),
        ),
    }
    if d.access != Access::Authenticated {
        if let Some(tier) = d.route.and_then(|r| policy.route(r).rate_tier) {
            line(
                "tier",
                format!("per client address: {}", describe_tier(policy, tier)),
            );
        }
        return decision(&mut line, policy, d);
    }

    let credential = match (req.token, req.api_key, &d.principal) {
        (_, _, Some(p)) => format!("{} ({})", verdict(false), p.method.as_str()),
        (None, None, None) if !failed_at("credential") => "none".to_string(),
        _ => format!(
            "{}: {}",
            verdict(failed_at("credential")),
            denial.map_or(String::new(), |x| x.code().to_string())
        ),
    };
    line("credential", credential);
    let Some(p) = &d.principal else {
        return decision(&mut line, policy, d);
    };
    let who = match p.holder.clone() {
        Holder::Key {
            key: k,
            owner: Some(u),
        } => format!(
            "key {:?} owned by user {:?} <{}>",
            policy.api_key(k).id,
            policy.user(u).id,
            policy.user(u).email
        ),
        Holder::User(u) => format!("user {:?} <{}>", policy.user(u).id, policy.user(u).email),
        Holder::Key {
            key: k,
            owner: None,
        } if p.method == AuthMethod::Mtls => {
            format!("client certificate {:?}", policy.api_key(k).id)
        }
        Holder::Key {
            key: k,
            owner: None,
        } => format!("key {:?} (no owner)", policy.api_key(k).id),
        Holder::Stored { ref key, owner: u } => format!(
            "self-service key {:?} owned by user {:?} <{}>",
            key.id,
            policy.user(u).id,
            policy.user(u).email
        ),
    };
    line("principal", who);
    line("ip rule", verdict(failed_at("ip")).to_string());
    if failed_at("ip") {
        return decision(&mut line, policy, d);
    }
    let needs = d
        .route
        .map_or_else(Vec::new, |r| policy.route(r).permissions.to_vec());
    let held = p.permissions(policy);
    let holds: Vec<&str> = held.iter().collect();
    line(
        "permissions",
        format!(
            "{}: needs [{}], holds [{}]",
            verdict(failed_at("permissions")),
            needs.join(", "),
            holds.join(", ")
        ),
    );
    if !failed_at("permissions") {
        line("tier", describe_tier(policy, p.tier(policy)));
    }
    decision(&mut line, policy, d)
}

fn describe_tier(policy: &Policy, tier: crate::policy::TierIdx) -> String {
    let t = policy.tier(tier);
    match t.rate {
        Rate::Unlimited => format!("{} (unlimited)", t.name),
        Rate::Limited(q) => format!(
            "{}: {} per {}, burst {} (explain does not count; live usage is not shown)",
            t.name,
            q.limit,
            humantime::format_duration(q.period),
            q.burst
        ),
    }
}

fn decision(line: &mut impl FnMut(&str, String), policy: &Policy, d: &Decision) {
    match &d.verdict {
        Ok(()) => line(
            "decision",
            format!("ALLOW: forwarded to {}", policy.upstream.endpoint.url),
        ),
        Err(denial) => line(
            "decision",
            format!(
                "DENY {} {}: {}",
                denial.status(),
                denial.code(),
                denial.message()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::{policy_from, BILLING_WEBHOOK};

    fn ask(policy: &Policy, method: &str, path: &str) -> (String, bool) {
        let req = Request {
            method,
            path,
            ip: "192.0.2.1".parse().unwrap(),
            token: None,
            api_key: None,
            headers: &[],
            client_cert: None,
        };
        explain(policy, &req, 1_800_000_000_000_000).unwrap()
    }

    #[test]
    fn webhook_paths_are_explained_as_the_proxy_dispatches_them() {
        let policy = policy_from(BILLING_WEBHOOK);
        let (text, allowed) = ask(&policy, "POST", "/hooks/billing");
        assert!(allowed, "{text}");
        assert!(text.contains("webhook /hooks/billing"), "{text}");
        assert!(
            !text.contains("\ncredential "),
            "the gate does not run: {text}"
        );
    }

    #[test]
    fn auth_endpoints_refuse_other_methods_as_the_proxy_does() {
        let policy = policy_from("");
        let (text, allowed) = ask(&policy, "GET", "/api/v1/auth/token");
        assert!(!allowed, "{text}");
        assert!(text.contains("DENY 405 method_not_allowed"), "{text}");
        assert!(text.contains("Allow: POST"), "{text}");
        assert!(ask(&policy, "POST", "/api/v1/auth/token").1);
    }

    #[test]
    fn targets_the_proxy_refuses_are_refused() {
        let policy = policy_from("");
        for path in ["/admin;x", "/v1/%2e%2e%2fadmin", "/v1/a%5cb"] {
            let (text, allowed) = ask(&policy, "GET", path);
            assert!(!allowed && text.contains("DENY 400"), "{path}: {text}");
        }
    }

    #[test]
    fn a_client_certificate_is_ignored_where_the_handshake_never_asks_for_one() {
        let src = format!(
            "{}\n[[client_certs]]\nid = \"ops\"\nsubject = \"CN=ops\"\ntier = \"free\"\npermissions = [\"vms:read\"]\n",
            crate::policy::testing::base_toml()
        );
        let policy = crate::policy::testing::compile_str(&src).unwrap().policy;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ops.crt");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["ops.internal".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ops");
        std::fs::write(&file, params.self_signed(&key).unwrap().pem()).unwrap();
        let req = Request {
            method: "GET",
            path: "/v1/vms",
            ip: "192.0.2.1".parse().unwrap(),
            token: None,
            api_key: None,
            headers: &[],
            client_cert: Some(&file),
        };
        let (text, allowed) = explain(&policy, &req, 1_800_000_000_000_000).unwrap();
        assert!(!allowed, "{text}");
        assert!(text.contains("subject \"CN=ops\""), "{text}");
        assert!(text.contains("IGNORED"), "{text}");
        assert!(text.contains("DENY 401 missing_credentials"), "{text}");
    }
}
