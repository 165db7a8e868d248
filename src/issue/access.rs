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
    /// OIDC's `auth_time`: when the user logged in. Tokens minted by a
    /// refresh carry their family's login, so a `tokens_valid_after`
    /// between the login and the refresh still cuts them off.
    auth_time: u64,
    jti: String,
}

/// A signed access token for `user`, issued at `now` (Unix seconds) for a
/// login made at `auth_time`, valid for `ttl_secs`. Returns the token and
/// its `exp`.
pub fn sign_access_token(
    policy: &Policy,
    user: UserIdx,
    now: u64,
    auth_time: u64,
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
        auth_time,
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

#[cfg(test)]
mod tests {
    use crate::policy::testing;

    /// Each asymmetric algorithm signs with its private key and the gate
    /// verifies the result with the public one.
    #[test]
    fn asymmetric_signers_round_trip_through_the_gate() {
        for (kid, stem) in [("ed", "ed25519"), ("es", "es256"), ("rs", "rs256")] {
            let private = format!("{stem}.pem");
            let src = testing::base_toml()
                .replace(
                    "secret_env = \"KEYGATE_TEST_HS\"\nsign = true",
                    "secret_env = \"KEYGATE_TEST_HS\"",
                )
                .replace(
                    &format!("public_key_file = \"keys/{stem}.pub.pem\""),
                    &format!("public_key_file = \"keys/{stem}.pub.pem\"\nprivate_key_file = \"keys/{private}\"\nsign = true"),
                );
            let mut secrets = testing::secrets();
            let pem = match kid {
                "ed" => testing::ED_PRIVATE,
                "es" => testing::ES_PRIVATE,
                _ => testing::RS_PRIVATE,
            };
            secrets
                .files
                .insert(format!("keys/{private}").into(), pem.as_bytes().to_vec());
            let policy = crate::policy::compile("t.toml", &src, &secrets)
                .unwrap()
                .policy;
            let (alice, _) = policy.user_by_id("u_alice").unwrap();
            let now = crate::clock::unix_now();
            let (token, exp) = super::sign_access_token(&policy, alice, now, now, 60).unwrap();
            assert_eq!(exp, now + 60);
            let header = jsonwebtoken::decode_header(&token).unwrap();
            assert_eq!(header.kid.as_deref(), Some(kid));
            assert_eq!(
                crate::gate::verify_jwt(&policy, &token, now),
                Ok(alice),
                "{kid}"
            );
        }
    }
}
