//! `keygate state export` / `import` (see [`crate::state::migrate`]).

use std::io::{BufReader, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};

use crate::policy::{Policy, StateBackend};
use crate::state::families::RedisStore;
use crate::state::migrate::{self, Record};
use crate::state::{RedbStore, StateStore};

/// The store `policy` names. The embedded one can be open in one process
/// at a time: a running keygate holds it.
fn open(policy: &Policy) -> anyhow::Result<Arc<dyn StateStore>> {
    Ok(match &policy.state {
        StateBackend::Embedded => {
            let dir = &policy.server.state_dir;
            let store = RedbStore::open(dir).with_context(|| {
                format!(
                    "opening {} (server.state_dir); stop the keygate that uses it first",
                    dir.display()
                )
            })?;
            Arc::new(store)
        }
        StateBackend::Redis(settings) => {
            let store = RedisStore::new(Arc::new((**settings).clone()))?;
            store
                .ping()
                .with_context(|| format!("Redis at {}", settings.display_url))?;
            Arc::new(store)
        }
    })
}

/// `keygate state export`: what is live now, as JSON lines on `out`.
pub fn export(config: &Path, out: &mut dyn Write) -> anyhow::Result<()> {
    let policy = super::load(config)?.policy;
    let store = open(&policy)?;
    let now = crate::clock::unix_now_us();
    let records: Vec<Record> = store
        .export()?
        .into_iter()
        .filter(|r| r.is_live(now))
        .collect();
    let n = migrate::write(out, &records).context("writing the export")?;
    eprintln!("exported {n} record(s)");
    Ok(())
}

/// `keygate state import`: write an export into the store the config names.
pub fn import(config: &Path, input: Option<&Path>) -> anyhow::Result<()> {
    let policy = super::load(config)?.policy;
    let items = match input {
        Some(p) if p != Path::new("-") => {
            let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
            migrate::read(&mut BufReader::new(f))
        }
        _ => migrate::read(&mut std::io::stdin().lock()),
    };
    let items = match items {
        Ok(items) => items,
        Err(e) => bail!(
            "{}: {e}",
            input.map_or("stdin".into(), |p| p.display().to_string())
        ),
    };
    let store = open(&policy)?;
    // Revocations first: an import cut off midway never leaves a revoked
    // family usable.
    let (revoked, rest): (Vec<_>, Vec<_>) = items
        .iter()
        .partition(|i| matches!(i, migrate::Item::Revoked { .. }));
    for item in revoked.into_iter().chain(rest) {
        store.import(item)?;
    }
    eprintln!("imported {} record(s)", items.len());
    Ok(())
}
