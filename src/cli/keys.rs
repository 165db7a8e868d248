//! `keygate keys create|list|revoke|roll`: the operator's key API on the
//! running instance's admin listener (so it works while keygate holds the
//! embedded store), with the admin token the configuration names.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// What `keygate keys` was asked to do.
pub enum Action {
    Create {
        user: String,
        name: String,
        permissions: Option<Vec<String>>,
        ip_allow: Option<Vec<String>>,
        expires_in: Option<String>,
    },
    List {
        user: String,
    },
    Revoke {
        id: String,
        user: Option<String>,
    },
    Roll {
        id: String,
        user: Option<String>,
        grace: Option<String>,
    },
}

/// Run `action` against the instance `config` describes; print the answer.
pub fn run(config: &Path, action: Action, out: &mut dyn Write) -> anyhow::Result<()> {
    let policy = super::load(config)?.policy;
    let admin = Admin {
        addr: reachable(policy.server.admin_listen),
        token: policy
            .server
            .admin_token
            .as_ref()
            .map(|t| String::from_utf8_lossy(t).into_owned()),
    };
    let owned_by = |user: &Option<String>, id: &str| -> anyhow::Result<()> {
        let Some(user) = user else { return Ok(()) };
        let list = admin.call("GET", &format!("/keys?user={}", encode(user)), None)?;
        let theirs = list["keys"]
            .as_array()
            .is_some_and(|keys| keys.iter().any(|k| k["id"] == id));
        if !theirs {
            bail!("{user} has no live key {id}");
        }
        Ok(())
    };
    let answer = match action {
        Action::Create {
            user,
            name,
            permissions,
            ip_allow,
            expires_in,
        } => {
            let mut body = json!({"user": user, "name": name});
            if let Some(p) = permissions {
                body["permissions"] = json!(p);
            }
            if let Some(n) = ip_allow {
                body["ip_allow"] = json!(n);
            }
            if let Some(e) = expires_in {
                body["expires_in"] = json!(e);
            }
            admin.call("POST", "/keys", Some(&body))?
        }
        Action::List { user } => {
            admin.call("GET", &format!("/keys?user={}", encode(&user)), None)?
        }
        Action::Revoke { id, user } => {
            owned_by(&user, &id)?;
            admin.call("DELETE", &format!("/keys/{id}"), None)?;
            json!({"revoked": id})
        }
        Action::Roll { id, user, grace } => {
            owned_by(&user, &id)?;
            let body = grace.map_or_else(|| json!({}), |g| json!({"grace": g}));
            admin.call("POST", &format!("/keys/{id}/roll"), Some(&body))?
        }
    };
    writeln!(out, "{}", serde_json::to_string_pretty(&answer)?)?;
    Ok(())
}

/// The admin listener as a client reaches it: a wildcard address is this host.
fn reachable(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, listen.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, listen.port()).into(),
        _ => listen,
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

struct Admin {
    addr: SocketAddr,
    token: Option<String>,
}

impl Admin {
    /// One request (HTTP/1.1, then close); the JSON answer, or the error
    /// keygate gave as the message.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
            .with_context(|| {
                format!(
                    "is keygate running? its admin listener {} did not answer",
                    self.addr
                )
            })?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\ncontent-length: {}\r\n",
            self.addr,
            body.len()
        );
        if !body.is_empty() {
            head.push_str("content-type: application/json\r\n");
        }
        if let Some(t) = &self.token {
            head.push_str(&format!("authorization: Bearer {t}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(body.as_bytes())?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        let (status, answer) =
            parse_answer(&raw).context("the admin listener's answer is malformed")?;
        let json: Value = if answer.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&answer).context("the admin listener's answer is not JSON")?
        };
        if !(200..300).contains(&status) {
            let message = json["error"]["message"].as_str().unwrap_or("(no message)");
            let code = json["error"]["code"].as_str().unwrap_or("error");
            bail!("{status} {code}: {message}");
        }
        Ok(json)
    }
}

/// Status and body of a whole HTTP/1.1 answer (Content-Length, chunked, or
/// delimited by the close).
fn parse_answer(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    let rest = &raw[end + 4..];
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Some((status, rest.to_vec()));
    }
    let mut body = Vec::new();
    let mut at = rest;
    loop {
        let line_end = at.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&at[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        at = &at[line_end + 2..];
        if size == 0 {
            return Some((status, body));
        }
        body.extend_from_slice(at.get(..size)?);
        at = at.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_with_either_framing() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_answer(plain), Some((200, b"{}".to_vec())));
        let chunked = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{\"\r\n3\r\na\":\r\n2\r\n1}\r\n0\r\n\r\n";
        assert_eq!(parse_answer(chunked), Some((201, b"{\"a\":1}".to_vec())));
        assert_eq!(parse_answer(b"garbage"), None);
        assert_eq!(encode("a@b.c"), "a%40b.c");
    }
}
