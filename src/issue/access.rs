//! Signing access tokens with the policy's signing key.

use serde::Serialize;

use crate::policy::{Policy, UserIdx};

#[derive(Serialize)]
struct AccessClaims<'a> {
    sub: &'a str,
    email: &'a str,
    tier: &'a str,
    permissions: Vec<&'a str>,
    iss: &'a str,
    aud: &'a str,
    iat: u64,
    nbf: u64,
    exp: u64,
    jti: String,
}

/// A signed access token for `user`, issued at `now` (Unix seconds) and
/// valid for `ttl_secs`. Returns the token and its `exp`.
pub fn sign_access_token(
    policy: &Policy,
    user: UserIdx,
    now: u64,
    ttl_secs: u64,
) -> Result<(String, u64), jsonwebtoken::errors::Error> {
    let key = policy.jwt_keys.signer();
    let u = policy.user(user);
    let exp = now + ttl_secs;
    let claims = AccessClaims {
        sub: &u.id,
        email: &u.email,
        tier: &policy.tier(u.tier).name,
        permissions: u.permissions.iter().collect(),
        iss: &policy.auth.issuer,
        aud: &policy.auth.audience,
        iat: now,
        nbf: now,
        exp,
        jti: format!("{:032x}", rand::random::<u128>()),
    };
    let mut header = jsonwebtoken::Header::new(key.algorithm);
    header.kid = Some(key.kid.to_string());
    let encoding = key.encoding.as_ref().ok_or_else(|| {
        jsonwebtoken::errors::Error::from(jsonwebtoken::errors::ErrorKind::InvalidKeyFormat)
    })?;
    let token = jsonwebtoken::encode(&header, &claims, encoding)?;
    Ok((token, exp))
}
