//! The broker machine: a QUIC server endpoint (and byte streams the adapter carries), one server
//! session per connection, and the state that outlives connections (subscriptions, retained
//! messages, kept sessions, wills). An application embedding it can subscribe and publish
//! in-process ([`Broker::subscribe_local`], [`Broker::publish_local`]) without a connection.
//!
//! This file is the dispatch spine: bytes in (a datagram, stream bytes) go to the connection's
//! session; the session's events are decided here (with the rules of `policy`, the sessions of
//! `registry`) and its messages routed to matching sessions; what the sessions then have to send
//! goes out through `links`. The other parts live in their own files (see the module map in
//! [`crate::broker`]).

pub use super::config::BrokerConfig;
pub use super::events::BrokerEvent;
pub use super::links::{Peer, StreamId, StreamOutput};
pub use super::local::LocalSubscription;
pub use super::restore::Restored;
pub use super::sys::{BrokerMetrics, Stats};

use super::auth::{AuthId, AuthRequest, AuthVerdict};
use super::journal::Journal;
use super::lanes::LaneState;
use super::links::Links;
use super::local::LOCAL_BASE;
use super::policy::{may_read, Logins};
use super::registry::Registry;
use super::retained::RetainedStore;
use super::router::{is_lane_key, shard_of_key, Entry, Router, SessionKey};
use super::shared::SharedPending;
use super::sys::Schedule;
use crate::config::ConfigError;
use crate::machine::Datagram;
use crate::quic::{self, Lane, Transmit};
use crate::session::server::{ServerEvent, ServerSession};
use crate::timers::TimerIndex;
use bytes::Bytes;
use mqtt_proto::{
    PacketId, Publish, QoS, QosPid, ReasonCode, RetainHandling, Subscription, SubscriptionId, TopicFilter,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A live connection and its session.
pub(super) struct Live {
    pub(super) session: ServerSession,
    pub(super) client: Option<String>,
    pub(super) username: Option<String>,
    /// The password verification this connection waits for, if any.
    pub(super) auth: Option<AuthId>,
    /// From its CONNECT, for the lifecycle events: client id, user name, remote address.
    pub(super) hello: Option<(String, Option<String>, Option<SocketAddr>)>,
    /// How its transport ended, when it did (for `BrokerEvent::ClientDisconnected`).
    pub(super) detail: Option<String>,
    /// QoS 0 messages dropped because it did not keep up.
    pub(super) dropped: u64,
    /// With `Persistence::Sync`: the ticket its output waits behind (see `journal`).
    pub(super) gate: u64,
    /// Its data streams (multi-stream mode, see `lanes`).
    pub(super) lanes: BTreeMap<Lane, LaneState>,
    /// It asked for QoS 0 messages as QUIC datagrams (see `datagrams`).
    pub(super) datagrams: bool,
    /// SUBSCRIBEs and UNSUBSCRIBEs read on one-way data streams, by packet id, in order, until
    /// the session reports them (see `lanes`).
    pub(super) origins: VecDeque<(PacketId, Lane)>,
    /// The broker's own connection (a bridge's session here): no password check, no ACL, and
    /// the only one that may use a `$bridge/` client id.
    pub(super) internal: bool,
    /// In a sharded broker: its CONNECT said its session lives on this shard (see
    /// `shard::relay`); until then its bytes wait.
    pub(super) placed: bool,
}

/// The broker machine. See the crate docs for the driving contract.
pub struct Broker {
    pub(super) config: BrokerConfig,
    /// The transports (QUIC connections, byte streams) and their write accounting.
    pub(super) links: Links,
    /// Boxed: a map node holds its values inline, and a session is over a KiB.
    pub(super) conns: BTreeMap<Peer, Box<Live>>,
    /// Connections with something to do (bytes or events in, messages delivered to them), so a
    /// datagram for one connection does not make the broker look at all of them.
    pub(super) dirty: BTreeSet<Peer>,
    /// Each connection's session deadline (keep-alive, connect timeout).
    session_timers: TimerIndex<Peer>,
    /// Kept sessions, with their wills and expiries.
    pub(super) registry: Registry,
    pub(super) router: Router,
    pub(super) retained: RetainedStore,
    /// Password verifications out with the adapter, and failed logins per address.
    pub(super) logins: Logins,
    /// Messages sent through shared subscriptions and not yet acknowledged.
    pub(super) shared: SharedPending,
    pub(super) events: VecDeque<BrokerEvent>,
    pub(super) next_local: SessionKey,
    /// The flow control of windowed in-process subscriptions (see `local`).
    pub(super) local_windows: BTreeMap<SessionKey, super::local::LocalWindow>,
    pub(super) stats: Stats,
    /// Uptime, `$SYS` and housekeeping clocks.
    pub(super) schedule: Schedule,
    /// Set by a shutdown: the latest moment it ends.
    pub(super) closing_until: Option<Instant>,
    /// Durable state changes waiting for the store, and output held until they are stored.
    pub(super) journal: Journal,
    /// Data streams' subscriber keys: which connection and stream.
    pub(super) lane_keys: BTreeMap<SessionKey, (Peer, Lane)>,
    /// The number the last data stream's subscriber key got (see `lanes`).
    pub(super) lane_seq: u64,
    /// Bridges to upstream brokers (see `bridges`).
    pub(super) bridges: Vec<super::bridges::BridgeSlot>,
    /// Outgoing connections and name resolutions the bridges need, for the adapter.
    pub(super) dials: VecDeque<super::bridges::Dial>,
    /// Scratch space for the MQTT bytes of WebSocket frames, kept between reads.
    ws_buf: Vec<u8>,
    /// MQTT packets received and sent over clients' control streams, by type.
    pub(super) packets: crate::session::packet_counts::PacketCounts,
    /// `$SYS` load averages.
    pub(super) loads: super::sys::Loads,
    /// In a sharded broker, what crosses shards (see `shard`); `None` in a broker of one.
    pub(super) shard: Option<Box<super::shard::ShardState>>,
}

impl Broker {
    /// A broker, serving nobody yet.
    pub fn new(config: BrokerConfig) -> Result<Broker, ConfigError> {
        config.validate()?;
        let id_key = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &quic::derive_key(config.quic.secret.as_ref(), config.quic.seed, quic::domain::CLIENT_ID),
        );
        let mut bridges = Vec::new();
        for (i, bridge) in config.bridges.iter().enumerate() {
            let marker = u8::try_from(i).map_err(|_| ConfigError::Invalid("at most 256 bridges".into()))?;
            let secret =
                quic::derive_key(config.quic.secret.as_ref(), config.quic.seed ^ i as u64, quic::domain::BRIDGE);
            let bridge = crate::bridge::Bridge::new(bridge.clone(), secret, marker)?;
            bridges.push(super::bridges::BridgeSlot::new(bridge));
        }
        let shard = config.shard.filter(|s| s.count > 1).map(|s| Box::new(super::shard::ShardState::new(s)));
        let mut router = Router::new();
        if shard.is_some() {
            router.track_interest();
        }
        Ok(Broker {
            shard,
            links: Links::new(&config)?,
            conns: BTreeMap::new(),
            dirty: BTreeSet::new(),
            session_timers: TimerIndex::new(),
            registry: Registry::new(id_key),
            router,
            retained: RetainedStore::new(config.max_retained, config.max_retained_bytes),
            logins: Logins::new(config.max_auth_failures, config.auth_failure_window),
            shared: SharedPending::default(),
            events: VecDeque::new(),
            next_local: LOCAL_BASE,
            local_windows: BTreeMap::new(),
            stats: Stats::default(),
            schedule: Schedule::default(),
            closing_until: None,
            journal: Journal::new(config.persistence, config.commit_delay),
            lane_keys: BTreeMap::new(),
            ws_buf: Vec::new(),
            packets: Default::default(),
            loads: Default::default(),
            lane_seq: 0,
            bridges,
            dials: VecDeque::new(),
            config,
        })
    }

    /// Subscriptions held, of sessions, data streams and the application.
    pub fn subscriptions(&self) -> usize {
        self.router.len() - self.shard.as_ref().map_or(0, |s| s.routing.keys)
    }

    /// Data streams the broker holds state for, on all connections (multi-stream mode).
    pub fn data_streams(&self) -> usize {
        debug_assert!(self.lane_keys.len() <= self.conns.values().map(|l| l.lanes.len()).sum::<usize>());
        self.conns.values().map(|l| l.lanes.len()).sum()
    }

    /// Connected clients.
    pub fn connected(&self) -> usize {
        self.registry.connected()
    }

    /// Sessions kept (connected or not).
    pub fn sessions(&self) -> usize {
        self.registry.len()
    }

    /// Whether a session is kept for this client id (connected or not).
    pub fn has_session(&self, client_id: &str) -> bool {
        self.registry.contains(client_id)
    }

    /// Retained messages.
    pub fn retained(&self) -> usize {
        self.retained.len()
    }

    /// Live connections, counting those that have not sent CONNECT yet.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Ends every connection for a server shutdown: MQTT 5 clients get DISCONNECT with Server
    /// shutting down (0x8B), then each stream is finished (QUIC) or closed (byte streams). The
    /// adapter keeps driving until [`Broker::is_done`], which waits for the QUIC
    /// connections to deliver their last bytes and close, for at most `grace`.
    pub fn shutdown(&mut self, now: Instant, grace: Duration) {
        self.tick(now);
        self.closing_until.get_or_insert(now + grace);
        self.stop_bridges(now);
        let peers: Vec<Peer> = self.conns.keys().copied().collect();
        for peer in peers {
            if let Some(live) = self.conns.get_mut(&peer) {
                if live.session.disconnect(ReasonCode::ServerShuttingDown).is_err()
                    && live.session.refuse(now, ReasonCode::ServerUnavailable).is_err()
                {
                    // Not connected yet (no CONNECT): there is nobody to tell.
                    live.session.handle_stream_closed(now);
                }
                self.dirty.insert(peer);
            }
        }
        self.pump(now);
    }

    /// After [`Broker::shutdown`]: whether every connection has closed or the grace is over.
    pub fn is_done(&self, now: Instant) -> bool {
        // (A sharded broker also waits for the connections it relays: their sessions' last
        // words come from other shards.)
        let relaying = self.shard.as_ref().is_some_and(|s| s.relays.relaying());
        self.closing_until.is_some_and(|t| {
            now >= t || (self.conns.is_empty() && self.links.quic.connection_count() == 0 && !relaying)
        })
    }

    /// A byte-stream connection (TCP, TLS) was accepted by the adapter, from `remote` when
    /// known (failed logins are then limited per address, see
    /// [`BrokerConfig::max_auth_failures`], as they are for QUIC): the broker numbers it and
    /// expects CONNECT on it within the connect timeout.
    pub fn handle_stream_open(&mut self, now: Instant, remote: Option<SocketAddr>) -> StreamId {
        self.open_stream(now, remote, false)
    }

    /// A byte stream the adapter accepted, numbered now, with the WebSocket layer when
    /// `websocket`; CONNECT is expected within the connect timeout.
    fn open_stream(&mut self, now: Instant, remote: Option<SocketAddr>, websocket: bool) -> StreamId {
        self.tick(now);
        let id = match websocket {
            true => self.links.open_websocket(&self.config.websocket_path),
            false => self.links.open_stream(),
        };
        if let Some(remote) = remote {
            self.links.set_remote(id, remote);
        }
        self.live(now, Peer::Stream(id));
        self.rearm(Peer::Stream(id));
        id
    }

    /// Replaces authentication and authorization (a re-read password file or ACL): new logins
    /// are checked against `auth`, and so is every delivery from now on (read rights are
    /// checked per message), while connections stay up. `None` lets everyone in.
    pub fn set_auth(&mut self, auth: Option<std::sync::Arc<dyn super::auth::Auth>>) {
        self.config.auth = auth;
    }

    /// Replaces the certificate (and client-certificate rules) new QUIC connections get;
    /// connections already open keep theirs. The adapter swaps its TLS listeners' too (from
    /// [`Broker::config`]'s `quic.tls`). On error nothing changes.
    pub fn set_server_tls(&mut self, tls: crate::tls::ServerTls) -> Result<(), ConfigError> {
        let mut quic = self.config.quic.clone();
        quic.tls = tls;
        self.links.quic.set_server_config(&quic)?;
        self.config.quic = quic;
        Ok(())
    }

    /// The client of a byte stream presented a certificate whose common name is `identity`
    /// (the adapter read it after the TLS handshake, see
    /// [`crate::tls::certificate_common_name`]): with
    /// [`BrokerConfig::use_identity_as_username`] it is the client's user name. Call it before
    /// the stream's first data.
    pub fn set_stream_identity(&mut self, id: StreamId, identity: String) {
        self.links.set_identity(id, identity);
    }

    /// The configuration in force (after [`Broker::set_auth`] and [`Broker::set_server_tls`]).
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// A byte-stream connection accepted on a WebSocket listener (`ws`, or `wss` with TLS
    /// below): as [`Broker::handle_stream_open`], and the broker also speaks WebSocket on it
    /// (see [`crate::ws`]): it answers the upgrade request for
    /// [`BrokerConfig::websocket_path`], and MQTT flows in binary frames. The connect timeout
    /// covers the upgrade too.
    pub fn handle_stream_open_ws(&mut self, now: Instant, remote: Option<SocketAddr>) -> StreamId {
        self.open_stream(now, remote, true)
    }

    /// Bytes read from a byte-stream connection.
    pub fn handle_stream_data(&mut self, now: Instant, id: StreamId, data: &[u8]) {
        self.tick(now);
        if self.dialed_data(now, id, data) {
            self.pump(now);
        } else if self.conns.contains_key(&Peer::Stream(id)) || self.is_relayed(Peer::Stream(id)) {
            let mut mqtt = std::mem::take(&mut self.ws_buf);
            match self.links.websocket_in(now, id, data, &mut mqtt) {
                None => self.received(now, Peer::Stream(id), data),
                Some(result) => {
                    if !mqtt.is_empty() {
                        self.received(now, Peer::Stream(id), &mqtt);
                    }
                    if let Err(why) = result {
                        // The session's answers to what came before the end go out first,
                        // framed, before the closing frame.
                        self.pump(now);
                        self.websocket_over(now, id, why);
                    }
                }
            }
            mqtt.clear();
            self.ws_buf = mqtt;
            self.pump(now);
        }
    }

    /// A WebSocket connection is over at its own layer: its answer (an HTTP refusal, a closing
    /// frame) is queued, the adapter is told to close it, and the session sees a lost
    /// connection (its will goes out, as for any connection that ends without DISCONNECT).
    fn websocket_over(&mut self, now: Instant, id: StreamId, why: String) {
        if let Some(live) = self.conns.get_mut(&Peer::Stream(id)) {
            live.detail.get_or_insert(why);
        }
        self.links.finish(now, Peer::Stream(id));
        self.stream_closed(now, id);
    }

    /// The byte-stream connection closed (or failed).
    pub fn handle_stream_closed(&mut self, now: Instant, id: StreamId) {
        if !self.dialed_closed(now, id) {
            self.stream_closed(now, id);
        }
        self.pump(now);
    }

    /// A byte stream ended (the adapter closed it, or the broker an internal one).
    pub(super) fn stream_closed(&mut self, now: Instant, id: StreamId) {
        if let Some(live) = self.conns.get_mut(&Peer::Stream(id)) {
            live.detail.get_or_insert_with(|| "the connection closed".into());
        }
        self.relay_lost(Peer::Stream(id), "the connection closed");
        self.links.forget_stream(id);
        self.journal.forget(Peer::Stream(id));
        self.lost(now, Peer::Stream(id));
    }

    /// Output for byte-stream connections: bytes to write, or the signal to close.
    #[must_use]
    pub fn poll_stream(&mut self) -> Option<(StreamId, StreamOutput)> {
        self.links.poll_stream()
    }

    /// The adapter wrote `bytes` of a byte stream's output to its socket: they no longer count
    /// against the client's backlog (see [`BrokerConfig::max_queued_bytes`]).
    pub fn handle_stream_written(&mut self, id: StreamId, bytes: usize) {
        if !self.bridges.is_empty() && self.dialed_written(id, bytes) {
            return;
        }
        self.links.stream_written(id, bytes);
    }

    /// The next password verification to run off the event loop (see [`AuthRequest`]). Poll it
    /// after every input, like the other outputs; answer each with
    /// [`Broker::handle_auth_result`]. Comes only when the configuration has `auth`.
    #[must_use]
    pub fn poll_auth(&mut self) -> Option<AuthRequest> {
        self.logins.poll()
    }

    /// The verdict on an [`AuthRequest`]: the client is let in (and its session set up) or
    /// refused with the verdict's code. A verdict for a connection that has gone meanwhile is
    /// ignored.
    pub fn handle_auth_result(&mut self, now: Instant, id: AuthId, verdict: AuthVerdict) {
        self.tick(now);
        let Some(waiting) = self.logins.settle(now, id, verdict.is_err()) else { return };
        if verdict.is_err() {
            self.stats.auth_failures += 1;
        }
        let Some((conn, connect)) = waiting else { return };
        let Some(live) = self.conns.get_mut(&conn).filter(|l| l.auth == Some(id)) else { return };
        live.auth = None;
        match verdict {
            Ok(()) => self.admit(now, conn, *connect),
            Err(code) => self.refuse(now, conn, code),
        }
        self.dirty.insert(conn);
        self.pump(now);
    }

    /// Moves everything along until nothing is left to do: the QUIC endpoint's events, then
    /// each connection with something to do.
    pub(super) fn pump(&mut self, now: Instant) {
        loop {
            while let Some(event) = self.links.quic.poll_event() {
                match event {
                    // (A resuming client's CONNECT comes in its 0-RTT data, before the handshake
                    // completes: its connection may be relayed to another shard by now.)
                    quic::Event::Connected { conn, .. } if !self.is_relayed(Peer::Quic(conn)) => {
                        self.live(now, Peer::Quic(conn));
                        self.dirty.insert(Peer::Quic(conn));
                    }
                    quic::Event::Connected { .. } => {}
                    quic::Event::Received { conn, data } => {
                        // Bytes after the session ended (the client may go on writing while our
                        // FIN is on its way) start nothing new on a finishing connection.
                        if self.conns.contains_key(&Peer::Quic(conn)) || !self.links.quic.is_finishing(conn) {
                            self.received(now, Peer::Quic(conn), &data);
                        }
                    }
                    quic::Event::Closed { conn, reason } => {
                        if self.shard.is_some() {
                            self.relay_lost(Peer::Quic(conn), &format!("QUIC: {reason}"));
                        }
                        if let Some(live) = self.conns.get_mut(&Peer::Quic(conn)) {
                            live.detail.get_or_insert_with(|| format!("QUIC: {reason}"));
                        }
                        self.journal.forget(Peer::Quic(conn));
                        self.lost(now, Peer::Quic(conn));
                    }
                    quic::Event::LaneOpened { conn, lane } => self.lane_opened(now, Peer::Quic(conn), lane),
                    quic::Event::LaneReceived { conn, lane, data } => {
                        self.lane_received(now, Peer::Quic(conn), lane, &data)
                    }
                    quic::Event::LaneEnded { conn, lane, reason } => {
                        self.lane_ended(now, Peer::Quic(conn), lane, reason)
                    }
                    quic::Event::DatagramReceived { conn, data } => self.datagram_received(now, Peer::Quic(conn), data),
                    quic::Event::Migrated { conn, remote } => {
                        let client = self.conns.get(&Peer::Quic(conn)).and_then(|l| l.client.clone());
                        if let Some(client_id) = client {
                            self.events.push_back(BrokerEvent::ClientMigrated { client_id, remote });
                        }
                    }
                }
            }
            let Some(conn) = self.dirty.pop_first() else {
                if self.release_held(now) || self.pump_bridges(now) || self.pump_shard(now) {
                    continue;
                }
                break;
            };
            self.serve(now, conn);
        }
    }

    pub(super) fn received(&mut self, now: Instant, peer: Peer, data: &[u8]) {
        if !self.is_placed(peer) {
            // A sharded broker reads the CONNECT first: its session may live elsewhere.
            if let Some(bytes) = self.place(now, peer, data) {
                self.received(now, peer, &bytes);
            }
            return;
        }
        self.stats.bytes_received += data.len() as u64;
        self.live(now, peer).session.handle_stream_data(now, data);
        self.dirty.insert(peer);
    }

    fn lost(&mut self, now: Instant, peer: Peer) {
        if let Some(live) = self.conns.get_mut(&peer) {
            live.session.handle_stream_closed(now);
            self.dirty.insert(peer);
        }
    }

    /// Ends a connection that does not take what is sent to it.
    pub(super) fn drop_slow(&mut self, now: Instant, peer: Peer) {
        const SLOW: &str = "slow consumer: it took nothing for the write timeout, or fell too far behind";
        let mut first = false;
        if let Some(live) = self.conns.get_mut(&peer) {
            first = live.detail.as_deref() != Some(SLOW);
            live.detail = Some(SLOW.into());
        }
        first |= self.relay_lost(peer, SLOW);
        // (Counted once per connection, whichever check caught it: the write timeout, or a
        // backlog four times the limit, which a flood reaches first.)
        if first {
            self.stats.stalled_clients += 1;
        }
        self.links.abort(now, peer);
        self.journal.forget(peer);
        if let Peer::Stream(_) = peer {
            // QUIC reports the closed connection itself; a byte stream is gone now.
            self.lost(now, peer);
        }
    }

    /// The write-timeout check: connections that took nothing of what waits for them for the
    /// write timeout are dropped.
    fn check_stalls(&mut self, now: Instant) {
        while let Some(peer) = {
            let relays = self.shard.as_ref().map(|s| &s.relays);
            let conns = &self.conns;
            self.links.next_stalled(now, |p| conns.contains_key(&p) || relays.is_some_and(|r| r.is_relayed(p)))
        } {
            self.drop_slow(now, peer);
        }
    }

    /// Whether QoS 0 messages for this connection are dropped now: its own backlog, or all
    /// clients' together, is over its limit.
    pub(super) fn over_budget(&self, peer: Peer) -> bool {
        // What the session holds that has not reached the transport counts too: a burst (the
        // retained messages of a SUBSCRIBE to `#`) is written before the transport sees any.
        let buffered = self.conns.get(&peer).map_or(0, |l| l.session.buffered()) + self.journal.held_bytes(peer);
        self.links.over_budget(peer, buffered)
    }

    /// Files a connection's session deadline (or forgets it, for a connection that is gone).
    pub(super) fn rearm(&mut self, conn: Peer) {
        let next = self.conns.get(&conn).and_then(|l| {
            let streams = l.lanes.values().filter_map(|s| s.poll_timeout());
            streams.chain(l.session.poll_timeout()).min()
        });
        self.session_timers.set(conn, next);
    }

    pub(super) fn live(&mut self, now: Instant, conn: Peer) -> &mut Live {
        let config = self.config.session.clone();
        self.conns.entry(conn).or_insert_with(|| {
            Box::new(Live {
                session: ServerSession::new(now, config),
                client: None,
                username: None,
                auth: None,
                hello: None,
                detail: None,
                dropped: 0,
                gate: 0,
                lanes: BTreeMap::new(),
                datagrams: false,
                origins: VecDeque::new(),
                internal: false,
                placed: false,
            })
        })
    }

    /// Moves one connection's events and bytes along.
    fn serve(&mut self, now: Instant, conn: Peer) {
        // Handling an event can raise more (accepting CONNECT releases the packets the client
        // sent right after it, and the data streams that waited), so go on until the session
        // and its streams are quiet.
        self.journal.open();
        loop {
            // Data streams that waited for CONNACK feed their packets in first.
            if self.conns.get(&conn).is_some_and(|l| l.lanes.values().any(|l| l.is_waiting())) {
                self.activate_lanes(now, conn);
            }
            let Some(live) = self.conns.get_mut(&conn) else {
                let _ = self.journal.close();
                return self.rearm(conn);
            };
            let events: Vec<ServerEvent> = std::iter::from_fn(|| live.session.poll_event()).collect();
            let lane_events = self.lane_events(conn);
            if events.is_empty() && lane_events.is_empty() {
                break;
            }
            for event in events {
                self.on_event(now, conn, Lane::CONTROL, None, event);
            }
            for (lane, key, event) in lane_events {
                self.on_event(now, conn, lane, Some(key), event);
            }
        }
        // What its packets changed durably is acknowledged only once kept.
        let ticket = self.journal.close();
        let Some(live) = self.conns.get_mut(&conn) else { return self.rearm(conn) };
        if let Some(ticket) = ticket {
            live.gate = self.journal.regate(conn, live.gate, ticket);
        }
        let out: Vec<Bytes> = std::iter::from_fn(|| live.session.poll_transmit()).collect();
        self.packets.add(&live.session.take_packet_counts());
        let ended = live.session.is_done();
        self.journal_live(conn);
        for bytes in out {
            self.stats.bytes_sent += bytes.len() as u64;
            self.emit_on(now, conn, Lane::CONTROL, bytes);
        }
        if ended {
            self.drop_lanes(now, conn);
        } else {
            self.lane_output(now, conn);
        }
        if ended {
            if let Some(Live { auth: Some(id), .. }) = self.conns.remove(&conn).map(|l| *l) {
                self.logins.abandon(id);
            }
            if self.journal.finish(conn) {
                self.links.finish(now, conn);
            }
        }
        self.rearm(conn);
    }

    /// A session's event: the connection's (`lane` the control stream), or one of its data
    /// streams' (`stream_key` then the stream's subscriber key), answered on the stream it came
    /// from.
    fn on_event(&mut self, now: Instant, conn: Peer, lane: Lane, stream_key: Option<SessionKey>, event: ServerEvent) {
        let key =
            self.conns.get(&conn).and_then(|l| l.client.as_ref()).and_then(|c| self.registry.get(c)).map(|r| r.key);
        // Who subscribes: the session, or the data stream (for one read on a one-way stream,
        // the stream opened back for its deliveries).
        let mut subscriber = stream_key.or(key);
        let one_way = match &event {
            ServerEvent::Subscribe { packet_id, .. } | ServerEvent::Unsubscribe { packet_id, .. }
                if lane.is_control() && self.conns.get(&conn).is_some_and(|l| !l.origins.is_empty()) =>
            {
                self.origin(conn, *packet_id)
            }
            _ => None,
        };
        if let Some(one_way) = one_way {
            // A SUBSCRIBE opens the way back (once); an UNSUBSCRIBE acts on it if it exists,
            // on the session's subscriptions otherwise.
            subscriber = match event {
                ServerEvent::Subscribe { .. } => self.way_back(now, conn, one_way),
                _ => self.way_back_key(conn, one_way),
            }
            .or(subscriber);
        }
        let durable = lane.is_control() && subscriber == key;
        match event {
            ServerEvent::Connect(c) => self.on_connect(now, conn, *c),
            ServerEvent::Publish(p) => {
                self.stats.messages_received += 1;
                let mut reason = self.publish_refusal(conn, &p.topic);
                // A retained message the store has no room for is refused as a whole.
                if reason == ReasonCode::Success && p.retain && self.keep_retained(now, &p).is_err() {
                    reason = ReasonCode::QuotaExceeded;
                }
                if let Some(session) = self.session_on(conn, lane) {
                    session.acknowledge(p.qos_pid, reason);
                }
                if reason == ReasonCode::Success {
                    self.journal.routing = true;
                    self.route(now, p, key);
                    self.journal.routing = false;
                }
            }
            ServerEvent::Subscribe { packet_id, subscriptions, subscription_id } => {
                if let Some(key) = subscriber {
                    self.subscribe(now, (conn, lane), key, packet_id, subscriptions, subscription_id);
                    if durable {
                        self.journal_client(conn);
                    }
                }
            }
            ServerEvent::Unsubscribe { packet_id, filters } => {
                if let Some(key) = subscriber {
                    let codes = filters
                        .iter()
                        .map(|f| {
                            if self.router.unsubscribe(key, f) {
                                ReasonCode::Success
                            } else {
                                ReasonCode::NoSubscriptionExisted
                            }
                        })
                        .collect();
                    if let Some(session) = self.session_on(conn, lane) {
                        let _ = session.unsuback(packet_id, codes);
                    }
                    if durable {
                        self.journal_client(conn);
                    }
                }
            }
            ServerEvent::Delivered { id } => {
                if let Some(key) = subscriber {
                    self.shared.acknowledged(key, id);
                }
            }
            ServerEvent::SessionExpiry(secs) => {
                // The broker's maximum caps it as at CONNECT.
                let record =
                    self.conns.get(&conn).and_then(|l| l.client.as_ref()).and_then(|c| self.registry.get_mut(c));
                if let Some(record) = record.filter(|r| r.conn == Some(conn)) {
                    record.expiry = secs.min(self.config.max_session_expiry);
                    self.journal_client(conn);
                }
            }
            // A data stream's end is seen by `lane_output`.
            ServerEvent::Ended { .. } if !lane.is_control() => {}
            ServerEvent::Ended { will, reason } => {
                self.report_end(conn, reason);
                self.on_end(now, conn, will)
            }
            ServerEvent::Auth(_) => {
                // No authentication method was agreed (a CONNECT carrying one is refused), so
                // AUTH from the client breaks the protocol: DISCONNECT once connected, a refused
                // CONNECT while its password is being checked.
                if let Some(live) = self.conns.get_mut(&conn) {
                    if live.session.disconnect(ReasonCode::ProtocolError).is_err() {
                        let _ = live.session.refuse(now, ReasonCode::ProtocolError);
                    }
                }
            }
        }
    }

    /// Routes a message the broker itself publishes (a will, `$SYS`), and retains it when asked:
    /// nobody can be told of a refusal, so a full store keeps its older messages and the
    /// message is routed all the same. (Client and in-process publishes are refused instead.)
    pub(super) fn publish(&mut self, now: Instant, publish: Publish, from: Option<SessionKey>) {
        if publish.retain {
            let _ = self.keep_retained(now, &publish);
        }
        self.route(now, publish, from);
    }

    /// Keeps a retained message published here (an empty payload deletes): in the store, in
    /// the journal, on the other shards. `Err` when the store has no room for it.
    pub(super) fn keep_retained(&mut self, now: Instant, publish: &Publish) -> Result<(), ()> {
        self.retained.set(now, publish).map_err(|_| ())?;
        self.journal_retained(now, publish);
        self.retained_here(now, publish);
        Ok(())
    }

    /// Routes a message to every matching subscription.
    pub(super) fn route(&mut self, now: Instant, publish: Publish, from: Option<SessionKey>) {
        // A shared group picks among members that are online and may read the topic, so a
        // member whose rights exclude it does not swallow the group's message.
        let auth = self.config.auth.as_deref();
        let registry = &self.registry;
        // (A key standing for another shard is eligible: that shard decides for its members.)
        let eligible =
            |k| shard_of_key(k).is_some() || registry.is_online(k) && may_read(registry, auth, k, &publish.topic);
        let mut routed: Vec<u16> = Vec::new();
        for d in self.router.route(&publish.topic, from, eligible) {
            match shard_of_key(d.session) {
                Some(to) => {
                    if d.shared.is_none() {
                        routed.push(to);
                    }
                    self.forward_routed(to, &publish, d.shared)
                }
                None => self.deliver_routed(now, &publish, d),
            }
        }
        if self.shard.is_some() {
            self.flush_retained(&routed);
        }
    }

    /// Hands a message to one subscriber the router chose, as its subscription asks.
    pub(super) fn deliver_routed(&mut self, now: Instant, publish: &Publish, d: super::router::Delivery) {
        let mut out = publish.clone();
        out.dup = false;
        out.qos_pid = QosPid::from_parts(publish.qos().min(d.qos), PacketId::MIN);
        out.retain = publish.retain && d.retain_as_published;
        out.properties.topic_alias = None;
        out.properties.subscription_identifiers = d.subscription_ids.into();
        let acknowledged = out.qos() != QoS::AtMostOnce;
        let id = self.deliver(now, d.session, out);
        if let (Some(filter), Some(id), true) = (d.shared, id, acknowledged) {
            self.shared.insert(d.session, id, filter);
        }
    }

    /// Hands a message to a session: its connection when online, its queue when offline.
    /// Returns the session's request id when the message went to a live connection. Read rights
    /// are checked here, on every path that delivers, not only at SUBSCRIBE.
    pub(super) fn deliver(&mut self, now: Instant, key: SessionKey, publish: Publish) -> Option<u64> {
        if key > LOCAL_BASE {
            self.deliver_local(key, publish);
            return None;
        }
        let (id, record) = self.registry.by_key(key)?;
        if let Some(auth) = &self.config.auth {
            let username = record.owner.as_deref();
            if !auth.can_read(id, username, &publish.topic) {
                self.stats.messages_denied += 1;
                return None;
            }
        }
        if is_lane_key(key) {
            return self.deliver_lane(now, key, publish);
        }
        let mut publish = publish;
        if let Some(conn) = record.conn {
            // (The configuration first: without datagrams no connection can have asked.)
            if self.config.quic.transport.datagrams
                && publish.qos() == QoS::AtMostOnce
                && self.conns.get(&conn).is_some_and(|l| l.datagrams)
            {
                publish = self.try_datagram(now, conn, publish)?;
            }
            if publish.qos() == QoS::AtMostOnce && self.over_budget(conn) {
                self.stats.messages_dropped += 1;
                if let Some(live) = self.conns.get_mut(&conn) {
                    live.dropped += 1;
                }
                return None;
            }
            if let Some(live) = self.conns.get_mut(&conn) {
                let id = live.session.publish(now, publish).ok();
                if id.is_some() {
                    self.stats.messages_sent += 1;
                }
                self.dirty.insert(conn);
                self.journal_live(conn);
                return id;
            }
        }
        // Offline (or its connection already gone): QoS 1 and 2 wait in the kept session.
        if publish.qos() != QoS::AtMostOnce {
            let (max_bytes, max_queue) = (self.config.max_offline_bytes, self.config.max_offline_queue);
            if !self.registry.enqueue(now, key, publish, max_bytes, max_queue) {
                self.stats.messages_dropped += 1;
            } else if let Some((id, state)) = self.registry.kept_by_key(key) {
                let _ = self.journal.state(id, state);
            }
        }
        None
    }

    /// A SUBSCRIBE: each filter decided (see `Broker::subscribe_refusal`), the SUBACK, then
    /// the retained messages of the new subscriptions.
    fn subscribe(
        &mut self,
        now: Instant,
        (conn, lane): (Peer, Lane),
        key: SessionKey,
        packet_id: PacketId,
        subscriptions: Vec<Subscription>,
        subscription_id: Option<SubscriptionId>,
    ) {
        let max = self.config.session.maximum_qos;
        // The same filter twice in one SUBSCRIBE is one subscription, decided where it first
        // appears with the options of its last occurrence (which would replace the earlier
        // ones [MQTT-3.8.4-3]), and its retained messages are sent once; each occurrence still
        // gets the code, so the SUBACK lines up [MQTT-3.9.3-1].
        let mut last: BTreeMap<&TopicFilter, usize> = BTreeMap::new();
        for (i, s) in subscriptions.iter().enumerate() {
            last.insert(&s.filter, i);
        }
        let mut decided: BTreeMap<&TopicFilter, ReasonCode> = BTreeMap::new();
        let mut retained = Vec::new();
        // At most as many retained messages per SUBSCRIBE as the session can queue: the rest
        // would be dropped anyway, and collecting them costs memory and time.
        let mut room = self.config.session.max_queued;
        for s in &subscriptions {
            if decided.contains_key(&s.filter) {
                continue;
            }
            let s = last.get(&s.filter).map_or(s, |&i| &subscriptions[i]);
            let mut options = s.options;
            options.qos = options.qos.min(max);
            let known = self.router.filters(key).contains(&s.filter);
            let code = self.subscribe_refusal(conn, key, &s.filter, known).unwrap_or(match options.qos {
                QoS::AtMostOnce => ReasonCode::Success,
                QoS::AtLeastOnce => ReasonCode::GrantedQos1,
                QoS::ExactlyOnce => ReasonCode::GrantedQos2,
            });
            decided.insert(&s.filter, code);
            if code.is_error() {
                continue;
            }
            let new = self.router.subscribe(key, &s.filter, Entry { options, subscription_id });
            let send = match options.retain_handling {
                RetainHandling::SendAtSubscribe => true,
                RetainHandling::SendIfNew => new,
                RetainHandling::DoNotSend => false,
            };
            // Retained messages are not sent for shared subscriptions (spec 4.8.2).
            if send && s.filter.shared().is_none() {
                let found = self.retained.matching(now, &s.filter, room);
                room -= found.len();
                for mut m in found {
                    m.qos_pid = QosPid::from_parts(m.qos().min(options.qos), PacketId::MIN);
                    if let Some(id) = subscription_id {
                        m.properties.subscription_identifiers = vec![id].into();
                    }
                    retained.push(m);
                }
            }
        }
        let codes =
            subscriptions.iter().map(|s| decided.get(&s.filter).copied().unwrap_or(ReasonCode::UnspecifiedError));
        let codes: Vec<ReasonCode> = codes.collect();
        if let Some(session) = self.session_on(conn, lane) {
            let _ = session.suback(packet_id, codes);
        }
        // After the SUBACK, through the same path as live traffic: read rights, and the
        // client's backlog limit for QoS 0 and its queue limit for QoS 1 and 2.
        for m in retained {
            self.deliver(now, key, m);
        }
    }

    /// The broker's own next deadline: a will, a session expiry, a session timer, a write
    /// timeout check or periodic work.
    fn next_deadline(&self) -> Option<Instant> {
        let sessions = self.session_timers.next();
        let store = self.journal.deadline();
        let relays = self.shard.as_ref().and_then(|s| s.relays.deadline());
        [
            self.registry.next_deadline(),
            sessions,
            self.links.next_deadline(),
            self.schedule.next_deadline(),
            store,
            relays,
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// The [`Machine`](crate::Machine) interface, as inherent methods (the trait forwards to them).
impl Broker {
    /// Feeds one received UDP datagram.
    pub fn handle_datagram(&mut self, now: Instant, datagram: Datagram<'_>) {
        self.tick(now);
        if self.forward_datagram(&datagram) {
            return;
        }
        if self.bridges.is_empty() || !self.bridge_datagram(now, &datagram) {
            self.links.quic.handle_datagram(now, datagram);
        }
        self.pump(now);
    }

    /// Advances timers (sessions, kept-session expiry and wills, stalled writers); early calls do nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.tick(now);
        self.links.quic.handle_timeout(now);
        while let Some(conn) = self.session_timers.pop_due(now) {
            if let Some(live) = self.conns.get_mut(&conn) {
                live.session.handle_timeout(now);
                for stream in live.lanes.values_mut() {
                    stream.handle_timeout(now);
                }
                self.dirty.insert(conn);
            }
        }
        self.fire(now);
        self.check_stalls(now);
        self.bridge_timeouts(now);
        self.pump(now);
    }

    /// The next datagram to send, written into `buf`.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        self.poll_transmit_batch(now, 1, buf)
    }

    /// Up to `max_datagrams` datagrams to one destination at once (see [`Machine::poll_transmit_batch`](crate::Machine::poll_transmit_batch)).
    #[must_use]
    pub fn poll_transmit_batch(&mut self, now: Instant, max_datagrams: usize, buf: &mut Vec<u8>) -> Option<Transmit> {
        let mut t = self.links.quic.poll_transmit_batch(now, max_datagrams, buf);
        if t.is_none() && !self.bridges.is_empty() {
            t = self.bridge_transmit(now, max_datagrams, buf);
        }
        self.pump(now);
        t
    }

    /// When to call `handle_timeout` next.
    #[must_use]
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let bridges = if self.bridges.is_empty() { None } else { self.bridge_deadline() };
        [self.links.quic.poll_timeout(), self.next_deadline(), self.closing_until, bridges].into_iter().flatten().min()
    }
}

crate::machine::forward_machine!(Broker);
