//! The broker's bridges (see [`crate::bridge`]): each one's session here rides an in-memory
//! byte stream of the broker (an internal [`StreamId`] whose output the broker hands to the
//! bridge instead of the adapter), its upstream QUIC connection shares the broker's UDP socket
//! (datagrams told apart by tagged connection ids), and its upstream TCP and TLS connections
//! are dialled by the adapter when asked ([`Dial`]) and then carried like accepted ones.

use super::links::{Peer, StreamId, StreamOutput};
use super::machine::Broker;
use crate::bridge::Bridge;
use crate::client::StreamCommand;
use crate::machine::Datagram;
use crate::quic::Transmit;
use crate::url::BrokerUrl;
use mqtt_proto::{Publish, TopicName};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a bridge waits before its session here connects again after the broker closed it.
const LOCAL_RETRY: Duration = Duration::from_secs(1);

/// Identifies a bridge in [`Dial::Resolve`] answers: its place in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BridgeId(pub usize);

/// TLS for a dialled connection.
#[derive(Debug, Clone)]
pub struct DialTls {
    /// The client configuration (trust, ALPN none: MQTT over TLS).
    pub config: Arc<rustls::ClientConfig>,
    /// The name the upstream certificate must carry.
    pub server_name: rustls_pki_types::ServerName<'static>,
}

/// An outgoing connection or a name the broker's bridges need, from [`Broker::poll_dial`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Dial {
    /// Open a TCP connection to `url`, resolving its name now, with TLS when `tls` is set, and
    /// report the outcome with [`Broker::handle_dialed`]. From then on it is carried like an
    /// accepted connection under `id`: bytes read go to [`Broker::handle_stream_data`], the
    /// output [`Broker::poll_stream`] has for `id` is written to it (and reported with
    /// [`Broker::handle_stream_written`]), its end goes to [`Broker::handle_stream_closed`].
    Open {
        /// Its number.
        id: StreamId,
        /// Where.
        url: BrokerUrl,
        /// For `mqtts://`.
        tls: Option<DialTls>,
    },
    /// Resolve the host of this QUIC URL and answer with [`Broker::handle_resolved`].
    Resolve {
        /// Which bridge asks.
        bridge: BridgeId,
        /// The URL.
        url: BrokerUrl,
    },
}

/// A bridge and its connections as the broker sees them.
pub(super) struct BridgeSlot {
    pub(super) bridge: Bridge,
    /// Its session's in-memory stream here, while open.
    local: Option<StreamId>,
    /// When its session here may connect again.
    local_retry: Option<Instant>,
    /// Its upstream byte stream, while one is dialled or open.
    dialed: Option<StreamId>,
    /// Bytes handed to the adapter for that stream and not yet reported written.
    backlog: usize,
    /// The connection state last published under `$SYS`.
    published: Option<bool>,
}

impl BridgeSlot {
    pub(super) fn new(bridge: Bridge) -> BridgeSlot {
        BridgeSlot { bridge, local: None, local_retry: None, dialed: None, backlog: 0, published: None }
    }
}

impl Broker {
    /// Starts what the broker does by itself: its bridges connect upstream. Call once before
    /// driving it (after [`Broker::restore`] with persistence), with the clock's time; a broker
    /// without bridges needs no call, and any input starts them too.
    pub fn start(&mut self, now: Instant) {
        self.tick(now);
        self.pump(now);
    }

    /// Starts the bridges (from the first `tick`).
    pub(super) fn start_bridges(&mut self, now: Instant) {
        for slot in &mut self.bridges {
            slot.bridge.start(now);
        }
    }

    /// The bridges (for inspection: names, statistics, upstream state).
    pub fn bridges(&self) -> impl Iterator<Item = &Bridge> {
        self.bridges.iter().map(|s| &s.bridge)
    }

    /// The next outgoing connection or name resolution the bridges need (see [`Dial`]). Poll
    /// it after every input, like the other outputs.
    #[must_use]
    pub fn poll_dial(&mut self) -> Option<Dial> {
        self.dials.pop_front()
    }

    /// The outcome of a [`Dial::Open`]: connected, or why not (one line).
    pub fn handle_dialed(&mut self, now: Instant, id: StreamId, result: Result<(), String>) {
        self.tick(now);
        match (self.bridges.iter_mut().find(|s| s.dialed == Some(id)), result) {
            (Some(slot), Ok(())) => slot.bridge.handle_stream_open(now),
            (Some(slot), Err(e)) => {
                slot.dialed = None;
                slot.bridge.handle_stream_failed(now, &e);
            }
            // Given up meanwhile (the bridge moved on, the broker is shutting down): close it.
            (None, Ok(())) => self.links.push_stream(id, StreamOutput::Close),
            (None, Err(_)) => {}
        }
        self.pump(now);
    }

