//! The decision pipeline, as plain Rust over plain data: no pingora types,
//! no I/O, one clock reading passed in. `keygate explain` and the benches
//! call [`decide`]; the proxy calls [`assess`] and puts the quota it needs
//! to its own limiter (local or Redis).
//!
//! Order: client IP → route (a case-ambiguous path refused) → global
//! allowlist → credential → principal → principal allowlist → permissions
//! → tier quota.

pub mod client_ip;
mod credential;
mod denial;
mod jwt;
pub mod path;

use std::net::IpAddr;

use http::{HeaderMap, HeaderValue, Method};

pub use credential::{
    extract as extract_credential, find_api_key, Credential, PeerCert, MAX_CREDENTIAL_LEN,
};
pub use denial::{error_body, Denial};
pub use jwt::verify as verify_jwt;

pub use crate::limit::QuotaNeed;
use crate::limit::{AccountId, Limiter, Outcome};
use crate::policy::{Access, KeyIdx, Permissions, Policy, Rate, RouteIdx, TierIdx, UserIdx};

/// What the gate needs to know about a request.
pub struct RequestFacts<'a, H: HeaderSource + ?Sized = HeaderMap> {
    /// The socket peer.
    pub peer: IpAddr,
    /// The client address when the caller resolved it already (the proxy's
    /// request record does, once); `None`: resolved here from `peer` and
    /// the trusted proxies' headers.
    pub client_ip: Option<IpAddr>,
    pub method: &'a Method,
    /// Already normalised (see [`path::normalize`]).
    pub path: &'a str,
    pub headers: &'a H,
    /// The connection's verified client certificate, if any (mTLS).
    pub client_cert: Option<&'a PeerCert>,
}

/// Request headers as the gate reads them: every value of one header, in
/// the order received. The proxy reads them straight out of its receive
/// buffer; tests, benches and `keygate explain` use an `http::HeaderMap`.
pub trait HeaderSource {
    /// The values of `name` (given in lower case), first received first.
    fn values<'s>(&'s self, name: &'s str) -> impl DoubleEndedIterator<Item = &'s [u8]> + 's;
}

impl HeaderSource for HeaderMap {
    fn values<'s>(&'s self, name: &'s str) -> impl DoubleEndedIterator<Item = &'s [u8]> + 's {
        self.get_all(name).into_iter().map(HeaderValue::as_bytes)
    }
}

/// A header value as text, under the rule `HeaderValue::to_str` applies:
/// visible ASCII and tabs only.
pub fn header_text(value: &[u8]) -> Option<&str> {
    // No early exit, so the check vectorises: tokens are hundreds of bytes.
    let printable = value.iter().fold(true, |ok, &b| {
        ok & ((b == b'\t') | ((32..127).contains(&b)))
    });
    if printable {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    Jwt,
    ApiKey,
    /// A client certificate verified in the TLS handshake.
    Mtls,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Jwt => "jwt",
            AuthMethod::ApiKey => "api_key",
            AuthMethod::Mtls => "mtls",
        }
    }

    pub fn header(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }
}

/// Who a request speaks for: indices into the policy it was decided under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal {
    pub method: AuthMethod,
    pub holder: Holder,
}

/// A user (a JWT), or an API key or client certificate binding, which may
/// have an owner: never neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    User(UserIdx),
    Key { key: KeyIdx, owner: Option<UserIdx> },
}

impl Principal {
    /// A JWT's user.
    pub fn user_token(user: UserIdx) -> Principal {
        Principal {
            method: AuthMethod::Jwt,
            holder: Holder::User(user),
        }
    }

    /// An API key or client certificate binding (`method` says which).
    pub fn key(method: AuthMethod, policy: &Policy, key: KeyIdx) -> Principal {
        Principal {
            method,
            holder: Holder::Key {
                key,
                owner: policy.api_key(key).owner,
            },
        }
    }

    /// The user it speaks for: the token's, or the key's owner.
    pub fn user(&self) -> Option<UserIdx> {
        match self.holder {
            Holder::User(u) => Some(u),
            Holder::Key { owner, .. } => owner,
        }
    }

    /// The API key (or certificate binding) it came with.
    pub fn key_idx(&self) -> Option<KeyIdx> {
        match self.holder {
            Holder::User(_) => None,
            Holder::Key { key, .. } => Some(key),
        }
    }

