//! Shards: one broker made of several broker machines, each on its own core, exchanging what
//! crosses them as inputs and outputs ([`Broker::poll_forward`], [`Broker::handle_forward`]),
//! never through shared memory. The adapter runs each shard on its own thread and carries
//! [`ShardBatch`]es between them over channels; the simulator carries them in memory
//! ([`ShardSet`]), so a sharded broker is as deterministic as one machine, and since a batch is
//! plain data the same messages could cross hosts.
//!
//! # Who owns what
//!
//! - **Connections** belong to the shard that accepted them: the kernel spreads UDP flows and
//!   TCP connections over the shards' sockets (`SO_REUSEPORT`). Every QUIC connection id a
//!   shard issues carries its shard ([`shard_of_datagram`]), so a datagram that reaches another
//!   shard (after a NAT rebinding or a migration, which change the flow) is forwarded to it.
//! - **Sessions** belong to the *home* shard of their client id ([`home_of`], a fixed hash):
//!   the shard that accepted a connection reads its CONNECT's client id and, if the session's
//!   home is elsewhere, relays the connection's MQTT bytes there and the answers back (see
//!   `relay`). So a client id has one owner whatever connection it comes on: a takeover, a
//!   kept session, its queued messages, its will and its expiry are each one shard's business,
//!   exactly as in a broker of one shard, and so are QoS 1 and 2 guarantees.
//! - **Subscriptions** are routed where the message is published: every shard announces the
//!   filters its sessions subscribe to (`Interest`), the others index them under one
//!   subscriber key per shard, and a PUBLISH matching another shard's interest is forwarded to
//!   it once, in order, in the batch for that shard; it routes the message to its own
//!   subscribers. Messages from one publisher therefore reach each shard in the order they were
//!   published. Shared subscriptions are decided where the message is published, among every
//!   member on every shard (a shard announces how many members it has), so they stay balanced
//!   across members wherever they are.
//! - **Retained messages** are kept by every shard (a SUBSCRIBE finds them locally): a change is
//!   applied where it was published and sent to the others, each change versioned (a Lamport
//!   clock and the shard) so concurrent changes of one topic settle on the same message
//!   everywhere.
//! - **`$SYS`** is published by shard 0 with every shard's counters added up (the others report
//!   theirs at each `$SYS` interval). Global limits are split between the shards
//!   ([`BrokerConfig::for_shard`](super::machine::BrokerConfig::for_shard)). Bridges run on
//!   shard 0.
//!
//! # Ordering across shards
//!
//! Deliver a shard's batches in the order it emitted them (one FIFO channel per pair of
//! shards), and hand a shard the batches waiting for it before network input that arrived
//! later: a shard emits a subscription's interest before the SUBACK leaves, so a client that
//! saw its SUBACK and then makes another client publish finds every shard aware of it.
//!
//! # Limits of relayed connections
//!
//! A connection relayed to its session's home carries its MQTT control stream only: QUIC data
//! streams (EMQX's multi-stream mode) and QUIC datagrams need the session on the connection's
//! own shard, and are refused (the stream reset, the datagram dropped) for relayed ones; a
//! client using them still works over its control stream.

mod relay;
mod routing;
mod set;

pub use set::ShardSet;

use super::links::StreamOutput;
use super::machine::Broker;
use super::sys::Stats;
use bytes::Bytes;
use mqtt_proto::{Publish, TopicFilter};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

pub(super) use relay::Relays;
pub(super) use routing::Routing;

/// Which shard a broker machine is, of how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardConfig {
    /// This shard, from 0.
    pub index: u16,
    /// How many shards make the broker (2 to 256).
    pub count: u16,
}

/// The home shard of a client id: where its session lives. A fixed hash (FNV-1a), the same on
/// every shard and across restarts with the same number of shards.
pub fn home_of(client_id: &str, count: u16) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in client_id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(count.max(1))) as u16
}

