//! The key API of `[auth.self_service]` and of the admin listener, as plain
//! operations over the store: create, list, get, narrow-only update,
//! revoke, roll with a grace period, and the account allowlist with its
//! lock-out guard. The caller has been authenticated already ([`Actor`]);
//! each operation runs on the blocking pool and answers JSON. Every change
//! writes one audit line and never a key.

use std::net::IpAddr;
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{parse_net, SelfKeys};
use crate::gate::stored::{checksum, encode_body};
use crate::limit::{Quota, QuotaNeed};
use crate::metrics::METRICS;
use crate::policy::{Permissions, Policy, SelfService, UserIdx};
use crate::state::keys::{Created, KeyRecord, Rolled};
use crate::state::StateError;

/// Creates and rolls one user may make per hour (with the whole hour as
/// burst), like login attempts: spent before the work, on this sidecar's
/// limiter or the fleet's.
pub const CHANGES_PER_HOUR: u32 = 60;
/// Longest key name.
pub const MAX_NAME: usize = 100;
/// The permission a key needs to manage its owner's keys.
pub const MANAGE: &str = "keys:manage";
/// Most entries in an `ip_allow` list.
pub const MAX_NETS: usize = 100;

/// Who is asking, already authenticated.
#[derive(Debug, Clone)]
pub struct Actor {
    /// The user whose keys are managed.
    pub owner: UserIdx,
    /// For the audit line: `user:ID`, `key:ID` or `admin`.
    pub label: String,
    /// What it may grant a key: the owner's current permissions, capped by
    /// the calling key's own when a key calls.
    pub ceiling: Permissions,
    /// The caller's address; `None` for the operator (no lock-out guard).
    pub client_ip: Option<IpAddr>,
    /// The operator (admin listener or CLI): may name the user in a create.
    pub operator: bool,
}

/// Spend one unit of a create-or-roll throttle; refused with the seconds
/// to wait, or unavailable when the fleet's store cannot be asked.
pub fn spend(
    throttles: &dyn crate::state::families::Throttles,
    need: &QuotaNeed,
    now_us: u64,
) -> Result<(), KeyError> {
    match throttles.hit(need.account, &need.quota, now_us) {
        Ok(o) if o.allowed => Ok(()),
        Ok(o) => Err(KeyError::Throttled(o.retry_after_secs.max(1))),
        Err(_) => Err(KeyError::Unavailable),
    }
}

/// One request of the key API.
pub enum Op<'a> {
    Create(&'a [u8]),
    List,
    Get(&'a str),
    Update(&'a str, &'a [u8]),
    Revoke(&'a str),
    Roll(&'a str, &'a [u8]),
    GetAllow,
    PutAllow(&'a [u8]),
}

impl Op<'_> {
    /// Its label in the access log.
    pub fn label(&self) -> &'static str {
        match self {
            Op::Create(_) => "keys:create",
            Op::List => "keys:list",
            Op::Get(_) => "keys:get",
            Op::Update(..) => "keys:update",
            Op::Revoke(_) => "keys:revoke",
            Op::Roll(..) => "keys:roll",
            Op::GetAllow => "keys:ip_allow",
            Op::PutAllow(_) => "keys:ip_allow",
        }
    }
}

/// A successful answer: status, JSON body, and whether it shows a key
/// (`Cache-Control: no-store` always; this says a key is in it).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    /// The subject the access log records (the owner's id).
    pub subject: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    InvalidRequest(String),
    NotFound,
    TooMany(u32),
    Revoked,
    WouldLockOut,
    Insufficient(String),
    Throttled(u64),
    Unavailable,
}

