//! Finding the credential in a request and turning an API key into the
//! policy's entry for it.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{header_text, Denial, HeaderSource};
use crate::policy::{KeyIdx, Policy};

/// Longer credentials are refused before any parsing or hashing.
pub const MAX_CREDENTIAL_LEN: usize = 8192;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential<'a> {
    Jwt(&'a str),
    ApiKey(&'a str),
}

/// The one credential a request carries. RFC 6750 §2 forbids sending more
/// than one, so an `Authorization: Bearer` together with the API-key header
/// is a malformed request rather than a guess about which one to believe.
pub fn extract<'a, H: HeaderSource + ?Sized>(
    headers: &'a H,
    api_key_header: &'a str,
) -> Result<Credential<'a>, Denial> {
    let bearer = bearer(headers)?;
    let mut api_keys = headers.values(api_key_header);
    let api_key = match (api_keys.next(), api_keys.next()) {
        (None, _) => None,
        (Some(_), Some(_)) => return Err(Denial::InvalidRequest("more than one API key header")),
        (Some(v), None) => Some(
            header_text(v)
                .ok_or(Denial::InvalidApiKey("not printable ASCII"))?
                .trim(),
        ),
    };
    match (bearer, api_key) {
        (Some(_), Some(_)) => Err(Denial::InvalidRequest(
            "send either an Authorization Bearer credential or an API key header, not both",
        )),
        (Some(token), None) => Ok(classify(token)),
        (None, Some("")) => Err(Denial::InvalidApiKey("empty")),
        (None, Some(key)) if key.len() > MAX_CREDENTIAL_LEN => {
            Err(Denial::InvalidApiKey("too long"))
        }
        (None, Some(key)) => Ok(Credential::ApiKey(key)),
        (None, None) => Err(Denial::MissingCredentials),
    }
}

/// The token of an `Authorization: Bearer` header (scheme in any case), or
/// `None` when there is no such header or it uses another scheme.
fn bearer<H: HeaderSource + ?Sized>(headers: &H) -> Result<Option<&str>, Denial> {
    let mut values = headers.values("authorization");
    let value = match (values.next(), values.next()) {
        (None, _) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(Denial::InvalidRequest("more than one Authorization header"))
        }
        (Some(v), None) => v,
    };
    let value = header_text(value)
        .ok_or(Denial::InvalidToken("not printable ASCII"))?
        .trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Ok(None);
    }
    let token = rest.trim();
    if token.is_empty() {
        return Err(Denial::InvalidToken("the Bearer token is empty"));
    }
    if token.len() > MAX_CREDENTIAL_LEN {
        return Err(Denial::InvalidToken("too long"));
    }
    Ok(Some(token))
}

/// A Bearer value with the three dot-separated parts of a JWS is a JWT;
/// anything else is an API key (generated keys never contain dots).
fn classify(token: &str) -> Credential<'_> {
    let dots: usize = token.bytes().map(|b| usize::from(b == b'.')).sum();
    if dots == 2 {
        Credential::Jwt(token)
    } else {
        Credential::ApiKey(token)
    }
}

/// What a verified client certificate (mTLS) shows, worked out once per
/// connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerCert {
    pub sha256: [u8; 32],
    /// Its subject as [`crate::policy::normalize_subject`] writes it.
    pub subject: String,
    /// Its subjectAltName DNS names (`dns:` and lower case) and URIs (`uri:`).
    pub sans: Vec<String>,
    /// Its notAfter, Unix seconds: checked on every request, since a
    /// connection (or a resumed session) may outlive the certificate.
    pub not_after: i64,
    /// The client CA set it was verified under (`TlsPolicy::client_trust`).
    /// Once the policy trusts another set, the certificate no longer
    /// counts, even on the connection that presented it.
    pub trust: [u8; 32],
}

impl PeerCert {
    /// Verified under CAs the policy no longer trusts exactly so.
    pub fn is_stale(&self, policy: &Policy) -> bool {
        policy
            .server
            .tls
            .as_ref()
            .is_some_and(|t| t.client_trust != self.trust)
    }
}

