//! The broker's connections, whatever carries them: the QUIC connections of its endpoint and
//! the byte streams (TCP, TLS) the adapter carries, behind one address ([`Peer`]). Sending,
//! finishing and aborting go through here, and so does the accounting that keeps a slow reader
//! from making the broker hold an unbounded backlog: bytes waiting per connection and in all,
//! write progress, and the write-timeout check of connections whose bytes wait.
//!
//! It knows transports, not sessions: what a stalled or too-far-behind connection means for its
//! session (a lost connection, a will) the machine decides.

use super::config::BrokerConfig;
use crate::config::ConfigError;
use crate::quic::{self, ConnId, Lane, QuicEndpoint};
use crate::timers::TimerIndex;
use crate::ws::{WsConn, WsError};
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A byte-stream connection the adapter owns (TCP, TLS over TCP), numbered by the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u64);

/// Where a client is connected: a QUIC connection of the broker's endpoint, or a byte stream
/// the adapter carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// A QUIC connection.
    Quic(ConnId),
    /// A byte stream (TCP or TLS).
    Stream(StreamId),
}

/// What the broker has for a byte-stream connection, from
/// [`Broker::poll_stream`](super::machine::Broker::poll_stream).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamOutput {
    /// Bytes to write to the stream.
    Data(Bytes),
    /// The session is over: close the stream (after writing what came before).
    Close,
    /// The client does not take what is sent to it: drop the connection now, with whatever
    /// waits to be written (it would never be read).
    Abort,
}

/// The transports and their write accounting.
pub(super) struct Links {
    /// The QUIC endpoint (the machine drives it directly for datagrams and timeouts).
    pub(super) quic: QuicEndpoint,
    /// Output for byte-stream connections, in order, for the adapter.
    out: VecDeque<(StreamId, StreamOutput)>,
    /// Bytes handed to the adapter for each byte stream and not yet reported written, and
    /// bytes reported written so far (progress).
    backlog: BTreeMap<StreamId, (usize, u64)>,
    /// The sum of the byte streams' backlogs.
    backlog_total: usize,
    /// Where the adapter said each byte stream comes from.
    remote: BTreeMap<StreamId, SocketAddr>,
    /// Connections with bytes waiting: since when, with how much progress then.
    stalls: BTreeMap<Peer, (Instant, u64)>,
    stall_timers: TimerIndex<Peer>,
    next_stream: u64,
    /// Streams the broker carries itself (its bridges' sessions here), and their output,
    /// which goes to them instead of the adapter.
    internal: std::collections::BTreeSet<StreamId>,
    internal_out: VecDeque<(StreamId, StreamOutput)>,
    /// Streams that stand for connections another shard relays here (see `broker::shard`),
    /// and their output, which goes back to that shard.
    relayed: std::collections::BTreeSet<StreamId>,
    relayed_out: VecDeque<(StreamId, StreamOutput)>,
    /// The identity (certificate common name) of byte streams whose client presented a
    /// certificate, as the adapter said (see `Broker::set_stream_identity`).
    identities: BTreeMap<StreamId, String>,
    /// The WebSocket layer of byte streams that carry MQTT over WebSocket: output is framed
    /// on its way to the adapter, input unframed on its way in.
    websockets: BTreeMap<StreamId, WsConn>,
    /// From the configuration: see [`BrokerConfig::write_timeout`].
    write_timeout: Duration,
    /// See [`BrokerConfig::max_queued_bytes`].
    max_queued_bytes: usize,
    /// See [`BrokerConfig::max_total_queued_bytes`].
    max_total_queued_bytes: usize,
}

impl Links {
    pub(super) fn new(config: &BrokerConfig) -> Result<Links, ConfigError> {
        Ok(Links {
            quic: QuicEndpoint::server(&config.quic)?,
            out: VecDeque::new(),
            backlog: BTreeMap::new(),
            backlog_total: 0,
            remote: BTreeMap::new(),
            stalls: BTreeMap::new(),
            stall_timers: TimerIndex::new(),
            next_stream: 0,
            internal: Default::default(),
            internal_out: VecDeque::new(),
            relayed: Default::default(),
            relayed_out: VecDeque::new(),
            websockets: BTreeMap::new(),
            identities: BTreeMap::new(),
            write_timeout: config.write_timeout,
            max_queued_bytes: config.max_queued_bytes,
            max_total_queued_bytes: config.max_total_queued_bytes,
        })
    }