    /// The answer to a [`Dial::Resolve`]: the address (of the family of the broker's UDP
    /// socket), or why there is none.
    pub fn handle_resolved(
        &mut self,
        now: Instant,
        bridge: BridgeId,
        url: &BrokerUrl,
        result: Result<SocketAddr, String>,
    ) {
        self.tick(now);
        if let Some(slot) = self.bridges.get_mut(bridge.0) {
            slot.bridge.handle_resolved(now, url, result);
        }
        self.pump(now);
    }

    /// Bytes read from a dialled connection, if `id` is one; whether it was.
    pub(super) fn dialed_data(&mut self, now: Instant, id: StreamId, data: &[u8]) -> bool {
        let Some(slot) = self.bridges.iter_mut().find(|s| s.dialed == Some(id)) else { return false };
        slot.bridge.handle_stream_data(now, data);
        true
    }

    /// The adapter wrote bytes of a dialled connection, if `id` is one; whether it was.
    pub(super) fn dialed_written(&mut self, id: StreamId, bytes: usize) -> bool {
        let Some(slot) = self.bridges.iter_mut().find(|s| s.dialed == Some(id)) else { return false };
        slot.backlog = slot.backlog.saturating_sub(bytes);
        slot.bridge.set_stream_backlog(slot.backlog);
        true
    }

    /// A dialled connection closed, if `id` is one; whether it was.
    pub(super) fn dialed_closed(&mut self, now: Instant, id: StreamId) -> bool {
        let Some(slot) = self.bridges.iter_mut().find(|s| s.dialed == Some(id)) else { return false };
        slot.dialed = None;
        slot.backlog = 0;
        slot.bridge.set_stream_backlog(0);
        slot.bridge.handle_stream_failed(now, "the connection closed");
        true
    }

    /// A datagram for a bridge's upstream QUIC connection, if it is one; whether it was.
    ///
    /// One more kind reaches a bridge: a datagram from its upstream broker's address that is not
    /// addressed to a tagged id may be a stateless reset (the upstream broker restarted and no
    /// longer knows the connection), whose bytes are random where the id would be. The bridge's
    /// endpoint sees those too, so that it gives up the connection at once instead of after its
    /// idle timeout; the server endpoint still gets them (the same address may also be a client
    /// of this broker's).
    pub(super) fn bridge_datagram(&mut self, now: Instant, datagram: &Datagram<'_>) -> bool {
        match crate::cid::tagged_marker(datagram.data) {
            Some(marker) => {
                let Some(slot) = self.bridges.get_mut(usize::from(marker)) else { return false };
                slot.bridge.handle_datagram(now, *datagram);
                true
            }
            None => {
                let short = datagram.data.first().is_some_and(|b| b & 0x80 == 0);
                if short {
                    if let Some(slot) = self.bridges.iter_mut().find(|s| s.bridge.talks_to(datagram.remote)) {
                        slot.bridge.handle_datagram(now, *datagram);
                    }
                }
                false
            }
        }
    }

    /// The bridges' upstream datagrams, after the server's.
    pub(super) fn bridge_transmit(
        &mut self,
        now: Instant,
        max_datagrams: usize,
        buf: &mut Vec<u8>,
    ) -> Option<Transmit> {
        self.bridges.iter_mut().find_map(|slot| slot.bridge.poll_transmit(now, max_datagrams, buf))
    }

    pub(super) fn bridge_timeouts(&mut self, now: Instant) {
        for slot in &mut self.bridges {
            slot.bridge.handle_timeout(now);
        }
    }

    pub(super) fn bridge_deadline(&mut self) -> Option<Instant> {
        self.bridges.iter_mut().flat_map(|s| [s.bridge.poll_timeout(), s.local_retry]).flatten().min()
    }

