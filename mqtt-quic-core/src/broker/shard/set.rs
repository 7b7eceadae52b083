//! All the shards of a broker driven together on one thread: what the simulator runs (so a
//! sharded broker is tested deterministically, with virtual time), and what an adapter's
//! threads do, written once in memory.

use super::ShardBatch;
use crate::broker::links::{StreamId, StreamOutput};
use crate::broker::machine::{Broker, BrokerConfig};
use crate::config::ConfigError;
use crate::machine::Datagram;
use crate::quic::Transmit;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

/// A sharded broker as one [`Machine`](crate::Machine): datagrams go to a shard as the
/// kernel's `SO_REUSEPORT` would send them (by the sender's address; a shard forwards what
/// belongs to another), byte streams are spread round robin, and the batches the shards emit
/// are delivered at once, in order, before the next input.
pub struct ShardSet {
    shards: Vec<Broker>,
    /// Byte streams: this set's number for each, and the shard's.
    streams: BTreeMap<StreamId, (usize, StreamId)>,
    numbers: BTreeMap<(usize, StreamId), StreamId>,
    next_stream: u64,
    /// The shard the next byte stream goes to.
    next_shard: usize,
    /// The shard whose transmits are taken first next time (round robin).
    next_transmit: usize,
    /// Batches emitted and not yet delivered (delivery may cascade).
    in_flight: VecDeque<(usize, u16, ShardBatch)>,
}

impl ShardSet {
    /// `count` shards (1 to 256) of a broker configured with `config` (see
    /// [`BrokerConfig::for_shard`]).
    pub fn new(config: &BrokerConfig, count: u16) -> Result<ShardSet, ConfigError> {
        if count == 0 {
            return Err(ConfigError::Invalid("a broker needs at least one shard".into()));
        }
        let shards = (0..count).map(|i| Broker::new(config.for_shard(i, count))).collect::<Result<Vec<_>, _>>()?;
        Ok(ShardSet {
            shards,
            streams: BTreeMap::new(),
            numbers: BTreeMap::new(),
            next_stream: 0,
            next_shard: 0,
            next_transmit: 0,
            in_flight: VecDeque::new(),
        })
    }

    /// The shards.
    pub fn shards(&mut self) -> &mut [Broker] {
        &mut self.shards
    }

    /// Delivers every batch the shards have for each other, until none has any.
    pub fn exchange(&mut self, now: Instant) {
        loop {
            for (i, shard) in self.shards.iter_mut().enumerate() {
                while let Some((to, batch)) = shard.poll_forward() {
                    self.in_flight.push_back((i, to, batch));
                }
            }
            let Some((from, to, batch)) = self.in_flight.pop_front() else { return };
            if let Some(shard) = self.shards.get_mut(usize::from(to)) {
                shard.handle_forward(now, from as u16, batch);
            }
        }
    }

    /// The shard a datagram from `remote` reaches first (the one that takes a new connection
    /// from there).
    pub fn shard_for(&self, remote: SocketAddr) -> usize {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let port = remote.port().to_be_bytes();
        let ip = match remote.ip() {
            std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            std::net::IpAddr::V6(a) => a.octets(),
        };
        for b in ip.iter().chain(&port) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        (h % self.shards.len() as u64) as usize
    }

    /// Clients connected, on every shard.
    pub fn connected(&self) -> usize {
        self.shards.iter().map(Broker::connected).sum()
    }

    /// Sessions kept, on every shard.
    pub fn sessions(&self) -> usize {
        self.shards.iter().map(Broker::sessions).sum()
    }

    /// Subscriptions of every shard's sessions.
    pub fn subscriptions(&self) -> usize {
        self.shards.iter().map(Broker::subscriptions).sum()
    }

    /// Whether any shard keeps a session for `client_id` (its home does, if any).
    pub fn has_session(&self, client_id: &str) -> bool {
        self.shards.iter().any(|s| s.has_session(client_id))
    }

    /// A byte-stream connection accepted (see [`Broker::handle_stream_open`]); `websocket`
    /// as for [`Broker::handle_stream_open_ws`].
    pub fn handle_stream_open(&mut self, now: Instant, remote: Option<SocketAddr>, websocket: bool) -> StreamId {
        let shard = self.next_shard;
        self.next_shard = (self.next_shard + 1) % self.shards.len();
        let theirs = match websocket {
            true => self.shards[shard].handle_stream_open_ws(now, remote),
            false => self.shards[shard].handle_stream_open(now, remote),
        };
        self.next_stream += 1;
        let ours = StreamId(self.next_stream);
        self.streams.insert(ours, (shard, theirs));
        self.numbers.insert((shard, theirs), ours);
        self.exchange(now);
        ours
    }

    /// Bytes read from a byte stream.
    pub fn handle_stream_data(&mut self, now: Instant, id: StreamId, data: &[u8]) {
        if let Some(&(shard, theirs)) = self.streams.get(&id) {
            self.shards[shard].handle_stream_data(now, theirs, data);
            self.exchange(now);
        }
    }

    /// A byte stream closed.
    pub fn handle_stream_closed(&mut self, now: Instant, id: StreamId) {
        if let Some((shard, theirs)) = self.streams.remove(&id) {
            self.numbers.remove(&(shard, theirs));
            self.shards[shard].handle_stream_closed(now, theirs);
            self.exchange(now);
        }
    }

    /// Bytes of a byte stream's output written.
    pub fn handle_stream_written(&mut self, id: StreamId, bytes: usize) {
        if let Some(&(shard, theirs)) = self.streams.get(&id) {
            self.shards[shard].handle_stream_written(theirs, bytes);
        }
    }

    /// Output for byte streams.
    #[must_use]
    pub fn poll_stream(&mut self) -> Option<(StreamId, StreamOutput)> {
        for (i, shard) in self.shards.iter_mut().enumerate() {
            while let Some((theirs, output)) = shard.poll_stream() {
                if let Some(&ours) = self.numbers.get(&(i, theirs)) {
                    return Some((ours, output));
                }
            }
        }
        None
    }

    /// Feeds one received datagram.
    pub fn handle_datagram(&mut self, now: Instant, datagram: Datagram<'_>) {
        let shard = self.shard_for(datagram.remote);
        self.shards[shard].handle_datagram(now, datagram);
        self.exchange(now);
    }

    /// Advances every shard's timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        for shard in &mut self.shards {
            if shard.poll_timeout().is_some_and(|t| t <= now) {
                shard.handle_timeout(now);
            }
        }
        self.exchange(now);
    }

    /// The next datagram any shard has to send.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        self.poll_transmit_batch(now, 1, buf)
    }

    /// Up to `max_datagrams` datagrams to one destination, from one shard.
    #[must_use]
    pub fn poll_transmit_batch(&mut self, now: Instant, max_datagrams: usize, buf: &mut Vec<u8>) -> Option<Transmit> {
        let n = self.shards.len();
        for k in 0..n {
            let i = (self.next_transmit + k) % n;
            let t = self.shards[i].poll_transmit_batch(now, max_datagrams, buf);
            // (Polling moves a shard along: what it emitted meanwhile is delivered.)
            self.exchange(now);
            if t.is_some() {
                self.next_transmit = (i + 1) % n;
                return t;
            }
        }
        None
    }

    /// The earliest deadline of any shard.
    #[must_use]
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        self.shards.iter_mut().filter_map(Broker::poll_timeout).min()
    }
}

crate::machine::forward_machine!(ShardSet);
