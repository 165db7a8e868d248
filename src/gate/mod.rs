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
pub mod stored;

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method};

pub use credential::{
    extract as extract_credential, find_api_key, key_hash, Credential, PeerCert, MAX_CREDENTIAL_LEN,
};
pub use denial::{error_body, Denial};
pub use jwt::verify as verify_jwt;
pub use stored::{Lookup, StoredKey, StoredKeys};

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
    /// Self-service keys and account allowlists, where the caller has them
    /// (the proxy does; `explain` and the benches may not).
    pub stored: Option<&'a dyn StoredKeys>,
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

/// Who a request speaks for: indices into the policy it was decided under
/// (and a self-service key as the store had it).
#[derive(Debug, Clone)]
pub struct Principal {
    pub method: AuthMethod,
    pub holder: Holder,
}

/// A user (a JWT), or an API key or client certificate binding, which may
/// have an owner, or a self-service key, which always has one: never none.
#[derive(Debug, Clone)]
pub enum Holder {
    User(UserIdx),
    Key { key: KeyIdx, owner: Option<UserIdx> },
    Stored { key: Arc<StoredKey>, owner: UserIdx },
}

impl PartialEq for Principal {
    fn eq(&self, other: &Principal) -> bool {
        self.method == other.method
            && match (&self.holder, &other.holder) {
                (Holder::User(a), Holder::User(b)) => a == b,
                (Holder::Key { key: a, owner: x }, Holder::Key { key: b, owner: y }) => {
                    a == b && x == y
                }
                (Holder::Stored { key: a, owner: x }, Holder::Stored { key: b, owner: y }) => {
                    a.id == b.id && x == y
                }
                _ => false,
            }
    }
}

impl Eq for Principal {}

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
            Holder::User(u) | Holder::Stored { owner: u, .. } => Some(u),
            Holder::Key { owner, .. } => owner,
        }
    }

    /// The id of the API key (or certificate binding) it came with.
    pub fn key_id<'s>(&'s self, policy: &'s Policy) -> Option<&'s str> {
        match &self.holder {
            Holder::User(_) => None,
            Holder::Key { key, .. } => Some(&policy.api_key(*key).id),
            Holder::Stored { key, .. } => Some(&key.id),
        }
    }

    /// [`Principal::key_id`] as the `X-Auth-Key-Id` value.
    pub fn key_id_header<'s>(&'s self, policy: &'s Policy) -> Option<&'s HeaderValue> {
        match &self.holder {
            Holder::User(_) => None,
            Holder::Key { key, .. } => Some(&policy.api_key(*key).id_header),
            Holder::Stored { key, .. } => Some(&key.id_header),
        }
    }

    /// The user's id, or for a key without an owner the key's id.
    pub fn subject<'p>(&self, policy: &'p Policy) -> &'p HeaderValue {
        match self.holder {
            Holder::User(u)
            | Holder::Key { owner: Some(u), .. }
            | Holder::Stored { owner: u, .. } => &policy.user(u).id_header,
            Holder::Key { key, owner: None } => &policy.api_key(key).id_header,
        }
    }

    pub fn subject_str<'p>(&self, policy: &'p Policy) -> &'p str {
        match self.holder {
            Holder::User(u)
            | Holder::Key { owner: Some(u), .. }
            | Holder::Stored { owner: u, .. } => &policy.user(u).id,
            Holder::Key { key, owner: None } => &policy.api_key(key).id,
        }
    }

    pub fn tier(&self, policy: &Policy) -> TierIdx {
        match self.holder {
            Holder::User(u) | Holder::Stored { owner: u, .. } => policy.user(u).tier,
            Holder::Key { key, .. } => policy.api_key(key).tier,
        }
    }

    /// Current permissions: a key's (capped by its owner's current ones),
    /// else the user's.
    pub fn permissions<'s>(&'s self, policy: &'s Policy) -> Cow<'s, Permissions> {
        match &self.holder {
            Holder::User(u) => Cow::Borrowed(&policy.user(*u).permissions),
            Holder::Key { key, .. } => Cow::Borrowed(&policy.api_key(*key).permissions),
            Holder::Stored { key, owner } => {
                Cow::Owned(key.permissions.intersect(&policy.user(*owner).permissions))
            }
        }
    }

    /// Whether it holds `permission` now.
    pub fn holds(&self, policy: &Policy, permission: &str) -> bool {
        match &self.holder {
            Holder::User(u) => policy.user(*u).permissions.contains(permission),
            Holder::Key { key, .. } => policy.api_key(*key).permissions.contains(permission),
            Holder::Stored { key, owner } => {
                key.permissions.contains(permission)
                    && policy.user(*owner).permissions.contains(permission)
            }
        }
    }

    /// The limiter account: the user's (shared by its keys) or the key's own.
    pub fn account(&self, policy: &Policy) -> AccountId {
        match self.holder {
            Holder::User(u) | Holder::Stored { owner: u, .. } => policy.user(u).account,
            Holder::Key { key, .. } => policy.api_key(key).account,
        }
    }

    /// The key's allowlist and its owner's both apply.
    pub fn ip_permitted(&self, policy: &Policy, ip: IpAddr) -> bool {
        let key = match &self.holder {
            Holder::User(_) => true,
            Holder::Key { key, .. } => policy.api_key(*key).ip_allow.permits(ip),
            Holder::Stored { key, .. } => key.ip_allow.permits(ip),
        };
        key && self
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
    /// A self-service key's hash the store must be asked about (the cache
    /// did not know it); the caller asks, then decides again.
    pub lookup: Option<[u8; 32]>,
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
    // (`decide` has no store to ask: a key it would look up stays refused.)
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
        lookup: None,
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
    identify(policy, req, now_us, decision)?;
    let Some(principal) = &decision.principal else {
        return Err(Denial::MissingCredentials);
    };
    let missing = decision.route.and_then(|route| {
        policy
            .route(route)
            .permissions
            .iter()
            .find(|p| !principal.holds(policy, p))
            .cloned()
    });
    if let Some(missing) = missing {
        return Err(Denial::InsufficientPermissions(missing));
    }
    let (tier, account) = (principal.tier(policy), principal.account(policy));
    needs_quota(policy, tier, account, decision);
    Ok(())
}