    /// The user's id, or for a key without an owner the key's id.
    pub fn subject<'p>(&self, policy: &'p Policy) -> &'p HeaderValue {
        match self.holder {
            Holder::User(u) | Holder::Key { owner: Some(u), .. } => &policy.user(u).id_header,
            Holder::Key { key, owner: None } => &policy.api_key(key).id_header,
        }
    }

    pub fn subject_str<'p>(&self, policy: &'p Policy) -> &'p str {
        match self.holder {
            Holder::User(u) | Holder::Key { owner: Some(u), .. } => &policy.user(u).id,
            Holder::Key { key, owner: None } => &policy.api_key(key).id,
        }
    }

    pub fn tier(&self, policy: &Policy) -> TierIdx {
        match self.holder {
            Holder::User(u) => policy.user(u).tier,
            Holder::Key { key, .. } => policy.api_key(key).tier,
        }
    }

    /// Current permissions: a key's (already capped by its owner's), else the user's.
    pub fn permissions<'p>(&self, policy: &'p Policy) -> &'p Permissions {
        match self.holder {
            Holder::User(u) => &policy.user(u).permissions,
            Holder::Key { key, .. } => &policy.api_key(key).permissions,
        }
    }

    /// The limiter account: the user's (shared by its keys) or the key's own.
    pub fn account(&self, policy: &Policy) -> AccountId {
        match self.holder {
            Holder::User(u) => policy.user(u).account,
            Holder::Key { key, .. } => policy.api_key(key).account,
        }
    }

    /// The key's allowlist and its owner's both apply.
    pub fn ip_permitted(&self, policy: &Policy, ip: IpAddr) -> bool {
        self.key_idx()
            .is_none_or(|k| policy.api_key(k).ip_allow.permits(ip))
            && self
                .user()
                .is_none_or(|u| policy.user(u).ip_allow.permits(ip))
    }
}

/// The gate's answer, with what it learned on the way (for headers, logs,
/// metrics and `keygate explain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub client_ip: IpAddr,
    pub route: Option<RouteIdx>,
    pub access: Access,
    pub principal: Option<Principal>,
    /// The limiter's answer, when a limited tier applied.
    pub rate: Option<RateInfo>,
    /// What the request still needs to pass: a unit of this quota. Set by
    /// [`assess`] when everything else passed; cleared by [`Decision::settle`].
    pub pending: Option<QuotaNeed>,
    pub verdict: Result<(), Denial>,
}

/// The tier that limited a request and what the limiter said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateInfo {
    pub tier: TierIdx,
    pub outcome: Outcome,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.verdict.is_ok() && self.pending.is_none()
    }

    /// The limiter could not be asked: refuse (503 `state_unavailable`).
    pub fn unavailable(&mut self) {
        self.pending = None;
        self.verdict = Err(Denial::StateUnavailable);
    }

    /// Apply the limiter's answer to the pending [`QuotaNeed`].
    pub fn settle(&mut self, outcome: Outcome) {
        if let Some(need) = self.pending.take() {
            self.rate = Some(RateInfo {
                tier: need.tier,
                outcome,
            });
            if !outcome.allowed {
                self.verdict = Err(Denial::RateLimited);
            }
        }
    }
}

/// Decide one request at `now_us` (µs since the Unix epoch), counting it
/// against its account's quota when it would otherwise pass.
pub fn decide<H: HeaderSource + ?Sized>(
    policy: &Policy,
    limiter: &Limiter,
    req: &RequestFacts<'_, H>,
    now_us: u64,
) -> Decision {
    let mut decision = assess(policy, req, now_us);
    if let Some(need) = decision.pending {
        decision.settle(limiter.check(need.account, &need.quota, now_us));
    }
    decision
}

