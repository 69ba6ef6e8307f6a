//! Giving freed memory back to the system after large answers.
//!
//! A `list` or a scrape of many rules builds tens of megabytes (the rule views, the JSON or
//! the exposition) on a blocking thread, and frees them once sent. glibc keeps what was
//! freed in the arena of the thread that allocated it, so without help the agent's RSS stays
//! at its largest answer's peak (with 100 000 rules: about 4 × its resting size). After a
//! large answer, the agent's tick asks glibc to return the free pages (`malloc_trim`), a
//! walk over the free lists that costs well under a millisecond when nothing was freed.
//!
//! Answers that grow with the rules are built one at a time ([`one_at_a_time`]): a `list`
//! and two scrapes asked together would otherwise hold three copies of every rule's view at
//! once. And glibc is kept to two arenas ([`limit_arenas`]), so that the blocking threads
//! that build them reuse each other's freed memory instead of each growing its own.

use std::sync::{
    Mutex,
    atomic::{AtomicU32, Ordering},
};

/// Answers at least this large count as large.
const LARGE: usize = 1 << 20;
/// Ticks that trim after a large answer: its memory is freed once the answer is written,
/// which may be after the next tick.
const TRIMS_PER_ANSWER: u32 = 2;

static TRIMS_DUE: AtomicU32 = AtomicU32::new(0);

/// Notes an answer of `bytes` bytes.
pub fn answered(bytes: usize) {
    if bytes >= LARGE {
        TRIMS_DUE.store(TRIMS_PER_ANSWER, Ordering::Relaxed);
    }
}

/// Returns freed memory to the system if a large answer went out lately; on each tick.
pub fn release_if_due() {
    let due = TRIMS_DUE.load(Ordering::Relaxed);
    if due == 0 {
        return;
    }
    TRIMS_DUE.store(due - 1, Ordering::Relaxed);
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory of glibc's heaps to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

static BUILDING: Mutex<()> = Mutex::new(());

/// Runs `build` (a large answer's building and encoding) when no other is running.
pub fn one_at_a_time<T>(build: impl FnOnce() -> T) -> T {
    let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    build()
}

/// At most two malloc arenas (the main one and one more), at the agent's start.
pub fn limit_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a tunable of glibc's allocator; called before the threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
