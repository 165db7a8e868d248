//! `[[routes]]`, `[[webhooks]]` and `[webhook_relay]`.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use http::Method;

use super::super::router::{RouteError, RouteSpec, Router};
use super::super::{Access, Rate, Route, Tier, TierIdx};
use super::values::without_line_end;
use super::*;
use crate::config;

impl Cx<'_> {
    pub(super) fn routes(
        &mut self,
        routes: &[config::Spanned<config::Route>],
        tiers: &HashMap<String, TierIdx>,
        tier_list: &[Tier],
    ) -> (Vec<Route>, Option<Router>) {
        let mut out = Vec::new();
        for entry in routes {
            let r = entry.get_ref();
            if !r.path.get_ref().starts_with('/') {
                self.d
                    .error(r.path.span(), "a route path must start with /");
            }
            let methods = r.methods.as_ref().map(|ms| {
                if ms.is_empty() {
                    self.d.error(
                        entry.span(),
                        "methods = [] matches nothing; leave it out to match every method",
                    );
                }
                ms.iter()
                    .filter_map(|m| {
                        let upper = m.get_ref().to_ascii_uppercase();
                        match Method::from_bytes(upper.as_bytes()) {
                            Ok(method) => Some(method),
                            Err(_) => {
                                self.d
                                    .error(m.span(), format!("invalid method {:?}", m.get_ref()));
                                None
                            }
                        }
                    })
                    .collect::<Vec<_>>()
            });
            let access = r
                .access
                .as_ref()
                .map_or(Some(Access::Authenticated), |a| self.access(a))
                .unwrap_or(Access::Authenticated);
            if access != Access::Authenticated && !r.permissions.is_empty() {
                self.d.error(
                    r.permissions[0].span(),
                    format!(
                        "permissions only apply to authenticated routes; this route is {}",
                        access.as_str()
                    ),
                );
            }
            for p in &r.permissions {
                self.permission_name(p);
            }
            let rate_tier = r.rate_tier.as_ref().map(|t| {
                if access != Access::Public {
                    self.d.error(
                        t.span(),
                        "rate_tier is for public routes; authenticated requests use their account's tier",
                    );
                }
                let idx = self.tier_ref(t, tiers);
                if tier_list.get(idx as usize).is_some_and(|t| t.rate == Rate::Unlimited) {
                    self.d.warn(t.span(), format!("tier {:?} is unlimited, so this limits nothing", t.get_ref()));
                }
                idx
            });
            out.push(Route {
                rate_tier,
                pattern: r.path.get_ref().as_str().into(),
                methods,
                access,
                permissions: r
                    .permissions
                    .iter()
                    .map(|p| p.get_ref().as_str().into())
                    .collect(),
            });
        }
        let specs: Vec<RouteSpec<'_>> = out
            .iter()
            .map(|r| RouteSpec {
                pattern: &r.pattern,
                methods: r.methods.as_deref(),
            })
            .collect();
        match Router::build(&specs) {
            Ok(router) => (out, Some(router)),
            Err(errors) => {
                for e in errors {
                    let (RouteError::Invalid { route, message }
                    | RouteError::Conflict { route, message }) = e;
                    self.d.error(routes[route].get_ref().path.span(), message);
                }
                (out, None)
            }
        }
    }

    pub(super) fn webhooks(
        &mut self,
        hooks: &[config::Spanned<config::Webhook>],
    ) -> Vec<crate::policy::Webhook> {
        let mut out: Vec<crate::policy::Webhook> = Vec::new();
        for entry in hooks {
            let w = entry.get_ref();
            let path = w.path.get_ref();
            if !path.starts_with('/') {
                self.d
                    .error(w.path.span(), "a webhook path must start with /");
            }
            if out.iter().any(|o| &*o.path == path.as_str()) {
                self.d
                    .error(w.path.span(), format!("duplicate webhook path {path:?}"));
            }
            let mut secrets = Vec::new();
            let envs = w
                .secret_env
                .iter()
                .flat_map(|e| e.names())
                .map(|n| (n, entry.span()))
                .chain(
                    w.secrets_env
                        .iter()
                        .map(|n| (n.get_ref().as_str(), n.span())),
                );
            for (name, span) in envs {
                match self.secrets.env(name) {
                    Ok(v) if !v.is_empty() => secrets.push(v.into_bytes()),
                    Ok(_) => self
                        .d
                        .error(span, format!("environment variable {name} is empty")),
                    Err(e) => self.d.error(span, e),
                }
            }
            for file in w.secret_file.iter().flat_map(|f| f.names()) {
                match self.secrets.file(Path::new(file)) {
                    Ok(v) => secrets.push(without_line_end(v)),
                    Err(e) => self.d.error(entry.span(), e),
                }
            }
            if let Some(inline) = &w.secret {
                self.d.warn(
                    inline.span(),
                    "inline webhook secret: prefer secret_env or secret_file",
                );
                secrets.push(inline.get_ref().as_bytes().to_vec());
            }
            if secrets.is_empty()
                && w.secret_env.is_none()
                && w.secrets_env.is_empty()
                && w.secret_file.is_none()
            {
                self.d.error(
                    entry.span(),
                    "a webhook needs secret_env, secrets_env, secret_file or secret",
                );
            }
            let header = self.header_name(w.header.as_ref(), "x-webhook-signature");
            let max_body = self.max_body(&w.max_body);
            let timestamp = match (&w.timestamp_header, &w.tolerance) {
                (Some(h), tolerance) => Some((
                    self.header_name(Some(h), "x-webhook-timestamp"),
                    self.duration_or(tolerance.as_ref(), Duration::from_secs(300)),
                )),
                (None, Some(t)) => {
                    self.d.error(t.span(), "tolerance needs timestamp_header");
                    None
                }
                (None, None) => None,
            };
            out.push(crate::policy::Webhook {
                path: path.as_str().into(),
                secrets,
                header,
                max_body,
                timestamp,
            });
        }
        out
    }

    pub(super) fn relay(&mut self, r: &config::WebhookRelay) -> Option<crate::policy::Relay> {
        let listen = self.socket_addr(Some(&r.listen), "127.0.0.1:8091");
        let max_body = self.max_body(&r.max_body);
        let mut subscribers: Vec<crate::policy::Subscriber> = Vec::new();
        for entry in &r.subscribers {
            let s = entry.get_ref();
            let id = s.id.get_ref();
            if id.is_empty() || subscribers.iter().any(|o| &*o.id == id.as_str()) {
                self.d.error(
                    s.id.span(),
                    format!("subscriber id {id:?} is empty or used twice"),
                );
            }
            let prefix = match crate::policy::Destination::parse(s.url_prefix.get_ref()) {
                // A prefix without a path ("https://a.example") would let
                // "https://a.example.evil" through a plain string comparison;
                // comparing parsed parts needs the path to end in '/'.
                Some(p) if p.path.ends_with('/') => p,
                _ => {
                    self.d.error(
                        s.url_prefix.span(),
                        "url_prefix must be an http(s) URL whose path ends with /, like https://hooks.example.com/keygate/",
                    );
                    continue;
                }
            };
            let Some(secret) = self.secret(
                entry.span(),
                &s.secret_env,
                &s.secret_file,
                &s.secret,
                "a subscriber",
            ) else {
                continue;
            };
            subscribers.push(crate::policy::Subscriber {
                id: id.as_str().into(),
                prefix,
                secret,
                header: self.header_name(s.header.as_ref(), "x-webhook-signature"),
                timestamp_header: s
                    .timestamp_header
                    .as_ref()
                    .map(|h| self.header_name(Some(h), "x-webhook-timestamp")),
            });
        }
        Some(crate::policy::Relay {
            listen: listen?,
            max_body,
            timeout: self.duration_or(r.timeout.as_ref(), Duration::from_secs(10)),
            subscribers,
        })
    }
}