/// Where a datagram received by a sharded broker belongs: `Some(shard)` when it is addressed
/// to a connection id one of the shards issued (see [`crate::cid::QuicLb`]: the byte after the
/// server id is the shard), `None` for a client's first packets (Initial and 0-RTT carry an id
/// the client chose: the shard that receives them takes the connection) and for anything
/// unparsable (the receiving shard's endpoint deals with it).
pub fn shard_of_datagram(datagram: &[u8], lb: &crate::cid::QuicLb) -> Option<u16> {
    let first = *datagram.first()?;
    let len = lb.cid_len();
    let dcid = if first & 0x80 != 0 {
        // Long header: version (4 bytes), then the destination id's length and the id. Initial
        // (type 0) and 0-RTT (type 1) packets carry the client's choice.
        if (first >> 4) & 0x3 < 2 {
            return None;
        }
        match datagram.get(5) {
            Some(&l) if usize::from(l) == len => datagram.get(6..6 + len)?,
            _ => return None,
        }
    } else {
        datagram.get(1..1 + len)?
    };
    (lb.server_id_of(dcid)? == lb.server_id.as_slice()).then_some(())?;
    dcid.get(1 + lb.server_id.len()).map(|&s| u16::from(s))
}

/// What crosses from one shard to another, in a [`ShardBatch`]. Plain data: it could be
/// written to a socket as well as to a channel.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ShardMessage {
    /// The sender's sessions subscribe to `filter` (`count` > 0) or no longer do (0); for a
    /// shared subscription (`$share/...`), `count` is how many members the sender has.
    Interest {
        /// The filter, as subscribed.
        filter: TopicFilter,
        /// Subscribers on the sender (members, for a shared subscription).
        count: u32,
    },
    /// A message published on the sender, for this shard's subscribers (not shared ones).
    Route {
        /// The message, as published.
        publish: Publish,
        /// With `Persistence::Sync`, for a QoS 1 or 2 message: the publisher's acknowledgement
        /// waits until this shard answers [`ShardMessage::Kept`] with this number.
        kept: Option<u64>,
    },
    /// A message for one of this shard's members of the shared subscription `filter`.
    Shared {
        /// The shared subscription.
        filter: TopicFilter,
        /// The message, as published.
        publish: Publish,
        /// As for [`ShardMessage::Route`].
        kept: Option<u64>,
        /// Shards that had no member online to take it (see [`ShardMessage::SharedDeclined`]).
        declined: Vec<u16>,
    },
    /// None of this shard's members of `filter` is online (or may read the topic): the shard
    /// that sent the message picks another member, on another shard or its own, as a broker
    /// of one shard picks among the members online.
    SharedDeclined {
        /// The shared subscription.
        filter: TopicFilter,
        /// The message, as published.
        publish: Publish,
        /// Every shard that declined it so far, this one included.
        declined: Vec<u16>,
    },
    /// The copies this shard made of the message sent with number `kept` are kept (written,
    /// or delivered and acknowledged): the publisher may have its acknowledgement.
    Kept {
        /// The number the message came with.
        kept: u64,
    },
    /// A retained message set on the sender (an empty payload deletes), with its version.
    Retain {
        /// The message.
        publish: Publish,
        /// Lamport clock of the change.
        clock: u64,
        /// Whether the sender also sent it to this shard to route ([`ShardMessage::Route`]);
        /// if not, this shard routes it to its own subscribers.
        routed: bool,
    },
    /// A connection on the sender whose session lives here: its first bytes (the CONNECT).
    RelayOpen {
        /// The sender's number for it.
        relay: u64,
        /// Where the client connects from.
        remote: Option<SocketAddr>,
        /// Its certificate's common name, if it presented one.
        identity: Option<String>,
        /// Its transport, for the log: `quic`, `ws` or `tcp` (TLS below included).
        transport: String,
        /// The MQTT bytes received so far.
        data: Bytes,
    },
    /// More MQTT bytes from a relayed connection.
    RelayData {
        /// The sender's number for it.
        relay: u64,
        /// The bytes.
        data: Bytes,
    },
    /// A relayed connection ended on the sender (closed, lost, or dropped as a slow consumer).
    RelayClosed {
        /// The sender's number for it.
        relay: u64,
        /// Why, for the log.
        detail: String,
    },
    /// Output of a session here for a connection the receiver relays (bytes, close, abort).
    RelayOut {
        /// The receiver's number for it.
        relay: u64,
        /// What to do with the connection.
        output: StreamOutput,
    },
    /// The receiver's session's client took `bytes` more of what was sent to it (it left the
    /// relaying shard's transport): the session's write backlog shrinks by as much.
    RelayWritten {
        /// The sender's number for it (in its `RelayOpen`).
        relay: u64,
        /// Bytes taken.
        bytes: usize,
    },
    /// A QUIC datagram that reached the sender and belongs to a connection here.
    Datagram {
        /// Where it came from.
        remote: SocketAddr,
        /// The local address it was sent to, when known.
        local_ip: Option<IpAddr>,
        /// Its bytes.
        data: Bytes,
    },
    /// The sender's `$SYS` counters (to shard 0).
    Report(ShardReport),
}