impl KeyError {
    pub fn status(&self) -> u16 {
        match self {
            KeyError::InvalidRequest(_) => 400,
            KeyError::Insufficient(_) => 403,
            KeyError::NotFound => 404,
            KeyError::TooMany(_) | KeyError::Revoked | KeyError::WouldLockOut => 409,
            KeyError::Throttled(_) => 429,
            KeyError::Unavailable => 503,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            KeyError::InvalidRequest(_) => "invalid_request",
            KeyError::Insufficient(_) => "insufficient_permissions",
            KeyError::NotFound => "key_not_found",
            KeyError::TooMany(_) => "too_many_keys",
            KeyError::Revoked => "key_revoked",
            KeyError::WouldLockOut => "would_lock_out",
            KeyError::Throttled(_) => "rate_limited",
            KeyError::Unavailable => "state_unavailable",
        }
    }

    pub fn message(&self) -> String {
        match self {
            KeyError::InvalidRequest(why) => format!("the request is malformed: {why}"),
            KeyError::Insufficient(p) => {
                format!("the key may not hold {p:?}: it is beyond what the caller holds")
            }
            KeyError::NotFound => "no such key".to_string(),
            KeyError::TooMany(n) => format!("this account holds {n} keys, the most it may"),
            KeyError::Revoked => "the key is revoked or expired".to_string(),
            KeyError::WouldLockOut => {
                "this allowlist would exclude the address this request comes from".to_string()
            }
            KeyError::Throttled(_) => {
                "too many keys made or rolled lately; see Retry-After".to_string()
            }
            KeyError::Unavailable => "the key store cannot be reached; try again".to_string(),
        }
    }

    /// Seconds for `Retry-After`.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            KeyError::Throttled(s) => Some(*s),
            KeyError::Unavailable => Some(1),
            _ => None,
        }
    }
}

impl From<StateError> for KeyError {
    fn from(e: StateError) -> KeyError {
        tracing::warn!(error = %e, "self-service key store");
        KeyError::Unavailable
    }
}

