//! `[upstream]`: where forwarded requests go, and how long they may take.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use super::super::Upstream;
use super::*;
use crate::config::{self};

impl Cx<'_> {
    pub(super) fn upstream(&mut self, u: &config::Upstream) -> Option<Upstream> {
        let span = u.url.span();
        let uri: http::Uri = match u.url.get_ref().parse() {
            Ok(uri) => uri,
            Err(e) => {
                self.d.error(span, format!("invalid upstream url: {e}"));
                return None;
            }
        };
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                self.d
                    .error(span, "the upstream url must start with http:// or https://");
                return None;
            }
        };
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            self.d.error(
                span.clone(),
                "the upstream url must not have a path: requests are forwarded with their own path",
            );
        }
        let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let addr = match host.parse::<IpAddr>() {
            Ok(ip) => Some(SocketAddr::new(ip, port)),
            Err(_) => match (host, port).to_socket_addrs() {
                Ok(mut addrs) => addrs.next(),
                Err(e) => {
                    self.d.error(
                        span.clone(),
                        format!("cannot resolve upstream host {host:?}: {e}"),
                    );
                    return None;
                }
            },
        };
        let Some(addr) = addr else {
            self.d
                .error(span, format!("upstream host {host:?} has no address"));
            return None;
        };
        let authority = uri.authority().map_or(host, |a| a.as_str()).into();
        Some(Upstream {
            endpoint: crate::http1::Endpoint {
                url: u.url.get_ref().as_str().into(),
                addr,
                tls,
                sni: if tls { host.to_string() } else { String::new() },
                connect_timeout: self
                    .duration_or(u.connect_timeout.as_ref(), Duration::from_secs(2)),
            },
            authority,
            read_timeout: self.duration_or(u.read_timeout.as_ref(), Duration::from_secs(60)),
            forward_credentials: u.forward_credentials,
        })
    }
}
