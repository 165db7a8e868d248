//! Issuing credentials: `POST token_path` (login), `POST refresh_path`
//! (rotation with reuse detection) and `POST revoke_path`. [`Issuer::login`]
//! is async: argon2 runs on the verifier threads of [`bounds`], its Redis
//! calls and the durable commit on the blocking pool. `refresh` and
//! `revoke` block, and the proxy calls them on the blocking pool, never on
//! a proxy thread.

mod access;
pub mod bounds;
mod password;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use access::sign_access_token;
pub use password::{dummy_hash_for, dummy_hash_like, verify_password};

use crate::limit::account_id;
use crate::limit::{AccountId, Quota};
use crate::metrics::METRICS;
use crate::policy::{Policy, UserIdx};
use crate::state::families::Throttles;
use crate::state::{RefreshRecord, Rotation, StateError, StateStore, TokenHash};

/// Request bodies of the auth endpoints are refused above this size.
pub const MAX_BODY: usize = 16 * 1024;

/// Refresh tokens: this prefix and 43 base62 characters (256 bits).
pub const REFRESH_PREFIX: &str = "rft_";

/// Why an auth endpoint refused; one place maps it to the response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssueError {
    InvalidRequest(&'static str),
    /// Over this many bytes.
    PayloadTooLarge(usize),
    InvalidCredentials,
    IpNotAllowed,
    LoginThrottled {
        retry_after_secs: u64,
    },
    /// Another login for this email, or from this address, is being
    /// checked: 429 `login_throttled`, `Retry-After: 1`.
    LoginBusy,
    InvalidRefreshToken(&'static str),
    /// The shared store (Redis) cannot be reached: never a spent token
    /// accepted, never a 500.
    StateUnavailable,
    /// The login verification queue is full.
    Overloaded,
    Internal,
}

impl IssueError {
    pub fn status(&self) -> u16 {
        match self {
            IssueError::InvalidRequest(_) => 400,
            IssueError::PayloadTooLarge(_) => 413,
            IssueError::InvalidCredentials | IssueError::InvalidRefreshToken(_) => 401,
            IssueError::IpNotAllowed => 403,
            IssueError::LoginThrottled { .. } | IssueError::LoginBusy => 429,
            IssueError::StateUnavailable | IssueError::Overloaded => 503,
            IssueError::Internal => 500,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            IssueError::InvalidRequest(_) => "invalid_request",
            IssueError::PayloadTooLarge(_) => "payload_too_large",
            IssueError::InvalidCredentials => "invalid_credentials",
            IssueError::IpNotAllowed => "ip_not_allowed",
            IssueError::LoginThrottled { .. } | IssueError::LoginBusy => "login_throttled",
            IssueError::InvalidRefreshToken(_) => "invalid_refresh_token",
            IssueError::StateUnavailable => "state_unavailable",
            IssueError::Overloaded => "overloaded",
            IssueError::Internal => "internal_error",
        }
    }

    pub fn message(&self) -> String {
        match self {
            IssueError::InvalidRequest(why) => format!("the request is malformed: {why}"),
            IssueError::PayloadTooLarge(limit) => {
                format!("the request body is larger than {limit} bytes")
            }
            IssueError::InvalidCredentials => "the email or password is wrong".to_string(),
            IssueError::IpNotAllowed => "requests from this address are not allowed".to_string(),
            IssueError::LoginThrottled { .. } => {
                "too many login attempts; see Retry-After".to_string()
            }
            IssueError::LoginBusy => {
                "another login for this account or from this address is being checked; \
                 retry in a second"
                    .to_string()
            }
            IssueError::InvalidRefreshToken(why) => format!("the refresh token is invalid: {why}"),
            IssueError::StateUnavailable => {
                "the token store cannot be reached right now; try again".to_string()
            }
            IssueError::Overloaded => {
                "too many logins are being checked right now; see Retry-After".to_string()
            }
            IssueError::Internal => "keygate could not complete the request".to_string(),
        }
    }

    /// The RFC 6750 challenge a 401 carries.
    pub fn challenge(&self) -> Option<String> {
        match self {
            IssueError::InvalidCredentials => Some(r#"Bearer realm="keygate""#.to_string()),
            IssueError::InvalidRefreshToken(_) => Some(format!(
                r#"Bearer realm="keygate", error="invalid_token", error_description="{}""#,
                self.message()
            )),
            _ => None,
        }
    }

    pub fn retry_after(&self) -> Option<u64> {
        match self {
            IssueError::LoginThrottled { retry_after_secs } => Some(*retry_after_secs),
            IssueError::StateUnavailable | IssueError::Overloaded | IssueError::LoginBusy => {
                Some(1)
            }
            _ => None,
        }
    }
}

/// The body of a successful login or refresh (the seed's shape).
#[derive(Debug, Serialize, Deserialize)]
pub struct TokenResponse {
    pub token: String,
    pub token_type: String,
    pub expires_at: String,
    pub expires_in: u64,
    pub refresh_token: String,
    /// Whom the tokens were issued to (for the access log; not sent).
    #[serde(skip)]
    pub subject: String,
}

#[derive(Deserialize)]
struct LoginBody {
    email: String,
    password: String,
}

#[derive(Deserialize)]
struct RefreshBody {
    refresh_token: String,
}

pub struct Issuer {
    pub store: Arc<dyn StateStore>,
    /// Login throttles: this process's limiter, or the fleet's.
    pub throttles: Arc<dyn Throttles>,
    /// Emails and client addresses with a login in flight.
    in_flight: Arc<bounds::InFlight>,
    /// argon2 verifications at a time, and the queue in front of them.
    work: Arc<bounds::Work>,
}

/// Log a store failure and name it for the client.
fn store_failed(what: &str, e: StateError) -> IssueError {
    match e {
        StateError::Unavailable(why) => {
            tracing::warn!(error = %why, "{what}: the shared store is unavailable");
            IssueError::StateUnavailable
        }
        e => {
            tracing::error!(error = %e, "{what}");
            IssueError::Internal
        }
    }
}

/// Another attempt for this address or email is being checked.
fn busy() -> IssueError {
    METRICS.login_busy.inc();
    IssueError::LoginBusy
}

fn overloaded() -> IssueError {
    METRICS.login_overloaded.inc();
    IssueError::Overloaded
}

/// Run blocking `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, IssueError> + Send + 'static,
) -> Result<T, IssueError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(IssueError::Internal))
}

