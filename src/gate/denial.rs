//! Every way the gate can refuse a request, and the one mapping from a
//! refusal to its status, code, message and `WWW-Authenticate` challenge.

use std::fmt;

/// Why a request was refused. The `&'static str` fields are short reasons
/// shown to the client in the message; none of them ever echoes a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    InvalidRequest(&'static str),
    MissingCredentials,
    InvalidToken(&'static str),
    TokenExpired,
    InvalidApiKey(&'static str),
    /// The connection's client certificate (mTLS) is the only credential
    /// and no usable principal is bound to it.
    InvalidClientCert(&'static str),
    IpNotAllowed,
    /// The route needs this permission and the principal does not hold it.
    InsufficientPermissions(Box<str>),
    /// The route is `access = "deny"` (or unmatched with `default_access = "deny"`).
    Forbidden,
    /// The account's tier quota is used up; the decision's `rate` says until when.
    RateLimited,
    /// The shared limiter (Redis) could not be asked in time, under
    /// `on_error_limits = "closed"`.
    StateUnavailable,
    /// A self-service key not looked up: the address presented too many
    /// unknown keys lately (429 `rate_limited`, not a 401 that would make
    /// a client throw a good key away).
    KeyLookupsThrottled,
}

impl Denial {
    /// Every code [`Denial::code`] can return (for metrics set up at 0).
    pub const CODES: [&'static str; 11] = [
        "invalid_request",
        "missing_credentials",
        "invalid_token",
        "token_expired",
        "invalid_api_key",
        "invalid_client_certificate",
        "ip_not_allowed",
        "insufficient_permissions",
        "forbidden",
        "rate_limited",
        "state_unavailable",
    ];

    pub fn status(&self) -> u16 {
        match self {
            Denial::InvalidRequest(_) => 400,
            Denial::MissingCredentials
            | Denial::InvalidToken(_)
            | Denial::TokenExpired
            | Denial::InvalidApiKey(_)
            | Denial::InvalidClientCert(_) => 401,
            Denial::IpNotAllowed | Denial::InsufficientPermissions(_) | Denial::Forbidden => 403,
            Denial::RateLimited | Denial::KeyLookupsThrottled => 429,
            Denial::StateUnavailable => 503,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Denial::InvalidRequest(_) => "invalid_request",
            Denial::MissingCredentials => "missing_credentials",
            Denial::InvalidToken(_) => "invalid_token",
            Denial::TokenExpired => "token_expired",
            Denial::InvalidApiKey(_) => "invalid_api_key",
            Denial::InvalidClientCert(_) => "invalid_client_certificate",
            Denial::IpNotAllowed => "ip_not_allowed",
            Denial::InsufficientPermissions(_) => "insufficient_permissions",
            Denial::Forbidden => "forbidden",
            Denial::RateLimited | Denial::KeyLookupsThrottled => "rate_limited",
            Denial::StateUnavailable => "state_unavailable",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Denial::InvalidRequest(why) => format!("the request is malformed: {why}"),
            Denial::MissingCredentials => {
                "this endpoint needs a Bearer token or an API key".to_string()
            }
            Denial::InvalidToken(why) => format!("the access token is invalid: {why}"),
            Denial::TokenExpired => "the access token has expired".to_string(),
            Denial::InvalidApiKey(why) => format!("the API key is invalid: {why}"),
            Denial::InvalidClientCert(why) => {
                format!("the client certificate is not a credential here: {why}")
            }
            Denial::IpNotAllowed => "requests from this address are not allowed".to_string(),
            Denial::InsufficientPermissions(p) => {
                format!("this request needs the permission {p:?}")
            }
            Denial::Forbidden => "access to this path is forbidden".to_string(),
            Denial::RateLimited => {
                "the rate limit of this account's tier is exceeded; see Retry-After".to_string()
            }
            Denial::StateUnavailable => {
                "the rate limit cannot be checked right now; try again".to_string()
            }
            Denial::KeyLookupsThrottled => {
                "too many unknown API keys from this address; see Retry-After".to_string()
            }
        }
    }

    /// The RFC 6750 challenge, for 401s and for permission 403s. A request
    /// that carried no credential gets no `error` attribute (RFC 6750 §3.1).
    pub fn challenge(&self) -> Option<String> {
        let realm = r#"Bearer realm="keygate""#;
        match self {
            Denial::MissingCredentials | Denial::InvalidClientCert(_) => Some(realm.to_string()),
            Denial::InvalidToken(_) | Denial::TokenExpired | Denial::InvalidApiKey(_) => {
                Some(format!(
                    r#"{realm}, error="invalid_token", error_description="{}""#,
                    self.message().replace('"', "'")
                ))
            }
            Denial::InsufficientPermissions(p) => Some(format!(
                r#"{realm}, error="insufficient_scope", scope="{}""#,
                p.replace('"', "'")
            )),
            _ => None,
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status(), self.code(), self.message())
    }
}

/// The JSON error body every refusal carries, fields in the documented order:
/// `{"error": {"status", "code", "message"}, "request_id"}`.
pub fn error_body(status: u16, code: &str, message: &str, request_id: &str) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Inner<'a> {
        status: u16,
        code: &'a str,
        message: &'a str,
    }
    #[derive(serde::Serialize)]
    struct Body<'a> {
        error: Inner<'a>,
        request_id: &'a str,
    }
    serde_json::to_vec(&Body {
        error: Inner {
            status,
            code,
            message,
        },
        request_id,
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_credentials_challenge_has_no_error_attribute() {
        assert_eq!(
            Denial::MissingCredentials.challenge().unwrap(),
            r#"Bearer realm="keygate""#
        );
    }

    #[test]
    fn permission_denial_names_the_missing_scope() {
        let d = Denial::InsufficientPermissions("vms:write".into());
        assert_eq!(d.status(), 403);
        assert_eq!(
            d.challenge().unwrap(),
            r#"Bearer realm="keygate", error="insufficient_scope", scope="vms:write""#
        );
    }

    #[test]
    fn body_has_the_documented_shape() {
        let body = error_body(401, "token_expired", "the access token has expired", "r1");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["status"], 401);
        assert_eq!(v["error"]["code"], "token_expired");
        assert_eq!(v["request_id"], "r1");
    }
}