/// One shard's share of the `$SYS` figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardReport {
    /// Its counters.
    pub stats: Stats,
    /// Clients connected to sessions it holds.
    pub connected: usize,
    /// Sessions it holds.
    pub sessions: usize,
    /// Subscriptions of its sessions.
    pub subscriptions: usize,
}

/// Messages from one shard to another, in the order they were emitted.
pub type ShardBatch = Vec<ShardMessage>;

/// A sharded broker's cross-shard state (absent in a broker of one shard).
pub(super) struct ShardState {
    pub(super) index: u16,
    pub(super) count: u16,
    /// Messages waiting to leave, per destination.
    out: BTreeMap<u16, ShardBatch>,
    /// Connections relayed to their session's home, and relayed connections hosted here.
    pub(super) relays: Relays,
    /// Other shards' interest, retained versions, `$SYS` reports.
    pub(super) routing: Routing,
}

impl ShardState {
    pub(super) fn new(config: ShardConfig) -> ShardState {
        ShardState {
            index: config.index,
            count: config.count,
            out: BTreeMap::new(),
            relays: Relays::default(),
            routing: Routing::default(),
        }
    }

    /// Queues a message for shard `to`.
    pub(super) fn send(&mut self, to: u16, message: ShardMessage) {
        self.out.entry(to).or_default().push(message);
    }

    /// Whether a client id's session lives here.
    pub(super) fn is_home(&self, client_id: &str) -> bool {
        home_of(client_id, self.count) == self.index
    }
}

impl Broker {
    /// This broker's shard, when it is one of several.
    pub fn shard(&self) -> Option<ShardConfig> {
        self.shard.as_ref().map(|s| ShardConfig { index: s.index, count: s.count })
    }

    /// The next batch of messages for another shard, and which; poll until `None` after every
    /// input, and hand each batch to [`Broker::handle_forward`] of that shard, in order.
    #[must_use]
    pub fn poll_forward(&mut self) -> Option<(u16, ShardBatch)> {
        let shard = self.shard.as_mut()?;
        shard.routing.flush_interest(&mut self.router, &mut shard.out, shard.index, shard.count);
        let to = *shard.out.keys().next()?;
        let batch = shard.out.remove(&to)?;
        Some((to, batch))
    }

    /// A batch from shard `from` (see [`Broker::poll_forward`]).
    pub fn handle_forward(&mut self, now: std::time::Instant, from: u16, batch: ShardBatch) {
        self.tick(now);
        if self.shard.as_ref().is_none_or(|s| from >= s.count || from == s.index) {
            return;
        }
        for message in batch {
            match message {
                ShardMessage::Interest { filter, count } => self.remote_interest(from, filter, count),
                ShardMessage::Route { publish, kept } => {
                    self.remote_routing(from, kept, |b| b.route_remote(now, publish))
                }
                ShardMessage::Shared { filter, publish, kept, declined } => {
                    self.remote_routing(from, kept, |b| b.shared_remote(now, from, &filter, publish, declined))
                }
                ShardMessage::SharedDeclined { filter, publish, declined } => {
                    self.shared_declined(now, &filter, publish, declined)
                }
                ShardMessage::Kept { kept } => self.journal.remote_kept(kept),
                ShardMessage::Retain { publish, clock, routed } => {
                    self.retain_remote(now, from, publish, clock, routed)
                }
                ShardMessage::RelayOpen { relay, remote, identity, transport, data } => {
                    self.relay_opened(now, from, relay, (remote, identity, transport), &data)
                }
                ShardMessage::RelayData { relay, data } => self.relay_data(now, from, relay, &data),
                ShardMessage::RelayClosed { relay, detail } => self.relay_closed(now, from, relay, detail),
                ShardMessage::RelayOut { relay, output } => self.relay_out(now, relay, output),
                ShardMessage::RelayWritten { relay, bytes } => self.relay_written(from, relay, bytes),
                ShardMessage::Datagram { remote, local_ip, data } => {
                    let datagram = crate::machine::Datagram { remote, local_ip, ecn: None, data: &data };
                    self.links.quic.handle_datagram(now, datagram);
                }
                ShardMessage::Report(report) => {
                    if let Some(shard) = self.shard.as_mut() {
                        shard.routing.reports.insert(from, report);
                    }
                }
            }
        }
        self.pump(now);
    }

