//! Every way keygate refuses a request on the public listener instead of
//! forwarding it, and the one place that maps each to status, code, message
//! and extra headers, all in the documented JSON shape. (The webhook relay,
//! the TLS redirect listener and the admin listener answer on their own.)

use std::borrow::Cow;

use crate::gate::Denial;
use crate::http1::client::Failure;
use crate::http1::parse::WireError;
use crate::http1::upstream::ConnectError;
use crate::http1::Fields;
use crate::issue::IssueError;

pub enum Refusal {
    /// The request's head could not be read (400, 408, 431, 501).
    Wire(WireError),
    /// The request body's framing broke after its head was accepted.
    Body(&'static str),
    Gate(Denial),
    Issue(IssueError),
    /// A `[[webhooks]]` signature did not verify.
    Signature {
        refusal: crate::webhook::Refusal,
        header: http::HeaderName,
    },
    /// `_` in a header name, under `underscore_headers = "refuse"`.
    Underscore,
    /// A method the endpoint does not serve; the value is its `Allow` header.
    MethodNotAllowed(&'static str),
    Upstream(Failure),
    /// The self-service key API refused.
    Keys(crate::keys::manage::KeyError),
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Wire(e) => e.status(),
            Refusal::Body(_) | Refusal::Underscore => 400,
            Refusal::MethodNotAllowed(_) => 405,
            Refusal::Gate(d) => d.status(),
            Refusal::Issue(e) => e.status(),
            Refusal::Keys(e) => e.status(),
            Refusal::Signature { .. } => 401,
            Refusal::Upstream(Failure::Timeout | Failure::Connect(ConnectError::Timeout)) => 504,
            Refusal::Upstream(_) => 502,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Wire(_) | Refusal::Body(_) | Refusal::Underscore => "invalid_request",
            Refusal::MethodNotAllowed(_) => "method_not_allowed",
            Refusal::Gate(d) => d.code(),
            Refusal::Issue(e) => e.code(),
            Refusal::Keys(e) => e.code(),
            Refusal::Signature { .. } => "invalid_signature",
            Refusal::Upstream(Failure::Timeout | Failure::Connect(ConnectError::Timeout)) => {
                "upstream_timeout"
            }
            Refusal::Upstream(_) => "upstream_unavailable",
        }
    }

    pub fn message(&self) -> Cow<'static, str> {
        match self {
            Refusal::Wire(e) => e.message().into(),
            Refusal::Body(why) => (*why).into(),
            Refusal::Underscore => "header names must not contain underscores".into(),
            Refusal::MethodNotAllowed(allow) => format!("this endpoint answers {allow}").into(),
            Refusal::Gate(d) => d.message().into(),
            Refusal::Issue(e) => e.message().into(),
            Refusal::Keys(e) => e.message().into(),
            Refusal::Signature { refusal, .. } => refusal.message().into(),
            Refusal::Upstream(Failure::Timeout | Failure::Connect(ConnectError::Timeout)) => {
                "the upstream did not answer in time".into()
            }
            Refusal::Upstream(Failure::Connect(_)) => "the upstream could not be reached".into(),
            Refusal::Upstream(_) => "the upstream failed to answer".into(),
        }
    }

    /// The label of `keygate_auth_denials_total`, for refusals of the client.
    pub fn denial_label(&self) -> Option<&'static str> {
        match self {
            Refusal::Upstream(_) | Refusal::Issue(_) | Refusal::Keys(_) => None,
            _ => Some(self.code()),
        }
    }

    /// The label of `keygate_upstream_errors_total`.
    pub fn upstream_label(&self) -> Option<&'static str> {
        match self {
            Refusal::Upstream(Failure::Timeout | Failure::Connect(ConnectError::Timeout)) => {
                Some("timeout")
            }
            Refusal::Upstream(Failure::Connect(_)) => Some("connect"),
            Refusal::Upstream(_) => Some("other"),
            _ => None,
        }
    }

    /// Headers beyond the ones every JSON answer carries: challenges and
    /// `Retry-After`.
    pub fn headers(&self, out: &mut dyn Fields) {
        match self {
            Refusal::Gate(d) => {
                if let Some(c) = d.challenge() {
                    out.field(b"www-authenticate", c.as_bytes());
                }
                // Every 503 says when to come back.
                if *d == Denial::StateUnavailable {
                    out.field_u64(b"retry-after", 1);
                }
                if *d == Denial::KeyLookupsThrottled {
                    out.field_u64(b"retry-after", 60);
                }
            }
            Refusal::Issue(e) => {
                if let Some(c) = e.challenge() {
                    out.field(b"www-authenticate", c.as_bytes());
                }
                if let Some(secs) = e.retry_after() {
                    out.field_u64(b"retry-after", secs);
                }
            }
            Refusal::Keys(e) => {
                if let Some(secs) = e.retry_after() {
                    out.field_u64(b"retry-after", secs);
                }
            }
            Refusal::MethodNotAllowed(allow) => out.field(b"allow", allow.as_bytes()),
            Refusal::Signature { header: name, .. } => {
                let challenge = format!(r#"HMAC-SHA256 realm="keygate", header="{name}""#);
                out.field(b"www-authenticate", challenge.as_bytes());
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_has_its_documented_status_and_code() {
        let cases = [
            (Refusal::Wire(WireError::TooLarge), 431, "invalid_request"),
            (
                Refusal::Wire(WireError::UnsupportedCoding),
                501,
                "invalid_request",
            ),
            (Refusal::Body("x"), 400, "invalid_request"),
            (Refusal::Underscore, 400, "invalid_request"),
            (Refusal::MethodNotAllowed("POST"), 405, "method_not_allowed"),
            (Refusal::Gate(Denial::Forbidden), 403, "forbidden"),
            (Refusal::Upstream(Failure::Timeout), 504, "upstream_timeout"),
            (
                Refusal::Upstream(Failure::Broken),
                502,
                "upstream_unavailable",
            ),
        ];
        for (r, status, code) in cases {
            assert_eq!((r.status(), r.code()), (status, code));
        }
    }
}