    /// Moves bytes between the bridges and the broker: their sessions' in-memory streams both
    /// ways, their upstream byte streams' commands, their state under `$SYS`. Whether
    /// anything moved.
    pub(super) fn pump_bridges(&mut self, now: Instant) -> bool {
        let mut moved = false;
        let closing = self.closing_until.is_some();
        for i in 0..self.bridges.len() {
            let slot = &mut self.bridges[i];
            let retry_due = slot.local_retry.is_none_or(|t| t <= now);
            if slot.local.is_none() && slot.bridge.local_idle() && retry_due && !closing {
                let id = self.links.open_internal_stream();
                slot.local = Some(id);
                slot.local_retry = None;
                self.live(now, Peer::Stream(id)).internal = true;
                self.bridges[i].bridge.local_open(now);
                moved = true;
            }
            while let Some(bytes) = self.bridges[i].bridge.poll_local() {
                moved = true;
                if let Some(id) = self.bridges[i].local {
                    if self.conns.contains_key(&Peer::Stream(id)) {
                        self.received(now, Peer::Stream(id), &bytes);
                    }
                }
            }
            while let Some(command) = self.bridges[i].bridge.poll_stream() {
                moved = true;
                self.bridge_command(now, i, command);
            }
            let slot = &mut self.bridges[i];
            if slot.bridge.take_state_change() || slot.published.is_none() {
                let up = slot.bridge.stats().connected;
                if slot.published != Some(up) {
                    let first = slot.published.is_none();
                    slot.published = Some(up);
                    let name = slot.bridge.name().to_string();
                    let upstream = slot.bridge.upstream();
                    let detail = match up {
                        true => upstream.current_broker().1.map_or_else(String::new, |u| u.to_string()),
                        false => upstream.last_failure().unwrap_or("not connected yet").to_string(),
                    };
                    if !first || up {
                        self.events.push_back(super::events::BrokerEvent::BridgeState {
                            name: name.clone(),
                            connected: up,
                            detail,
                        });
                    }
                    self.publish_bridge_state(now, &name, up);
                    moved = true;
                }
            }
        }
        while let Some((id, out)) = self.links.poll_internal() {
            moved = true;
            let Some(i) = self.bridges.iter().position(|s| s.local == Some(id)) else { continue };
            match out {
                StreamOutput::Data(bytes) => {
                    self.links.stream_written(id, bytes.len());
                    self.bridges[i].bridge.local_data(now, &bytes);
                }
                _ => {
                    // The broker ended the bridge's session here (a shutdown, a takeover):
                    // as for an accepted stream the adapter closes, and the bridge connects
                    // again a little later.
                    let slot = &mut self.bridges[i];
                    slot.local = None;
                    slot.local_retry = Some(now + LOCAL_RETRY);
                    slot.bridge.local_closed(now);
                    self.links.forget_internal(id);
                    self.stream_closed(now, id);
                }
            }
        }
        moved
    }

    /// One command of a bridge's upstream machine: a byte stream to open (dialled by the
    /// adapter), write or close, a name to resolve.
    fn bridge_command(&mut self, now: Instant, i: usize, command: StreamCommand) {
        match command {
            StreamCommand::Open(Some(url)) => {
                let tls = match url.transport {
                    t if t.is_tls() => match self.dial_tls(i, &url) {
                        Ok(tls) => Some(tls),
                        Err(e) => return self.bridges[i].bridge.handle_stream_failed(now, &e),
                    },
                    _ => None,
                };
                let id = self.links.open_stream();
                self.bridges[i].dialed = Some(id);
                self.dials.push_back(Dial::Open { id, url, tls });
            }
            StreamCommand::Data(bytes) => {
                let slot = &mut self.bridges[i];
                if let Some(id) = slot.dialed {
                    slot.backlog += bytes.len();
                    slot.bridge.set_stream_backlog(slot.backlog);
                    self.links.push_stream(id, StreamOutput::Data(bytes));
                }
            }
            StreamCommand::Close => {
                let slot = &mut self.bridges[i];
                if let Some(id) = slot.dialed.take() {
                    slot.backlog = 0;
                    slot.bridge.set_stream_backlog(0);
                    self.links.push_stream(id, StreamOutput::Close);
                }
            }
            StreamCommand::Resolve(url) => self.dials.push_back(Dial::Resolve { bridge: BridgeId(i), url }),
            // (A bridge's machine always has URLs.)
            _ => {}
        }
    }

    fn dial_tls(&self, i: usize, url: &BrokerUrl) -> Result<DialTls, String> {
        let config = self.bridges[i].bridge.config();
        let trust = config.tls.as_ref().ok_or("no TLS trust configured")?;
        let mut rustls = trust.rustls_config(false).map_err(|e| e.to_string())?;
        rustls.alpn_protocols = vec![url.transport.alpn().to_vec()];
        let server_name =
            crate::driver::tls_server_name(config.server_name.as_deref(), url).map_err(|e| e.to_string())?;
        Ok(DialTls { config: Arc::new(rustls), server_name })
    }

    /// `$SYS/broker/connection/<name>/state`: `1` while connected upstream, `0` otherwise
    /// (retained, as mosquitto publishes it).
    fn publish_bridge_state(&mut self, now: Instant, name: &str, up: bool) {
        if let Ok(topic) = TopicName::new(format!("$SYS/broker/connection/{name}/state")) {
            let mut p = Publish::new(topic, if up { "1" } else { "0" });
            p.retain = true;
            self.publish(now, p, None);
        }
    }

    /// The bridges' counters, for the periodic `$SYS` publication.
    pub(super) fn bridge_sys_values(&self) -> Vec<(String, String)> {
        let mut values = Vec::new();
        for slot in &self.bridges {
            let (name, s) = (slot.bridge.name(), slot.bridge.stats());
            values.push((format!("connection/{name}/messages/sent"), s.sent.to_string()));
            values.push((format!("connection/{name}/messages/received"), s.received.to_string()));
            values.push((format!("connection/{name}/messages/dropped"), s.dropped.to_string()));
            values.push((format!("connection/{name}/connects"), s.connects.to_string()));
        }
        values
    }

    /// Shuts the bridges down with the broker: DISCONNECT upstream.
    pub(super) fn stop_bridges(&mut self, now: Instant) {
        for slot in &mut self.bridges {
            slot.bridge.stop(now);
        }
    }
}
