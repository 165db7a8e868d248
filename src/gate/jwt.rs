//! Verifying a JWT against the policy: the key named by `kid`, that key's one
//! algorithm, the signature, `iss` and `aud`, the user it names as the policy
//! has it now, and the time claims against the gate's clock with the
//! configured leeway. What does not depend on the time is cached per policy
//! (clients send the same token for hours; EdDSA verification costs ~50 µs).

use serde::Deserialize;

use super::Denial;
use crate::policy::{Policy, UserIdx, VerifiedToken};

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<f64>,
    nbf: Option<f64>,
    iat: Option<f64>,
}

/// The user a valid token speaks for. A token this policy verified before
/// skips the signature and parsing; its time claims are checked every time.
pub fn verify(policy: &Policy, token: &str, now: u64) -> Result<UserIdx, Denial> {
    let verified = match policy.verified_tokens.get(token) {
        Some(v) => v,
        None => {
            let v = verify_signature_and_subject(policy, token)?;
            policy.verified_tokens.insert(token, v);
            v
        }
    };
    check_times(policy, &verified, now)?;
    Ok(verified.user)
}

/// Everything about a token that does not depend on the time.
fn verify_signature_and_subject(policy: &Policy, token: &str) -> Result<VerifiedToken, Denial> {
    // `decode_header` refuses `alg: none` in any spelling: it is not an algorithm it knows.
    let header =
        jsonwebtoken::decode_header(token).map_err(|_| Denial::InvalidToken("malformed token"))?;
    let key = policy
        .jwt_keys
        .for_kid(header.kid.as_deref())
        .ok_or(Denial::InvalidToken("unknown signing key"))?;
    if header.alg != key.algorithm {
        return Err(Denial::InvalidToken("algorithm does not match the key"));
    }
    let data =
        jsonwebtoken::decode::<Claims>(token, &key.decoding, &key.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            Denial::InvalidToken(match e.kind() {
                ErrorKind::InvalidSignature => "signature does not match",
                ErrorKind::InvalidIssuer => "wrong issuer",
                ErrorKind::InvalidAudience => "wrong audience",
                ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
                ErrorKind::InvalidAlgorithm => "algorithm does not match the key",
                _ => "malformed token",
            })
        })?;
    let claims = data.claims;
    let exp = claims.exp.ok_or(Denial::InvalidToken("no exp claim"))?;
    let sub = claims.sub.ok_or(Denial::InvalidToken("no sub claim"))?;
    let (idx, user) = policy
        .user_by_id(&sub)
        .ok_or(Denial::InvalidToken("unknown subject"))?;
    if user.disabled {
        return Err(Denial::InvalidToken("the account is disabled"));
    }
    if let Some(after) = user.tokens_valid_after {
        let iat = claims.iat.ok_or(Denial::InvalidToken(
            "no iat claim, and the account revoked older tokens",
        ))?;
        if iat < after as f64 {
            return Err(Denial::InvalidToken("the token has been revoked"));
        }
    }
    Ok(VerifiedToken {
        user: idx,
        exp,
        nbf: claims.nbf,
        iat: claims.iat,
    })
}

fn check_times(policy: &Policy, v: &VerifiedToken, now: u64) -> Result<(), Denial> {
    let leeway = policy.auth.leeway.as_secs() as f64;
    let now = now as f64;
    if now >= v.exp + leeway {
        return Err(Denial::TokenExpired);
    }
    if v.nbf.is_some_and(|nbf| now + leeway < nbf) {
        return Err(Denial::InvalidToken("not valid yet"));
    }
    if v.iat.is_some_and(|iat| now + leeway < iat) {
        return Err(Denial::InvalidToken("issued in the future"));
    }
    Ok(())
}