/// Who a request that reaches keygate's own endpoints speaks for (the
/// self-service key API): client IP, the global allowlist, the credential
/// and the principal's allowlists; no route, permission or quota.
pub fn authenticate<H: HeaderSource + ?Sized>(
    policy: &Policy,
    req: &RequestFacts<'_, H>,
    now_us: u64,
) -> Decision {
    let client_ip = req.client_ip.unwrap_or_else(|| {
        client_ip::resolve(req.peer, req.headers, &policy.server.trusted_proxies)
    });
    let mut decision = Decision {
        client_ip,
        route: None,
        access: Access::Authenticated,
        principal: None,
        rate: None,
        pending: None,
        lookup: None,
        verdict: Ok(()),
    };
    decision.verdict = if policy.server.ip_allow.permits(client_ip) {
        identify(policy, req, now_us, &mut decision)
    } else {
        Err(Denial::IpNotAllowed)
    };
    decision
}

/// Steps 3 and 4 up to the permissions: the credential, its principal
/// (set in the decision once known) and the principal's allowlists.
fn identify<H: HeaderSource + ?Sized>(
    policy: &Policy,
    req: &RequestFacts<'_, H>,
    now_us: u64,
    decision: &mut Decision,
) -> Result<(), Denial> {
    let now = now_us / 1_000_000;
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
        Ok(Credential::ApiKey(key)) => api_key(policy, req, key, now_us, decision)?,
    };
    let ip = decision.client_ip;
    let permitted = principal.ip_permitted(policy, ip)
        && match (principal.user(), req.stored) {
            (Some(u), Some(stored)) => stored.account_permits(&policy.user(u).id, ip),
            _ => true,
        };
    decision.principal = Some(principal);
    if !permitted {
        return Err(Denial::IpNotAllowed);
    }
    Ok(())
}

/// An API key: one of the policy's, else (when self-service keys are on) a
/// well-formed key the store knows. A key of the wrong shape or checksum is
/// refused without a lookup.
fn api_key<H: HeaderSource + ?Sized>(
    policy: &Policy,
    req: &RequestFacts<'_, H>,
    key: &str,
    now_us: u64,
    decision: &mut Decision,
) -> Result<Principal, Denial> {
    let now = now_us / 1_000_000;
    let hash = credential::key_hash(key);
    if let Some(idx) = credential::policy_key(policy, &hash) {
        return credential::usable_key(policy, idx, now)
            .map(|idx| Principal::key(AuthMethod::ApiKey, policy, idx));
    }
    let unknown = Denial::InvalidApiKey("unknown key");
    let (Some(ss), Some(stored)) = (&policy.auth.self_service, req.stored) else {
        return Err(unknown);
    };
    if !stored::well_formed(&ss.key_prefix, key) {
        return Err(unknown);
    }
    let found = match stored.lookup(&hash, now_us) {
        Lookup::Found(found) => found,
        Lookup::Unknown => return Err(unknown),
        Lookup::Miss => {
            decision.lookup = Some(hash);
            return Err(Denial::StateUnavailable);
        }
        Lookup::Unavailable => return Err(Denial::StateUnavailable),
        Lookup::Refused => return Err(Denial::KeyLookupsThrottled),
    };
    if found.expires_at.is_some_and(|t| now >= t) {
        return Err(Denial::InvalidApiKey("the key has expired"));
    }
    let (owner, user) = policy
        .user_by_id(&found.owner)
        .ok_or(Denial::InvalidApiKey("the key's owner no longer exists"))?;
    if user.disabled {
        return Err(Denial::InvalidApiKey("the key's owner is disabled"));
    }
    Ok(Principal {
        method: AuthMethod::ApiKey,
        holder: Holder::Stored { key: found, owner },
    })
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