/// The binding of a client certificate: by fingerprint, subject, then
/// subjectAltName, if it may be used now.
pub fn find_client_cert(policy: &Policy, cert: &PeerCert, now: u64) -> Result<KeyIdx, Denial> {
    if cert.is_stale(policy) {
        return Err(Denial::InvalidClientCert(
            "the certificate authorities that verified it are no longer trusted",
        ));
    }
    let idx = policy
        .client_cert(&cert.sha256, &cert.subject, &cert.sans)
        .ok_or(Denial::InvalidClientCert("no principal is bound to it"))?;
    if i64::try_from(now).unwrap_or(i64::MAX) >= cert.not_after {
        return Err(Denial::InvalidClientCert("it has expired"));
    }
    usable(policy, idx, now).map_err(|why| {
        Denial::InvalidClientCert(match why {
            Unusable::Disabled => "its binding is disabled",
            Unusable::Expired => "its binding has expired",
            Unusable::OwnerDisabled => "its owner is disabled",
        })
    })
}

/// The API key whose SHA-256 the policy lists, if it may be used now.
pub fn find_api_key(policy: &Policy, key: &str, now: u64) -> Result<KeyIdx, Denial> {
    let idx = policy_key(policy, &key_hash(key)).ok_or(Denial::InvalidApiKey("unknown key"))?;
    usable_key(policy, idx, now)
}

/// SHA-256 of an API key: what the policy and the store index keys by.
pub fn key_hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The policy's key with this SHA-256 (compared in constant time).
pub fn policy_key(policy: &Policy, hash: &[u8; 32]) -> Option<KeyIdx> {
    let prefix = crate::policy::hash_prefix(hash);
    policy
        .api_key_by_hash_prefix(prefix)
        .filter(|(_, k)| bool::from(k.sha256.ct_eq(hash)))
        .map(|(idx, _)| idx)
}

/// The policy's key `idx`, if it may be used now.
pub fn usable_key(policy: &Policy, idx: KeyIdx, now: u64) -> Result<KeyIdx, Denial> {
    usable(policy, idx, now).map_err(|why| {
        Denial::InvalidApiKey(match why {
            Unusable::Disabled => "the key is disabled",
            Unusable::Expired => "the key has expired",
            Unusable::OwnerDisabled => "the key's owner is disabled",
        })
    })
}

/// Why an entry of `api_keys` (a key, or a client-certificate binding)
/// cannot be used.
enum Unusable {
    Disabled,
    Expired,
    OwnerDisabled,
}

/// The same rules for keys and certificate bindings: not disabled, not
/// expired, and an owner who is not disabled.
fn usable(policy: &Policy, idx: KeyIdx, now: u64) -> Result<KeyIdx, Unusable> {
    let entry = policy.api_key(idx);
    if entry.disabled {
        return Err(Unusable::Disabled);
    }
    if entry.expires_at.is_some_and(|t| now >= t) {
        return Err(Unusable::Expired);
    }
    if entry.owner.is_some_and(|o| policy.user(o).disabled) {
        return Err(Unusable::OwnerDisabled);
    }
    Ok(idx)
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderName};

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn x_api_key() -> &'static str {
        "x-api-key"
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            let h = headers(&[("authorization", &format!("{scheme} a.b.c"))]);
            assert_eq!(extract(&h, x_api_key()), Ok(Credential::Jwt("a.b.c")));
        }
    }

    #[test]
    fn bearer_without_dots_is_an_api_key() {
        let h = headers(&[("authorization", "Bearer vmc_abc")]);
        assert_eq!(extract(&h, x_api_key()), Ok(Credential::ApiKey("vmc_abc")));
    }

    #[test]
    fn api_key_header_is_read() {
        let h = headers(&[("x-api-key", "vmc_abc")]);
        assert_eq!(extract(&h, x_api_key()), Ok(Credential::ApiKey("vmc_abc")));
    }

    #[test]
    fn two_credentials_are_a_bad_request() {
        let h = headers(&[("authorization", "Bearer a.b.c"), ("x-api-key", "vmc_abc")]);
        assert_eq!(extract(&h, x_api_key()).unwrap_err().status(), 400);
    }

    #[test]
    fn other_schemes_count_as_no_credential() {
        let h = headers(&[("authorization", "Basic dXNlcjpwYXNz")]);
        assert_eq!(extract(&h, x_api_key()), Err(Denial::MissingCredentials));
        assert_eq!(
            extract(&HeaderMap::new(), x_api_key()),
            Err(Denial::MissingCredentials)
        );
    }

    #[test]
    fn empty_and_oversized_tokens_are_invalid() {
        let h = headers(&[("authorization", "Bearer ")]);
        assert_eq!(
            extract(&h, x_api_key()).unwrap_err().code(),
            "invalid_token"
        );
        let long = format!("Bearer {}", "a".repeat(20_000));
        let h = headers(&[("authorization", &long)]);
        assert_eq!(
            extract(&h, x_api_key()).unwrap_err().code(),
            "invalid_token"
        );
    }
}
