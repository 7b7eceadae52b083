//! What every adapter's broker server does with the store, written once: open it and read it
//! back into the broker before any listener opens, hand the broker's batches to the commit
//! thread after every input, close it at shutdown. The adapter only carries the commit
//! thread's reports back to its event loop (a channel, a waker) and calls
//! `Broker::handle_stored` with them.

use crate::{Store, StoreError, StoreWorker, SyncMode};
use mqtt_quic_core::broker::machine::{Broker, Restored};
use mqtt_quic_core::driver::{ServerError, ServerOptions};
use mqtt_quic_core::persist::Persistence;
use std::path::PathBuf;
use std::time::Instant;

/// A broker server's store (nothing at all when persistence is off).
pub struct BrokerStore {
    worker: Option<StoreWorker>,
    /// What was read back, and from where.
    restored: Option<(Restored, PathBuf)>,
    /// The highest batch handed to the commit thread.
    submitted: u64,
}

impl BrokerStore {
    /// With `options.broker.persistence` on: opens the store in `options.data_dir`, restores
    /// the broker from it, and starts the commit thread, which calls `notify` with the highest
    /// batch committed after each commit (or the error that stopped it). Call it before opening
    /// any listener. With persistence off, a store that does nothing.
    pub fn open(
        options: &ServerOptions,
        broker: &mut Broker,
        now: Instant,
        notify: impl FnMut(Result<u64, StoreError>) + Send + 'static,
    ) -> Result<BrokerStore, ServerError> {
        let sync = match options.broker.persistence {
            Persistence::Off => return Ok(BrokerStore { worker: None, restored: None, submitted: 0 }),
            Persistence::Sync => SyncMode::Sync,
            Persistence::Periodic => SyncMode::Periodic(options.sync_interval),
        };
        let Some(dir) = &options.data_dir else {
            return Err(ServerError::Store("persistence is on but no data directory is set".into()));
        };
        let store = Store::open(dir).map_err(|e| ServerError::Store(e.to_string()))?;
        let records = store.load().map_err(|e| ServerError::Store(e.to_string()))?;
        let restored = broker.restore(now, records).map_err(|e| {
            ServerError::Store(format!(
                "{}: {e}; restore it from a backup or move it aside to start empty",
                store.path().display()
            ))
        })?;
        let path = store.path().to_path_buf();
        let worker = StoreWorker::spawn(store, sync, notify);
        Ok(BrokerStore { worker: Some(worker), restored: Some((restored, path)), submitted: 0 })
    }

    /// The log line for what was read back at start (`None` with persistence off).
    pub fn summary(&self) -> Option<String> {
        let (r, path) = self.restored.as_ref()?;
        Some(format!(
            "store {}: {} sessions, {} queued or in-flight messages, {} retained messages, {} delayed wills restored{}",
            path.display(),
            r.sessions,
            r.messages,
            r.retained,
            r.wills,
            if r.dropped > 0 { format!(" ({} expired or orphaned records dropped)", r.dropped) } else { String::new() }
        ))
    }

    /// Hands every batch the broker has ready to the commit thread. Call it after every input,
    /// with the other outputs.
    pub fn submit(&mut self, broker: &mut Broker, now: Instant) {
        while let Some(batch) = broker.poll_store(now) {
            if let Some(worker) = &self.worker {
                self.submitted = self.submitted.max(batch.seq);
                worker.submit(batch);
            }
        }
    }

    /// The highest batch `seq` handed to the commit thread so far (0 before the first, and
    /// always with persistence off). Every batch submitted is reported (`notify(Ok(seq))` with
    /// this `seq` or a higher one) unless the store fails first, so an adapter that cannot be
    /// woken by `notify` knows whether a report is still to come: while this is above the
    /// highest `seq` it was given, one is.
    pub fn submitted(&self) -> u64 {
        self.submitted
    }

    /// Commits what is left durably and stops the commit thread.
    pub fn close(self) -> Result<(), StoreError> {
        self.worker.map_or(Ok(()), StoreWorker::close)
    }
}
