//! What every adapter's broker server does with the store, written once: open it and read it
//! back into the broker before any listener opens, hand the broker's batches to the commit
//! thread after every input, close it at shutdown. The adapter only carries the commit
//! thread's reports back to its event loop (a channel, a waker) and calls
//! `Broker::handle_stored` with them.

use crate::{Store, StoreError, StoreWorker, SyncMode};
use mqtt_quic_core::broker::machine::{Broker, Restored};
use mqtt_quic_core::broker::shard::ShardConfig;
use mqtt_quic_core::driver::{ServerError, ServerOptions};
use mqtt_quic_core::persist::Persistence;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A broker server's store (nothing at all when persistence is off).
pub struct BrokerStore {
    worker: Option<StoreWorker>,
    /// What was read back, and from where.
    restored: Option<(Restored, PathBuf)>,
    /// The highest batch handed to the commit thread.
    submitted: u64,
    /// The highest batch reported stored.
    reported: u64,
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
        BrokerStore::open_shard(options, broker, now, None, notify)
    }

    /// As [`BrokerStore::open`], for one shard of a sharded broker (`shard` from
    /// [`Broker::shard`]): each shard keeps its own store, in
    /// `<data_dir>/shard-<index>-of-<count>` (see [`shard_dir`]), and reads back only its own.
    /// Sessions live on the home shard of their client id, which depends on the number of
    /// shards: a store written by another number of shards is refused with a message that
    /// names it (see [`stored_shards`]).
    pub fn open_shard(
        options: &ServerOptions,
        broker: &mut Broker,
        now: Instant,
        shard: Option<ShardConfig>,
        notify: impl FnMut(Result<u64, StoreError>) + Send + 'static,
    ) -> Result<BrokerStore, ServerError> {
        let sync = match options.broker.persistence {
            Persistence::Off => return Ok(BrokerStore { worker: None, restored: None, submitted: 0, reported: 0 }),
            Persistence::Sync => SyncMode::Sync,
            Persistence::Periodic => SyncMode::Periodic(options.sync_interval),
        };
        let Some(dir) = &options.data_dir else {
            return Err(ServerError::Store("persistence is on but no data directory is set".into()));
        };
        let count = shard.map_or(1, |s| s.count.max(1));
        match stored_shards(dir) {
            Some(found) if found != count => {
                return Err(ServerError::Store(format!(
                    "{} holds the sessions of a broker of {found} shard{}, and this one has {count}: start it with \
                     --shards {found} (or move the directory aside to start empty)",
                    dir.display(),
                    if found == 1 { "" } else { "s" }
                )))
            }
            _ => {}
        }
        let dir = match shard.filter(|s| s.count > 1) {
            Some(s) => shard_dir(dir, s),
            None => dir.clone(),
        };
        let store = Store::open(&dir).map_err(|e| ServerError::Store(e.to_string()))?;
        let records = store.load().map_err(|e| ServerError::Store(e.to_string()))?;
        let restored = broker.restore(now, records).map_err(|e| {
            ServerError::Store(format!(
                "{}: {e}; restore it from a backup or move it aside to start empty",
                store.path().display()
            ))
        })?;
        let path = store.path().to_path_buf();
        let worker = StoreWorker::spawn(store, sync, notify);
        Ok(BrokerStore { worker: Some(worker), restored: Some((restored, path)), submitted: 0, reported: 0 })
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

    /// Hands the broker's changes to the commit thread, when it is idle. Call it after every
    /// input, with the other outputs.
    ///
    /// One commit is in flight at a time: while it syncs, the broker's journal keeps collecting
    /// (and coalescing) changes, and the next batch carries all of them. A message delivered to
    /// a client and acknowledged by it within one commit is never written at all, and the busier
    /// the broker, the more one sync carries.
    pub fn submit(&mut self, broker: &mut Broker, now: Instant) {
        let Some(worker) = &self.worker else { return };
        if self.reported < self.submitted {
            return;
        }
        while let Some(batch) = broker.poll_store(now) {
            self.submitted = self.submitted.max(batch.seq);
            worker.submit(batch);
        }
    }

    /// The commit thread reported batches up to `seq` stored: the broker releases what waited
    /// for them. Call it with each `Ok(seq)` the `notify` of [`BrokerStore::open`] gave, on the
    /// broker's thread; then [`BrokerStore::submit`] (with the other outputs) sends what
    /// collected meanwhile.
    pub fn stored(&mut self, broker: &mut Broker, now: Instant, seq: u64) {
        self.reported = self.reported.max(seq);
        broker.handle_stored(now, seq);
    }

    /// Whether a commit is in flight (its report is still to come).
    pub fn is_committing(&self) -> bool {
        self.reported < self.submitted
    }

    /// Hands the commit thread everything the broker still has journaled (commit delay or
    /// not: a graceful shutdown loses nothing), commits it durably and stops the thread. Call it
    /// once the broker is done.
    pub fn close(self, broker: &mut Broker, now: Instant) -> Result<(), StoreError> {
        let Some(worker) = self.worker else { return Ok(()) };
        // Batches are committed in the order they are handed over, after any in flight.
        while let Some(batch) = broker.flush_store(now) {
            worker.submit(batch);
        }
        worker.close()
    }
}

/// Where shard `shard` of a sharded broker keeps its store under the data directory.
pub fn shard_dir(dir: &Path, shard: ShardConfig) -> PathBuf {
    dir.join(format!("shard-{}-of-{}", shard.index, shard.count))
}

/// How many shards wrote the store in `dir`: 1 for a store of its own (`mqttq.redb` there),
/// the count of `shard-<i>-of-<count>` directories holding one, `None` for no store yet. A
/// broker restarted with another number of shards would look for its sessions on other
/// shards than those that kept them.
pub fn stored_shards(dir: &Path) -> Option<u16> {
    if dir.join(crate::FILE_NAME).exists() {
        return Some(1);
    }
    let entries = std::fs::read_dir(dir).ok()?;
    entries.filter_map(Result::ok).find_map(|e| {
        let name = e.file_name();
        let count = name.to_str()?.strip_prefix("shard-")?.split_once("-of-")?.1.parse::<u16>().ok()?;
        e.path().join(crate::FILE_NAME).exists().then_some(count)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_number_of_shards_is_read_from_the_layout() {
        let dir = std::env::temp_dir().join(format!("mqtt-store-shards-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(stored_shards(&dir), None);
        let shard = shard_dir(&dir, ShardConfig { index: 2, count: 4 });
        std::fs::create_dir_all(&shard).unwrap();
        assert_eq!(stored_shards(&dir), None, "an empty shard directory is no store");
        std::fs::write(shard.join(crate::FILE_NAME), b"x").unwrap();
        assert_eq!(stored_shards(&dir), Some(4));
        std::fs::write(dir.join(crate::FILE_NAME), b"x").unwrap();
        assert_eq!(stored_shards(&dir), Some(1));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
