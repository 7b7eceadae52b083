//! The store: one redb file, four tables of stamped records and a format version.

use std::fs;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mqtt_quic_core::persist::{StoreBatch, StoreOp, StoredRecord, Table, FORMAT_VERSION};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableError};

use crate::error::{self, Phase, StoreError};

/// The store's file name inside its directory.
pub const FILE_NAME: &str = "mqttq.redb";

/// Where a new store is built before it is renamed to [`FILE_NAME`].
const TEMP_NAME: &str = "mqttq.redb.tmp";

/// The table holding the format version, under [`VERSION_KEY`].
const META: TableDefinition<'static, &'static str, u32> = TableDefinition::new("meta");

/// The key of the format version in the `meta` table.
const VERSION_KEY: &str = "format_version";

/// How many bytes of a value are its wall-clock stamp.
const STAMP_LEN: usize = 8;

/// The most memory redb may use to cache pages (redb's own default is 1 GiB, too much for
/// the small machines a broker runs on; a store of tens of megabytes fits).
const CACHE_BYTES: usize = 64 * 1024 * 1024;

fn definition(table: Table) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
    TableDefinition::new(table.name())
}

/// The position of `table` in [`Table::ALL`].
fn index(table: Table) -> usize {
    match table {
        Table::Sessions => 0,
        Table::Messages => 1,
        Table::Retained => 2,
        Table::Wills => 3,
    }
}

/// The smallest key greater than every key starting with `prefix`, or `None` if there is none
/// (the prefix is empty or all `0xFF`): then the prefix's range runs to the end of the keys.
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Milliseconds since the Unix epoch, by the wall clock (zero if the clock is before 1970).
#[allow(clippy::disallowed_methods)] // the store is the I/O side: it reads the clock
fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

thread_local! {
    /// Set while [`guarded`] runs redb on this thread: a panic there is expected, turned into
    /// an error, and not to be printed.
    static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Wraps the process's panic hook, once, so that panics caught by [`guarded`] print nothing
/// (the operator gets the one-line error instead); every other panic goes to the hook as before.
fn quiet_guarded_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(|g| g.get()) {
                previous(info);
            }
        }));
    });
}

/// Runs `f`, turning a panic inside it (redb asserts on some damaged files rather than
/// returning an error) into the error `on_panic` makes of its message.
fn guarded<T>(
    f: impl FnOnce() -> Result<T, StoreError>,
    on_panic: impl FnOnce(String) -> StoreError,
) -> Result<T, StoreError> {
    quiet_guarded_panics();
    let outer = GUARDED.with(|g| g.replace(true));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(outer));
    match result {
        Ok(result) => result,
        Err(payload) => Err(on_panic(error::panic_text(payload.as_ref()))),
    }
}

