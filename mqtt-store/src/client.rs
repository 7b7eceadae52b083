//! What every adapter's client does with a client store ([`ClientOptions::store`]), written
//! once: open it and read it back into the client before its first connection, hand the
//! client's batches to the store after every input, report them stored, close it when the
//! client ends. The adapter picks how commits run: on a thread of their own
//! ([`ClientStore::spawn`], for an event loop that must not wait on the disk; it carries the
//! thread's reports back to [`ClientStore::stored`]) or inline, a durable commit in
//! [`ClientStore::submit`] itself (for a blocking client, whose calls wait on the network
//! anyway).
//!
//! [`ClientOptions::store`]: mqtt_quic_core::driver::ClientOptions::store

use crate::{Store, StoreError, StoreWorker, SyncMode};
use mqtt_quic_core::driver::{ClientDriver, ClientError};
use mqtt_quic_core::persist::{ClientRestored, RestoreError, StoreBatch};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How commits run.
enum Commits {
    /// In [`ClientStore::submit`], durably, one transaction per call.
    Inline(Store),
    /// On the store's thread.
    Worker(StoreWorker),
    /// The store failed (the driver was told) or was closed.
    Stopped,
}

/// A client's store: the file, and the batches handed to it. See the module docs.
pub struct ClientStore {
    commits: Commits,
    path: PathBuf,
    restored: ClientRestored,
}

impl std::fmt::Debug for ClientStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientStore")
            .field("path", &self.path)
            .field("restored", &self.restored)
            .finish_non_exhaustive()
    }
}

/// A store error as a client reports it: the broker-oriented advice of a store in use is
/// replaced by the client's.
fn client_error(e: StoreError) -> String {
    match e {
        StoreError::InUse { path } => format!(
            "the client store {} is in use by another client (this process or another): a store directory belongs to one running client",
            path.display()
        ),
        other => other.to_string(),
    }
}

impl ClientStore {
    /// Opens the store in `dir` (creating it if there is none) and restores `driver`'s
    /// session from it (see
    /// [`ClientSession::restore`](mqtt_quic_core::session::client::ClientSession::restore)).
    /// Call it before [`ClientDriver::start`]. Commits run inline until
    /// [`ClientStore::spawn`].
    ///
    /// # Errors
    ///
    /// [`ClientError::Config`] if the session cannot outlive its connections (clean start, no
    /// session expiry, no client id); [`ClientError::Store`] if the store cannot be opened or
    /// read (in use by another client, damaged, too new) or holds another client's records.
    pub fn open<T>(dir: &Path, driver: &mut ClientDriver<T>, now: Instant) -> Result<ClientStore, ClientError> {
        let store = Store::open(dir).map_err(|e| ClientError::Store(client_error(e)))?;
        let records = store.load().map_err(|e| ClientError::Store(client_error(e)))?;
        let path = store.path().to_path_buf();
        let restored = driver.restore(now, records).map_err(|e| match e {
            RestoreError::Config(e) => ClientError::Config(e),
            e => ClientError::Store(format!(
                "the client store {}: {e}; point the client at its own store directory, or move this one aside to start empty",
                path.display()
            )),
        })?;
        Ok(ClientStore { commits: Commits::Inline(store), path, restored })
    }

    /// Moves commits to a thread of their own ([`StoreWorker`], every commit durable). After
    /// each commit it calls `notify(Ok(seq))` with the highest batch committed, or
    /// `notify(Err(error))` once if the store fails; carry those to the driver's thread and
    /// hand them to [`ClientStore::stored`] or [`ClientStore::failed`].
    pub fn spawn(self, notify: impl FnMut(Result<u64, StoreError>) + Send + 'static) -> ClientStore {
        let commits = match self.commits {
            Commits::Inline(store) => Commits::Worker(StoreWorker::spawn(store, SyncMode::Sync, notify)),
            other => other,
        };
        ClientStore { commits, ..self }
    }

    /// What was read back at open.
    pub fn restored(&self) -> ClientRestored {
        self.restored
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A log line for what was read back.
    pub fn summary(&self) -> String {
        let r = self.restored;
        format!(
            "client store {}: {} unacknowledged messages restored ({} in flight), {} QoS 2 messages awaiting PUBREL",
            self.path.display(),
            r.messages,
            r.in_flight,
            r.qos2_received
        )
    }

    /// Hands the driver's changes to the store; call it after every input, before the output
    /// goes to the network. Inline, they are committed (durably) and reported stored at once;
    /// a failure stops the client ([`ClientDriver::handle_store_failed`]). On the thread, they
    /// are queued for it at once: whatever queued while it syncs goes in its next transaction,
    /// with one sync. (Unlike the broker's store, which hands on nothing while a commit is in
    /// flight so that its journal coalesces more: a client's volume is small, and a message
    /// queued for the disk before it is sent is also written by a client that stops right
    /// after, as the thread commits what is queued when it is closed or dropped.)
    pub fn submit<T>(&mut self, driver: &mut ClientDriver<T>, now: Instant) {
        match &mut self.commits {
            Commits::Inline(store) => {
                let batches: Vec<StoreBatch> = std::iter::from_fn(|| driver.poll_store(now)).collect();
                let Some(seq) = batches.last().map(|b| b.seq) else { return };
                let committed = store.commit(&batches, true);
                match committed {
                    Ok(()) => driver.handle_stored(now, seq),
                    Err(e) => self.failed(driver, now, e),
                }
            }
            Commits::Worker(worker) => {
                while let Some(batch) = driver.poll_store(now) {
                    worker.submit(batch);
                }
            }
            Commits::Stopped => {}
        }
    }

    /// The commit thread stored every batch up to `seq`: output that waited for them goes.
    pub fn stored<T>(&mut self, driver: &mut ClientDriver<T>, now: Instant, seq: u64) {
        driver.handle_stored(now, seq);
    }

    /// The store failed: the client stops ([`ClientDriver::handle_store_failed`]), and nothing
    /// more is written.
    pub fn failed<T>(&mut self, driver: &mut ClientDriver<T>, now: Instant, e: StoreError) {
        self.commits = Commits::Stopped;
        driver.handle_store_failed(now, &client_error(e));
    }

    /// Commits what is left, durably, and closes the store; call it once the driver is done
    /// (or on shutdown). What the client had not finished stays for its next run.
    ///
    /// # Errors
    ///
    /// [`ClientError::Store`] if the last commit failed.
    pub fn close<T>(self, driver: &mut ClientDriver<T>, now: Instant) -> Result<(), ClientError> {
        let batches: Vec<StoreBatch> = std::iter::from_fn(|| driver.poll_store(now)).collect();
        let result = match self.commits {
            Commits::Inline(mut store) => store.commit(&batches, true),
            Commits::Worker(worker) => {
                for batch in batches {
                    worker.submit(batch);
                }
                worker.close()
            }
            Commits::Stopped => Ok(()),
        };
        result.map_err(|e| ClientError::Store(client_error(e)))
    }
}