    /// A datagram for this shard's endpoint: handled here, or forwarded to the shard whose
    /// connection id it carries. Returns whether it was forwarded.
    pub(super) fn forward_datagram(&mut self, datagram: &crate::machine::Datagram<'_>) -> bool {
        let Some(shard) = self.shard.as_mut() else { return false };
        let Some(lb) = &self.config.quic.load_balancer else { return false };
        // Packets for the bridges' connections (tagged ids) belong to shard 0, where the
        // bridges run.
        let to = match crate::cid::tagged_marker(datagram.data) {
            Some(_) => Some(0),
            None => shard_of_datagram(datagram.data, lb),
        };
        match to {
            Some(to) if to != shard.index && to < shard.count => {
                let message = ShardMessage::Datagram {
                    remote: datagram.remote,
                    local_ip: datagram.local_ip,
                    data: Bytes::copy_from_slice(datagram.data),
                };
                shard.send(to, message);
                true
            }
            _ => false,
        }
    }

    /// What the shard layer has to do between inputs: relayed output back to where it was
    /// accepted, progress reports. Returns whether it did anything (then `pump` goes on).
    pub(super) fn pump_shard(&mut self, now: std::time::Instant) -> bool {
        if self.shard.is_none() {
            return false;
        }
        self.report_relayed(now);
        let kept = self.journal.take_kept();
        let moved = !kept.is_empty();
        if let Some(shard) = self.shard.as_mut() {
            for (to, kept) in kept {
                shard.send(to, ShardMessage::Kept { kept });
            }
        }
        self.relayed_output() || moved
    }

    /// A client id for a client that sent none, whose home is this shard (the connection is
    /// served where it arrived, so the id it is given must lead back here when it returns).
    pub(super) fn assign_client_id(&mut self) -> String {
        loop {
            let id = self.registry.assign_client_id();
            if self.shard.as_ref().is_none_or(|s| s.is_home(&id)) {
                return id;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn homes_spread_and_stay() {
        let mut counts = [0usize; 8];
        for i in 0..8000 {
            counts[usize::from(home_of(&format!("device-{i}"), 8))] += 1;
        }
        assert!(counts.iter().all(|&c| (800..1200).contains(&c)), "{counts:?}");
        assert_eq!(home_of("sensor-17", 8), home_of("sensor-17", 8));
        assert_eq!(home_of("anything", 1), 0);
    }

    #[test]
    fn datagrams_find_their_shard_by_connection_id() {
        let lb = crate::cid::QuicLb::new(vec![0]);
        let mut cid = vec![(lb.cid_len() - 1) as u8, 0, 5];
        cid.resize(lb.cid_len(), 0xAB);
        let mut short = vec![0x40];
        short.extend_from_slice(&cid);
        short.extend_from_slice(&[0; 30]);
        assert_eq!(shard_of_datagram(&short, &lb), Some(5));
        // A Handshake packet carries our id; an Initial the client's.
        let mut handshake = vec![0xE0, 0, 0, 0, 1, cid.len() as u8];
        handshake.extend_from_slice(&cid);
        handshake.extend_from_slice(&[0; 30]);
        assert_eq!(shard_of_datagram(&handshake, &lb), Some(5));
        handshake[0] = 0xC0;
        assert_eq!(shard_of_datagram(&handshake, &lb), None);
        assert_eq!(shard_of_datagram(&[], &lb), None);
        assert_eq!(shard_of_datagram(&[0x40, 1], &lb), None);
    }
}