fn bad(why: impl Into<String>) -> KeyError {
    KeyError::InvalidRequest(why.into())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
    permissions: Option<Vec<String>>,
    ip_allow: Option<Vec<String>>,
    expires_in: Option<String>,
    expires_at: Option<String>,
    /// The admin listener names the user here; the public API never.
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    name: Option<String>,
    permissions: Option<Vec<String>>,
    ip_allow: Option<Vec<String>>,
    expires_at: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RollBody {
    grace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowBody {
    ip_allow: Vec<String>,
}

/// A key as lists show it (never the key itself).
#[derive(Serialize)]
struct KeyView<'a> {
    id: &'a str,
    name: &'a str,
    start: &'a str,
    permissions: &'a [String],
    ip_allow: &'a [String],
    created_at: String,
    expires_at: Option<String>,
    last_used_at: Option<String>,
}

impl<'a> KeyView<'a> {
    fn of(r: &'a KeyRecord) -> KeyView<'a> {
        KeyView {
            id: &r.id,
            name: &r.name,
            start: &r.start,
            permissions: &r.permissions,
            ip_allow: &r.ip_allow,
            created_at: rfc3339(r.created_at),
            expires_at: r.expires_at.map(rfc3339),
            last_used_at: r.last_used_at.map(rfc3339),
        }
    }
}

/// The answer to a create or roll: the only time the key is shown.
#[derive(Serialize)]
struct NewKey<'a> {
    id: &'a str,
    key: &'a str,
    start: &'a str,
    name: &'a str,
    permissions: &'a [String],
    ip_allow: &'a [String],
    created_at: String,
    expires_at: Option<String>,
}

pub fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, KeyError> {
    serde_json::from_slice(body).map_err(|e| bad(format!("{e}")))
}

/// A new key for `prefix`: the key, its SHA-256 and its visible start.
pub fn new_key(prefix: &str) -> (String, [u8; 32], String) {
    let body = encode_body(&rand::random());
    let key = format!("{prefix}{body}{}", checksum(prefix, &body));
    let hash = crate::gate::key_hash(&key);
    let start = format!("{prefix}{}", &body[..6]);
    (key, hash, start)
}

fn new_id() -> String {
    let [a, b]: [u64; 2] = rand::random();
    format!(
        "key_{}{}",
        crate::gate::stored::base62(a, 11),
        crate::gate::stored::base62(b, 11)
    )
}

/// The audit line of one change: who, which key, what, from where.
fn audit(actor: &Actor, key_id: &str, action: &'static str) {
    METRICS.key_changes.with_label_values(&[action]).inc();
    tracing::info!(
        target: "keygate::audit",
        actor = %actor.label,
        key_id,
        action,
        client_ip = actor.client_ip.map(|ip| ip.to_string()).unwrap_or_else(|| "-".into()),
        "self-service key change"
    );
}

impl SelfKeys {
    /// Run `op` for `actor` under `policy` at `now` (Unix seconds). Blocking:
    /// call it on the blocking pool. `throttle` spends a create or roll.
    pub fn run(
        &self,
        policy: &Policy,
        settings: &SelfService,
        actor: &Actor,
        op: Op<'_>,
        now: u64,
        throttle: &dyn Fn(&QuotaNeed) -> Result<(), KeyError>,
    ) -> Result<Reply, KeyError> {
        let owner = policy.user(actor.owner);
        let user = owner.id.to_string();
        let reply = |status, body| Reply {
            status,
            body,
            subject: user.clone(),
        };
        let per_hour =
            std::num::NonZeroU32::new(CHANGES_PER_HOUR).unwrap_or(std::num::NonZeroU32::MIN);
        let changes = QuotaNeed {
            tier: 0,
            account: crate::limit::account_id("selfkey-changes", &owner.id),
            quota: Quota::new(per_hour, Duration::from_secs(3600), per_hour),
        };
        match op {
            Op::Create(body) => {
                let b: CreateBody = parse(body)?;
                if b.user.is_some() && !actor.operator {
                    return Err(bad("unknown field `user`"));
                }
                let name = check_name(&b.name)?;
                let permissions = granted(actor, b.permissions)?;
                let ip_allow = nets(b.ip_allow.unwrap_or_default())?;
                let expires_at = expiry(b.expires_in.as_deref(), b.expires_at.as_deref(), now)?;
                throttle(&changes)?;
                let (key, sha256, start) = new_key(&settings.key_prefix);
                let record = KeyRecord {
                    id: new_id(),
                    user: user.clone(),
                    name,
                    start,
                    sha256,
                    permissions,
                    ip_allow,
                    created_at: now,
                    expires_at,
                    revoked_at: None,
                    last_used_at: None,
                };
                match self
                    .store
                    .create(&record, settings.max_keys_per_user, now)?
                {
                    Created::TooMany => return Err(KeyError::TooMany(settings.max_keys_per_user)),
                    Created::Stored => {}
                }
                self.invalidate(&sha256);
                audit(actor, &record.id, "create");
                Ok(reply(201, new_key_body(&record, &key)))
            }
            Op::List => {
                let keys = self.store.list(&user)?;
                #[derive(Serialize)]
                struct List<'a> {
                    keys: Vec<KeyView<'a>>,
                }
                let live: Vec<KeyView<'_>> = keys
                    .iter()
                    .filter(|k| k.live(now))
                    .map(KeyView::of)
                    .collect();
                Ok(reply(200, json(&List { keys: live })))
            }
            Op::Get(id) => {
                let record = self.owned(&user, id, now)?;
                Ok(reply(200, json(&KeyView::of(&record))))
            }
            Op::Update(id, body) => {
                let b: UpdateBody = parse(body)?;
                let name = b.name.as_deref().map(check_name).transpose()?;
                let ip_allow = b.ip_allow.map(nets).transpose()?;
                let expires_at = b
                    .expires_at
                    .as_deref()
                    .map(|t| expiry(None, Some(t), now))
                    .transpose()?
                    .flatten();
                let current = self.owned(&user, id, now)?;
                if let Some(p) = &b.permissions {
                    for name in p {
                        if !current.permissions.contains(name) {
                            return Err(KeyError::Insufficient(name.clone()));
                        }
                    }
                }
                if let (Some(new), Some(old)) = (expires_at, current.expires_at) {
                    if new > old {
                        return Err(bad("expires_at may only move earlier"));
                    }
                }
                let mut refused = None;
                let updated = self.store.update(id, &mut |r| {
                    if r.user != user || !r.live(now) {
                        refused = Some(KeyError::NotFound);
                        return false;
                    }
                    if let Some(n) = &name {
                        r.name = n.clone();
                    }
                    if let Some(p) = &b.permissions {
                        r.permissions.retain(|x| p.contains(x));
                    }
                    if let Some(list) = &ip_allow {
                        r.ip_allow = list.clone();
                    }
                    if let Some(t) = expires_at {
                        r.expires_at = Some(r.expires_at.map_or(t, |o| o.min(t)));
                    }
                    true
                })?;
                if let Some(e) = refused {
                    return Err(e);
                }
                let updated = updated.ok_or(KeyError::NotFound)?;
                self.invalidate(&updated.sha256);
                audit(actor, id, "update");
                Ok(reply(200, json(&KeyView::of(&updated))))
            }
            Op::Revoke(id) => {
                self.owned(&user, id, now)?;
                let mut refused = false;
                let revoked = self.store.update(id, &mut |r| {
                    if r.user != user || !r.live(now) {
                        refused = true;
                        return false;
                    }
                    r.revoked_at = Some(now);
                    true
                })?;
                let revoked = revoked.filter(|_| !refused).ok_or(KeyError::NotFound)?;
                self.invalidate(&revoked.sha256);
                audit(actor, id, "revoke");
                Ok(reply(204, Vec::new()))
            }
            Op::Roll(id, body) => {
                let b: RollBody = if body.iter().all(u8::is_ascii_whitespace) {
                    RollBody::default()
                } else {
                    parse(body)?
                };
                let grace = match b.grace.as_deref() {
                    None => settings.default_grace,
                    Some(g) => parse_duration(g, "grace")?,
                };
                if grace > settings.max_grace {
                    return Err(bad(format!(
                        "grace may be at most {}",
                        humantime::format_duration(settings.max_grace)
                    )));
                }
                let old = self
                    .store
                    .get(id)?
                    .filter(|r| r.user == user)
                    .ok_or(KeyError::NotFound)?;
                if !old.live(now) {
                    return Err(KeyError::Revoked);
                }
                // The new key is shown to the caller: a caller (a key with
                // keys:manage) may not get a key that holds more than itself
                // (what the key holds now: its list within the owner's).
                let holds = |p: &&String| owner.permissions.contains(p);
                if let Some(p) = old
                    .permissions
                    .iter()
                    .filter(holds)
                    .find(|p| !actor.ceiling.contains(p))
                {
                    return Err(KeyError::Insufficient(p.clone()));
                }
                throttle(&changes)?;
                let (key, sha256, start) = new_key(&settings.key_prefix);
                let record = KeyRecord {
                    id: new_id(),
                    sha256,
                    start,
                    created_at: now,
                    revoked_at: None,
                    last_used_at: None,
                    ..old.clone()
                };
                // Times are whole seconds: the grace ends on the first whole
                // second after it has passed in full, never before.
                let until = if grace.is_zero() {
                    now
                } else {
                    now + grace.as_secs() + 1
                };
                match self.store.roll(id, &record, until, now)? {
                    Rolled::Rolled(old) => self.invalidate(&old.sha256),
                    Rolled::NotFound => return Err(KeyError::NotFound),
                    Rolled::NotLive => return Err(KeyError::Revoked),
                }
                self.invalidate(&sha256);
                audit(actor, id, "roll");
                Ok(reply(201, new_key_body(&record, &key)))
            }
            Op::GetAllow => {
                let list = self.store.account_allow(&user)?;
                Ok(reply(200, allow_body(&list)))
            }
            Op::PutAllow(body) => {
                let b: AllowBody = parse(body)?;
                let list = nets(b.ip_allow)?;
                if let Some(ip) = actor.client_ip {
                    let set = super::ip_set(&list);
                    if !list.is_empty() && !set.contains(ip) {
                        return Err(KeyError::WouldLockOut);
                    }
                }
                self.store.set_account_allow(&user, &list)?;
                self.set_allow(&user, &list);
                audit(actor, "-", "ip_allow");
                Ok(reply(200, allow_body(&list)))
            }
        }
    }

    /// Key `id` when it belongs to `user` and is live; otherwise 404 (so
    /// another user's ids reveal nothing).
    fn owned(&self, user: &str, id: &str, now: u64) -> Result<KeyRecord, KeyError> {
        self.store
            .get(id)?
            .filter(|r| r.user == user && r.live(now))
            .ok_or(KeyError::NotFound)
    }
}

