//! `mqtt-store`: the broker's persistence store, shared by the tokio, mio and async-std
//! adapters, and the clients' store ([`ClientStore`]: unacknowledged QoS 1 and 2 messages and
//! QoS 2 receive state surviving a client restart), in the same file format.
//!
//! The core (`mqtt_quic_core::persist`) describes what must survive a crash as [`StoreBatch`]es
//! of [`StoreOp`]s on four tables of opaque byte keys and values. This crate writes them to
//! one [redb](https://docs.rs/redb) file, `<data dir>/mqttq.redb`, and reads them back at start
//! as [`StoredRecord`]s.
//!
//! ```no_run
//! # fn main() -> Result<(), mqtt_store::StoreError> {
//! use mqtt_store::{Store, StoreWorker, SyncMode};
//!
//! let store = Store::open(std::path::Path::new("/var/lib/mqttq"))?;
//! let records = store.load()?; // hand them to Broker::restore
//! # drop(records);
//! let worker = StoreWorker::spawn(store, SyncMode::Sync, |stored| {
//!     // Ok(seq): hand it to Broker::handle_stored (on the broker's thread);
//!     // Err(e): the store has stopped; report e and shut down.
//!     # drop(stored);
//! });
//! // For each batch from Broker::poll_store:
//! # let batch = mqtt_quic_core::persist::StoreBatch { seq: 1, ops: vec![] };
//! worker.submit(batch);
//! // On shutdown:
//! worker.close()?;
//! # Ok(())
//! # }
//! ```
//!
//! # Why it is built this way
//!
//! - **Group commit.** A durable commit costs a sync, a few milliseconds on most disks: one
//!   sync per message would cap a broker at a few thousand QoS 1 messages a second
//!   (`BENCHMARKS.md`, "Choosing the persistence store"). [`StoreWorker`] runs the store on a
//!   thread of its own; while it syncs, batches pile up in its channel, and the next commit
//!   takes all of them in one transaction and one sync. The busier the broker, the more each
//!   sync carries, and the broker's event loop never waits on the disk.
//! - **One transaction per commit.** Every batch's operations are applied in order in one
//!   redb write transaction across the four tables, so a session, its subscriptions and its
//!   queue change together or not at all, and a crash leaves the state of some complete
//!   commit.
//! - **Stamping.** Each value is stored as an 8-byte little-endian wall-clock stamp (Unix
//!   milliseconds, taken at commit) followed by the value's bytes. [`Store::load`] strips the
//!   stamp and reports each record's age, so the broker can expire sessions, fire delayed wills
//!   and drop expired messages across a restart as if it had run on.
//! - **Versioning.** A `meta` table holds the record format version (key `"format_version"`,
//!   a `u32`), written when the store is created. A file from a newer build
//!   ([`FORMAT_VERSION`] greater than this build's) is refused with [`StoreError::TooNew`]
//!   rather than misread. (redb versions its own file format underneath; that is redb's to
//!   upgrade.)
//!
//! # Layout of the file
//!
//! One redb table per [`Table`], named by [`Table::name`] (`sessions`, `messages`, `retained`,
//! `wills`), with `&[u8]` keys and `&[u8]` values (stamp then value), plus the `meta` table.
//!
//! # Damaged files
//!
//! redb writes copy-on-write with checksummed commit slots, so a crash or power loss in the
//! middle of a commit leaves the previous commit readable: on the next open redb repairs the
//! file and [`Store::load`] returns the last complete commit. A file damaged some other way
//! (truncated by a copy, overwritten, not a store at all) is never read as empty: opening or
//! loading it gives [`StoreError::Corrupt`] (or [`StoreError::Io`]), whose one-line message
//! names the file and says to restore it or move it aside. In detail:
//!
//! - A new store is built in `mqttq.redb.tmp` and renamed into place once its format version
//!   is synced, so `mqttq.redb` exists only as a completely created store. An existing
//!   `mqttq.redb` of 0 bytes is therefore damage (a truncation), and is refused like any
//!   other file redb rejects; only a missing file starts an empty store.
//! - A truncated file (shorter than its header says, as an interrupted copy leaves it) is
//!   refused: the missing tail may hold pages the last commit uses (`tests/torn.rs` tries
//!   lengths from 0 bytes to one byte short; every one is refused).
//! - redb reports some damage (notably a file shorter than its header says) by panicking
//!   rather than returning an error. The store catches those panics and returns
//!   [`StoreError::Corrupt`]. While redb runs, the process's panic hook is silenced for that
//!   thread (the store wraps the hook once, on first use, and passes every other panic on), so
//!   an operator sees the one-line error, not redb's assertion. This needs the default
//!   `panic = "unwind"`.
//! - redb checks a file's checksums on open only after a crash; [`Store::open`] also runs
//!   redb's integrity check (every page in use against its checksum: about 30 ms for 100,000
//!   records in a 67 MB file, against 90 ms to load them, release build), so bytes changed in a file since it
//!   was closed cleanly are refused as [`StoreError::Corrupt`], never loaded as records.
//!
//! [`StoreBatch`]: mqtt_quic_core::persist::StoreBatch
//! [`StoreOp`]: mqtt_quic_core::persist::StoreOp
//! [`StoredRecord`]: mqtt_quic_core::persist::StoredRecord
//! [`Table`]: mqtt_quic_core::persist::Table
//! [`Table::name`]: mqtt_quic_core::persist::Table::name
//! [`FORMAT_VERSION`]: mqtt_quic_core::persist::FORMAT_VERSION

mod broker;
mod client;
mod error;
mod store;
mod worker;

pub use broker::{shard_dir, stored_shards, BrokerStore};
pub use client::ClientStore;
pub use error::StoreError;
pub use store::{Store, FILE_NAME};
pub use worker::{StoreWorker, SyncMode};