    /// Numbers a new byte stream.
    pub(super) fn open_stream(&mut self) -> StreamId {
        self.next_stream += 1;
        StreamId(self.next_stream)
    }

    /// Numbers a new byte stream that carries MQTT over WebSocket served at `path`.
    pub(super) fn open_websocket(&mut self, path: &str) -> StreamId {
        let id = self.open_stream();
        self.websockets.insert(id, WsConn::server(path));
        id
    }

    /// Bytes read from a WebSocket stream: `None` if the stream is not one; otherwise the MQTT
    /// bytes they carried are appended to `mqtt`, and what the WebSocket layer answers (its
    /// handshake, Pongs, a closing frame) is queued for the adapter, counted and watched like
    /// any output. `Some(Err)`: the WebSocket connection is over (a refused upgrade, a broken
    /// frame, the peer's close, or a client that sends Pings and reads none of the Pongs: over
    /// four times its backlog limit), and the caller ends it.
    pub(super) fn websocket_in(
        &mut self,
        now: Instant,
        id: StreamId,
        data: &[u8],
        mqtt: &mut Vec<u8>,
    ) -> Option<Result<(), String>> {
        let ws = self.websockets.get_mut(&id)?;
        // A client that does not read gets no more Pongs (RFC 6455 allows answering only the
        // latest Ping): what waits for it stays bounded.
        ws.set_answer_pings(self.backlog.get(&id).map_or(0, |b| b.0) <= self.max_queued_bytes);
        let result = ws.receive(data, mqtt).map_err(|e: WsError| e.to_string());
        let result = match (result, ws.is_closed()) {
            (Ok(()), true) => Err("the client closed the WebSocket".to_string()),
            (result, _) => result,
        };
        if self.flush_websocket(now, id) {
            return Some(Err("slow consumer: it does not read what is sent to it".to_string()));
        }
        Some(result)
    }

    /// Queues what a stream's WebSocket layer has to write, counted in the stream's backlog
    /// like everything else the adapter reports written (and watched by the write timeout).
    /// Returns whether the stream has fallen too far behind (see [`Links::send`]).
    fn flush_websocket(&mut self, now: Instant, id: StreamId) -> bool {
        let Some(ws) = self.websockets.get_mut(&id) else { return false };
        let mut extra = 0;
        while let Some(bytes) = ws.poll_output() {
            extra += bytes.len();
            self.out.push_back((id, StreamOutput::Data(bytes)));
        }
        extra > 0 && self.queued(now, Peer::Stream(id), extra)
    }

    /// Whether a byte stream carries MQTT over WebSocket.
    pub(super) fn is_websocket(&self, id: StreamId) -> bool {
        self.websockets.contains_key(&id)
    }

    /// Numbers a stream the broker carries itself (see `internal`).
    pub(super) fn open_internal_stream(&mut self) -> StreamId {
        let id = self.open_stream();
        self.internal.insert(id);
        id
    }

    /// Numbers a stream standing for a connection another shard relays here.
    pub(super) fn open_relayed(&mut self) -> StreamId {
        let id = self.open_stream();
        self.relayed.insert(id);
        id
    }

    /// Output for a byte stream: the adapter's, the broker's own for an internal one, the
    /// relaying shard's for a relayed one.
    pub(super) fn push_stream(&mut self, id: StreamId, output: StreamOutput) {
        if self.internal.contains(&id) {
            self.internal_out.push_back((id, output));
        } else if !self.relayed.is_empty() && self.relayed.contains(&id) {
            self.relayed_out.push_back((id, output));
        } else {
            self.out.push_back((id, output));
        }
    }