fn new_key_body(r: &KeyRecord, key: &str) -> Vec<u8> {
    json(&NewKey {
        id: &r.id,
        key,
        start: &r.start,
        name: &r.name,
        permissions: &r.permissions,
        ip_allow: &r.ip_allow,
        created_at: rfc3339(r.created_at),
        expires_at: r.expires_at.map(rfc3339),
    })
}

fn allow_body(list: &[String]) -> Vec<u8> {
    #[derive(Serialize)]
    struct Allow<'a> {
        ip_allow: &'a [String],
    }
    json(&Allow { ip_allow: list })
}

fn check_name(name: &str) -> Result<String, KeyError> {
    let name = name.trim();
    if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(bad(format!(
            "name must be 1 to {MAX_NAME} printable characters"
        )));
    }
    Ok(name.to_string())
}

/// The permissions a new key gets: what was asked for (all within the
/// actor's ceiling), or the whole ceiling but `keys:manage`, which a key
/// gets only when asked for by name.
fn granted(actor: &Actor, asked: Option<Vec<String>>) -> Result<Vec<String>, KeyError> {
    match asked {
        None => Ok(actor
            .ceiling
            .iter()
            .filter(|p| *p != MANAGE)
            .map(str::to_string)
            .collect()),
        Some(mut asked) => {
            if let Some(p) = asked.iter().find(|p| !actor.ceiling.contains(p)) {
                return Err(KeyError::Insufficient(p.clone()));
            }
            asked.sort();
            asked.dedup();
            Ok(asked)
        }
    }
}

