//! One agent per gate: the agent locks its state directory and its pin directory (flock,
//! exclusive) before it touches anything, and holds both locks for its life. A second agent,
//! and `portgate uninstall`, find them taken and refuse, naming the agent that holds them.
//! The kernel drops a lock with its holder, also when it is killed.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::{
        fd::AsRawFd as _,
        unix::fs::{
            DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
        },
    },
    path::{Path, PathBuf},
};

/// The lock file in the state directory (it holds the agent's pid, for people).
pub const STATE_LOCK_FILE: &str = "agent.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "a portgate agent ({}) is running with the {what} {}; stop it first",
        holder_text(*.pid),
        .dir.display()
    )]
    Held {
        what: &'static str,
        dir: PathBuf,
        pid: Option<u32>,
    },
    #[error("locking {path}")]
    Io { path: PathBuf, source: io::Error },
}

fn holder_text(pid: Option<u32>) -> String {
    pid.map_or_else(|| "pid unknown".to_owned(), |pid| format!("pid {pid}"))
}

/// An exclusive lock, released when dropped (or when the process ends).
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

/// Locks `state_dir` through its lock file, creating both (root-only) if missing.
pub fn lock_state_dir(state_dir: &Path) -> Result<Lock, LockError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| LockError::Io { path, source }
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(io_err(state_dir))?;
    let path = state_dir.join(STATE_LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_err(&path))?;
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io_err(&path))?;
    flock(&file, &path, "state directory", state_dir)?;
    // For people looking: the holder's pid. The lock itself is what counts.
    file.set_len(0)
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .map_err(io_err(&path))?;
    Ok(Lock { _file: file })
}

/// Locks an existing directory itself (a bpffs directory holds no ordinary files).
pub fn lock_dir(dir: &Path, what: &'static str) -> Result<Lock, LockError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
        .map_err(|source| LockError::Io {
            path: dir.to_owned(),
            source,
        })?;
    flock(&file, dir, what, dir)?;
    Ok(Lock { _file: file })
}

fn flock(file: &File, path: &Path, what: &'static str, dir: &Path) -> Result<(), LockError> {
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(LockError::Held {
            what,
            dir: dir.to_owned(),
            pid: file.metadata().ok().and_then(|m| flock_holder(&m)),
        });
    }
    Err(LockError::Io {
        path: path.to_owned(),
        source: err,
    })
}

/// The pid holding a flock on the file, from /proc/locks.
fn flock_holder(file: &fs::Metadata) -> Option<u32> {
    let locks = fs::read_to_string("/proc/locks").ok()?;
    holder_in(&locks, file.dev(), file.ino())
}

/// Finds the pid holding a FLOCK on (device, inode) in the text of /proc/locks, whose lines
/// read `1: FLOCK  ADVISORY  WRITE 1234 00:28:12758 0 EOF` (major and minor in hex).
fn holder_in(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let wanted = format!("{major:02x}:{minor:02x}:{ino}");
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Waiters are listed with "->" after the number; they do not hold the lock.
        if fields.get(1) != Some(&"FLOCK") {
            return None;
        }
        let at = fields.iter().position(|f| *f == wanted)?;
        fields.get(at.checked_sub(1)?)?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let first = lock_state_dir(&state).expect("first lock");
        let meta = fs::metadata(state.join(STATE_LOCK_FILE)).expect("lock file");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(
            fs::metadata(&state).expect("state dir").mode() & 0o777,
            0o700
        );
        let pid = std::process::id();
        assert_eq!(
            fs::read_to_string(state.join(STATE_LOCK_FILE)).expect("read"),
            format!("{pid}\n")
        );
        // flock locks belong to the open file: a second open in this process conflicts too.
        let err = lock_state_dir(&state).expect_err("second lock");
        assert!(
            matches!(err, LockError::Held { pid: Some(p), .. } if p == pid),
            "{err:?}"
        );
        let text = err.to_string();
        assert_eq!(
            text,
            format!(
                "a portgate agent (pid {pid}) is running with the state directory {}; stop it first",
                state.display()
            )
        );
        let dir_lock = lock_dir(&state, "pin directory");
        assert!(
            dir_lock.is_ok(),
            "the directory is not its lock file: {dir_lock:?}"
        );
        drop(first);
        lock_state_dir(&state).expect("free again once dropped");
    }

    #[test]
    fn the_holder_is_read_from_proc_locks() {
        let locks = "1: FLOCK  ADVISORY  WRITE 4242 00:28:12758 0 EOF\n\
                     1: -> FLOCK  ADVISORY  WRITE 4343 00:28:12758 0 EOF\n\
                     2: POSIX  ADVISORY  WRITE 99 08:01:555 0 EOF\n";
        // Device 0:40 (0x28), as the kernel prints it.
        assert_eq!(holder_in(locks, 40, 12758), Some(4242));
        assert_eq!(
            holder_in(locks, (8 << 8) | 1, 555),
            None,
            "POSIX locks are not ours"
        );
        assert_eq!(holder_in(locks, 40, 1), None);
    }
}