/// Every step but the quota: pure, no I/O and no shared state. When a
/// limited tier applies and everything else passed, the decision carries a
/// [`QuotaNeed`] for the caller to put to its limiter.
pub fn assess<H: HeaderSource + ?Sized>(
    policy: &Policy,
    req: &RequestFacts<'_, H>,
    now_us: u64,
) -> Decision {
    let client_ip = req.client_ip.unwrap_or_else(|| {
        client_ip::resolve(req.peer, req.headers, &policy.server.trusted_proxies)
    });
    let route = policy.router.lookup(req.method, req.path);
    // Express and ASP.NET route without regard to letter case: `/ADMIN`
    // must not pass by missing a rule that `/admin` would meet.
    let ambiguous = req.path.bytes().any(|b| b.is_ascii_uppercase())
        && policy
            .router
            .lookup(req.method, &req.path.to_ascii_lowercase())
            .is_some_and(|lower| Some(lower) != route);
    let access = route.map_or(policy.auth.default_access, |r| policy.route(r).access);
    let mut decision = Decision {
        client_ip,
        route,
        access,
        principal: None,
        rate: None,
        pending: None,
        verdict: Ok(()),
    };
    decision.verdict = if ambiguous {
        Err(Denial::InvalidRequest(
            "the path's letter case changes which route it matches",
        ))
    } else {
        judge(policy, req, now_us, &mut decision)
    };
    decision
}

fn judge<H: HeaderSource + ?Sized>(
    policy: &Policy,
    req: &RequestFacts<'_, H>,
    now_us: u64,
    decision: &mut Decision,
) -> Result<(), Denial> {
    let now = now_us / 1_000_000;
    if !policy.server.ip_allow.permits(decision.client_ip) {
        return Err(Denial::IpNotAllowed);
    }
    match decision.access {
        Access::Deny => return Err(Denial::Forbidden),
        Access::Public => {
            let tier = decision.route.and_then(|r| policy.route(r).rate_tier);
            return match tier {
                Some(tier) => {
                    let account = ip_account(policy, tier, decision.client_ip);
                    needs_quota(policy, tier, account, decision);
                    Ok(())
                }
                None => Ok(()),
            };
        }
        Access::Authenticated => {}
    }
    // A credential in the request wins; a client certificate is the
    // credential of a request that carries none.
    let principal = match credential::extract(req.headers, policy.auth.api_key_header.as_str()) {
        Err(Denial::MissingCredentials) => {
            let cert = req.client_cert.ok_or(Denial::MissingCredentials)?;
            let idx = credential::find_client_cert(policy, cert, now)?;
            Principal::key(AuthMethod::Mtls, policy, idx)
        }
        Err(e) => return Err(e),
        Ok(Credential::Jwt(token)) => Principal::user_token(jwt::verify(policy, token, now)?),
        Ok(Credential::ApiKey(key)) => {
            let idx = credential::find_api_key(policy, key, now)?;
            Principal::key(AuthMethod::ApiKey, policy, idx)
        }
    };
    decision.principal = Some(principal);
    if !principal.ip_permitted(policy, decision.client_ip) {
        return Err(Denial::IpNotAllowed);
    }
    if let Some(route) = decision.route {
        let held = principal.permissions(policy);
        if let Some(missing) = policy
            .route(route)
            .permissions
            .iter()
            .find(|p| !held.contains(p))
        {
            return Err(Denial::InsufficientPermissions(missing.clone()));
        }
    }
    let tier = principal.tier(policy);
    needs_quota(policy, tier, principal.account(policy), decision);
    Ok(())
}

/// Step 5: the tier's quota, left to the limiter. Unlimited tiers never
/// touch it.
fn needs_quota(policy: &Policy, tier: TierIdx, account: AccountId, decision: &mut Decision) {
    if let Rate::Limited(quota) = policy.tier(tier).rate {
        decision.pending = Some(QuotaNeed {
            tier,
            account,
            quota,
        });
    }
}

/// A client address's account under a public route's tier: an IPv6
/// client's is its prefix (`server.ipv6_prefix`), or one host with a /64
/// would hold 2^64 fresh buckets.
fn ip_account(policy: &Policy, tier: TierIdx, ip: IpAddr) -> AccountId {
    let mut id = String::with_capacity(64);
    id.push_str(&policy.tier(tier).name);
    id.push('/');
    use std::fmt::Write;
    let bucket = crate::policy::address_bucket(ip, policy.server.ipv6_prefix);
    let _ = write!(id, "{bucket}");
    crate::limit::account_id("ip", &id)
}

#[cfg(test)]
mod tests;
