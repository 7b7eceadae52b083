//! Bridges: this broker as a client of an upstream broker (a cloud cluster: EMQX, HiveMQ,
//! VerneMQ, mosquitto, or another `mqttq broker`), carrying the topics its mappings name out,
//! in, or both ways.
//!
//! A [`Bridge`] is two MQTT sessions and the rules between them:
//!
//! - **here**, a session of this broker with client id `$bridge/<name>`, on an in-memory
//!   connection the broker carries like any other (no socket). It subscribes to what goes out
//!   and publishes what comes in. It is a kept session (its subscriptions and the messages
//!   waiting for it are in the broker's store with persistence on), so what is queued for the
//!   upstream broker while it is unreachable survives a restart of this broker;
//! - **upstream**, a [`ClientMachine`] with the client's fallback (QUIC first, say, then TLS or
//!   TCP), a kept session there (`clean_start` off), and its own reconnect backoff.
//!
//! Nothing is acknowledged before it is kept on the other side: a message taken here is
//! acknowledged here only once the upstream broker acknowledged it, and one taken upstream is
//! acknowledged there only once this broker has it (stored, with persistence on). Both sessions
//! acknowledge by hand (`manual_acks`), so a crash at any point leaves the message with the side
//! that still has to send it again: at least once across the bridge (QoS 2 on both sides is
//! still at least once across it, as with mosquitto's bridges).
//!
//! Loops: when a topic goes both ways, what the bridge publishes here must not be taken by its
//! own subscription and sent back, and what it publishes upstream must not come back down. Its
//! subscriptions here are No Local, and so are its MQTT 5 subscriptions upstream. MQTT 3.1.1
//! has no No Local: there the bridge sets mosquitto's bridge flag in its CONNECT (protocol
//! level 0x84), which mosquitto and this broker honour with the same effect.
//!
//! The bridge's QUIC endpoint shares the broker's UDP socket: its connection ids are tagged
//! ([`crate::cid::tagged_marker`]), so the broker tells its datagrams from its clients'. Its TCP and
//! TLS connections are opened by the adapter when the broker asks
//! ([`crate::broker::machine::Broker::poll_dial`]) and then carried like any accepted
//! connection.

pub mod config;

use crate::client::{ClientMachine, ClientUrlsConfig, StreamCommand};
use crate::config::{ClientConfig, ConfigError};
use crate::machine::Datagram;
use crate::quic::Transmit;
use crate::session::client::{ClientEvent, ClientSession, ClientSessionConfig, CommandError, RequestId};
use crate::url::BrokerUrl;
use bytes::Bytes;
use config::BridgeConfig;
use mqtt_proto::{PacketId, Publish, QoS, RetainHandling, Subscription, SubscriptionOptions, TopicFilter, TopicName};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

/// The client id prefix of bridges' sessions on this broker (clients cannot use it).
pub const LOCAL_CLIENT_PREFIX: &str = "$bridge/";

/// What a bridge has done, for `$SYS/broker/connection/<name>/...` and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BridgeStats {
    /// Connected upstream now.
    pub connected: bool,
    /// Messages sent upstream and acknowledged there (QoS 0: sent).
    pub sent: u64,
    /// Messages received from upstream and published here.
    pub received: u64,
    /// Messages that could not be carried: QoS 0 while the other side was unreachable,
    /// messages the other side refused or that exceed its limits.
    pub dropped: u64,
    /// Times the upstream connection was made.
    pub connects: u64,
}

/// One bridge (see the module docs). Driven by the broker: the local session's bytes through
/// `local_*`, the upstream machine's datagrams, byte streams and timers through the rest.
pub struct Bridge {
    config: BridgeConfig,
    local: ClientSession,
    upstream: ClientMachine,
    /// Messages taken here and sent upstream, waiting for the upstream acknowledgement: the
    /// upstream request, and the local message's packet id.
    outbound: BTreeMap<RequestId, PacketId>,
    /// Messages taken upstream and published here, waiting for this broker's acknowledgement:
    /// the local request, and the upstream message's packet id.
    inbound: BTreeMap<RequestId, PacketId>,
    subscribed_local: Subscribing,
    subscribed_upstream: Subscribing,
    /// Messages taken here that the upstream session had no room to queue, in order (at most
    /// the local window: the broker sends no more unacknowledged).
    waiting_out: VecDeque<(Publish, Option<PacketId>)>,
    /// Bytes handed to the adapter for the upstream byte stream and not yet written (the
    /// broker says).
    stream_backlog: usize,
    stats: BridgeStats,
    /// The connection state changed since the last [`Bridge::take_state_change`].
    state_changed: bool,
}

