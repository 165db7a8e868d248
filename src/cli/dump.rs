//! `keygate config dump`: what keygate reads and what it makes of it, as
//! `nginx -T` does — every file of the configuration (the main file, then
//! its includes) with inline secrets redacted, then the effective settings
//! with every default filled in. The file must pass `check` first.

use std::fmt::Write;
use std::path::Path;

use anyhow::bail;

use crate::config::include;
use crate::policy::{Policy, Rate, StateBackend};

/// Keys whose inline values are never printed.
const SECRET_KEYS: [&str; 4] = ["secret", "password", "password_hash", "token"];

/// One line with an inline secret's value (or a URL's password) hidden.
pub fn redact_line(line: &str) -> String {
    let Some((key, _)) = line.split_once('=') else {
        return line.to_string();
    };
    let name = key.trim();
    if name.starts_with('#') {
        return line.to_string();
    }
    if SECRET_KEYS.contains(&name) {
        return format!("{key}= \"<redacted>\"");
    }
    if name == "url" {
        return crate::policy::redact_url(line);
    }
    line.to_string()
}

pub fn run(path: &Path, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let compiled = match crate::policy::compile_file(path) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            bail!("{}: fix these first (keygate check)", path.display());
        }
    };
    let mut text = String::new();
    for file in include::files(path) {
        let _ = writeln!(
            text,
            "# ---- {} (as read; secrets redacted)",
            file.display()
        );
        let src = std::fs::read_to_string(&file)?;
        for line in src.lines() {
            text.push_str(&redact_line(line));
            text.push('\n');
        }
        text.push('\n');
    }
    text.push_str(&effective(&compiled.policy));
    out.write_all(text.as_bytes())?;
    Ok(())
}

/// The settings in force, defaults included, as comment lines.
fn effective(p: &Policy) -> String {
    let d = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let s = &p.server;
    let mut o = String::from("# ---- effective settings (defaults filled in)\n");
    let mut line = |k: &str, v: String| {
        let _ = writeln!(o, "# {k} = {v}");
    };
    line("server.listen", s.listen.to_string());
    line("server.admin_listen", s.admin_listen.to_string());
    line("server.threads", s.threads.to_string());
    line("server.state_dir", s.state_dir.display().to_string());
    line("server.grace_period", d(s.grace_period));
    line("server.upgrades", format!("{:?}", s.upgrades));
    line(
        "server.underscore_headers",
        format!("{:?}", s.underscore_headers),
    );
    line(
        "server.admin_token",
        if s.admin_token.is_some() {
            "set"
        } else {
            "none"
        }
        .into(),
    );
    match &s.tls {
        None => line("server.tls", "off (plain TCP)".into()),
        Some(t) => {
            line("server.tls", t.summary.clone());
            for c in &t.certs {
                line(
                    &format!("server.tls.cert[{}]", c.name),
                    format!(
                        "{} names {:?}, expires {}",
                        c.subject,
                        c.dns_names,
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH
                                + std::time::Duration::from_secs(c.not_after.max(0) as u64)
                        )
                    ),
                );
            }
            line("server.tls.handshake_timeout", d(t.handshake_timeout));
            line(
                "server.tls.redirect_listen",
                t.redirect_listen.map_or("none".into(), |a| a.to_string()),
            );
            line(
                "server.tls.hsts",
                t.hsts.as_deref().unwrap_or("not sent").to_string(),
            );
        }
    }
    line("log.access", format!("{:?}", p.log.access));
    line("log.level", p.log.level.clone());
    let u = &p.upstream;
    line("upstream.url", u.url.to_string());
    line("upstream.addr", u.addr.to_string());
    line("upstream.connect_timeout", d(u.connect_timeout));
    line("upstream.read_timeout", d(u.read_timeout));
    line(
        "upstream.forward_credentials",
        u.forward_credentials.to_string(),
    );
    let a = &p.auth;
    line("auth.issuer", a.issuer.clone());
    line("auth.audience", a.audience.clone());
    line("auth.token_ttl", d(a.token_ttl));
    line("auth.refresh_ttl", d(a.refresh_ttl));
    line("auth.leeway", d(a.leeway));
    line("auth.token_path", a.token_path.clone());
    line("auth.refresh_path", a.refresh_path.clone());
    line("auth.revoke_path", a.revoke_path.clone());
    line("auth.default_access", format!("{:?}", a.default_access));
    line("auth.api_key_header", a.api_key_header.to_string());
    for t in &p.tiers {
        let rate = match &t.rate {
            Rate::Unlimited => "unlimited".to_string(),
            Rate::Limited(q) => format!(
                "{} per {}, burst {}",
                q.limit,
                humantime::format_duration(q.period),
                q.burst
            ),
        };
        line(&format!("tiers.{}", t.name), rate);
    }
    match &p.state {
        StateBackend::Embedded => line("state.backend", "embedded".into()),
        StateBackend::Redis(r) => {
            line("state.backend", "redis".into());
            line("state.url", r.display_url.clone());
            line("state.key_prefix", r.key_prefix.to_string());
            line("state.timeout", d(r.timeout));
            line("state.connect_timeout", d(r.connect_timeout));
            line("state.on_error_limits", format!("{:?}", r.on_error_limits));
            line("state.fleet_size", r.fleet_size.to_string());
        }
    }
    line("policy", p.counts().to_string());
    o
}

#[cfg(test)]
mod tests {
    use super::redact_line;

    #[test]
    fn inline_secrets_and_url_passwords_are_hidden() {
        assert_eq!(
            redact_line("secret = \"hunter2\""),
            "secret = \"<redacted>\""
        );
        assert_eq!(
            redact_line("  password = 'x'"),
            "  password = \"<redacted>\""
        );
        assert_eq!(
            redact_line("url = \"redis://:pw@h:6379\""),
            "url = \"redis://:***@h:6379\""
        );
        assert_eq!(redact_line("secret_env = \"X\""), "secret_env = \"X\"");
        assert_eq!(redact_line("# secret = \"x\""), "# secret = \"x\"");
    }
}
