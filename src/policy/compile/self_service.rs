//! `[auth.self_service]`: where customers manage their own API keys and
//! account allowlist, and the bounds of what they may do.

use std::time::Duration;

use super::super::{Auth, SelfService};
use super::*;
use crate::config::{self, Str};

const DEFAULT_PATH: &str = "/api/v1/keys";
const DEFAULT_ACCOUNT_PATH: &str = "/api/v1/account/ip-allow";
const DEFAULT_PREFIX: &str = "kg_";
const DEFAULT_MAX_KEYS: u32 = 20;
const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_MAX_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);

impl Cx<'_> {
    /// `None` unless `enabled = true`; the section is checked either way.
    pub(super) fn self_service(
        &mut self,
        s: Option<&config::Spanned<config::SelfService>>,
        auth: &Auth,
    ) -> Option<SelfService> {
        let section = s?;
        let c = section.get_ref();
        let path = |cx: &mut Self, s: &Option<Str>, default: &str| -> Box<str> {
            let Some(s) = s else { return default.into() };
            let p = s.get_ref();
            if !p.starts_with('/') || p.len() < 2 {
                cx.d.error(s.span(), "a path must start with / and name something");
            } else if p.ends_with('/') {
                cx.d.error(s.span(), "write the path without a trailing /");
            } else if [&auth.token_path, &auth.refresh_path, &auth.revoke_path]
                .iter()
                .any(|t| t.as_str() == p)
            {
                cx.d.error(s.span(), "this path is already an [auth] endpoint");
            }
            p.as_str().into()
        };
        let keys_path = path(self, &c.path, DEFAULT_PATH);
        let account_path = path(self, &c.account_path, DEFAULT_ACCOUNT_PATH);
        if keys_path == account_path {
            let span = c.account_path.as_ref().map_or(section.span(), |p| p.span());
            self.d.error(span, "account_path must differ from path");
        }
        let key_prefix: Box<str> = match &c.key_prefix {
            None => DEFAULT_PREFIX.into(),
            Some(p) => {
                let text = p.get_ref();
                let fits = (2..=16).contains(&text.len())
                    && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if !fits {
                    self.d.error(
                        p.span(),
                        "key_prefix must be 2 to 16 letters, digits or _ (it starts every key, so secret scanners can find them)",
                    );
                }
                text.as_str().into()
            }
        };
        let max_keys_per_user = c.max_keys_per_user.as_ref().map_or(DEFAULT_MAX_KEYS, |n| {
            self.count(n, "max_keys_per_user").get()
        });
        let default_grace = self.grace(c.default_grace.as_ref(), DEFAULT_GRACE);
        let max_grace = self.grace(c.max_grace.as_ref(), DEFAULT_MAX_GRACE);
        if default_grace > max_grace {
            let span = c
                .default_grace
                .as_ref()
                .map_or(section.span(), |g| g.span());
            self.d.error(span, "default_grace is longer than max_grace");
        }
        c.enabled.then_some(SelfService {
            path: keys_path,
            account_path,
            key_prefix,
            max_keys_per_user,
            default_grace,
            max_grace,
        })
    }

    /// A grace period: zero is allowed (the old key stops at once).
    fn grace(&mut self, s: Option<&Str>, default: Duration) -> Duration {
        match s {
            Some(s) if s.get_ref().trim() == "0s" || s.get_ref().trim() == "0" => Duration::ZERO,
            other => self.duration_or(other, default),
        }
    }
}