/// CIDRs checked and written the one way (`10.0.0.0/8`; an address alone
/// as `/32` or `/128`).
fn nets(list: Vec<String>) -> Result<Vec<String>, KeyError> {
    if list.len() > MAX_NETS {
        return Err(bad(format!("at most {MAX_NETS} networks")));
    }
    let mut out = Vec::with_capacity(list.len());
    for s in list {
        let net =
            parse_net(&s).ok_or_else(|| bad(format!("{s:?} is not a CIDR like 203.0.113.0/24")))?;
        out.push(net.trunc().to_string());
    }
    out.dedup();
    Ok(out)
}

fn parse_duration(s: &str, what: &str) -> Result<Duration, KeyError> {
    if s.trim() == "0s" || s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| bad(format!("{what}: {e}")))
}

/// When a key ends: `expires_in` (a duration) or `expires_at` (RFC 3339),
/// never both, always in the future.
fn expiry(
    expires_in: Option<&str>,
    expires_at: Option<&str>,
    now: u64,
) -> Result<Option<u64>, KeyError> {
    let at = match (expires_in, expires_at) {
        (Some(_), Some(_)) => return Err(bad("give expires_in or expires_at, not both")),
        (None, None) => return Ok(None),
        (Some(d), None) => now.saturating_add(parse_duration(d, "expires_in")?.as_secs()),
        (None, Some(t)) => humantime::parse_rfc3339_weak(t)
            .map_err(|e| bad(format!("expires_at: {e}")))?
            .duration_since(UNIX_EPOCH)
            .map_err(|_| bad("expires_at is before 1970"))?
            .as_secs(),
    };
    if at <= now {
        return Err(bad("the expiry must be in the future"));
    }
    Ok(Some(at))
}
