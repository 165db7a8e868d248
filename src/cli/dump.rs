//! `keygate config dump`: what keygate reads and what it makes of it, as
//! `nginx -T` does — every file of the configuration (the main file, then
//! its includes) with inline secrets redacted, then the effective settings
//! with every default filled in. The file must pass `check` first.

use std::fmt::Write;
use std::path::Path;

use anyhow::bail;

use crate::config::include;
use crate::policy::{Policy, Rate, StateBackend};

/// Keys whose values are never printed, wherever they stand: a table, an
/// inline table, an array of tables, a multi-line string.
const SECRET_KEYS: [&str; 6] = [
    "secret",
    "password",
    "password_hash",
    "token",
    "record_key",
    "sentinel_password",
];

/// `src` (one configuration file) with every secret value replaced by
/// `"<redacted>"` and every URL's password by `***`. Found by key path in
/// the parsed document, not by line, so no layout hides one; a file that
/// does not parse is not printed at all.
pub fn redact(src: &str) -> Result<String, String> {
    let doc = toml::de::DeTable::parse(src).map_err(|e| e.message().to_string())?;
    let mut edits = Vec::new();
    walk(doc.get_ref(), &mut edits);
    edits.sort_by_key(|(span, _)| span.start);
    let mut out = String::with_capacity(src.len());
    let mut at = 0;
    for (span, with) in edits {
        if span.start < at {
            continue;
        }
        out.push_str(&src[at..span.start]);
        out.push_str(&with);
        at = span.end;
    }
    out.push_str(&src[at..]);
    Ok(out)
}

fn walk(table: &toml::de::DeTable<'_>, edits: &mut Vec<(std::ops::Range<usize>, String)>) {
    use toml::de::DeValue;
    for (key, value) in table {
        let name = key.get_ref().as_ref();
        if SECRET_KEYS.contains(&name) {
            edits.push((value.span(), "\"<redacted>\"".into()));
            continue;
        }
        match value.get_ref() {
            DeValue::Table(t) => walk(t, edits),
            DeValue::Array(items) => {
                for item in items {
                    if let DeValue::Table(t) = item.get_ref() {
                        walk(t, edits);
                    }
                }
            }
            DeValue::String(url) if name.ends_with("url") => {
                let shown = crate::policy::redact_url(url);
                if shown != *url {
                    edits.push((value.span(), toml_string(&shown)));
                }
            }
            _ => {}
        }
    }
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"<redacted>\"".into())
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
        match redact(&src) {
            Ok(shown) => text.push_str(&shown),
            Err(e) => bail!("{}: {e}", file.display()),
        }
        if !text.ends_with('\n') {
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
    line("upstream.url", u.endpoint.url.to_string());
    line("upstream.addr", u.endpoint.addr.to_string());
    line("upstream.connect_timeout", d(u.endpoint.connect_timeout));
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
    use super::redact;

    #[test]
    fn secrets_are_hidden_wherever_the_document_holds_them() {
        let src = r#"
secret = "hunter2"
[state]
url = "redis+unix:///run/r.sock?pass=unixpw&db=1"
password = '''
multi
line-pw'''
record_key = "rk-0123456789"
[[webhooks]]
path = "/h"
secret = { inline = "inline-table-pw" }
[[webhooks.more]]
secret = "nested-pw"
[tiny]
creds = { password = "inline-pw", url = "redis://u:userinfo-pw@h" }
list = [{ token = "in-array-pw" }]
# secret = "commented"
secret_env = "NAME_OF_A_VARIABLE"
"#;
        let shown = redact(src).unwrap();
        for leaked in [
            "hunter2",
            "unixpw",
            "line-pw",
            "rk-0123456789",
            "inline-table-pw",
            "nested-pw",
            "inline-pw",
            "userinfo-pw",
            "in-array-pw",
        ] {
            assert!(!shown.contains(leaked), "{leaked} shown:\n{shown}");
        }
        assert!(shown.contains("pass=***&db=1"), "{shown}");
        assert!(shown.contains("redis://u:***@h"), "{shown}");
        assert!(shown.contains("secret_env = \"NAME_OF_A_VARIABLE\""));
        // What is shown still parses, with the same keys.
        assert!(toml::de::DeTable::parse(&shown).is_ok(), "{shown}");
    }
}