impl Issuer {
    /// An issuer whose verifications are bounded by this machine's cores.
    pub fn new(store: Arc<dyn StateStore>, throttles: Arc<dyn Throttles>) -> Issuer {
        Issuer::with_work(store, throttles, bounds::Work::for_this_machine())
    }

    pub fn with_work(
        store: Arc<dyn StateStore>,
        throttles: Arc<dyn Throttles>,
        work: bounds::Work,
    ) -> Issuer {
        Issuer {
            store,
            throttles,
            in_flight: Arc::default(),
            work: Arc::new(work),
        }
    }

    /// How many verifications run at once: logins hold at most this many
    /// times argon2's `m_cost` of memory.
    pub fn verification_permits(&self) -> usize {
        self.work.permits_total
    }

    /// `POST token_path`. Unknown email, wrong password, disabled user, a
    /// user without a password and the right password from outside the
    /// user's allowlist all cost one argon2 verification, spend a throttle
    /// unit and answer the same `401 invalid_credentials`.
    ///
    /// Bounded whatever is sent:
    /// - the client address first: one attempt in flight per address (else
    ///   429, `Retry-After: 1`), and its throttle unit spent; only an
    ///   attempt that passed that touches the email, so a throttled address
    ///   cannot hold anyone's email busy;
    /// - then the email: one attempt in flight, its unit spent;
    /// - both units spent *before* the verification (refunded on success),
    ///   so n parallel guesses cost n units and at most the quota is ever
    ///   checked;
    /// - at most [`Issuer::verification_permits`] verifications at once,
    ///   behind a short queue (else 503 `overloaded`, the units refunded);
    ///   a login whose client went away while it queued is not verified.
    pub async fn login(
        self: Arc<Self>,
        policy: Arc<Policy>,
        client_ip: IpAddr,
        body: Vec<u8>,
        now_us: u64,
    ) -> Result<TokenResponse, IssueError> {
        let body: LoginBody = serde_json::from_slice(&body).map_err(|_| {
            IssueError::InvalidRequest(
                "expected a JSON object with \"email\" and \"password\" strings",
            )
        })?;
        if !policy.server.ip_allow.permits(client_ip) {
            return Err(IssueError::IpNotAllowed);
        }
        let email = body.email.trim().to_ascii_lowercase();
        let bucket = crate::policy::address_bucket(client_ip, policy.server.ipv6_prefix);
        let by_ip = (
            account_id("login-ip", &bucket.to_string()),
            policy.auth.login_per_ip,
        );
        let by_email = (
            account_id("login-email", &email),
            policy.auth.login_per_email,
        );
        let ip_busy = self.in_flight.claim(by_ip.0).ok_or_else(busy)?;
        let Some(spending) = self.work.spending.enter() else {
            return Err(overloaded());
        };
        let spender = self.clone();
        blocking(move || spender.spend(&[by_ip], now_us)).await?;
        let Some(email_busy) = self.in_flight.claim(by_email.0) else {
            self.refund_later(vec![by_ip], now_us);
            return Err(busy());
        };
        let spender = self.clone();
        blocking(move || {
            let spent = spender.spend(&[by_email], now_us);
            if spent.is_err() {
                spender.refund(&[by_ip], now_us);
            }
            spent
        })
        .await?;
        drop(spending);
        let throttles = [by_ip, by_email];
        let Some(admitted) = self.work.verifying.enter() else {
            self.refund_later(throttles.to_vec(), now_us);
            return Err(overloaded());
        };
        let issuer = self.clone();
        let runtime = tokio::runtime::Handle::current();
        let verified = self.work.run(move |wanted| {
            let _held = (ip_busy, email_busy, admitted);
            if !wanted {
                // The client went away while this queued: no verification,
                // and the attempt costs nothing (refunded off this thread:
                // a Redis call must not hold a verifier).
                runtime.spawn_blocking(move || issuer.refund(&throttles, now_us));
                return Err(IssueError::Internal);
            }
            let user = policy.user_by_email(&email);
            let dummy;
            let hash = match user.and_then(|(_, u)| u.password_hash.as_deref()) {
                Some(hash) => hash,
                None => {
                    dummy = dummy_hash_for(&policy);
                    &dummy
                }
            };
            METRICS.login_verifications.inc();
            let password_ok = verify_password(hash, &body.password);
            let user = user.filter(|(_, u)| {
                password_ok
                    && !u.disabled
                    && u.password_hash.is_some()
                    // The right password from outside the allowlist must
                    // not answer differently from a wrong one.
                    && u.ip_allow.permits(client_ip)
            });
            let Some((idx, _)) = user else {
                METRICS.login_failures.inc();
                return Err(IssueError::InvalidCredentials);
            };
            Ok((policy, idx))
        });
        let (policy, idx) = verified.await.ok_or(IssueError::Internal)??;
        // Durable before it is handed out: on the blocking pool, so the
        // verifiers go on verifying meanwhile.
        blocking(move || {
            let now = now_us / 1_000_000;
            let (refresh, hash, record) = new_refresh(&policy, idx, rand::random(), now, now);
            self.store
                .insert_refresh(&hash, &record)
                .map_err(|e| store_failed("could not store a refresh token", e))?;
            METRICS.tokens_issued.with_label_values(&["password"]).inc();
            // A login that passes costs its user nothing.
            self.refund(&throttles, now_us);
            respond(&policy, idx, now, now, refresh)
        })
        .await
    }

