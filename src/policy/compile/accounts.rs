//! `[tiers.<name>]`, `[[users]]`, `[[api_keys]]` and `[[client_certs]]`: who may
//! call, under which limits, and the indexes requests look them up by.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::time::Duration;

use http::HeaderValue;

use super::super::{Allowlist, ApiKey, Permissions, Rate, Tier, TierIdx, User, UserIdx};
use super::values::{decode_sha256, is_token};
use super::*;
use crate::config::{self, Str};
use crate::limit::{account_id, Quota};

impl Cx<'_> {
    /// The index of `[[client_certs]]`, whose entries follow the API keys
    /// from `first` on.
    pub(super) fn client_certs(
        &mut self,
        certs: &[config::Spanned<config::ClientCert>],
        first: usize,
    ) -> crate::policy::ClientCertIndex {
        let mut index = crate::policy::ClientCertIndex::default();
        for (i, entry) in certs.iter().enumerate() {
            let c = entry.get_ref();
            let idx = (first + i) as crate::policy::KeyIdx;
            let given: Vec<&Str> = [&c.sha256, &c.subject, &c.san]
                .into_iter()
                .flatten()
                .collect();
            let Some(&how) = given.first() else {
                self.d.error(
                    entry.span(),
                    format!(
                        "client certificate {:?} needs one of sha256, subject or san",
                        c.id.get_ref()
                    ),
                );
                continue;
            };
            if given.len() > 1 {
                self.d.error(
                    given[1].span(),
                    "give one of sha256, subject or san, not several",
                );
                continue;
            }
            let text = how.get_ref();
            let taken = if c.sha256.is_some() {
                let hex: String = text.chars().filter(|&ch| ch != ':').collect();
                match decode_sha256(&hex) {
                    Some(h) => index.by_sha256.insert(h, idx).is_some(),
                    None => {
                        self.d.error(
                            how.span(),
                            "sha256 must be the certificate's SHA-256 fingerprint: 64 hex digits, colons allowed (openssl x509 -noout -fingerprint -sha256)",
                        );
                        continue;
                    }
                }
            } else if c.subject.is_some() {
                match super::super::normalize_subject(text) {
                    Some(n) => index.by_subject.insert(n, idx).is_some(),
                    None => {
                        self.d.error(
                            how.span(),
                            "subject must be a distinguished name like \"CN=billing,O=Example\"",
                        );
                        continue;
                    }
                }
            } else {
                // A URI (a SPIFFE id) or a DNS name, matched against the
                // certificate's names of that kind only.
                let san = if text.contains("://") {
                    format!("uri:{text}")
                } else {
                    format!("dns:{}", text.to_ascii_lowercase())
                };
                index.by_san.insert(san, idx).is_some()
            };
            if taken {
                self.d.error(
                    how.span(),
                    "another client certificate entry matches the same certificate",
                );
            }
        }
        index
    }

    pub(super) fn tiers(
        &mut self,
        tiers: &std::collections::BTreeMap<String, config::Spanned<config::Tier>>,
    ) -> (Vec<Tier>, HashMap<String, TierIdx>) {
        let mut out = Vec::new();
        let mut index = HashMap::new();
        for (name, t) in tiers {
            let span = t.span();
            let t = t.get_ref();
            if !is_token(name) {
                self.d.error(
                    span.clone(),
                    format!("tier name {name:?} may only use letters, digits, '-' and '_'"),
                );
            }
            let rate = if t.unlimited {
                for (field, present) in [
                    ("limit", t.limit.is_some()),
                    ("period", t.period.is_some()),
                    ("burst", t.burst.is_some()),
                ] {
                    if present {
                        self.d.error(
                            span.clone(),
                            format!("tier {name:?} is unlimited; remove {field}"),
                        );
                    }
                }
                Rate::Unlimited
            } else {
                let limit = match &t.limit {
                    None => {
                        self.d.error(
                            span.clone(),
                            format!("tier {name:?} needs limit (or unlimited = true)"),
                        );
                        NonZeroU32::MIN
                    }
                    Some(l) => self.count(l, "limit"),
                };
                let period = self.duration_or(t.period.as_ref(), Duration::from_secs(3600));
                let burst = t.burst.as_ref().map_or(limit, |b| self.count(b, "burst"));
                Rate::Limited(Quota::new(limit, period, burst))
            };
            let policy_header = match rate {
                Rate::Limited(q) => HeaderValue::from_str(&format!(
                    "\"{name}\";q={};w={}",
                    q.limit,
                    q.period.as_secs().max(1)
                ))
                .ok(),
                Rate::Unlimited => None,
            };
            index.insert(name.clone(), out.len() as TierIdx);
            out.push(Tier {
                name: name.as_str().into(),
                rate,
                header: HeaderValue::from_str(name).unwrap_or(HeaderValue::from_static("invalid")),
                policy_header,
            });
        }
        (out, index)
    }

    #[allow(clippy::type_complexity)]
    pub(super) fn users(
        &mut self,
        users: &[config::Spanned<config::User>],
        tiers: &HashMap<String, TierIdx>,
    ) -> (
        Vec<User>,
        HashMap<Box<str>, UserIdx>,
        HashMap<Box<str>, UserIdx>,
    ) {
        let mut out = Vec::new();
        let mut by_id = HashMap::new();
        let mut by_email = HashMap::new();
        for u in users {
            let u = u.get_ref();
            let email = u.email.get_ref().trim().to_ascii_lowercase();
            if !email.contains('@') || HeaderValue::from_str(&email).is_err() {
                self.d
                    .error(u.email.span(), format!("{email:?} is not an email address"));
            }
            let (id, id_span) = match &u.id {
                Some(id) => (id.get_ref().clone(), id.span()),
                None => (email.clone(), u.email.span()),
            };
            if id.is_empty() || HeaderValue::from_str(&id).is_err() || id.contains(',') {
                self.d.error(
                    id_span.clone(),
                    "a user id must be printable ASCII without commas",
                );
            }
            let idx = out.len() as UserIdx;
            if by_email
                .insert(email.clone().into_boxed_str(), idx)
                .is_some()
            {
                self.d
                    .error(u.email.span(), format!("duplicate user email {email:?}"));
            }
            if by_id.insert(id.clone().into_boxed_str(), idx).is_some() {
                self.d.error(id_span, format!("duplicate user id {id:?}"));
            }
            if let Some(hash) = &u.password_hash {
                self.password_hash(hash);
            }
            let tier = self.tier_ref(&u.tier, tiers);
            out.push(User {
                account: account_id("user", &id),
                id_header: HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("")),
                email_header: HeaderValue::from_str(&email).unwrap_or(HeaderValue::from_static("")),
                id: id.into(),
                email: email.into(),
                password_hash: u
                    .password_hash
                    .as_ref()
                    .map(|h| h.get_ref().as_str().into()),
                tier,
                permissions: self.permissions(&u.permissions),
                ip_allow: Allowlist(self.ip_set(&u.ip_allow)),
                disabled: u.disabled,
                tokens_valid_after: u
                    .tokens_valid_after
                    .as_ref()
                    .and_then(|t| self.timestamp(t)),
            });
        }
        (out, by_id, by_email)
    }

    pub(super) fn api_keys(
        &mut self,
        keys: Vec<config::Spanned<config::ApiKey>>,
        users: &[User],
        users_by_id: &HashMap<Box<str>, UserIdx>,
        users_by_email: &HashMap<Box<str>, UserIdx>,
        tiers: &HashMap<String, TierIdx>,
    ) -> (Vec<ApiKey>, HashMap<u64, crate::policy::KeyIdx>) {
        // Sized once: a policy may hold a million keys.
        let mut out = Vec::with_capacity(keys.len());
        let mut by_prefix: HashMap<u64, crate::policy::KeyIdx> = HashMap::with_capacity(keys.len());
        // Each entry is dropped once compiled, so the file's keys and the
        // policy's are not both whole in memory at once.
        let mut id_spans = Vec::with_capacity(keys.len());
        // Keys listing the same permissions under the same owner share one set.
        let mut sets: HashMap<(Vec<String>, Option<UserIdx>), Permissions> = HashMap::new();
        for entry in keys {
            let span = entry.span();
            let k = entry.into_inner();
            let id = k.id.get_ref();
            if id.is_empty() || HeaderValue::from_str(id).is_err() {
                self.d
                    .error(k.id.span(), "an API key id must be printable ASCII");
            }
            id_spans.push(k.id.span());
            let sha256 = match decode_sha256(k.sha256.get_ref()) {
                Some(h) => h,
                None => {
                    self.d.error(
                        k.sha256.span(),
                        "sha256 must be 64 hex digits (the SHA-256 of the whole key; `keygate new-api-key` prints it)",
                    );
                    [0; 32]
                }
            };
            let owner = k.user.as_ref().and_then(|u| {
                let name = u.get_ref().as_str();
                let found = users_by_id
                    .get(name)
                    .or_else(|| users_by_email.get(name.to_ascii_lowercase().as_str()))
                    .copied();
                if found.is_none() {
                    self.d.error(
                        u.span(),
                        format!("API key {id:?} names unknown user {name:?}"),
                    );
                }
                found
            });
            let tier = match (owner, &k.tier, &k.user) {
                (Some(o), None, _) => users[o as usize].tier,
                (_, Some(t), Some(_)) => {
                    self.d.error(
                        t.span(),
                        "a key owned by a user shares the user's tier and quota; remove tier",
                    );
                    0
                }
                (_, Some(t), None) => self.tier_ref(t, tiers),
                (None, None, Some(_)) => 0,
                (None, None, None) => {
                    self.d.error(
                        span.clone(),
                        format!("API key {id:?} has no user, so it needs a tier"),
                    );
                    0
                }
            };
            let permissions = match (&k.permissions, owner) {
                (None, Some(o)) => users[o as usize].permissions.clone(),
                (None, None) => Permissions::default(),
                (Some(listed), owner) => {
                    if let Some(o) = owner {
                        let owner = &users[o as usize];
                        for p in listed {
                            if !owner.permissions.contains(p.get_ref()) {
                                self.d.warn(
                                    p.span(),
                                    format!(
                                        "user {:?} does not hold {:?}; the key will not have it either",
                                        owner.id,
                                        p.get_ref()
                                    ),
                                );
                            }
                        }
                    }
                    let names: Vec<String> = listed.iter().map(|p| p.get_ref().clone()).collect();
                    match sets.get(&(names, owner)) {
                        Some(set) => {
                            for p in listed {
                                self.permission_name(p);
                            }
                            set.clone()
                        }
                        None => {
                            let set = match owner {
                                None => self.permissions(listed),
                                Some(o) => self
                                    .permissions(listed)
                                    .intersect(&users[o as usize].permissions),
                            };
                            let names = listed.iter().map(|p| p.get_ref().clone()).collect();
                            sets.insert((names, owner), set.clone());
                            set
                        }
                    }
                }
            };
            let idx = out.len() as crate::policy::KeyIdx;
            let prefix = hash_prefix(&sha256);
            if sha256 != [0; 32] {
                if let Some(other) = by_prefix.insert(prefix, idx) {
                    let other: &ApiKey = &out[other as usize];
                    let message = if other.sha256 == sha256 {
                        format!("API key {id:?} has the same sha256 as {:?}", other.id)
                    } else {
                        format!(
                            "API keys {id:?} and {:?} share the first 8 bytes of their hash; regenerate one",
                            other.id
                        )
                    };
                    self.d.error(k.sha256.span(), message);
                }
            }
            out.push(ApiKey {
                account: owner.map_or_else(|| account_id("key", id), |o| users[o as usize].account),
                id_header: HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("")),
                id: id.as_str().into(),
                sha256,
                owner,
                tier,
                permissions,
                ip_allow: Allowlist(self.ip_set(&k.ip_allow)),
                expires_at: k.expires_at.as_ref().and_then(|t| self.timestamp(t)),
                disabled: k.disabled,
            });
        }
        let mut ids = HashSet::with_capacity(out.len());
        for (key, span) in out.iter().zip(id_spans) {
            if !key.id.is_empty() && !ids.insert(&*key.id) {
                self.d
                    .error(span, format!("duplicate API key id {:?}", key.id));
            }
        }
        (out, by_prefix)
    }
}

/// A `[[client_certs]]` entry as the API key it is compiled like; its hash
/// is all zeros, which no key has and the key index skips.
pub(super) fn as_api_key(
    c: &config::Spanned<config::ClientCert>,
) -> config::Spanned<config::ApiKey> {
    let span = c.span();
    let c = c.get_ref();
    config::Spanned::new(
        span.clone(),
        config::ApiKey {
            id: c.id.clone(),
            sha256: config::Spanned::new(span, "0".repeat(64)),
            user: c.user.clone(),
            tier: c.tier.clone(),
            permissions: c.permissions.clone(),
            ip_allow: c.ip_allow.clone(),
            expires_at: c.expires_at.clone(),
            disabled: c.disabled,
        },
    )
}
