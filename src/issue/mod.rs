//! Issuing credentials: `POST token_path` (login), `POST refresh_path`
//! (rotation with reuse detection), `POST revoke_path`, and the JWKS the
//! proxy serves. Every function here blocks (argon2, a durable commit): the
//! proxy calls them on the blocking pool, never on a proxy thread.

mod access;
mod password;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use access::sign_access_token;
pub use password::{dummy_hash_like, verify_password};

use crate::metrics::METRICS;
use crate::policy::{account_id, Policy, UserIdx};
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
    InvalidRefreshToken(&'static str),
    /// The shared store (Redis) cannot be reached: never a spent token
    /// accepted, never a 500.
    StateUnavailable,
    Internal,
}

impl IssueError {
    pub fn status(&self) -> u16 {
        match self {
            IssueError::InvalidRequest(_) => 400,
            IssueError::PayloadTooLarge(_) => 413,
            IssueError::InvalidCredentials | IssueError::InvalidRefreshToken(_) => 401,
            IssueError::IpNotAllowed => 403,
            IssueError::LoginThrottled { .. } => 429,
            IssueError::StateUnavailable => 503,
            IssueError::Internal => 500,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            IssueError::InvalidRequest(_) => "invalid_request",
            IssueError::PayloadTooLarge(_) => "payload_too_large",
            IssueError::InvalidCredentials => "invalid_credentials",
            IssueError::IpNotAllowed => "ip_not_allowed",
            IssueError::LoginThrottled { .. } => "login_throttled",
            IssueError::InvalidRefreshToken(_) => "invalid_refresh_token",
            IssueError::StateUnavailable => "state_unavailable",
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
                "too many failed logins; see Retry-After".to_string()
            }
            IssueError::InvalidRefreshToken(why) => format!("the refresh token is invalid: {why}"),
            IssueError::StateUnavailable => {
                "the token store cannot be reached right now; try again".to_string()
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
            IssueError::StateUnavailable => Some(1),
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

impl Issuer {
    /// `POST token_path`. Unknown email, wrong password, disabled user and a
    /// user without a password all cost one argon2 verification and answer
    /// the same `401 invalid_credentials`.
    pub fn login(
        &self,
        policy: &Policy,
        client_ip: IpAddr,
        body: &[u8],
        now_us: u64,
    ) -> Result<TokenResponse, IssueError> {
        let body: LoginBody = serde_json::from_slice(body).map_err(|_| {
            IssueError::InvalidRequest(
                "expected a JSON object with \"email\" and \"password\" strings",
            )
        })?;
        if !policy.server.ip_allow.permits(client_ip) {
            return Err(IssueError::IpNotAllowed);
        }
        let email = body.email.trim().to_ascii_lowercase();
        let by_ip = account_id("login-ip", &client_ip.to_string());
        let by_email = account_id("login-email", &email);
        let auth = &policy.auth;
        let peek = |account, quota| {
            self.throttles
                .peek(account, quota, now_us)
                .map_err(|e| store_failed("could not read a login throttle", e))
        };
        let throttled = [
            peek(by_ip, &auth.login_per_ip)?,
            peek(by_email, &auth.login_per_email)?,
        ];
        if let Some(wait) = throttled
            .iter()
            .filter(|o| !o.allowed)
            .map(|o| o.retry_after_secs)
            .max()
        {
            METRICS.login_throttled.inc();
            return Err(IssueError::LoginThrottled {
                retry_after_secs: wait.max(1),
            });
        }

        let user = policy.user_by_email(&email);
        let hash = user
            .and_then(|(_, u)| u.password_hash.as_deref())
            .unwrap_or(&policy.dummy_password_hash);
        let password_ok = verify_password(hash, &body.password);
        let user = user.filter(|(_, u)| password_ok && !u.disabled && u.password_hash.is_some());
        let Some((idx, user)) = user else {
            METRICS.login_failures.inc();
            for (account, quota) in [
                (by_ip, &auth.login_per_ip),
                (by_email, &auth.login_per_email),
            ] {
                self.throttles
                    .hit(account, quota, now_us)
                    .map_err(|e| store_failed("could not count a failed login", e))?;
            }
            return Err(IssueError::InvalidCredentials);
        };
        if !user.ip_allow.permits(client_ip) {
            return Err(IssueError::IpNotAllowed);
        }
        let now = now_us / 1_000_000;
        let (refresh, hash, record) = new_refresh(policy, idx, rand::random(), now);
        self.store
            .insert_refresh(&hash, &record)
            .map_err(|e| store_failed("could not store a refresh token", e))?;
        METRICS.tokens_issued.with_label_values(&["password"]).inc();
        respond(policy, idx, now, refresh)
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
                if user.disabled || user.tokens_valid_after.is_some_and(|t| old.issued_at < t) {
                    refusal = Some(IssueError::InvalidRefreshToken(
                        "the account's tokens were revoked",
                    ));
                    return None;
                }
                if !user.ip_allow.permits(client_ip) {
                    refusal = Some(IssueError::IpNotAllowed);
                    return None;
                }
                let (refresh, hash, record) = new_refresh(policy, idx, old.family, now);
                issued = Some((idx, refresh));
                Some((hash, record))
            })
            .map_err(|e| store_failed("could not rotate a refresh token", e))?;
        match rotation {
            Rotation::Rotated(_) => {
                let (idx, refresh) = issued.ok_or(IssueError::Internal)?;
                METRICS
                    .tokens_issued
                    .with_label_values(&["refresh_token"])
                    .inc();
                respond(policy, idx, now, refresh)
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
    refresh_token: String,
) -> Result<TokenResponse, IssueError> {
    let ttl = policy.auth.token_ttl.as_secs();
    let (token, exp) = sign_access_token(policy, user, now, ttl).map_err(|e| {
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
