//! `[[client_certs]]`: how a verified client certificate finds its
//! binding (by fingerprint, subject or subjectAltName).

use std::collections::HashMap;

use super::{KeyIdx, Policy};

/// How `[[client_certs]]` entries are found.
#[derive(Debug, Default)]
pub struct ClientCertIndex {
    pub by_sha256: HashMap<[u8; 32], KeyIdx>,
    /// Keyed by [`normalize_subject`].
    pub by_subject: HashMap<String, KeyIdx>,
    pub by_san: HashMap<String, KeyIdx>,
}

impl Policy {
    /// The binding of a verified client certificate: by fingerprint, then
    /// subject, then any of its subjectAltNames.
    pub fn client_cert(&self, sha256: &[u8; 32], subject: &str, sans: &[String]) -> Option<KeyIdx> {
        let c = &self.client_certs;
        c.by_sha256
            .get(sha256)
            .or_else(|| c.by_subject.get(subject))
            .or_else(|| sans.iter().find_map(|s| c.by_san.get(s.as_str())))
            .copied()
    }
}

/// A distinguished name as `K=V` pairs, sorted, keys upper case, joined by
/// commas: `CN=billing, O=Example` and `O=Example,CN=billing` are equal.
/// `None` when a part is not `K=V`.
pub fn normalize_subject(dn: &str) -> Option<String> {
    let mut parts = Vec::new();
    for part in dn.split([',', '+']) {
        let (k, v) = part.split_once('=')?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() {
            return None;
        }
        parts.push(format!("{}={v}", k.to_ascii_uppercase()));
    }
    parts.sort();
    Some(parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_compare_without_regard_to_order_and_spaces() {
        let a = normalize_subject("CN=billing, O=Example").unwrap();
        assert_eq!(normalize_subject("o = Example,CN = billing").unwrap(), a);
        assert_eq!(a, "CN=billing,O=Example");
        assert_ne!(normalize_subject("CN=billing").unwrap(), a);
        assert_eq!(normalize_subject("billing"), None);
        assert_eq!(normalize_subject("=x"), None);
    }
}
