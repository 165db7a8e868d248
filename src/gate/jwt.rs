//! Verifying a JWT against the policy: the key named by `kid`, that key's one
//! algorithm, the signature, `iss` and `aud`, the user it names as the policy
//! has it now, and the time claims against the gate's clock with the
//! configured leeway. What does not depend on the time is cached per policy
//! (clients send the same token for hours; EdDSA verification costs ~50 µs).

use std::borrow::Cow;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::Algorithm;
use serde::Deserialize;

use super::Denial;
use crate::policy::{Policy, UserIdx, VerifiedToken};

/// The JOSE header fields keygate reads; `jku`, `x5u`, `jwk` and the rest
/// are ignored, never fetched.
#[derive(Deserialize)]
struct Header<'a> {
    #[serde(borrow)]
    alg: Cow<'a, str>,
    #[serde(borrow, default)]
    kid: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Claims<'a> {
    #[serde(borrow, default)]
    sub: Option<Cow<'a, str>>,
    exp: Option<f64>,
    nbf: Option<f64>,
    iat: Option<f64>,
    /// When the user logged in (keygate's own tokens carry it).
    auth_time: Option<f64>,
    #[serde(borrow, default)]
    iss: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    aud: Option<Audience<'a>>,
}

/// RFC 7519 §4.1.3: one audience or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum Audience<'a> {
    One(#[serde(borrow)] Cow<'a, str>),
    Many(#[serde(borrow)] Vec<Cow<'a, str>>),
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

/// Everything about a token that does not depend on the time. Each part is
/// decoded and parsed once; HMAC keys verify from their pre-keyed state,
/// the others through jsonwebtoken's crypto provider.
fn verify_signature_and_subject(policy: &Policy, token: &str) -> Result<VerifiedToken, Denial> {
    const MALFORMED: Denial = Denial::InvalidToken("malformed token");
    let mut parts = token.split('.');
    let (Some(header64), Some(claims64), Some(signature64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(MALFORMED);
    };
    let header_json = URL_SAFE_NO_PAD.decode(header64).map_err(|_| MALFORMED)?;
    let header: Header<'_> = serde_json::from_slice(&header_json).map_err(|_| MALFORMED)?;
    // `none`, in any spelling, is not an algorithm jsonwebtoken knows.
    let alg: Algorithm = header.alg.parse().map_err(|_| MALFORMED)?;
    let key = policy
        .jwt_keys
        .for_kid(header.kid.as_deref())
        .ok_or(Denial::InvalidToken("unknown signing key"))?;
    if alg != key.algorithm {
        return Err(Denial::InvalidToken("algorithm does not match the key"));
    }
    let message = &token.as_bytes()[..header64.len() + 1 + claims64.len()];
    let valid = match &key.mac {
        Some(mac) => {
            let signature = URL_SAFE_NO_PAD.decode(signature64).map_err(|_| MALFORMED)?;
            mac.verifies(message, &signature)
        }
        None => jsonwebtoken::crypto::verify(signature64, message, &key.decoding, key.algorithm)
            .map_err(|_| MALFORMED)?,
    };
    if !valid {
        return Err(Denial::InvalidToken("signature does not match"));
    }
    let claims_json = URL_SAFE_NO_PAD.decode(claims64).map_err(|_| MALFORMED)?;
    let claims: Claims<'_> = serde_json::from_slice(&claims_json).map_err(|_| MALFORMED)?;
    let missing = Denial::InvalidToken("a required claim is missing");
    if claims.iss.as_deref().ok_or(missing.clone())? != policy.auth.issuer.as_str() {
        return Err(Denial::InvalidToken("wrong issuer"));
    }
    let audience = policy.auth.audience.as_str();
    let aud_ok = match claims.aud.as_ref().ok_or(missing)? {
        Audience::One(a) => a == audience,
        Audience::Many(list) => list.iter().any(|a| a == audience),
    };
    if !aud_ok {
        return Err(Denial::InvalidToken("wrong audience"));
    }
    let exp = claims.exp.ok_or(Denial::InvalidToken("no exp claim"))?;
    let sub = claims.sub.ok_or(Denial::InvalidToken("no sub claim"))?;
    let (idx, user) = policy
        .user_by_id(&sub)
        .ok_or(Denial::InvalidToken("unknown subject"))?;
    if user.disabled {
        return Err(Denial::InvalidToken("the account is disabled"));
    }
    if let Some(after) = user.tokens_valid_after {
        // The login's time when the token says it, else its own issue time.
        let since = claims.auth_time.or(claims.iat).ok_or(Denial::InvalidToken(
            "no iat claim, and the account revoked older tokens",
        ))?;
        if since < after as f64 || claims.iat.is_some_and(|iat| iat < after as f64) {
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