impl Bridge {
    /// A bridge, not started. `secret` keys its QUIC endpoint (as a client's), whose connection
    /// ids carry `marker` (see [`crate::cid::tagged_marker`]): the bridge's number in its broker.
    pub fn new(config: BridgeConfig, secret: [u8; 32], marker: u8) -> Result<Bridge, ConfigError> {
        config.validate()?;
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&secret[..8]);
        let seed = u64::from_le_bytes(seed);
        let quic = config.tls.clone().map(|tls| {
            let mut quic = ClientConfig::new(tls);
            quic.transport = config.transport.clone();
            quic.seed = seed;
            quic.secret = Some(crate::config::Secret::new(secret));
            quic.tagged_cids = Some(marker);
            quic
        });
        let upstream_session = ClientSessionConfig {
            protocol: config.protocol,
            client_id: config.client_id.clone(),
            clean_start: config.clean_start,
            keep_alive: config.keep_alive,
            session_expiry: if config.clean_start { 0 } else { config.session_expiry },
            username: config.username.clone(),
            password: config.password.clone(),
            manual_acks: true,
            // MQTT 3.1.1 has no No Local: mosquitto's bridge flag asks for it.
            bridge: true,
            // Upstream publishes wait in the session while it is unreachable: room for every
            // message taken here and not yet acknowledged.
            max_queued: usize::from(config.max_inflight) * 2,
            ..Default::default()
        };
        let upstream = ClientMachine::with_urls(ClientUrlsConfig {
            urls: config.urls.clone(),
            quic,
            session: upstream_session,
            server_name: config.server_name.clone(),
            reconnect: Some(config.reconnect),
            fallback: config.fallback,
            seed,
            // The broker's adapter gives addresses in the form the broker's socket needs.
            resolve_literals: true,
        })?;
        let local = ClientSession::new(ClientSessionConfig {
            client_id: format!("{LOCAL_CLIENT_PREFIX}{}", config.name),
            clean_start: false,
            // The in-memory connection cannot go quiet.
            keep_alive: 0,
            session_expiry: u32::MAX,
            receive_maximum: config.max_inflight,
            topic_alias_maximum: 0,
            manual_acks: true,
            max_queued: usize::MAX,
            ..Default::default()
        })?;
        Ok(Bridge {
            config,
            local,
            upstream,
            outbound: BTreeMap::new(),
            inbound: BTreeMap::new(),
            subscribed_local: Subscribing::default(),
            subscribed_upstream: Subscribing::default(),
            waiting_out: VecDeque::new(),
            stream_backlog: 0,
            stats: BridgeStats::default(),
            state_changed: true,
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Its configuration.
    pub fn config(&self) -> &BridgeConfig {
        &self.config
    }

    /// What it has done.
    pub fn stats(&self) -> BridgeStats {
        self.stats
    }

    /// Whether the upstream connection came up or went down since the last call.
    pub fn take_state_change(&mut self) -> bool {
        std::mem::take(&mut self.state_changed)
    }

    /// Starts connecting upstream.
    pub fn start(&mut self, now: Instant) {
        // Fails only for a machine already started.
        let _ = self.upstream.start(now);
        self.pump(now);
    }

    /// The in-memory connection to this broker is open: CONNECT goes out on it.
    pub fn local_open(&mut self, now: Instant) {
        let _ = self.local.connect(now);
        self.pump(now);
    }

    /// Bytes from this broker on the in-memory connection.
    pub fn local_data(&mut self, now: Instant, data: &[u8]) {
        self.local.handle_stream_data(now, data);
        self.pump(now);
    }

    /// The broker closed the in-memory connection.
    pub fn local_closed(&mut self, now: Instant) {
        self.local.handle_stream_closed(now);
        self.pump(now);
    }

    /// Whether the in-memory connection is down and should be opened again.
    pub fn local_idle(&self) -> bool {
        self.local.is_idle()
    }

    /// Bytes for this broker on the in-memory connection.
    #[must_use]
    pub fn poll_local(&mut self) -> Option<Bytes> {
        self.local.poll_transmit()
    }

    /// A datagram for the upstream QUIC connection (see [`crate::cid::tagged_marker`]).
    pub fn handle_datagram(&mut self, now: Instant, datagram: Datagram<'_>) {
        self.upstream.handle_datagram(now, datagram);
        self.pump(now);
    }

    /// Upstream datagrams to send through the broker's socket.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant, max_datagrams: usize, buf: &mut Vec<u8>) -> Option<Transmit> {
        let t = self.upstream.poll_transmit_batch(now, max_datagrams, buf);
        self.pump(now);
        t
    }

    /// What the upstream connection asks of the adapter: byte streams to open, write and
    /// close, names to resolve.
    #[must_use]
    pub fn poll_stream(&mut self) -> Option<StreamCommand> {
        self.upstream.poll_stream()
    }

    /// See [`ClientMachine::handle_stream_open`].
    pub fn handle_stream_open(&mut self, now: Instant) {
        self.upstream.handle_stream_open(now);
        self.pump(now);
    }

    /// See [`ClientMachine::handle_stream_data`].
    pub fn handle_stream_data(&mut self, now: Instant, data: &[u8]) {
        self.upstream.handle_stream_data(now, data);
        self.pump(now);
    }

    /// See [`ClientMachine::handle_stream_closed`].
    pub fn handle_stream_closed(&mut self, now: Instant) {
        self.upstream.handle_stream_closed(now);
        self.pump(now);
    }

    /// See [`ClientMachine::handle_stream_failed`].
    pub fn handle_stream_failed(&mut self, now: Instant, reason: &str) {
        self.upstream.handle_stream_failed(now, reason);
        self.pump(now);
    }

    /// See [`ClientMachine::handle_resolved`].
    pub fn handle_resolved(&mut self, now: Instant, url: &BrokerUrl, result: Result<SocketAddr, String>) {
        self.upstream.handle_resolved(now, url, result);
        self.pump(now);
    }

    /// Advances the upstream machine's and the local session's timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.upstream.handle_timeout(now);
        self.local.handle_timeout(now);
        self.pump(now);
    }