    /// The next output for a relayed stream.
    pub(super) fn poll_relayed(&mut self) -> Option<(StreamId, StreamOutput)> {
        self.relayed_out.pop_front()
    }

    /// A relayed stream is gone.
    pub(super) fn forget_relayed(&mut self, id: StreamId) {
        self.relayed.remove(&id);
    }

    /// An internal stream is closed (after its last output was taken).
    pub(super) fn forget_internal(&mut self, id: StreamId) {
        self.internal.remove(&id);
    }

    /// The next output for an internal stream.
    pub(super) fn poll_internal(&mut self) -> Option<(StreamId, StreamOutput)> {
        self.internal_out.pop_front()
    }

    /// Notes where a byte stream comes from (the adapter knows; QUIC tells itself).
    pub(super) fn set_remote(&mut self, id: StreamId, remote: SocketAddr) {
        self.remote.insert(id, remote);
    }

    /// Notes the identity a byte stream's client certificate carries.
    pub(super) fn set_identity(&mut self, id: StreamId, identity: String) {
        self.identities.insert(id, identity);
    }

    /// The common name of the certificate a connection's client presented, if any.
    pub(super) fn identity(&self, conn: Peer) -> Option<String> {
        match conn {
            Peer::Quic(c) => self.quic.peer_certificate(c).and_then(|der| crate::tls::certificate_common_name(&der)),
            Peer::Stream(id) => self.identities.get(&id).cloned(),
        }
    }

    /// Where a connection comes from, when known.
    pub(super) fn remote_addr(&self, conn: Peer) -> Option<SocketAddr> {
        match conn {
            Peer::Quic(c) => self.quic.remote_address(c),
            Peer::Stream(id) => self.remote.get(&id).copied(),
        }
    }

    /// Hands bytes to one stream of a connection's transport (a byte stream has only the
    /// control stream). Returns whether the connection has fallen so
    /// far behind (four times its backlog limit) that it must be dropped; otherwise, if bytes
    /// now wait, the write timeout starts counting for it.
    #[must_use]
    pub(super) fn send(&mut self, now: Instant, peer: Peer, lane: Lane, bytes: Bytes) -> bool {
        match peer {
            Peer::Quic(conn) => {
                // A data stream that ended meanwhile takes nothing more: its bytes are dropped.
                let _ = self.quic.send_lane(now, conn, lane, bytes);
            }
            Peer::Stream(id) => {
                let bytes = match self.websockets.get_mut(&id) {
                    Some(ws) => ws.frame(&bytes),
                    None => bytes,
                };
                let n = bytes.len();
                self.push_stream(id, StreamOutput::Data(bytes));
                return self.queued(now, peer, n);
            }
        }
        self.watch(now, peer)
    }

    /// `n` more bytes wait for a byte stream: counted in its backlog, and watched.
    fn queued(&mut self, now: Instant, peer: Peer, n: usize) -> bool {
        if let Peer::Stream(id) = peer {
            self.backlog.entry(id).or_default().0 += n;
            self.backlog_total += n;
        }
        self.watch(now, peer)
    }

    /// Whether a connection has fallen so far behind (four times its backlog limit) that it
    /// must be dropped; otherwise, if bytes now wait, the write timeout starts counting for it.
    fn watch(&mut self, now: Instant, peer: Peer) -> bool {
        if self.backlog(peer) > self.max_queued_bytes.saturating_mul(4) {
            return true;
        }
        if self.backlog(peer) > 0 && !self.stalls.contains_key(&peer) {
            // Bytes wait: from now on the connection must take some within the write timeout.
            self.stalls.insert(peer, (now, self.progress(peer)));
            self.stall_timers.set(peer, Some(now + self.write_timeout));
        }
        false
    }

