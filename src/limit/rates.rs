//! The emission intervals in use, interned process-wide so a limiter state
//! word can name its rate in 12 bits. Append-only and content-addressed: the
//! same interval always gets the same index, whoever asks first.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

const CAPACITY: usize = 4096;

static INTERVALS: [AtomicU64; CAPACITY] = [const { AtomicU64::new(0) }; CAPACITY];
static LEN: AtomicUsize = AtomicUsize::new(1); // index 0: "no state yet"
static APPEND: Mutex<()> = Mutex::new(());

/// The index of `interval_us`, adding it if new. Called when a policy is
/// compiled or a snapshot restored, never per request.
pub fn intern(interval_us: u64) -> u16 {
    if let Some(i) = find(interval_us) {
        return i;
    }
    let _guard = APPEND.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(i) = find(interval_us) {
        return i;
    }
    let i = LEN.load(Ordering::Acquire);
    if i >= CAPACITY {
        // 4 095 distinct rates in one process's life: share the last slot.
        // A request under it may then be judged at a neighbouring rate.
        tracing::error!("rate table full; restart keygate to compact it");
        return (CAPACITY - 1) as u16;
    }
    INTERVALS[i].store(interval_us, Ordering::Release);
    LEN.store(i + 1, Ordering::Release);
    i as u16
}

fn find(interval_us: u64) -> Option<u16> {
    let len = LEN.load(Ordering::Acquire);
    (1..len)
        .find(|&i| INTERVALS[i].load(Ordering::Acquire) == interval_us)
        .map(|i| i as u16)
}

/// The interval behind an index (0 for index 0).
pub fn interval(index: u16) -> u64 {
    INTERVALS[usize::from(index) % CAPACITY].load(Ordering::Acquire)
}