    /// Spend one unit of each throttle, or none: a refused attempt is
    /// 429 and leaves the others as they were.
    fn spend(&self, throttles: &[(AccountId, Quota)], now_us: u64) -> Result<(), IssueError> {
        let mut spent = Vec::with_capacity(throttles.len());
        for (account, quota) in throttles {
            let outcome = self
                .throttles
                .hit(*account, quota, now_us)
                .map_err(|e| store_failed("could not count a login attempt", e))?;
            if !outcome.allowed {
                self.refund(&spent, now_us);
                METRICS.login_throttled.inc();
                return Err(IssueError::LoginThrottled {
                    retry_after_secs: outcome.retry_after_secs.max(1),
                });
            }
            spent.push((*account, *quota));
        }
        Ok(())
    }

    /// [`Issuer::refund`] on the blocking pool, not waited for.
    fn refund_later(self: &Arc<Self>, throttles: Vec<(AccountId, Quota)>, now_us: u64) {
        let issuer = self.clone();
        tokio::task::spawn_blocking(move || issuer.refund(&throttles, now_us));
    }

    /// Give back one unit of each throttle (best effort: a failed refund
    /// leaves the attempt counted, never the other way round).
    fn refund(&self, throttles: &[(AccountId, Quota)], now_us: u64) {
        for (account, quota) in throttles {
            if let Err(e) = self.throttles.refund(*account, quota, now_us) {
                tracing::warn!(error = %e, "could not refund a login throttle unit");
            }
        }
    }

