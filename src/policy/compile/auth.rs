//! `[auth]` and `[[auth.keys]]`: token lifetimes, endpoint paths, the
//! signing and verifying keys, and the JWK set published from them.

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::time::Duration;

use http::HeaderName;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};

use super::super::{Access, Auth, JwtKey, JwtKeys, Mac};
use super::*;
use crate::config::{self, Str};
use crate::limit::Quota;

const DEFAULT_TOKEN_PATH: &str = "/api/v1/auth/token";
const DEFAULT_REFRESH_PATH: &str = "/api/v1/auth/refresh";
const DEFAULT_REVOKE_PATH: &str = "/api/v1/auth/revoke";

impl Cx<'_> {
    pub(super) fn auth(&mut self, a: &config::Auth) -> Auth {
        let text = |s: &Option<Str>, default: &str| {
            s.as_ref()
                .map_or_else(|| default.to_string(), |s| s.get_ref().clone())
        };
        let default_access = match &a.default_access {
            None => Access::Authenticated,
            Some(s) => self.access(s).unwrap_or(Access::Authenticated),
        };
        let api_key_header = match &a.api_key_header {
            None => HeaderName::from_static("x-api-key"),
            Some(h) => match HeaderName::from_bytes(h.get_ref().as_bytes()) {
                Ok(name) if name == http::header::AUTHORIZATION => {
                    self.d.error(
                        h.span(),
                        "api_key_header cannot be Authorization (API keys are accepted there as Bearer credentials already)",
                    );
                    name
                }
                Ok(name) => name,
                Err(_) => {
                    self.d.error(h.span(), "not a valid header name");
                    HeaderName::from_static("x-api-key")
                }
            },
        };
        let paths = [
            (&a.token_path, DEFAULT_TOKEN_PATH),
            (&a.refresh_path, DEFAULT_REFRESH_PATH),
            (&a.revoke_path, DEFAULT_REVOKE_PATH),
        ];
        for (path, _) in paths {
            if let Some(p) = path.as_ref().filter(|p| !p.get_ref().starts_with('/')) {
                self.d.error(p.span(), "a path must start with /");
            }
        }
        let period = self.duration_or(
            a.login_throttle_period.as_ref(),
            Duration::from_secs(15 * 60),
        );
        let attempts = |cx: &mut Self, n: &Option<config::Spanned<i64>>, default: u32| {
            let n = n
                .as_ref()
                .map_or(NonZeroU32::new(default).unwrap_or(NonZeroU32::MIN), |n| {
                    cx.count(n, "login attempts")
                });
            Quota::new(n, period, n)
        };
        let login_per_ip = attempts(self, &a.login_attempts_per_ip, 30);
        let login_per_email = attempts(self, &a.login_attempts_per_email, 10);
        Auth {
            login_per_ip,
            login_per_email,
            issuer: text(&a.issuer, "keygate"),
            audience: text(&a.audience, "api"),
            token_ttl: self.duration_or(a.token_ttl.as_ref(), Duration::from_secs(24 * 3600)),
            refresh_ttl: self.duration_or(a.refresh_ttl.as_ref(), Duration::from_secs(30 * 86400)),
            leeway: self.duration_or(a.leeway.as_ref(), Duration::from_secs(60)),
            token_path: text(&a.token_path, DEFAULT_TOKEN_PATH),
            refresh_path: text(&a.refresh_path, DEFAULT_REFRESH_PATH),
            revoke_path: text(&a.revoke_path, DEFAULT_REVOKE_PATH),
            default_access,
            api_key_header,
            self_service: None,
        }
    }

    pub(super) fn jwt_keys(&mut self, keys: &[config::Spanned<config::JwtKey>]) -> Option<JwtKeys> {
        let mut out = Vec::new();
        let mut signer = None;
        let mut kids = HashSet::new();
        for key in keys {
            let k = key.get_ref();
            if k.kid.get_ref().is_empty() {
                self.d.error(k.kid.span(), "kid must not be empty");
            } else if !kids.insert(k.kid.get_ref().as_str()) {
                self.d
                    .error(k.kid.span(), format!("duplicate kid {:?}", k.kid.get_ref()));
            }
            if k.sign {
                if signer.is_some() {
                    self.d.error(
                        key.span(),
                        "only one [[auth.keys]] entry may have sign = true",
                    );
                }
                signer = Some(out.len());
            }
            if let Some(compiled) = self.jwt_key(k) {
                out.push(compiled);
            } else if k.sign {
                signer = None;
            }
        }
        if keys.is_empty() {
            self.d.error_at_start(
                "no [[auth.keys]]: at least one JWT key with sign = true is required",
            );
            return None;
        }
        if signer.is_none() && !keys.iter().any(|k| k.get_ref().sign) {
            self.d.error(
                keys[0].span(),
                "no signing key: mark one [[auth.keys]] entry with sign = true",
            );
        }
        Some(JwtKeys {
            keys: out,
            signer: signer?,
        })
    }

    pub(super) fn jwt_key(&mut self, k: &config::JwtKey) -> Option<JwtKey> {
        let algorithm = match k.algorithm.get_ref().as_str() {
            "HS256" => Algorithm::HS256,
            "HS384" => Algorithm::HS384,
            "HS512" => Algorithm::HS512,
            "EdDSA" => Algorithm::EdDSA,
            "ES256" => Algorithm::ES256,
            "RS256" => Algorithm::RS256,
            other => {
                self.d.error(
                    k.algorithm.span(),
                    format!("unsupported algorithm {other:?} (expected HS256, HS384, HS512, EdDSA, ES256 or RS256)"),
                );
                return None;
            }
        };
        let mut mac = None;
        let (decoding, encoding) = match algorithm {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                for pem in [&k.private_key_file, &k.public_key_file]
                    .into_iter()
                    .flatten()
                {
                    self.d.error(
                        pem.span(),
                        "PEM key files are for EdDSA, ES256 and RS256; HMAC keys take secret_env, secret_file or secret",
                    );
                }
                let secret = self.secret(
                    k.kid.span(),
                    &k.secret_env,
                    &k.secret_file,
                    &k.secret,
                    "an HMAC key",
                )?;
                // RFC 7518 §3.2: a key at least as long as the hash output.
                let min = match algorithm {
                    Algorithm::HS256 => 32,
                    Algorithm::HS384 => 48,
                    _ => 64,
                };
                if secret.len() < min {
                    self.d.error(
                        k.kid.span(),
                        format!(
                            "the {:?} secret is {} bytes; {:?} needs at least {min} (RFC 7518 §3.2)",
                            k.kid.get_ref(),
                            secret.len(),
                            algorithm
                        ),
                    );
                    return None;
                }
                mac = Mac::new(algorithm, &secret);
                let keys = DecodingKey::from_secret(&secret).and_then(|d| {
                    let e = if k.sign {
                        Some(EncodingKey::from_secret(&secret)?)
                    } else {
                        None
                    };
                    Ok((d, e))
                });
                match keys {
                    Ok(keys) => keys,
                    Err(e) => {
                        self.d
                            .error(k.kid.span(), format!("unusable HMAC secret: {e}"));
                        return None;
                    }
                }
            }
            _ => {
                for s in [&k.secret_env, &k.secret_file, &k.secret]
                    .into_iter()
                    .flatten()
                {
                    self.d.error(
                        s.span(),
                        "asymmetric keys take public_key_file (and private_key_file to sign), not a secret",
                    );
                }
                let Some(public) = &k.public_key_file else {
                    self.d.error(
                        k.kid.span(),
                        "an asymmetric key needs public_key_file (PEM)",
                    );
                    return None;
                };
                let pem = self.read_file(public)?;
                let decoding = match algorithm {
                    Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
                    Algorithm::ES256 => DecodingKey::from_ec_pem(&pem),
                    _ => DecodingKey::from_rsa_pem(&pem),
                };
                let decoding = match decoding {
                    Ok(d) => d,
                    Err(e) => {
                        self.d.error(
                            public.span(),
                            format!("not a {algorithm:?} public key in PEM form: {e}"),
                        );
                        return None;
                    }
                };
                let encoding = match (&k.private_key_file, k.sign) {
                    (None, true) => {
                        self.d.error(
                            k.kid.span(),
                            "a signing asymmetric key needs private_key_file (PEM)",
                        );
                        return None;
                    }
                    (None, false) => None,
                    (Some(private), _) => {
                        let pem = self.read_file(private)?;
                        let encoding = match algorithm {
                            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
                            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
                            _ => EncodingKey::from_rsa_pem(&pem),
                        };
                        match encoding {
                            Ok(e) => Some(e),
                            Err(e) => {
                                self.d.error(
                                    private.span(),
                                    format!("not a {algorithm:?} private key in PEM form: {e}"),
                                );
                                return None;
                            }
                        }
                    }
                };
                (decoding, encoding.filter(|_| k.sign))
            }
        };
        Some(JwtKey {
            kid: k.kid.get_ref().as_str().into(),
            algorithm,
            decoding,
            encoding,
            mac,
        })
    }
}

/// The JWK set of every asymmetric key (HMAC secrets are never published).
pub(super) fn jwks_document(keys: &JwtKeys) -> String {
    use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
    let keys = keys
        .keys
        .iter()
        .filter(|k| {
            !matches!(
                k.algorithm,
                Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
            )
        })
        .filter_map(|k| {
            let mut jwk = Jwk::from_decoding_key(&k.decoding, Some(k.algorithm)).ok()?;
            jwk.common.key_id = Some(k.kid.to_string());
            jwk.common.public_key_use = Some(PublicKeyUse::Signature);
            Some(jwk)
        })
        .collect();
    serde_json::to_string(&JwkSet { keys }).unwrap_or_else(|_| r#"{"keys":[]}"#.to_string())
}