    /// When to call [`Bridge::handle_timeout`] next.
    #[must_use]
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        [self.upstream.poll_timeout(), self.local.poll_timeout()].into_iter().flatten().min()
    }

    /// The broker's count of bytes given to the adapter for the upstream byte stream and not
    /// yet written (see `upstream_busy`).
    pub fn set_stream_backlog(&mut self, bytes: usize) {
        self.stream_backlog = bytes;
    }

    /// Whether the upstream QUIC connection talks to `remote`.
    pub fn talks_to(&self, remote: SocketAddr) -> bool {
        self.upstream.quic_remotes().any(|r| r == remote)
    }

    /// The upstream machine (for inspection).
    pub fn upstream(&self) -> &ClientMachine {
        &self.upstream
    }

    /// Shuts the bridge down: DISCONNECT upstream (the upstream session stays, with what it
    /// holds for the bridge).
    pub fn stop(&mut self, now: Instant) {
        let _ = self.upstream.disconnect(now, mqtt_proto::ReasonCode::Success);
        self.pump(now);
    }

    /// Moves messages and acknowledgements between the two sessions until both are quiet.
    fn pump(&mut self, now: Instant) {
        loop {
            let mut progressed = false;
            while let Some(event) = self.upstream.poll_event() {
                progressed = true;
                self.upstream_event(now, event);
            }
            while let Some(event) = self.local.poll_event() {
                progressed = true;
                self.local_event(now, event);
            }
            progressed |= !self.waiting_out.is_empty() && self.retry_waiting(now);
            if !progressed {
                break;
            }
        }
    }

    fn upstream_event(&mut self, now: Instant, event: ClientEvent) {
        match event {
            ClientEvent::Connected { .. } => {
                self.stats.connected = true;
                self.stats.connects += 1;
                self.state_changed = true;
                // Until the SUBACK comes: the session makes again only what was granted.
                if !self.subscribed_upstream.done && self.subscribed_upstream.pending.is_none() {
                    let subs = self.subscriptions(|m| m.direction.is_in(), |m| m.remote_filter());
                    self.subscribed_upstream.pending = match subs.is_empty() {
                        true => None,
                        false => self.upstream.subscribe(now, subs, None).ok(),
                    };
                }
            }
            ClientEvent::Disconnected { .. } | ClientEvent::Refused { .. } => {
                if self.stats.connected {
                    self.stats.connected = false;
                    self.state_changed = true;
                }
                // Those messages' packet ids mean nothing on the next connection: the
                // upstream broker sends them again.
                self.inbound.clear();
            }
            ClientEvent::Message(publish) => self.carry_in(now, publish),
            ClientEvent::Published { id, reason } => {
                if reason.is_error() {
                    self.stats.dropped += 1;
                } else {
                    self.stats.sent += 1;
                }
                if let Some(pid) = self.outbound.remove(&id) {
                    // (Fails only when the local connection ended meanwhile: the broker sends
                    // the message again.)
                    let _ = self.local.ack(now, pid);
                }
            }
            ClientEvent::Subscribed { id, .. } => self.subscribed_upstream.granted(id),
            ClientEvent::Aborted { id } => {
                self.outbound.remove(&id);
                self.subscribed_upstream.aborted(id);
            }
            _ => {}
        }
    }

    fn local_event(&mut self, now: Instant, event: ClientEvent) {
        match event {
            ClientEvent::Connected { session_present, .. } => {
                if !session_present {
                    self.subscribed_local = Subscribing::default();
                }
                if !self.subscribed_local.done && self.subscribed_local.pending.is_none() {
                    let subs = self.subscriptions(|m| m.direction.is_out(), |m| m.local_filter());
                    self.subscribed_local.pending = match subs.is_empty() {
                        true => None,
                        false => self.local.subscribe(now, subs, None).ok(),
                    };
                }
            }
            ClientEvent::Message(publish) => self.carry_out(now, publish),
            ClientEvent::Published { id, reason } => {
                if reason.is_error() {
                    self.stats.dropped += 1;
                } else {
                    self.stats.received += 1;
                }
                if let Some(pid) = self.inbound.remove(&id) {
                    let _ = self.upstream.ack(now, pid);
                }
            }
            ClientEvent::Subscribed { id, .. } => self.subscribed_local.granted(id),
            ClientEvent::Aborted { id } => self.subscribed_local.aborted(id),
            ClientEvent::Disconnected { .. } => {
                // Acknowledgements of messages from that connection have nowhere to go: the
                // broker sends those messages again on the next one.
                self.outbound.clear();
                self.waiting_out.clear();
            }
            _ => {}
        }
    }

    /// The subscriptions for the mappings `wanted` selects, on the filters `filter` gives: No
    /// Local (no loops), Retain As Published, retained messages only for a new subscription.
    fn subscriptions(
        &self,
        wanted: impl Fn(&config::TopicMapping) -> bool,
        filter: impl Fn(&config::TopicMapping) -> String,
    ) -> Vec<Subscription> {
        let mut subs: Vec<Subscription> = Vec::new();
        for m in self.config.mappings.iter().filter(|m| wanted(m)) {
            let Ok(f) = TopicFilter::new(filter(m)) else { continue };
            let options = SubscriptionOptions {
                qos: m.qos,
                // (No Local is a protocol error on a shared subscription.)
                no_local: f.shared().is_none(),
                retain_as_published: true,
                retain_handling: RetainHandling::SendIfNew,
            };
            match subs.iter_mut().find(|s| s.filter == f) {
                Some(s) => s.options.qos = s.options.qos.max(m.qos),
                None => subs.push(Subscription { filter: f, options }),
            }
        }
        subs
    }

    /// Whether the upstream connection has so much waiting to be sent that QoS 0 messages are
    /// dropped rather than queued (as the broker does for a slow client).
    fn upstream_busy(&self) -> bool {
        self.upstream.queued_bytes() + self.stream_backlog > UPSTREAM_BACKLOG
    }

    /// A message taken here: upstream under its mapped topic, acknowledged here once the
    /// upstream broker acknowledged it.
    fn carry_out(&mut self, now: Instant, publish: Publish) {
        let pid = publish.qos_pid.packet_id();
        let limits = self.upstream.session();
        let (max_qos, retain) = (limits.server_maximum_qos(), limits.server_retain_available());
        let out = self.config.mappings.iter().find_map(|m| {
            let topic = m.to_remote(publish.topic.as_str())?;
            forwarded(&publish, &topic, m.qos.min(max_qos), retain)
        });
        match out {
            Some(out) => self.send_out(now, out, pid),
            None => self.drop_local(now, pid),
        }
    }

    /// Publishes upstream what was taken here (with its local packet id, QoS 1 and 2).
    fn send_out(&mut self, now: Instant, out: Publish, pid: Option<PacketId>) {
        let qos = out.qos();
        if qos == QoS::AtMostOnce && self.upstream_busy() {
            return self.drop_local(now, pid);
        }
        match self.upstream.publish(now, out.clone()) {
            Ok(id) if qos > QoS::AtMostOnce => {
                if let Some(pid) = pid {
                    self.outbound.insert(id, pid);
                }
            }
            Ok(_) => {
                if let Some(pid) = pid {
                    let _ = self.local.ack(now, pid);
                }
            }
            // Queued upstream to the limit: it waits here (at most the local window), and is
            // tried again as the queue drains.
            Err(CommandError::QueueFull(_)) => self.waiting_out.push_back((out, pid)),
            // QoS 0 with the upstream unreachable, or beyond what it accepts: never sendable.
            Err(_) => self.drop_local(now, pid),
        }
    }

    /// Tries again the messages the upstream queue had no room for; whether any went.
    fn retry_waiting(&mut self, now: Instant) -> bool {
        let mut any = false;
        while let Some((out, pid)) = self.waiting_out.pop_front() {
            let before = self.waiting_out.len();
            self.send_out(now, out, pid);
            if self.waiting_out.len() > before {
                // Still full: it went to the back; put it first again, in order.
                if let Some(last) = self.waiting_out.pop_back() {
                    self.waiting_out.push_front(last);
                }
                break;
            }
            any = true;
        }
        any
    }

    fn drop_local(&mut self, now: Instant, pid: Option<PacketId>) {
        self.stats.dropped += 1;
        if let Some(pid) = pid {
            let _ = self.local.ack(now, pid);
        }
    }

    /// A message taken upstream: published here under its mapped topic, acknowledged upstream
    /// once this broker acknowledged it.
    fn carry_in(&mut self, now: Instant, publish: Publish) {
        let pid = publish.qos_pid.packet_id();
        let limits = &self.local;
        let (max_qos, retain) = (limits.server_maximum_qos(), limits.server_retain_available());
        let here = self.config.mappings.iter().find_map(|m| {
            let topic = m.to_local(publish.topic.as_str())?;
            forwarded(&publish, &topic, m.qos.min(max_qos), retain)
        });
        let local_id = here.and_then(|here| {
            let qos = here.qos();
            self.local.publish(now, here).ok().map(|id| (id, qos))
        });
        match (local_id, pid) {
            (Some((id, qos)), Some(pid)) if qos > QoS::AtMostOnce => drop(self.inbound.insert(id, pid)),
            (local_id, pid) => {
                if local_id.is_none() {
                    self.stats.dropped += 1;
                }
                if let Some(pid) = pid {
                    let _ = self.upstream.ack(now, pid);
                }
            }
        }
    }
}