    /// `POST refresh_path`: spend the token, issue its successor in the same
    /// family. A spent token presented again revokes the whole family.
    pub fn refresh(
        &self,
        policy: &Policy,
        client_ip: IpAddr,
        request_id: &str,
        body: &[u8],
        now_us: u64,
    ) -> Result<TokenResponse, IssueError> {
        let body: RefreshBody = serde_json::from_slice(body).map_err(|_| {
            IssueError::InvalidRequest("expected a JSON object with a \"refresh_token\" string")
        })?;
        if !policy.server.ip_allow.permits(client_ip) {
            return Err(IssueError::IpNotAllowed);
        }
        let presented = refresh_hash(&body.refresh_token)
            .ok_or(IssueError::InvalidRefreshToken("not a refresh token"))?;
        let now = now_us / 1_000_000;
        let ttl = policy.auth.refresh_ttl.as_secs();
        let mut refusal = None;
        let mut issued = None;
        let rotation = self
            .store
            .rotate_refresh(&presented, now, now + ttl, &mut |old: &RefreshRecord| {
                let Some((idx, user)) = policy.user_by_id(&old.user) else {
                    refusal = Some(IssueError::InvalidRefreshToken(
                        "the account no longer exists",
                    ));
                    return None;
                };
                // The family's start, not this token's: a rotation after
                // the cutoff does not launder a login from before it.
                if user.disabled || user.tokens_valid_after.is_some_and(|t| old.auth_time < t) {
                    refusal = Some(IssueError::InvalidRefreshToken(
                        "the account's tokens were revoked",
                    ));
                    return None;
                }
                if !user.ip_allow.permits(client_ip) {
                    refusal = Some(IssueError::IpNotAllowed);
                    return None;
                }
                let (refresh, hash, record) =
                    new_refresh(policy, idx, old.family, now, old.auth_time);
                issued = Some((idx, refresh, old.auth_time));
                Some((hash, record))
            })
            .map_err(|e| store_failed("could not rotate a refresh token", e))?;
        match rotation {
            Rotation::Rotated(_) => {
                let (idx, refresh, auth_time) = issued.ok_or(IssueError::Internal)?;
                METRICS
                    .tokens_issued
                    .with_label_values(&["refresh_token"])
                    .inc();
                respond(policy, idx, now, auth_time, refresh)
            }
            Rotation::ReuseDetected { user } => {
                METRICS.refresh_reuse.inc();
                tracing::warn!(
                    %user,
                    client_ip = %client_ip,
                    request_id,
                    "a spent refresh token was presented again; its family is revoked"
                );
                Err(IssueError::InvalidRefreshToken(
                    "the token was already used",
                ))
            }
            Rotation::Refused => Err(refusal.unwrap_or(IssueError::InvalidRefreshToken("refused"))),
            Rotation::Unknown => Err(IssueError::InvalidRefreshToken("unknown token")),
            Rotation::Expired => Err(IssueError::InvalidRefreshToken("the token has expired")),
            Rotation::Revoked => Err(IssueError::InvalidRefreshToken("the token was revoked")),
        }
    }

    /// `POST revoke_path` (RFC 7009): revokes the token's family; unknown
    /// tokens get the same 200.
    pub fn revoke(&self, policy: &Policy, body: &[u8], now_us: u64) -> Result<(), IssueError> {
        let body: RefreshBody = serde_json::from_slice(body).map_err(|_| {
            IssueError::InvalidRequest("expected a JSON object with a \"refresh_token\" string")
        })?;
        let Some(hash) = refresh_hash(&body.refresh_token) else {
            return Ok(());
        };
        let until = now_us / 1_000_000 + policy.auth.refresh_ttl.as_secs();
        self.store
            .revoke_refresh(&hash, until)
            .map_err(|e| store_failed("could not revoke a refresh token", e))?;
        Ok(())
    }
}

/// A fresh refresh token for `user` in `family`, its hash and its record.
fn new_refresh(
    policy: &Policy,
    user: UserIdx,
    family: u128,
    now: u64,
    auth_time: u64,
) -> (String, TokenHash, RefreshRecord) {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    let mut token = String::with_capacity(REFRESH_PREFIX.len() + 43);
    token.push_str(REFRESH_PREFIX);
    token.extend((0..43).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char));
    let hash: TokenHash = Sha256::digest(token.as_bytes()).into();
    let record = RefreshRecord {
        user: policy.user(user).id.to_string(),
        family,
        issued_at: now,
        expires_at: now + policy.auth.refresh_ttl.as_secs(),
        spent: false,
        auth_time,
    };
    (token, hash, record)
}

/// The hash of a well-formed refresh token; anything else (an access token,
/// an API key) is not one.
fn refresh_hash(token: &str) -> Option<TokenHash> {
    let body = token.strip_prefix(REFRESH_PREFIX)?;
    if body.len() != 43 || !body.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    Some(Sha256::digest(token.as_bytes()).into())
}

fn respond(
    policy: &Policy,
    user: UserIdx,
    now: u64,
    auth_time: u64,
    refresh_token: String,
) -> Result<TokenResponse, IssueError> {
    let ttl = policy.auth.token_ttl.as_secs();
    let (token, exp) = sign_access_token(policy, user, now, auth_time, ttl).map_err(|e| {
        tracing::error!(error = %e, "could not sign an access token");
        IssueError::Internal
    })?;
    Ok(TokenResponse {
        token,
        token_type: "Bearer".to_string(),
        expires_at: humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(exp))
            .to_string(),
        expires_in: ttl,
        refresh_token,
        subject: policy.user(user).id.to_string(),
    })
}
