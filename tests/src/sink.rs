//! A minimal MQTT-over-QUIC server for session tests: it accepts every client, keeps sessions
//! between connections, grants every subscription and records every message it receives. It
//! stands in for the broker until there is one.

use mqtt_proto::{Publish, ReasonCode};
use mqtt_quic_core::config::ServerConfig;
use mqtt_quic_core::quic::{self, ConnId, QuicEndpoint, Transmit};
use mqtt_quic_core::session::server::{ServerEvent, ServerSession, ServerSessionConfig, SessionState};
use mqtt_quic_core::{EcnCodepoint, Machine};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

struct Live {
    session: ServerSession,
    client_id: Option<String>,
}

/// The recording server.
pub struct SinkServer {
    quic: QuicEndpoint,
    config: ServerSessionConfig,
    live: BTreeMap<ConnId, Live>,
    kept: BTreeMap<String, SessionState>,
    /// Every message received: (client id, message), in arrival order.
    pub received: Vec<(String, Publish)>,
    /// Connections accepted (with session present or not).
    pub connects: Vec<(String, bool)>,
}

impl SinkServer {
    /// A server on a QUIC configuration.
    pub fn new(quic: &ServerConfig, config: ServerSessionConfig) -> SinkServer {
        SinkServer {
            quic: QuicEndpoint::server(quic).expect("server config"),
            config,
            live: BTreeMap::new(),
            kept: BTreeMap::new(),
            received: Vec::new(),
            connects: Vec::new(),
        }
    }

    fn pump(&mut self, now: Instant) {
        loop {
            let mut progressed = false;
            while let Some(event) = self.quic.poll_event() {
                progressed = true;
                match event {
                    quic::Event::Connected { conn, .. } => {
                        self.live.entry(conn).or_insert_with(|| Live {
                            session: ServerSession::new(now, self.config.clone()),
                            client_id: None,
                        });
                    }
                    quic::Event::Received { conn, data } => {
                        let live = self.live.entry(conn).or_insert_with(|| Live {
                            session: ServerSession::new(now, self.config.clone()),
                            client_id: None,
                        });
                        live.session.handle_bytes(now, &data);
                    }
                    quic::Event::Closed { conn, .. } => {
                        if let Some(live) = self.live.get_mut(&conn) {
                            live.session.connection_lost();
                        }
                    }
                    _ => {}
                }
            }
            let conns: Vec<ConnId> = self.live.keys().copied().collect();
            for conn in conns {
                progressed |= self.serve(now, conn);
            }
            if !progressed {
                break;
            }
        }
    }

    /// Moves one session's bytes and events along; returns whether anything happened.
    fn serve(&mut self, now: Instant, conn: ConnId) -> bool {
        let Some(live) = self.live.get_mut(&conn) else { return false };
        let events: Vec<ServerEvent> = std::iter::from_fn(|| live.session.poll_event()).collect();
        let mut progressed = !events.is_empty();
        for event in events {
            self.on_event(now, conn, event);
        }
        if let Some(live) = self.live.get_mut(&conn) {
            while let Some(bytes) = live.session.poll_transmit() {
                progressed = true;
                let _ = self.quic.send(now, conn, bytes);
            }
            if live.session.is_ended() {
                self.live.remove(&conn);
            }
        }
        progressed
    }

    fn on_event(&mut self, now: Instant, conn: ConnId, event: ServerEvent) {
        match event {
            ServerEvent::Connect(c) => {
                let id = c.client_id.to_string();
                // Session takeover: a live connection with the same client id is ended (0x8E)
                // and its session moves to the new connection.
                let old = self
                    .live
                    .iter_mut()
                    .find(|(other, l)| **other != conn && l.client_id.as_deref() == Some(id.as_str()));
                if let Some((&other, l)) = old {
                    let _ = l.session.disconnect(ReasonCode::SessionTakenOver);
                    l.client_id = None;
                    let state = l.session.take_state();
                    self.kept.insert(id.clone(), state);
                    while let Some(bytes) = l.session.poll_transmit() {
                        let _ = self.quic.send(now, other, bytes);
                    }
                    let _ = self.quic.finish(now, other);
                }
                let kept = self.kept.remove(&id);
                self.connects.push((id.clone(), kept.is_some() && !c.clean_start));
                let Some(live) = self.live.get_mut(&conn) else { return };
                match kept {
                    Some(state) if !c.clean_start => {
                        let _ = live.session.resume(now, state);
                    }
                    _ => {
                        let _ = live.session.accept(now, false, None);
                    }
                }
                live.client_id = Some(id);
            }
            ServerEvent::Publish(p) => {
                let Some(live) = self.live.get_mut(&conn) else { return };
                live.session.acknowledge(p.qos_pid, ReasonCode::Success);
                let id = live.client_id.clone().unwrap_or_default();
                self.received.push((id, p));
            }
            ServerEvent::Subscribe { packet_id, subscriptions, .. } => {
                let codes = subscriptions.iter().map(|s| match s.options.qos as u8 {
                    0 => ReasonCode::Success,
                    1 => ReasonCode::GrantedQos1,
                    _ => ReasonCode::GrantedQos2,
                });
                if let Some(live) = self.live.get_mut(&conn) {
                    let _ = live.session.suback(packet_id, codes.collect());
                }
            }
            ServerEvent::Unsubscribe { packet_id, filters } => {
                if let Some(live) = self.live.get_mut(&conn) {
                    let _ = live.session.unsuback(packet_id, vec![ReasonCode::Success; filters.len()]);
                }
            }
            ServerEvent::Ended { .. } => {
                if let Some(live) = self.live.get_mut(&conn) {
                    let state = live.session.take_state();
                    if let Some(id) = live.client_id.clone() {
                        self.kept.insert(id, state);
                    }
                }
                let _ = self.quic.finish(now, conn);
            }
            _ => {}
        }
    }
}

impl Machine for SinkServer {
    fn handle_datagram(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        local_ip: Option<IpAddr>,
        ecn: Option<EcnCodepoint>,
        data: &[u8],
    ) {
        self.quic.handle_datagram(now, remote, local_ip, ecn, data);
        self.pump(now);
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.quic.handle_timeout(now);
        for live in self.live.values_mut() {
            live.session.handle_timeout(now);
        }
        self.pump(now);
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        let t = self.quic.poll_transmit(now, buf);
        self.pump(now);
        t
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        let sessions = self.live.values().filter_map(|l| l.session.poll_timeout()).min();
        [self.quic.poll_timeout(), sessions].into_iter().flatten().min()
    }
}
