//! Who the client is: the socket peer, unless the peer is a trusted proxy, in
//! which case the right-most `X-Forwarded-For` entry that is not itself a
//! trusted proxy. Entries left of that are client-supplied and never believed.

use std::net::{IpAddr, SocketAddr};

use super::{header_text, HeaderSource};
use crate::policy::IpSet;

pub fn resolve<H: HeaderSource + ?Sized>(peer: IpAddr, headers: &H, trusted: &IpSet) -> IpAddr {
    let peer = peer.to_canonical();
    if !trusted.contains(peer) {
        return peer;
    }
    let mut current = peer;
    // Later headers were appended later: walk them, and each list, from the right.
    for value in headers.values("x-forwarded-for").rev() {
        let Some(list) = header_text(value) else {
            return current;
        };
        for entry in list.rsplit(',') {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            let Some(ip) = parse_entry(entry) else {
                // Garbage from the hop we trust least: stop at the last good one.
                return current;
            };
            current = ip;
            if !trusted.contains(ip) {
                return ip;
            }
        }
    }
    current
}

/// An address, optionally with a port (`1.2.3.4:5678`, `[2001:db8::1]:443`).
fn parse_entry(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;

    use super::*;

    fn trusted() -> IpSet {
        IpSet::new(vec!["10.0.0.0/8".parse().unwrap()])
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_it_claims() {
        let h = xff(&["198.51.100.1"]);
        assert_eq!(
            resolve(ip("203.0.113.5"), &h, &trusted()),
            ip("203.0.113.5")
        );
    }

    #[test]
    fn trusted_peer_yields_right_most_untrusted_entry() {
        let h = xff(&["1.1.1.1, 198.51.100.1, 10.0.0.2"]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted()), ip("198.51.100.1"));
    }

    #[test]
    fn several_headers_are_one_list_in_order() {
        let h = xff(&["1.1.1.1", "198.51.100.1", "10.0.0.3"]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted()), ip("198.51.100.1"));
    }

    #[test]
    fn all_trusted_yields_left_most() {
        let h = xff(&["10.9.9.9, 10.0.0.2"]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted()), ip("10.9.9.9"));
    }

    #[test]
    fn garbage_entry_stops_at_last_trusted_hop() {
        let h = xff(&["198.51.100.1, not-an-ip, 10.0.0.2"]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted()), ip("10.0.0.2"));
    }

    #[test]
    fn trusted_peer_without_header_is_the_client() {
        assert_eq!(
            resolve(ip("10.0.0.1"), &HeaderMap::new(), &trusted()),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn ports_and_mapped_addresses_are_understood() {
        let h = xff(&["[2001:db8::1]:443, ::ffff:198.51.100.9"]);
        assert_eq!(resolve(ip("10.0.0.1"), &h, &trusted()), ip("198.51.100.9"));
    }
}