    /// Ends a connection whose session is over, after what was sent to it: QUIC finishes its
    /// stream, the adapter is told to close a byte stream.
    pub(super) fn finish(&mut self, now: Instant, peer: Peer) {
        self.forget_stall(peer);
        match peer {
            Peer::Quic(conn) => {
                let _ = self.quic.finish(now, conn);
            }
            Peer::Stream(id) => {
                // A WebSocket says goodbye with a closing frame first.
                if let Some(ws) = self.websockets.get_mut(&id) {
                    ws.close();
                    // (The connection ends now whatever its backlog.)
                    let _ = self.flush_websocket(now, id);
                }
                self.forget_stream(id);
                self.push_stream(id, StreamOutput::Close);
            }
        }
    }

    /// Drops a connection that does not take what is sent to it, with what waits for it: QUIC
    /// closes with the slow-consumer code, the adapter is told to abort a byte stream.
    pub(super) fn abort(&mut self, now: Instant, peer: Peer) {
        self.forget_stall(peer);
        match peer {
            Peer::Quic(conn) => {
                let _ = self.quic.close(now, conn, quic::close_code::SLOW_CONSUMER, "not reading");
            }
            Peer::Stream(id) => {
                self.forget_stream(id);
                self.push_stream(id, StreamOutput::Abort);
            }
        }
    }

    fn forget_stall(&mut self, peer: Peer) {
        self.stalls.remove(&peer);
        self.stall_timers.set(peer, None);
    }

    /// Drops the byte-stream bookkeeping of a connection that is gone.
    pub(super) fn forget_stream(&mut self, id: StreamId) {
        if let Some((backlog, _)) = self.backlog.remove(&id) {
            self.backlog_total -= backlog;
        }
        self.remote.remove(&id);
        self.websockets.remove(&id);
        self.identities.remove(&id);
        self.forget_stall(Peer::Stream(id));
    }

    /// The adapter wrote `bytes` of a byte stream's output: they leave its backlog and count as
    /// progress.
    pub(super) fn stream_written(&mut self, id: StreamId, bytes: usize) {
        if let Some(b) = self.backlog.get_mut(&id) {
            let n = bytes.min(b.0);
            b.0 -= n;
            b.1 += n as u64;
            self.backlog_total -= n;
        }
    }

    /// The next output for the adapter's byte streams.
    pub(super) fn poll_stream(&mut self) -> Option<(StreamId, StreamOutput)> {
        self.out.pop_front()
    }

    /// The write-timeout check of connections with bytes waiting, one due connection at a
    /// time: returns the next one that took nothing since its last check (and is `live`), for
    /// the caller to drop; one that took some is checked again a timeout later.
    pub(super) fn next_stalled(&mut self, now: Instant, live: impl Fn(Peer) -> bool) -> Option<Peer> {
        while let Some(peer) = self.stall_timers.pop_due(now) {
            let Some((_, before)) = self.stalls.remove(&peer) else { continue };
            if self.backlog(peer) == 0 {
                continue;
            }
            let progress = self.progress(peer);
            if progress == before && live(peer) {
                return Some(peer);
            }
            self.stalls.insert(peer, (now, progress));
            self.stall_timers.set(peer, Some(now + self.write_timeout));
        }
        None
    }

    /// The next write-timeout check.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.stall_timers.next()
    }

    /// Bytes waiting to be sent to a connection.
    pub(super) fn backlog(&self, peer: Peer) -> usize {
        match peer {
            Peer::Quic(conn) => self.quic.queued(conn),
            Peer::Stream(id) => self.backlog.get(&id).map_or(0, |b| b.0),
        }
    }

    /// Bytes a connection has taken so far (a counter: it stands still while the client reads
    /// nothing).
    fn progress(&self, peer: Peer) -> u64 {
        match peer {
            Peer::Quic(conn) => self.quic.written(conn),
            Peer::Stream(id) => self.backlog.get(&id).map_or(0, |b| b.1),
        }
    }

    /// Whether QoS 0 messages for this connection are dropped now: its own backlog (with the
    /// `buffered` bytes its session holds that have not reached the transport), or all
    /// clients' together, is over its limit.
    pub(super) fn over_budget(&self, peer: Peer, buffered: usize) -> bool {
        self.backlog(peer) + buffered > self.max_queued_bytes
            || self.quic.queued_total() + self.backlog_total > self.max_total_queued_bytes
    }
}
