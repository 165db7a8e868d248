//! The embedded store: redb in `server.state_dir` (pure Rust, ACID,
//! copy-on-write B-trees, crash safe by default: a commit is durable when
//! it returns). One process at a time.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};

use super::migrate::{Item, Record};
use super::*;
use crate::limit::{AccountId, Snapshot};

/// account → (emission interval µs, TAT µs since the Unix epoch)
const LIMITS: TableDefinition<u128, (u64, u64)> = TableDefinition::new("limits_v1");
/// token hash → (user, family, issued_at, expires_at, spent, auth_time)
const REFRESH: TableDefinition<&[u8; 32], RefreshRow<'static>> = TableDefinition::new("refresh_v2");
/// The table before families kept their start; moved into [`REFRESH`] at open.
const REFRESH_V1: TableDefinition<&[u8; 32], (&str, u128, u64, u64, bool)> =
    TableDefinition::new("refresh_v1");
/// revoked family → when its last token expires (for purging)
const REVOKED: TableDefinition<u128, u64> = TableDefinition::new("revoked_families_v1");

pub struct RedbStore {
    pub(super) db: Database,
}

impl RedbStore {
    pub fn open(dir: &Path) -> Result<RedbStore, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        let db = Database::create(dir.join("keygate.redb"))?;
        let txn = db.begin_write()?;
        txn.open_table(LIMITS)?;
        txn.open_table(REFRESH)?;
        txn.open_table(REVOKED)?;
        RedbStore::open_key_tables(&txn)?;
        migrate_refresh_v1(&txn)?;
        txn.commit()?;
        Ok(RedbStore { db })
    }
}

/// Move tokens written before families kept their start into the current
/// table. Their start is unknown: it is taken as 0, before any cutoff, so
/// a user's `tokens_valid_after` ends them (a user logs in again) rather
/// than letting one through. (The family's earliest token still held is
/// not the login once that token has expired and been purged.)
fn migrate_refresh_v1(txn: &redb::WriteTransaction) -> Result<(), StateError> {
    let exists = txn.list_tables()?.any(|t| t.name() == REFRESH_V1.name());
    if !exists {
        return Ok(());
    }
    let mut rows = Vec::new();
    {
        let old = txn.open_table(REFRESH_V1)?;
        for row in old.iter()? {
            let (k, v) = row?;
            let (user, family, issued_at, expires_at, spent) = v.value();
            rows.push((
                *k.value(),
                (user.to_string(), family, issued_at, expires_at, spent),
            ));
        }
    }
    {
        let mut new = txn.open_table(REFRESH)?;
        for (hash, (user, family, issued_at, expires_at, spent)) in &rows {
            new.insert(
                hash,
                (user.as_str(), *family, *issued_at, *expires_at, *spent, 0),
            )?;
        }
    }
    txn.delete_table(REFRESH_V1)?;
    tracing::info!(
        tokens = rows.len(),
        "refresh tokens moved to the table that keeps family starts"
    );
    Ok(())
}

