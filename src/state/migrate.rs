//! `keygate state export` / `import`: moving the embedded store's live
//! state to Redis (when one sidecar becomes a fleet) or to another embedded
//! store, so that refresh tokens stay valid and quotas stay spent. Redis
//! itself is not exported.
//!
//! The format is JSON lines: a header, then one record per line. Token
//! hashes, never tokens, are in it; it still deserves the care of a
//! credentials file (a hash lets nobody in, but it ties users to families).
//!
//! ```text
//! {"keygate_state":1}
//! {"limit":{"account":"<32 hex>","interval_us":36000000,"tat_us":1780000000000000}}
//! {"refresh":{"hash":"<64 hex>","user":"u_alice","family":"<32 hex>","issued_at":…,"expires_at":…,"spent":false,"auth_time":…}}
//! {"revoked":{"family":"<32 hex>","until":…}}
//! ```

use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};

use super::{RefreshRecord, TokenHash};
use crate::limit::Snapshot;

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Record {
    Limit {
        account: String,
        interval_us: u64,
        tat_us: u64,
    },
    Refresh {
        hash: String,
        user: String,
        family: String,
        issued_at: u64,
        expires_at: u64,
        spent: bool,
        /// The family's start (its login). Exports of an earlier keygate
        /// lack it: 0 then (before any cutoff, so `tokens_valid_after`
        /// ends such a family rather than letting it through).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        auth_time: Option<u64>,
    },
    Revoked {
        family: String,
        until: u64,
    },
}

#[derive(Serialize, Deserialize)]
struct Header {
    keygate_state: u32,
}

impl Record {
    pub fn limit(s: &Snapshot) -> Record {
        Record::Limit {
            account: format!("{:032x}", s.account),
            interval_us: s.interval_us,
            tat_us: s.tat_us,
        }
    }

    pub fn refresh(hash: &TokenHash, r: &RefreshRecord) -> Record {
        Record::Refresh {
            hash: hex::encode(hash),
            user: r.user.clone(),
            family: format!("{:032x}", r.family),
            issued_at: r.issued_at,
            expires_at: r.expires_at,
            spent: r.spent,
            auth_time: Some(r.auth_time),
        }
    }

    /// Still meaningful at `now_us`? Spent buckets and expired tokens are
    /// not worth carrying over.
    pub fn is_live(&self, now_us: u64) -> bool {
        let now = now_us / 1_000_000;
        match self {
            Record::Limit { tat_us, .. } => *tat_us > now_us,
            Record::Refresh { expires_at, .. } => *expires_at > now,
            Record::Revoked { until, .. } => *until > now,
        }
    }
}

/// What [`Record`] holds, in the stores' own types.
pub enum Item {
    Limit(Snapshot),
    Refresh(TokenHash, RefreshRecord),
    Revoked { family: u128, until: u64 },
}

impl TryFrom<Record> for Item {
    type Error = String;

    fn try_from(r: Record) -> Result<Item, String> {
        let id = |s: &str| u128::from_str_radix(s, 16).map_err(|_| format!("bad id {s:?}"));
        Ok(match r {
            Record::Limit {
                account,
                interval_us,
                tat_us,
            } => Item::Limit(Snapshot {
                account: id(&account)?,
                interval_us,
                tat_us,
            }),
            Record::Refresh {
                hash,
                user,
                family,
                issued_at,
                expires_at,
                spent,
                auth_time,
            } => {
                let bytes = hex::decode(&hash).map_err(|_| format!("bad hash {hash:?}"))?;
                let hash: TokenHash = bytes
                    .try_into()
                    .map_err(|_| "a token hash is 32 bytes".to_string())?;
                Item::Refresh(
                    hash,
                    RefreshRecord {
                        user,
                        family: id(&family)?,
                        issued_at,
                        expires_at,
                        spent,
                        auth_time: auth_time.unwrap_or(0),
                    },
                )
            }
            Record::Revoked { family, until } => Item::Revoked {
                family: id(&family)?,
                until,
            },
        })
    }
}

