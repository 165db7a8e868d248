//! Address sets built from CIDR lists.

use std::net::IpAddr;

use ipnet::IpNet;

/// A set of networks. Lists in policy files are short, so a linear scan over
/// a flat slice beats anything cleverer.
#[derive(Debug, Clone, Default)]
pub struct IpSet {
    nets: Box<[IpNet]>,
}

impl IpSet {
    pub fn new(nets: Vec<IpNet>) -> IpSet {
        IpSet {
            nets: nets.into_iter().map(|n| n.trunc()).collect(),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|n| n.contains(&ip))
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }
}

/// An allowlist: empty means everyone.
#[derive(Debug, Clone, Default)]
pub struct Allowlist(pub IpSet);

impl Allowlist {
    pub fn permits(&self, ip: IpAddr) -> bool {
        self.0.is_empty() || self.0.contains(ip)
    }

    pub fn is_restricted(&self) -> bool {
        !self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(nets: &[&str]) -> IpSet {
        IpSet::new(nets.iter().map(|n| n.parse().unwrap()).collect())
    }

    #[test]
    fn ipv4_mapped_ipv6_matches_ipv4_networks() {
        let s = set(&["10.0.0.0/8"]);
        assert!(s.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!s.contains("::ffff:11.1.2.3".parse().unwrap()));
    }

    #[test]
    fn empty_allowlist_permits_everyone() {
        assert!(Allowlist::default().permits("203.0.113.9".parse().unwrap()));
        let a = Allowlist(set(&["198.51.100.7/32"]));
        assert!(a.permits("198.51.100.7".parse().unwrap()));
        assert!(!a.permits("198.51.100.8".parse().unwrap()));
    }

    #[test]
    fn host_bits_in_a_network_are_ignored() {
        assert!(set(&["192.168.1.77/24"]).contains("192.168.1.3".parse().unwrap()));
    }
}
