//! Persistence, the sans-IO way: the broker (or a client, see "Client stores" below)
//! describes the state that must survive a crash as storage operations, the adapter writes
//! them, and the machine holds back what promises durability until the adapter says they are
//! on disk.
//!
//! # The contract
//!
//! - With [`Persistence::Sync`] or [`Persistence::Periodic`] configured, the broker journals
//!   every change to durable state (kept sessions and their subscriptions, both directions of
//!   QoS 1/2 state, offline queues, retained messages, delayed wills). Poll
//!   [`Broker::poll_store`](crate::broker::machine::Broker::poll_store) after every input, like
//!   the other outputs: each [`StoreBatch`] is a list of [`StoreOp`]s to apply in order, in one
//!   transaction, numbered by `seq`.
//! - Batches may be committed together (group commit): one transaction and one sync for
//!   everything polled so far. Then report the highest `seq` committed with
//!   [`Broker::handle_stored`](crate::broker::machine::Broker::handle_stored). Polling only
//!   while no commit is in flight (as `mqtt-store`'s `BrokerStore` does) lets the broker
//!   coalesce what changes meanwhile: a message delivered and acknowledged before it was
//!   written is never written. A new QoS 1 message is also left out of batches for
//!   `BrokerConfig::commit_delay` (1 ms), so that subscribers that acknowledge at once spare
//!   the disk; `poll_timeout` includes the end of the delay.
//! - With `Sync`, a connection whose packet changed durable state gets no further output (its
//!   PUBACK, PUBREC, PUBCOMP, SUBACK, CONNACK, ...) until that change is kept: the batch
//!   holding it reported stored, or, for a message copy routed to a kept session, that copy
//!   acknowledged by its subscriber before it was written (see `broker/journal.rs`).
//! - On start, before any listener opens, the adapter reads every record back and hands them
//!   to [`Broker::restore`](crate::broker::machine::Broker::restore).
//!
//! # Client stores
//!
//! A client keeps its side of the session the same way, in the same record format
//! ([`ClientSession::restore`](crate::session::client::ClientSession::restore),
//! `poll_store`, `handle_stored`; the adapters' clients do it all when
//! [`ClientOptions::store`](crate::driver::ClientOptions::store) names a directory): one store
//! per client id, holding
//! - every QoS 1 and 2 message the application published and the broker has not acknowledged
//!   (queued, in flight under its packet identifier, or released awaiting PUBCOMP), in
//!   [`Table::Messages`] under the client id and the message's request id;
//! - the broker's QoS 2 messages received (PUBREC sent) and not yet released, so that a resent
//!   PUBLISH is not delivered twice: their identifiers in a [`Table::Sessions`] record for the
//!   client id (no owner, no subscriptions), absent when there are none.
//!
//! Output that promises what a crash could take back waits for the batch that records it (the
//! broker's `Sync` rule, for one connection): a QoS 2 PUBLISH sent under an identifier, a
//! PUBREL, and the PUBREC and PUBCOMP that change the QoS 2 receive state. Otherwise a client
//! restarted from an older store would send a QoS 2 message again under another identifier,
//! or PUBLISH again after its PUBREL, or take a resent message for a new one, and the broker
//! would deliver it twice. QoS 1 output never waits: at worst a restart sends a message again,
//! which QoS 1 allows. Nor does a message wait to be stored before it is sent: a crash before
//! its batch is committed may lose it, but the application had not been told it was accepted
//! (that is PUBACK or PUBCOMP, after which the broker has it). The adapters' clients hand every
//! batch to the store before the output it came with goes to the network, so a client that
//! stops (rather than crashes) loses nothing.
//!
//! Records are opaque bytes to the store: keys and values are encoded here (`records.rs`), so
//! every adapter stores the same format and the core never touches a file. A store only needs
//! four tables of ordered byte keys, prefix deletes, and a wall-clock stamp per value (so the
//! broker learns how old each record is: offline sessions expire, wills fire and messages
//! expire across a restart as if the broker had run on).

use std::time::Duration;

/// The version of the record format in [`Table`]s. A store holding a newer version than this
/// build knows must be refused: its records may not mean what this build would read.
pub const FORMAT_VERSION: u32 = 1;

/// How durable the broker's state is (the `persistence` setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Persistence {
    /// Nothing is stored: a restart starts empty.
    Off,
    /// State is written in batches and synced to disk at intervals: a crash loses at most the
    /// last interval; acknowledgements do not wait for the disk.
    Periodic,
    /// Acknowledgements wait for the disk: once PUBACK, PUBREC, PUBCOMP or SUBACK went out, what
    /// it acknowledges survives a crash.
    #[default]
    Sync,
}

impl Persistence {
    /// Whether the broker journals its state at all.
    pub fn is_on(self) -> bool {
        self != Persistence::Off
    }
}

/// A table of the store. Keys sort as bytes; each table's key and value format is in
/// `records.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// Kept sessions by client id: owner, expiry, subscriptions, QoS 2 ids awaiting PUBREL.
    Sessions,
    /// Messages for a session (queued or in flight) by client id and message number.
    Messages,
    /// Retained messages by topic.
    Retained,
    /// Delayed wills by client id.
    Wills,
}

impl Table {
    /// Every table.
    pub const ALL: [Table; 4] = [Table::Sessions, Table::Messages, Table::Retained, Table::Wills];

    /// The table's name in a store.
    pub fn name(self) -> &'static str {
        match self {
            Table::Sessions => "sessions",
            Table::Messages => "messages",
            Table::Retained => "retained",
            Table::Wills => "wills",
        }
    }
}

/// One change to apply to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// Insert or replace a record. The store stamps the value with the wall-clock time of the
    /// write (see [`StoredRecord::age`]).
    Put {
        /// Which table.
        table: Table,
        /// Its key.
        key: Vec<u8>,
        /// Its value.
        value: Vec<u8>,
    },
    /// Remove a record (nothing happens if there is none).
    Delete {
        /// Which table.
        table: Table,
        /// Its key.
        key: Vec<u8>,
    },
    /// Remove every record whose key starts with `prefix`.
    DeletePrefix {
        /// Which table.
        table: Table,
        /// The prefix.
        prefix: Vec<u8>,
    },
}

/// Operations to apply in order, atomically, numbered so the adapter can report them stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreBatch {
    /// Increases from batch to batch, from 1 (a number is skipped when output waited on
    /// changes that all cancelled out before they were written).
    pub seq: u64,
    /// The changes.
    pub ops: Vec<StoreOp>,
}

/// A record read back from the store at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Its table.
    pub table: Table,
    /// Its key.
    pub key: Vec<u8>,
    /// Its value, as put.
    pub value: Vec<u8>,
    /// How long ago it was written (wall clock; zero if the clock went backwards).
    pub age: Duration,
}

pub(crate) mod client;
pub(crate) mod log;
pub(crate) mod records;

pub use client::{ClientRestored, RestoreError};

pub use records::RecordError;
