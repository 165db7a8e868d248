//! Which part of keygate answers a request: an auth endpoint, a signed
//! webhook path, or the gate. One pure function, used by the proxy and by
//! `keygate explain`, so the two can never disagree.

use http::Method;

use crate::policy::{Policy, Webhook};

/// The endpoints keygate serves itself instead of forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Token,
    Refresh,
    Revoke,
    Jwks,
    /// `[auth.self_service] path` and what is under it.
    Keys,
    /// `[auth.self_service] account_path`.
    AccountAllow,
}

impl Endpoint {
    /// Its label in metrics and the access log.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Token => "auth:token",
            Endpoint::Refresh => "auth:refresh",
            Endpoint::Revoke => "auth:revoke",
            Endpoint::Jwks => "auth:jwks",
            Endpoint::Keys => "keys",
            Endpoint::AccountAllow => "keys:ip_allow",
        }
    }

    /// The methods it answers (the key API's depend on the path under it).
    pub fn allows(self, method: &Method) -> bool {
        match self {
            Endpoint::Jwks => *method == Method::GET || *method == Method::HEAD,
            Endpoint::Keys => true,
            Endpoint::AccountAllow => *method == Method::GET || *method == Method::PUT,
            _ => *method == Method::POST,
        }
    }

    /// Those methods, as a 405's `Allow` header.
    pub fn allow_header(self) -> &'static str {
        match self {
            Endpoint::Jwks => "GET, HEAD",
            Endpoint::Keys => "GET, POST, PATCH, DELETE",
            Endpoint::AccountAllow => "GET, PUT",
            _ => "POST",
        }
    }
}

/// Where a request with this (normalised) path goes.
#[derive(Debug, Clone, Copy)]
pub enum Dispatch<'p> {
    Endpoint(Endpoint),
    /// A `[[webhooks]]` path: the body's signature is the credential.
    Webhook(&'p Webhook),
    /// Everything else runs the gate pipeline.
    Gate,
}

pub fn dispatch<'p>(policy: &'p Policy, path: &str) -> Dispatch<'p> {
    let auth = &policy.auth;
    let endpoint = match path {
        p if p == auth.token_path => Some(Endpoint::Token),
        p if p == auth.refresh_path => Some(Endpoint::Refresh),
        p if p == auth.revoke_path => Some(Endpoint::Revoke),
        "/.well-known/jwks.json" => Some(Endpoint::Jwks),
        _ => None,
    };
    if let Some(e) = endpoint {
        return Dispatch::Endpoint(e);
    }
    if let Some(ss) = &auth.self_service {
        if path == &*ss.account_path {
            return Dispatch::Endpoint(Endpoint::AccountAllow);
        }
        let under = path
            .strip_prefix(&*ss.path)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
        if under {
            return Dispatch::Endpoint(Endpoint::Keys);
        }
    }
    match policy.webhook(path) {
        Some(hook) => Dispatch::Webhook(hook),
        None => Dispatch::Gate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::{policy_from, BILLING_WEBHOOK};

    #[test]
    fn endpoints_then_webhooks_then_the_gate() {
        let policy = policy_from(BILLING_WEBHOOK);
        assert!(matches!(
            dispatch(&policy, "/api/v1/auth/token"),
            Dispatch::Endpoint(Endpoint::Token)
        ));
        assert!(matches!(
            dispatch(&policy, "/.well-known/jwks.json"),
            Dispatch::Endpoint(Endpoint::Jwks)
        ));
        assert!(matches!(
            dispatch(&policy, "/hooks/billing"),
            Dispatch::Webhook(_)
        ));
        assert!(matches!(
            dispatch(&policy, "/hooks/billing/x"),
            Dispatch::Gate
        ));
        assert!(Endpoint::Token.allows(&Method::POST));
        assert!(!Endpoint::Token.allows(&Method::GET));
        assert!(Endpoint::Jwks.allows(&Method::HEAD));
    }
}