impl StateStore for RedbStore {
    fn load_limits(&self) -> Result<Vec<Snapshot>, StateError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LIMITS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            let (interval_us, tat_us) = v.value();
            out.push(Snapshot {
                account: k.value(),
                interval_us,
                tat_us,
            });
        }
        Ok(out)
    }

    fn save_limits(&self, entries: &[Snapshot]) -> Result<(), StateError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(LIMITS)?;
            for s in entries {
                table.insert(s.account, (s.interval_us, s.tat_us))?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn forget_limits(&self, accounts: &[AccountId]) -> Result<(), StateError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(LIMITS)?;
            for a in accounts {
                table.remove(*a)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn insert_refresh(&self, hash: &TokenHash, r: &RefreshRecord) -> Result<(), StateError> {
        let txn = self.db.begin_write()?;
        txn.open_table(REFRESH)?.insert(hash, r.row())?;
        txn.commit()?;
        Ok(())
    }

    fn rotate_refresh(
        &self,
        hash: &TokenHash,
        now: u64,
        revoke_until: u64,
        successor: &mut dyn FnMut(&RefreshRecord) -> Option<(TokenHash, RefreshRecord)>,
    ) -> Result<Rotation, StateError> {
        // redb has one writer at a time, so two refreshes with the same
        // token are serialised: the second one sees it spent.
        let txn = self.db.begin_write()?;
        let outcome = {
            let mut tokens = txn.open_table(REFRESH)?;
            let mut revoked = txn.open_table(REVOKED)?;
            let old = tokens
                .get(hash)?
                .map(|v| RefreshRecord::from_row(v.value()));
            match old {
                None => Rotation::Unknown,
                Some(old) if revoked.get(old.family)?.is_some() => Rotation::Revoked,
                Some(old) if old.spent => {
                    revoked.insert(old.family, revoke_until.max(old.expires_at))?;
                    Rotation::ReuseDetected { user: old.user }
                }
                Some(old) if old.expires_at <= now => Rotation::Expired,
                Some(old) => match successor(&old) {
                    None => Rotation::Refused,
                    Some((new_hash, new)) => {
                        let spent = RefreshRecord {
                            spent: true,
                            ..old.clone()
                        };
                        tokens.insert(hash, spent.row())?;
                        let live = RefreshRecord {
                            spent: false,
                            auth_time: old.auth_time,
                            ..new
                        };
                        tokens.insert(&new_hash, live.row())?;
                        Rotation::Rotated(live)
                    }
                },
            }
        };
        if matches!(
            outcome,
            Rotation::Rotated(_) | Rotation::ReuseDetected { .. }
        ) {
            txn.commit()?;
        } else {
            txn.abort()?;
        }
        Ok(outcome)
    }

    fn revoke_refresh(&self, hash: &TokenHash, revoke_until: u64) -> Result<bool, StateError> {
        let txn = self.db.begin_write()?;
        let found = {
            let tokens = txn.open_table(REFRESH)?;
            let mut revoked = txn.open_table(REVOKED)?;
            let family = tokens.get(hash)?.map(|v| {
                let (_, family, _, expires_at, _, _) = v.value();
                (family, expires_at)
            });
            match family {
                Some((family, expires_at)) => {
                    revoked.insert(family, expires_at.max(revoke_until))?;
                    true
                }
                None => false,
            }
        };
        txn.commit()?;
        Ok(found)
    }

    fn purge_expired(&self, now: u64) -> Result<usize, StateError> {
        let txn = self.db.begin_write()?;
        let purged = {
            let mut tokens = txn.open_table(REFRESH)?;
            let mut revoked = txn.open_table(REVOKED)?;
            let a = tokens
                .extract_if(|_, (_, _, _, expires_at, _, _)| expires_at <= now)?
                .count();
            let b = revoked.extract_if(|_, until| until <= now)?.count();
            a + b
        };
        txn.commit()?;
        Ok(purged)
    }

    fn export(&self) -> Result<Vec<Record>, StateError> {
        let mut out: Vec<Record> = self.load_limits()?.iter().map(Record::limit).collect();
        let txn = self.db.begin_read()?;
        for row in txn.open_table(REFRESH)?.iter()? {
            let (k, v) = row?;
            out.push(Record::refresh(
                k.value(),
                &RefreshRecord::from_row(v.value()),
            ));
        }
        for row in txn.open_table(REVOKED)?.iter()? {
            let (k, v) = row?;
            out.push(Record::Revoked {
                family: format!("{:032x}", k.value()),
                until: v.value(),
            });
        }
        Ok(out)
    }

    /// The Redis import's rules: an import never un-spends a token, never
    /// shortens a revocation and never moves a limiter's time back (an old
    /// export replayed over newer state changes nothing that matters).
    fn import(&self, item: &Item) -> Result<(), StateError> {
        let txn = self.db.begin_write()?;
        match item {
            Item::Limit(s) => {
                let mut table = txn.open_table(LIMITS)?;
                let held = table.get(s.account)?.map(|v| v.value());
                if held.is_none_or(|(_, tat_us)| tat_us < s.tat_us) {
                    table.insert(s.account, (s.interval_us, s.tat_us))?;
                }
            }
            Item::Refresh(hash, r) => {
                let mut table = txn.open_table(REFRESH)?;
                let held = table.get(hash)?.map(|v| RefreshRecord::from_row(v.value()));
                let record = match held {
                    Some(held) => held.merged(r),
                    None => r.clone(),
                };
                table.insert(hash, record.row())?;
            }
            Item::Revoked { family, until } => {
                let mut table = txn.open_table(REVOKED)?;
                let held = table.get(*family)?.map(|v| v.value()).unwrap_or(0);
                table.insert(*family, held.max(*until))?;
            }
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    const NOW: u64 = 1_780_000_000;
    const DAY: u64 = 86_400;

    fn record(family: u128, issued_at: u64) -> RefreshRecord {
        RefreshRecord {
            user: "u_alice".into(),
            family,
            issued_at,
            expires_at: issued_at + 30 * DAY,
            spent: false,
            auth_time: NOW,
        }
    }

    fn store() -> (tempfile::TempDir, RedbStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        (dir, store)
    }

    /// Rotate `from` into `to` at `now`.
    fn rotate(store: &RedbStore, from: u8, to: u8, now: u64) -> Rotation {
        store
            .rotate_refresh(&[from; 32], now, now + 30 * DAY, &mut |old| {
                Some(([to; 32], record(old.family, now)))
            })
            .unwrap()
    }

    #[test]
    fn rotation_spends_the_old_token_and_keeps_the_family() {
        let (_dir, s) = store();
        s.insert_refresh(&[1; 32], &record(7, NOW)).unwrap();
        match rotate(&s, 1, 2, NOW + 10) {
            Rotation::Rotated(new) => assert_eq!((new.family, new.issued_at), (7, NOW + 10)),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            rotate(&s, 2, 3, NOW + 20),
            Rotation::Rotated(record(7, NOW + 20))
        );
    }

    #[test]
    fn reuse_of_a_spent_token_revokes_every_descendant() {
        let (_dir, s) = store();
        s.insert_refresh(&[1; 32], &record(7, NOW)).unwrap();
        rotate(&s, 1, 2, NOW + 10);
        rotate(&s, 2, 3, NOW + 20);
        assert_eq!(
            rotate(&s, 1, 9, NOW + 30),
            Rotation::ReuseDetected {
                user: "u_alice".into()
            }
        );
        assert_eq!(rotate(&s, 3, 4, NOW + 40), Rotation::Revoked);
        // Another family is untouched.
        s.insert_refresh(&[5; 32], &record(8, NOW)).unwrap();
        assert!(matches!(rotate(&s, 5, 6, NOW + 50), Rotation::Rotated(_)));
    }

    #[test]
    fn expiry_follows_the_given_clock() {
        let (_dir, s) = store();
        s.insert_refresh(&[1; 32], &record(7, NOW)).unwrap();
        assert_eq!(rotate(&s, 1, 2, NOW + 30 * DAY), Rotation::Expired);
        assert!(matches!(
            rotate(&s, 1, 2, NOW + 30 * DAY - 1),
            Rotation::Rotated(_)
        ));
    }

    #[test]
    fn refused_successor_changes_nothing() {
        let (_dir, s) = store();
        s.insert_refresh(&[1; 32], &record(7, NOW)).unwrap();
        let refused = s
            .rotate_refresh(&[1; 32], NOW, NOW + DAY, &mut |_| None)
            .unwrap();
        assert_eq!(refused, Rotation::Refused);
        assert!(matches!(rotate(&s, 1, 2, NOW + 1), Rotation::Rotated(_)));
        assert_eq!(rotate(&s, 42, 43, NOW), Rotation::Unknown);
    }

    #[test]
    fn revocation_and_purge() {
        let (_dir, s) = store();
        s.insert_refresh(&[1; 32], &record(7, NOW)).unwrap();
        assert!(s.revoke_refresh(&[1; 32], NOW + 30 * DAY).unwrap());
        assert!(!s.revoke_refresh(&[9; 32], NOW + 30 * DAY).unwrap());
        assert_eq!(rotate(&s, 1, 2, NOW + 1), Rotation::Revoked);
        assert_eq!(s.purge_expired(NOW).unwrap(), 0);
        // The token and its family's mark both lapse after 30 days.
        assert_eq!(s.purge_expired(NOW + 30 * DAY).unwrap(), 2);
        assert_eq!(rotate(&s, 1, 2, NOW + 1), Rotation::Unknown);
    }

    #[test]
    fn limiter_state_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let q = crate::limit::Quota::new(
            NonZeroU32::new(100).unwrap(),
            Duration::from_secs(3600),
            NonZeroU32::new(100).unwrap(),
        );
        let now = 1_780_000_000_000_000;
        let limiter = Limiter::new();
        for _ in 0..100 {
            limiter.check(11, &q, now);
        }
        {
            let store = RedbStore::open(dir.path()).unwrap();
            flush(&limiter, &store);
            assert!(limiter.dirty().is_empty());
        }
        let store = RedbStore::open(dir.path()).unwrap();
        let restored = Limiter::new();
        assert_eq!(
            restored.restore(store.load_limits().unwrap(), now + 1_000_000),
            1
        );
        assert!(!restored.check(11, &q, now + 1_000_000).allowed);
        store.forget_limits(&[11]).unwrap();
        assert!(store.load_limits().unwrap().is_empty());
    }

    #[test]
    fn a_rotation_keeps_the_family_start() {
        let (_dir, s) = store();
        s.insert_refresh(&[1; 32], &record(7, NOW)).unwrap();
        let rotated = s
            .rotate_refresh(&[1; 32], NOW + 99, NOW + 30 * DAY, &mut |old| {
                Some((
                    [2; 32],
                    RefreshRecord {
                        auth_time: NOW + 99,
                        ..record(old.family, NOW + 99)
                    },
                ))
            })
            .unwrap();
        match rotated {
            Rotation::Rotated(new) => assert_eq!((new.issued_at, new.auth_time), (NOW + 99, NOW)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_import_never_revives_a_spent_token_nor_moves_time_back() {
        let (_dir, s) = store();
        let live = record(7, NOW);
        s.insert_refresh(&[1; 32], &live).unwrap();
        let exported = s.export().unwrap();
        assert!(matches!(rotate(&s, 1, 2, NOW + 10), Rotation::Rotated(_)));
        s.save_limits(&[Snapshot {
            account: 5,
            interval_us: 10,
            tat_us: NOW * 1_000_000 + 500,
        }])
        .unwrap();
        s.import(&Item::Revoked {
            family: 9,
            until: NOW + 100,
        })
        .unwrap();
        // The old export: token 1 live, an older limiter time, a shorter revocation.
        for r in exported {
            s.import(&Item::try_from(r).unwrap()).unwrap();
        }
        s.import(&Item::Limit(Snapshot {
            account: 5,
            interval_us: 10,
            tat_us: NOW * 1_000_000,
        }))
        .unwrap();
        s.import(&Item::Revoked {
            family: 9,
            until: NOW + 1,
        })
        .unwrap();
        assert!(
            matches!(rotate(&s, 1, 3, NOW + 20), Rotation::ReuseDetected { .. }),
            "the spent token stays spent"
        );
        assert_eq!(s.load_limits().unwrap()[0].tat_us, NOW * 1_000_000 + 500);
        assert!(s.export().unwrap().contains(&Record::Revoked {
            family: format!("{:032x}", 9),
            until: NOW + 100
        }));
    }

    #[test]
    fn tokens_of_the_first_table_move_over_with_an_unknown_start() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join("keygate.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(REFRESH_V1).unwrap();
                t.insert(&[1; 32], ("u_alice", 7u128, NOW, NOW + DAY, true))
                    .unwrap();
                t.insert(&[2; 32], ("u_alice", 7u128, NOW + 50, NOW + DAY, false))
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        let s = RedbStore::open(dir.path()).unwrap();
        match rotate(&s, 2, 3, NOW + 60) {
            // Before any cutoff: a tokens_valid_after ends it.
            Rotation::Rotated(new) => assert_eq!(new.auth_time, 0),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            rotate(&s, 1, 4, NOW + 70),
            Rotation::ReuseDetected { .. }
        ));
        drop(s);
        // Opened again: nothing left to move, nothing lost.
        let s = RedbStore::open(dir.path()).unwrap();
        assert_eq!(rotate(&s, 3, 5, NOW + 80), Rotation::Revoked);
    }
}