/// Write the header and `records`; returns how many.
pub fn write(out: &mut dyn Write, records: &[Record]) -> std::io::Result<usize> {
    serde_json::to_writer(
        &mut *out,
        &Header {
            keygate_state: FORMAT_VERSION,
        },
    )?;
    out.write_all(b"\n")?;
    for r in records {
        serde_json::to_writer(&mut *out, r)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(records.len())
}

/// Read an export; an error names its line.
pub fn read(input: &mut dyn BufRead) -> Result<Vec<Item>, String> {
    let mut items = Vec::new();
    for (n, line) in input.lines().enumerate() {
        let line = line.map_err(|e| format!("line {}: {e}", n + 1))?;
        if n == 0 {
            match serde_json::from_str::<Header>(&line) {
                Ok(h) if h.keygate_state == FORMAT_VERSION => continue,
                Ok(h) => {
                    return Err(format!(
                        "line 1: format {} (this keygate reads {FORMAT_VERSION})",
                        h.keygate_state
                    ))
                }
                Err(_) => return Err("line 1: not a keygate state export".into()),
            }
        }
        if line.trim().is_empty() {
            continue;
        }
        let record: Record =
            serde_json::from_str(&line).map_err(|e| format!("line {}: {e}", n + 1))?;
        items.push(Item::try_from(record).map_err(|e| format!("line {}: {e}", n + 1))?);
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_reads_back() {
        let records = vec![
            Record::limit(&Snapshot {
                account: 7,
                interval_us: 36_000_000,
                tat_us: 1_780_000_000_000_000,
            }),
            Record::refresh(
                &[3; 32],
                &RefreshRecord {
                    user: "u_alice".into(),
                    family: u128::MAX,
                    issued_at: 1,
                    expires_at: 2,
                    spent: true,
                    auth_time: 1,
                },
            ),
            Record::Revoked {
                family: format!("{:032x}", 9),
                until: 5,
            },
        ];
        let mut buf = Vec::new();
        write(&mut buf, &records).unwrap();
        let items = read(&mut buf.as_slice()).unwrap();
        assert_eq!(items.len(), 3);
        assert!(
            matches!(items[1], Item::Refresh(h, ref r) if h == [3; 32] && r.spent && r.family == u128::MAX)
        );
    }

    #[test]
    fn an_export_without_family_starts_reads_them_as_before_any_cutoff() {
        let text = concat!(
            "{\"keygate_state\":1}\n",
            "{\"refresh\":{\"hash\":\"0101010101010101010101010101010101010101010101010101010101010101\",\"user\":\"u\",\"family\":\"0000000000000000000000000000000a\",\"issued_at\":50,\"expires_at\":90,\"spent\":false}}\n",
            "{\"refresh\":{\"hash\":\"0202020202020202020202020202020202020202020202020202020202020202\",\"user\":\"u\",\"family\":\"0000000000000000000000000000000a\",\"issued_at\":20,\"expires_at\":60,\"spent\":true}}\n",
        );
        let items = read(&mut text.as_bytes()).unwrap();
        for item in &items {
            let Item::Refresh(_, r) = item else { panic!() };
            assert_eq!(r.auth_time, 0);
        }
    }

    #[test]
    fn a_bad_line_is_named() {
        let text = "{\"keygate_state\":1}\n{\"limit\":{\"account\":\"zz\",\"interval_us\":1,\"tat_us\":1}}\n";
        let e = read(&mut text.as_bytes()).err().unwrap();
        assert!(e.starts_with("line 2:"), "{e}");
        assert!(read(&mut "{}\n".as_bytes()).is_err());
        assert!(read(&mut "{\"keygate_state\":9}\n".as_bytes())
            .err()
            .unwrap()
            .contains("format 9"));
    }
}
