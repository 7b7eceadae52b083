//! What can go wrong with a store, in words an operator can act on.

use std::any::Any;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{CommitError, DatabaseError, SetDurabilityError, StorageError, TableError, TransactionError};

/// Why a store could not be opened, read or written. Each message is one line, names the file
/// and says what to do.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The file or its directory could not be created, opened or read (permissions, a missing
    /// mount, a full disk, ...).
    #[error("cannot open or read the store {}: {source}; check that the path is writable and the disk is mounted", path.display())]
    Io {
        /// The file (or directory) that failed.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: Arc<io::Error>,
    },
    /// Another process holds the file open (another broker with the same data directory).
    #[error("the store {} is in use by another process; stop it, or point --data-dir elsewhere", path.display())]
    InUse {
        /// The file.
        path: PathBuf,
    },
    /// The file was written by a newer build whose record format this build does not know.
    #[error(
        "the store {} was written by a newer version (format {found}); this build reads format {supported}: upgrade, or point --data-dir elsewhere",
        path.display()
    )]
    TooNew {
        /// The file.
        path: PathBuf,
        /// The format version found in the file.
        found: u32,
        /// The newest format version this build reads.
        supported: u32,
    },
    /// The file is not a store, or is damaged beyond what the storage engine repairs by itself.
    #[error("the store {} is damaged: {detail}; restore it from a backup or move it aside to start empty", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it (one line).
        detail: String,
    },
    /// A write failed. Nothing of the failed transaction is in the file; what was committed
    /// before it is.
    #[error("writing the store {} failed: {detail}; check free space and the disk, then restart", path.display())]
    Commit {
        /// The file.
        path: PathBuf,
        /// What failed (one line).
        detail: String,
    },
}

/// Makes `text` one line: control characters (newlines included) become spaces.
pub(crate) fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            if !out.ends_with(' ') {
                out.push(' ');
            }
        } else {
            out.push(c);
        }
    }
    out.trim().to_string()
}

pub(crate) fn io(path: &Path, source: io::Error) -> StoreError {
    StoreError::Io { path: path.to_path_buf(), source: Arc::new(source) }
}

pub(crate) fn corrupt(path: &Path, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { path: path.to_path_buf(), detail: one_line(&detail.to_string()) }
}

pub(crate) fn commit_failed(path: &Path, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Commit { path: path.to_path_buf(), detail: one_line(&detail.to_string()) }
}

/// Whether a storage error happened while reading (opening, loading) or writing (committing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Read,
    Write,
}

pub(crate) fn storage(path: &Path, phase: Phase, error: StorageError) -> StoreError {
    match (error, phase) {
        (StorageError::Corrupted(detail), _) => corrupt(path, detail),
        (StorageError::Io(e), Phase::Read) if e.kind() == io::ErrorKind::InvalidData => {
            corrupt(path, "it is not a store file (no redb header)")
        }
        (StorageError::Io(e), Phase::Read) if e.kind() == io::ErrorKind::UnexpectedEof => {
            corrupt(path, "it ends early (truncated)")
        }
        (StorageError::Io(e), Phase::Read) => io(path, e),
        (other, Phase::Read) => corrupt(path, other),
        (other, Phase::Write) => commit_failed(path, other),
    }
}

pub(crate) fn database(path: &Path, error: DatabaseError) -> StoreError {
    match error {
        DatabaseError::DatabaseAlreadyOpen => StoreError::InUse { path: path.to_path_buf() },
        DatabaseError::UpgradeRequired(version) => {
            corrupt(path, format!("it uses the old storage engine format {version}, which this build does not upgrade"))
        }
        DatabaseError::Storage(e) => storage(path, Phase::Read, e),
        other => corrupt(path, other),
    }
}

pub(crate) fn transaction(path: &Path, phase: Phase, error: TransactionError) -> StoreError {
    match error {
        TransactionError::Storage(e) => storage(path, phase, e),
        other => match phase {
            Phase::Read => corrupt(path, other),
            Phase::Write => commit_failed(path, other),
        },
    }
}

pub(crate) fn table(path: &Path, phase: Phase, error: TableError) -> StoreError {
    match error {
        TableError::Storage(e) => storage(path, phase, e),
        // A table of the wrong type or kind: the file is not laid out as a store.
        other => corrupt(path, other),
    }
}

pub(crate) fn commit(path: &Path, error: CommitError) -> StoreError {
    match error {
        CommitError::Storage(e) => storage(path, Phase::Write, e),
        other => commit_failed(path, other),
    }
}

pub(crate) fn durability(path: &Path, error: SetDurabilityError) -> StoreError {
    commit_failed(path, error)
}

/// The text of a caught panic.
pub(crate) fn panic_text(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        one_line(text)
    } else if let Some(text) = payload.downcast_ref::<String>() {
        one_line(text)
    } else {
        "a panic without a message".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_folds_control_characters() {
        assert_eq!(one_line("a\nb\r\n\tc \n"), "a b c");
        assert_eq!(one_line("plain"), "plain");
    }

    #[test]
    fn messages_name_the_path_on_one_line() {
        let path = Path::new("/data/mqttq.redb");
        let errors = [
            io(path, io::Error::new(io::ErrorKind::PermissionDenied, "denied")),
            StoreError::InUse { path: path.into() },
            StoreError::TooNew { path: path.into(), found: 7, supported: 1 },
            corrupt(path, "bad\nthings"),
            commit_failed(path, "disk full"),
        ];
        for error in errors {
            let text = error.to_string();
            assert!(text.contains("/data/mqttq.redb"), "{text}");
            assert!(!text.contains('\n'), "{text}");
        }
    }
}
