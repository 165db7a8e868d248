//! `[state]`: the embedded store, or Redis for a fleet (its url, secrets,
//! TLS, Sentinel access, record keys and failure policy).

use std::num::NonZeroU32;
use std::time::Duration;

use super::super::topology::Topology;
use super::super::{OnError, RedisSettings, SentinelAccess, StateBackend};
use super::*;
use crate::config::{self};

impl Cx<'_> {
    pub(super) fn state(&mut self, s: &config::State) -> Option<StateBackend> {
        let redis = match s.backend.as_ref().map(|b| (b.get_ref().as_str(), b.span())) {
            None | Some(("embedded", _)) => false,
            Some(("redis", _)) => true,
            Some((other, span)) => {
                self.d.error(
                    span,
                    format!("unknown state backend {other:?} (expected embedded or redis)"),
                );
                return None;
            }
        };
        if !redis {
            let redis_only = [&s.url, &s.password_env, &s.password_file, &s.password]
                .into_iter()
                .chain([
                    &s.key_prefix,
                    &s.timeout,
                    &s.connect_timeout,
                    &s.on_error_limits,
                    &s.tls_ca_file,
                    &s.token_timeout,
                    &s.record_key_env,
                    &s.record_key_file,
                    &s.record_key,
                    &s.previous_record_key_env,
                    &s.previous_record_key_file,
                    &s.sentinel_username,
                    &s.sentinel_password_env,
                    &s.sentinel_password_file,
                    &s.sentinel_password,
                ])
                .flatten()
                .map(|f| f.span())
                .chain(s.fleet_size.as_ref().map(|f| f.span()))
                .chain(s.sentinel_tls.as_ref().map(|f| f.span()))
                .chain(s.accept_unsigned_records.as_ref().map(|f| f.span()))
                .next();
            if let Some(span) = redis_only {
                self.d
                    .error(span, "this setting is for backend = \"redis\"");
            }
            return Some(StateBackend::Embedded);
        }
        let Some(url) = &s.url else {
            self.d.error(
                s.backend.as_ref().map_or(0..0, |b| b.span()),
                "backend = \"redis\" needs a url (redis://host:port/db)",
            );
            return None;
        };
        let text = url.get_ref();
        // redis-rs reads a `#insecure` fragment as "accept any certificate".
        if text.contains('#') {
            self.d.error(
                url.span(),
                "a Redis url takes no #fragment (#insecure would turn certificate checks off; \
                 give tls_ca_file for a private CA instead)",
            );
            return None;
        }
        // Parsed once here without the password for the warning, and again
        // below with it.
        match Topology::parse(text, None) {
            Ok(t) if t.holds_password() => {
                self.d.warn(
                    url.span(),
                    "the url holds a password (shown as *** in logs and config dump): \
                     prefer password_env or password_file",
                );
            }
            Ok(_) => {}
            Err(why) => {
                self.d
                    .error(url.span(), format!("invalid Redis url: {why}"));
                return None;
            }
        }
        let password = if [&s.password_env, &s.password_file, &s.password]
            .iter()
            .any(|p| p.is_some())
        {
            let owner = url.span();
            let bytes = self.secret(
                owner,
                &s.password_env,
                &s.password_file,
                &s.password,
                "the Redis password",
            )?;
            match String::from_utf8(bytes) {
                Ok(p) => Some(p.trim_end_matches(['\r', '\n']).to_string()),
                Err(_) => {
                    self.d.error(url.span(), "the Redis password is not UTF-8");
                    return None;
                }
            }
        } else {
            None
        };
        let key_prefix: Box<str> = match &s.key_prefix {
            None => "keygate".into(),
            Some(p)
                if !p.get_ref().is_empty() && p.get_ref().bytes().all(|b| b.is_ascii_graphic()) =>
            {
                p.get_ref().as_str().into()
            }
            Some(p) => {
                self.d.error(
                    p.span(),
                    "key_prefix must be printable ASCII without spaces",
                );
                "keygate".into()
            }
        };
        let on_error_limits = match s.on_error_limits.as_ref() {
            None => OnError::Local,
            Some(o) => {
                match o.get_ref().as_str() {
                    "local" => OnError::Local,
                    "open" => OnError::Open,
                    "closed" => OnError::Closed,
                    other => {
                        self.d.error(
                        o.span(),
                        format!("unknown on_error_limits {other:?} (expected local, open or closed)"),
                    );
                        OnError::Local
                    }
                }
            }
        };
        let topology = match Topology::parse(text, password.as_deref()) {
            Ok(t) => t,
            Err(why) => {
                self.d
                    .error(url.span(), format!("invalid Redis url: {why}"));
                return None;
            }
        };
        let tls_to_sentinels = s.sentinel_tls.as_ref().is_some_and(|t| *t.get_ref());
        let tls_ca = match &s.tls_ca_file {
            None => None,
            Some(_) if !topology.uses_tls() && !tls_to_sentinels => {
                let span = s.tls_ca_file.as_ref().map_or(0..0, |f| f.span());
                self.d.error(
                    span,
                    "tls_ca_file is for a TLS url (rediss://, rediss+cluster://, rediss+sentinel://) \
                     or sentinel_tls = true",
                );
                None
            }
            Some(f) => match self.read_file(f) {
                Some(pem) if pem.windows(11).any(|w| w == b"-----BEGIN ") => Some(pem),
                Some(_) => {
                    self.d
                        .error(f.span(), "tls_ca_file holds no PEM certificate");
                    None
                }
                None => None,
            },
        };
        let record_key = self.secret(
            s.backend.as_ref().map_or(0..0, |b| b.span()),
            &s.record_key_env,
            &s.record_key_file,
            &s.record_key,
            "[state] record_key (the HMAC key of refresh families in Redis, \
             at least 32 bytes: `openssl rand -hex 32`; record_key_env, record_key_file or record_key)",
        )?;
        if record_key.len() < 32 {
            let span = [&s.record_key_env, &s.record_key_file, &s.record_key]
                .into_iter()
                .flatten()
                .map(|f| f.span())
                .next()
                .unwrap_or(0..0);
            self.d.error(
                span,
                format!(
                    "record_key is {} bytes; it must be at least 32 (`openssl rand -hex 32`)",
                    record_key.len()
                ),
            );
            return None;
        }
        let previous_record_key =
            if s.previous_record_key_env.is_some() || s.previous_record_key_file.is_some() {
                let key = self.secret(
                url.span(),
                &s.previous_record_key_env,
                &s.previous_record_key_file,
                &None,
                "[state] previous_record_key (previous_record_key_env or previous_record_key_file)",
            )?;
                Some(key.into_boxed_slice())
            } else {
                None
            };
        let is_sentinel = matches!(topology, Topology::Sentinel { .. });
        let sentinel_fields = [
            &s.sentinel_username,
            &s.sentinel_password_env,
            &s.sentinel_password_file,
            &s.sentinel_password,
        ];
        if !is_sentinel {
            let span = sentinel_fields
                .iter()
                .copied()
                .flatten()
                .map(|f| f.span())
                .chain(s.sentinel_tls.as_ref().map(|f| f.span()))
                .next();
            if let Some(span) = span {
                self.d
                    .error(span, "this setting is for a redis+sentinel:// url");
            }
        }
        let sentinel_password = if is_sentinel
            && [
                &s.sentinel_password_env,
                &s.sentinel_password_file,
                &s.sentinel_password,
            ]
            .iter()
            .any(|p| p.is_some())
        {
            let bytes = self.secret(
                url.span(),
                &s.sentinel_password_env,
                &s.sentinel_password_file,
                &s.sentinel_password,
                "the Sentinels' password",
            )?;
            match String::from_utf8(bytes) {
                Ok(p) => Some(p),
                Err(_) => {
                    self.d
                        .error(url.span(), "the Sentinels' password is not UTF-8");
                    return None;
                }
            }
        } else {
            None
        };
        let sentinel = SentinelAccess {
            username: s.sentinel_username.as_ref().map(|u| u.get_ref().clone()),
            password: sentinel_password,
            tls: s
                .sentinel_tls
                .as_ref()
                .map_or(is_sentinel && topology.uses_tls(), |t| *t.get_ref()),
        };
        Some(StateBackend::Redis(Box::new(RedisSettings {
            display_url: crate::policy::redact_url(text),
            url: text.clone(),
            password,
            topology,
            tls_ca,
            key_prefix,
            record_key: record_key.into(),
            previous_record_key,
            accept_unsigned_records: s
                .accept_unsigned_records
                .as_ref()
                .is_some_and(|a| *a.get_ref()),
            sentinel,
            timeout: self.duration_or(s.timeout.as_ref(), Duration::from_millis(25)),
            connect_timeout: self.duration_or(s.connect_timeout.as_ref(), Duration::from_secs(1)),
            token_timeout: self.duration_or(s.token_timeout.as_ref(), Duration::from_secs(1)),
            on_error_limits,
            fleet_size: s
                .fleet_size
                .as_ref()
                .map_or(NonZeroU32::MIN, |n| self.count(n, "fleet_size")),
        })))
    }
}