/// The broker's persistent state in one redb file, `<dir>/mqttq.redb`.
///
/// See the [crate documentation](crate) for the file's layout and what happens to a damaged
/// file.
pub struct Store {
    /// Always `Some` until dropped (taken out in `drop` to drop it under a panic guard).
    db: Option<Database>,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the store in `dir`, creating the directory and an empty store if there is none.
    ///
    /// A new store is built in a temporary file (format version written, synced) and renamed
    /// into place, so an existing `mqttq.redb` is always a store that was completely created:
    /// an existing file that redb rejects, or that is empty (0 bytes), is reported as
    /// [`StoreError::Corrupt`] and never replaced by an empty store. A file left by a crash is
    /// repaired to its last complete commit; every page in use is checked against its
    /// checksum.
    ///
    /// # Errors
    ///
    /// [`StoreError::TooNew`] if the file holds a newer [`FORMAT_VERSION`] than this build's,
    /// [`StoreError::Corrupt`] if it is not a store or is damaged (a missing format version
    /// included), [`StoreError::InUse`] if another process has it open, [`StoreError::Io`] if
    /// the directory or file cannot be created or opened.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        fs::create_dir_all(dir).map_err(|e| error::io(dir, e))?;
        let path = dir.join(FILE_NAME);
        match fs::metadata(&path) {
            Ok(meta) if meta.len() == 0 => {
                return Err(error::corrupt(&path, "it is empty (0 bytes), but a store is never empty once created"));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => create(dir, &path)?,
            Err(e) => return Err(error::io(&path, e)),
        }
        let store = guarded(
            || {
                let db = Database::builder().set_cache_size(CACHE_BYTES).open(&path);
                let mut db = db.map_err(|e| error::database(&path, e))?;
                // redb repairs a file left by a crash on open, but trusts one closed cleanly;
                // verifying every page's checksum catches damage since (a few tens of
                // milliseconds for 100,000 records).
                db.check_integrity().map_err(|e| error::database(&path, e))?;
                Ok(Store { db: Some(db), path: path.clone() })
            },
            |text| error::corrupt(&path, format!("redb failed on it ({text})")),
        )?;
        store.check_version()?;
        Ok(store)
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db(&self) -> &Database {
        self.db.as_ref().expect("the database is only taken out when the store is dropped")
    }

    fn check_version(&self) -> Result<(), StoreError> {
        let path = &self.path;
        let found = guarded(
            || {
                let read = self.db().begin_read().map_err(|e| error::transaction(path, Phase::Read, e))?;
                let meta = match read.open_table(META) {
                    Ok(meta) => meta,
                    Err(TableError::TableDoesNotExist(_)) => {
                        return Err(error::corrupt(path, "it has no format version (no meta table)"));
                    }
                    Err(e) => return Err(error::table(path, Phase::Read, e)),
                };
                let version = meta.get(VERSION_KEY).map_err(|e| error::storage(path, Phase::Read, e))?;
                version.map(|v| v.value()).ok_or_else(|| error::corrupt(path, "it has no format version"))
            },
            |text| error::corrupt(path, format!("redb failed reading it ({text})")),
        )?;
        if found > FORMAT_VERSION {
            return Err(StoreError::TooNew { path: path.clone(), found, supported: FORMAT_VERSION });
        }
        if found < FORMAT_VERSION {
            // Upgrades from older formats go here when FORMAT_VERSION moves on; version 1 is the
            // first, so anything below it was never written by a build.
            return Err(error::corrupt(
                path,
                format!("its format version {found} is older than any this build upgrades (format {FORMAT_VERSION})"),
            ));
        }
        Ok(())
    }

    /// Every record of every table, with its age: the wall clock now minus the stamp taken
    /// when it was put (zero if the clock went backwards).
    ///
    /// # Errors
    ///
    /// [`StoreError::Corrupt`] if a value is too short to hold its stamp or redb finds the file
    /// damaged; [`StoreError::Io`] if it cannot be read.
    pub fn load(&self) -> Result<Vec<StoredRecord>, StoreError> {
        let path = &self.path;
        let now = now_millis();
        guarded(
            || {
                let read = self.db().begin_read().map_err(|e| error::transaction(path, Phase::Read, e))?;
                let mut records = Vec::new();
                for table in Table::ALL {
                    let stored = match read.open_table(definition(table)) {
                        Ok(stored) => stored,
                        Err(TableError::TableDoesNotExist(_)) => continue,
                        Err(e) => return Err(error::table(path, Phase::Read, e)),
                    };
                    let entries = stored.iter().map_err(|e| error::storage(path, Phase::Read, e))?;
                    for entry in entries {
                        let (key, value) = entry.map_err(|e| error::storage(path, Phase::Read, e))?;
                        let value = value.value();
                        let Some((stamp, value)) = value.split_first_chunk::<STAMP_LEN>() else {
                            return Err(error::corrupt(
                                path,
                                format!(
                                    "a record in table {} is {} bytes, too short for its time stamp",
                                    table.name(),
                                    value.len()
                                ),
                            ));
                        };
                        let age = Duration::from_millis(now.saturating_sub(u64::from_le_bytes(*stamp)));
                        records.push(StoredRecord { table, key: key.value().to_vec(), value: value.to_vec(), age });
                    }
                }
                Ok(records)
            },
            |text| error::corrupt(path, format!("redb failed reading it ({text})")),
        )
    }

    /// Applies the operations of `batches`, in order, in one write transaction: all of them
    /// or (on error) none. Each value put is stamped with the wall clock of this call.
    ///
    /// `durable`: the transaction is synced to disk before this returns
    /// ([`Durability::Immediate`]). Otherwise it is written without a sync
    /// ([`Durability::None`]): a crash before the next durable commit loses it, and a durable
    /// commit (even of no batches) makes it and every earlier one durable.
    ///
    /// # Errors
    ///
    /// [`StoreError::Commit`] if the write or the sync failed, [`StoreError::Corrupt`] if redb
    /// found the file damaged. Either way nothing of this call is in the store; open the store
    /// again before writing more.
    pub fn commit(&mut self, batches: &[StoreBatch], durable: bool) -> Result<(), StoreError> {
        if batches.is_empty() && !durable {
            return Ok(());
        }
        // Batches with nothing in them only carry a number to report (output that waited on
        // changes coalesced away): nothing to write, and nothing earlier left unsynced in a
        // mode that syncs every commit.
        if !batches.is_empty() && batches.iter().all(|b| b.ops.is_empty()) && durable {
            return Ok(());
        }
        let stamp = now_millis().to_le_bytes();
        let path = &self.path;
        let db = self.db.as_ref().expect("the database is only taken out when the store is dropped");
        guarded(
            || {
                let mut txn = db.begin_write().map_err(|e| error::transaction(path, Phase::Write, e))?;
                let level = if durable { Durability::Immediate } else { Durability::None };
                txn.set_durability(level).map_err(|e| error::durability(path, e))?;
                {
                    let open =
                        |table| txn.open_table(definition(table)).map_err(|e| error::table(path, Phase::Write, e));
                    let mut tables =
                        [open(Table::ALL[0])?, open(Table::ALL[1])?, open(Table::ALL[2])?, open(Table::ALL[3])?];
                    let storage = |e| error::storage(path, Phase::Write, e);
                    let mut stamped = Vec::new();
                    for op in batches.iter().flat_map(|batch| &batch.ops) {
                        match op {
                            StoreOp::Put { table, key, value } => {
                                stamped.clear();
                                stamped.extend_from_slice(&stamp);
                                stamped.extend_from_slice(value);
                                tables[index(*table)].insert(key.as_slice(), stamped.as_slice()).map_err(storage)?;
                            }
                            StoreOp::Delete { table, key } => {
                                tables[index(*table)].remove(key.as_slice()).map_err(storage)?;
                            }
                            StoreOp::DeletePrefix { table, prefix } => {
                                let stored = &mut tables[index(*table)];
                                let start = prefix.as_slice();
                                match prefix_end(prefix) {
                                    Some(end) => stored.retain_in(start..end.as_slice(), |_, _| false),
                                    None => stored.retain_in(start.., |_, _| false),
                                }
                                .map_err(storage)?;
                            }
                        }
                    }
                }
                txn.commit().map_err(|e| error::commit(path, e))
            },
            |text| error::commit_failed(path, format!("redb failed ({text})")),
        )
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Closing writes redb's allocator state; on a file redb found damaged that may panic,
        // which must not escape a drop.
        if let Some(db) = self.db.take() {
            let _ = panic::catch_unwind(AssertUnwindSafe(move || drop(db)));
        }
    }
}

/// Builds a new, empty store at `path`: in a temporary file first, renamed into place once
/// its format version is synced, so a crash while creating leaves no half-made store behind.
fn create(dir: &Path, path: &Path) -> Result<(), StoreError> {
    let temp = dir.join(TEMP_NAME);
    match fs::remove_file(&temp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(error::io(&temp, e)),
    }
    {
        let db =
            Database::builder().set_cache_size(CACHE_BYTES).create(&temp).map_err(|e| error::database(&temp, e))?;
        let txn = db.begin_write().map_err(|e| error::transaction(&temp, Phase::Write, e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| error::table(&temp, Phase::Write, e))?;
            meta.insert(VERSION_KEY, FORMAT_VERSION).map_err(|e| error::storage(&temp, Phase::Write, e))?;
            for table in Table::ALL {
                txn.open_table(definition(table)).map_err(|e| error::table(&temp, Phase::Write, e))?;
            }
        }
        // The default durability: synced before commit returns.
        txn.commit().map_err(|e| error::commit(&temp, e))?;
    }
    fs::rename(&temp, path).map_err(|e| error::io(path, e))?;
    sync_dir(dir)
}

/// Makes the rename into `dir` durable.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| error::io(dir, e))
}

/// Makes the rename into `dir` durable (not possible through std on this platform).
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<(), StoreError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte_below_ff() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xFF]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xFF, 0xFF]), None);
        assert_eq!(prefix_end(&[]), None);
        assert_eq!(prefix_end(&[0, 0xFF, 0xFF]), Some(vec![1]));
    }

    #[test]
    fn table_index_follows_all() {
        for (i, table) in Table::ALL.into_iter().enumerate() {
            assert_eq!(index(table), i);
        }
    }
}
