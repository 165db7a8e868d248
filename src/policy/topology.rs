//! Where a fleet's Redis is: the `[state] url` parsed into a [`Topology`],
//! part of the policy. Connections to it are `state::topology`'s.
//!
//! | form | deployment |
//! |---|---|
//! | `redis://[user[:pw]@]host[:port][/db]` | one server |
//! | `rediss://…` | one server over TLS |
//! | `redis+unix:///path/redis.sock[?db=N]` | one server on a Unix socket |
//! | `redis+cluster://[user[:pw]@]host:port,host:port,…` | a Redis Cluster, from seed nodes (`rediss+cluster://` for TLS) |
//! | `redis+sentinel://[user[:pw]@]host:port,host:port,…/master-name[/db]` | the master that Sentinels name (`rediss+sentinel://` for TLS to the master) |

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo};

#[derive(Clone, Debug)]
pub enum Topology {
    Single(ConnectionInfo),
    Cluster(Vec<ConnectionInfo>),
    Sentinel {
        sentinels: Vec<ConnectionAddr>,
        master: String,
        db: i64,
        username: Option<String>,
        password: Option<String>,
        tls: bool,
    },
}

/// What a malformed URL gets. The parser's own messages may quote the URL,
/// password and all, so they are never shown.
pub const URL_FORMS: &str = "expected redis://[user[:password]@]host[:port][/db], rediss://…, \
     redis+unix:///path, redis+cluster://host:port,host:port,… or \
     redis+sentinel://host:port,…/master-name[/db]";

impl Topology {
    /// Parse `url`; `password` (from `password_env`/`password_file`) wins
    /// over one in the URL.
    pub fn parse(url: &str, password: Option<&str>) -> Result<Topology, String> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| URL_FORMS.to_string())?;
        let with_password = |mut info: ConnectionInfo| {
            if let Some(p) = password {
                let redis = info.redis_settings().clone().set_password(p);
                info = info.set_redis_settings(redis);
            }
            info
        };
        let single = |url: &str| -> Result<ConnectionInfo, String> {
            url.into_connection_info()
                .map(with_password)
                .map_err(|_| URL_FORMS.to_string())
        };
        match scheme {
            "redis" | "rediss" | "redis+unix" | "unix" => Ok(Topology::Single(single(url)?)),
            "redis+cluster" | "rediss+cluster" => {
                let node_scheme = if scheme.starts_with("rediss") {
                    "rediss"
                } else {
                    "redis"
                };
                let (userinfo, hosts, path) = split_authority(rest);
                if !path.is_empty() && path != "/" {
                    return Err(
                        "a cluster url has no database or path: Redis Cluster has only db 0".into(),
                    );
                }
                let nodes = hosts
                    .split(',')
                    .map(|h| single(&format!("{node_scheme}://{userinfo}{h}")))
                    .collect::<Result<Vec<_>, _>>()?;
                if nodes.is_empty() || hosts.is_empty() {
                    return Err("a cluster url needs at least one seed node".into());
                }
                Ok(Topology::Cluster(nodes))
            }
            "redis+sentinel" | "rediss+sentinel" => {
                let (userinfo, hosts, path) = split_authority(rest);
                let mut parts = path.trim_start_matches('/').split('/');
                let master = parts.next().unwrap_or("").to_string();
                if master.is_empty() {
                    return Err("a sentinel url names the master: redis+sentinel://host:port,…/master-name[/db]".into());
                }
                let db = match parts.next() {
                    None | Some("") => 0,
                    // Not quoted: a password with a '/' in it would land here.
                    Some(d) => d.parse().map_err(|_| {
                        "the database after the master name must be a number".to_string()
                    })?,
                };
                if parts.next().is_some() {
                    return Err(URL_FORMS.into());
                }
                let sentinels = hosts
                    .split(',')
                    .map(|h| single(&format!("redis://{h}")).map(|i| i.addr().clone()))
                    .collect::<Result<Vec<_>, _>>()?;
                if hosts.is_empty() {
                    return Err("a sentinel url needs at least one sentinel".into());
                }
                // The user and password are the master's (Sentinels are
                // commonly run without one).
                let creds = single(&format!("redis://{userinfo}localhost"))?;
                Ok(Topology::Sentinel {
                    sentinels,
                    master,
                    db,
                    username: creds.redis_settings().username().map(str::to_string),
                    password: creds.redis_settings().password().map(str::to_string),
                    tls: scheme.starts_with("rediss"),
                })
            }
            _ => Err(URL_FORMS.into()),
        }
    }

    pub fn uses_tls(&self) -> bool {
        match self {
            Topology::Single(i) => matches!(i.addr(), ConnectionAddr::TcpTls { .. }),
            Topology::Cluster(nodes) => nodes
                .iter()
                .any(|i| matches!(i.addr(), ConnectionAddr::TcpTls { .. })),
            Topology::Sentinel { tls, .. } => *tls,
        }
    }

    pub fn holds_password(&self) -> bool {
        match self {
            Topology::Single(i) => i.redis_settings().password().is_some(),
            Topology::Cluster(nodes) => nodes
                .iter()
                .any(|i| i.redis_settings().password().is_some()),
            Topology::Sentinel { password, .. } => password.is_some(),
        }
    }
}

/// `user:pw@h1:p1,h2:p2/path` → (`user:pw@`, `h1:p1,h2:p2`, `/path`).
fn split_authority(rest: &str) -> (&str, &str, &str) {
    let end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..], path),
        None => ("", authority, path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_form_parses() {
        assert!(matches!(
            Topology::parse("redis://127.0.0.1:6379/2", None),
            Ok(Topology::Single(_))
        ));
        assert!(Topology::parse("rediss://r.example:6380", None)
            .unwrap()
            .uses_tls());
        assert!(matches!(
            Topology::parse("redis+unix:///run/redis.sock", None),
            Ok(Topology::Single(_))
        ));
        match Topology::parse("redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:7001", None) {
            Ok(Topology::Cluster(nodes)) => {
                assert_eq!(nodes.len(), 2);
                assert!(nodes
                    .iter()
                    .all(|n| n.redis_settings().password() == Some("pw")));
            }
            other => panic!("{other:?}"),
        }
        match Topology::parse("redis+sentinel://s1:26379,s2:26379/main/3", Some("pw")) {
            Ok(Topology::Sentinel {
                sentinels,
                master,
                db,
                password,
                tls,
                ..
            }) => {
                assert_eq!(sentinels.len(), 2);
                assert_eq!((master.as_str(), db, tls), ("main", 3, false));
                // password_env/password_file is the master's password.
                assert_eq!(password.as_deref(), Some("pw"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_urls_are_refused_without_echoing_them() {
        for bad in [
            "http://h:6379",
            "redis+cluster://",
            "redis+cluster://h:1,h:2/3",
            "redis+sentinel://s1:26379",
            "redis+sentinel://s1:26379/main/x",
            "redis://s3cret@h:notaport",
            "localhost:6379",
        ] {
            let e = Topology::parse(bad, None).expect_err(bad);
            assert!(!e.contains("s3cret"), "{e}");
        }
    }
}