/// A subscription request of the bridge: made again until its SUBACK comes.
#[derive(Debug, Default)]
struct Subscribing {
    pending: Option<RequestId>,
    done: bool,
}

impl Subscribing {
    fn granted(&mut self, id: RequestId) {
        if self.pending == Some(id) {
            self.pending = None;
            self.done = true;
        }
    }

    fn aborted(&mut self, id: RequestId) {
        if self.pending == Some(id) {
            self.pending = None;
        }
    }
}

/// Bytes waiting for the upstream connection beyond which QoS 0 messages are dropped.
const UPSTREAM_BACKLOG: usize = 4 << 20;

/// `publish` as it goes on to the other side: under `topic`, at no more than `max_qos` (the
/// mapping's and the other side's), with its payload, retain flag (where retained messages
/// are available) and the properties that describe the message (not those of the
/// hop it came on: topic alias, subscription identifiers).
fn forwarded(publish: &Publish, topic: &str, max_qos: QoS, retain_available: bool) -> Option<Publish> {
    let mut out =
        Publish::new(TopicName::new(topic).ok()?, publish.payload.clone()).with_qos(publish.qos().min(max_qos));
    // A side without retained messages gets the message, not the retaining.
    out.retain = publish.retain && retain_available;
    let mut properties = publish.properties.clone();
    properties.topic_alias = None;
    properties.subscription_identifiers = Default::default();
    out.properties = properties;
    Some(out)
}
