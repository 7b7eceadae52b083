//! The checks behind the `server_session` and `client_session` fuzz targets: a session fed a
//! fuzzer-chosen sequence of well-formed packets (plus raw bytes, waits, lost connections and
//! the local side's own commands) must never panic, and everything it sends must obey the
//! limits its peer announced:
//!
//! - every byte it writes decodes, as packets that direction may carry, CONNACK (server) or
//!   CONNECT (client) first, nothing after its DISCONNECT;
//! - no packet is larger than the peer's Maximum Packet Size [MQTT-3.1.2-24] [MQTT-3.2.2-15];
//! - no topic alias above the peer's Topic Alias Maximum [MQTT-3.1.2-26] [MQTT-3.2.2-17];
//! - no more unacknowledged QoS 1 and 2 publishes than the peer's Receive Maximum
//!   [MQTT-3.3.4-7] [MQTT-3.3.4-9] (a PUBLISH is unacknowledged until PUBACK, PUBCOMP, or a
//!   failing PUBREC).
//!
//! With `data_stream` set, the server session's steps go to a data stream's session of the
//! connection (EMQX's multi-stream mode), which must also never send CONNACK, DISCONNECT or
//! AUTH.
//!
//! `tests/tests/fuzz_corpus_quic.rs` replays the committed corpora through these functions.

use arbitrary::{Arbitrary, Unstructured};
use bytes::BytesMut;
use mqtt_proto::{
    ConnAck, ConnAckProperties, Connect, Decoder, Packet, PacketId, PropBox, Protocol, Publish, QoS, QosPid,
    ReasonCode, Subscription, TopicFilter, TopicName,
};
use mqtt_quic_core::session::client::{ClientEvent, ClientSession, ClientSessionConfig};
use mqtt_quic_core::session::server::{ServerEvent, ServerSession, ServerSessionConfig};
use std::collections::HashMap;
use std::num::{NonZeroU16, NonZeroU32};
use std::time::{Duration, Instant};

/// What the server session's peer (the client) or its broker does next.
#[derive(Arbitrary, Debug)]
enum ServerStep {
    /// The client sends this packet (skipped if it cannot be encoded).
    Packet(Packet),
    /// The client sends these bytes.
    Raw(Vec<u8>),
    /// Time passes (in units of 10 ms).
    Wait(u8),
    /// The broker routes this message to the client.
    Route(Publish),
    /// The connection drops; the client reconnects with the same CONNECT (clean start off)
    /// and the broker resumes the session.
    Reconnect,
}

/// A server session's fuzz input.
#[derive(Arbitrary, Debug)]
struct ServerScript {
    v5: bool,
    /// The steps go to a data stream's session of the connection (EMQX's multi-stream mode)
    /// instead of the connection's own.
    data_stream: bool,
    connect: Connect,
    steps: Vec<ServerStep>,
}

/// What one direction of a connection must obey, from the receiver's announced limits.
struct Limits {
    max_packet_size: Option<u32>,
    topic_alias_maximum: u16,
    receive_maximum: Option<u16>,
    maximum_qos: QoS,
    retain_available: bool,
}

/// Checks one direction of a connection: decodes what the sender writes and keeps the sender's
/// unacknowledged QoS 1 and 2 publishes, as the receiver's acknowledgements free them.
struct Watch {
    decoder: Decoder,
    buf: BytesMut,
    limits: Limits,
    /// Packet identifier -> QoS of the sender's publishes awaiting their final acknowledgement.
    unacked: HashMap<PacketId, QoS>,
    first: bool,
    disconnected: bool,
    server_side: bool,
    /// Limits from a CONNACK the client was given, until it reports being connected.
    offered: Option<Limits>,
    /// A data stream's session: no CONNACK first, and never CONNACK or DISCONNECT.
    data_stream: bool,
}

impl Watch {
    fn new(protocol: Protocol, server_side: bool, limits: Limits) -> Watch {
        Watch {
            decoder: Decoder::new(protocol).with_max_packet_size(u32::MAX),
            buf: BytesMut::new(),
            limits,
            unacked: HashMap::new(),
            first: true,
            disconnected: false,
            server_side,
            offered: None,
            data_stream: false,
        }
    }

    /// The watch of a data stream's session.
    fn data_stream(protocol: Protocol, limits: Limits) -> Watch {
        Watch { first: false, data_stream: true, ..Watch::new(protocol, true, limits) }
    }

    /// Bytes the sender wrote.
    fn sent(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        loop {
            let before = self.buf.len();
            let packet = match self.decoder.decode(&mut self.buf) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => panic!("the session wrote bytes that do not decode: {e}"),
            };
            let size = before - self.buf.len();
            self.packet(&packet, size);
        }
    }

    fn packet(&mut self, packet: &Packet, size: usize) {
        if tracing() {
            eprintln!("{} sent {packet:?}", if self.server_side { "server" } else { "client" });
        }
        assert!(!self.disconnected, "{packet:?} sent after DISCONNECT");
        if let Some(max) = self.limits.max_packet_size {
            assert!(size <= max as usize, "{size}-byte packet exceeds the peer's maximum {max}: {packet:?}");
        }
        let first = std::mem::take(&mut self.first);
        if self.data_stream {
            assert!(
                !matches!(packet, Packet::ConnAck(_) | Packet::Disconnect(_) | Packet::Auth(_)),
                "a data stream's session sent a control packet: {packet:?}"
            );
        }
        if self.server_side {
            assert_eq!(first, matches!(packet, Packet::ConnAck(_)), "CONNACK must come first, once: {packet:?}");
            assert!(
                !matches!(packet, Packet::Connect(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) | Packet::PingReq),
                "a server sent a client's packet: {packet:?}"
            );
        } else {
            assert_eq!(first, matches!(packet, Packet::Connect(_)), "CONNECT must come first, once: {packet:?}");
            assert!(
                !matches!(packet, Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp),
                "a client sent a server's packet: {packet:?}"
            );
        }
        match packet {
            Packet::Disconnect(_) => self.disconnected = true,
            Packet::ConnAck(ack) if ack.reason_code.is_error() => self.disconnected = true,
            Packet::Publish(p) => {
                assert!(p.qos() <= self.limits.maximum_qos, "QoS above the peer's Maximum QoS [MQTT-3.2.2-11]");
                assert!(!p.retain || self.limits.retain_available, "RETAIN to a peer without it [MQTT-3.2.2-14]");
                if let Some(alias) = p.properties.topic_alias {
                    assert!(
                        alias.get() <= self.limits.topic_alias_maximum,
                        "topic alias {alias} above the peer's maximum"
                    );
                }
                if let QosPid::AtLeastOnce(pid) | QosPid::ExactlyOnce(pid) = p.qos_pid {
                    let known = self.unacked.insert(pid, p.qos());
                    assert!(known.is_none() || p.dup, "packet identifier {pid} reused while in flight");
                    if let Some(max) = self.limits.receive_maximum {
                        assert!(
                            self.unacked.len() <= usize::from(max),
                            "{} publishes unacknowledged, the peer's Receive Maximum is {max}",
                            self.unacked.len()
                        );
                    }
                }
            }
            _ => {}
        }
    }

    /// A packet the receiver sent: a CONNACK sets the limits the client must obey, and
    /// acknowledgements free the sender's publishes.
    fn acknowledged(&mut self, packet: &Packet) {
        if let Packet::ConnAck(ack) = packet {
            // The limits apply once the client accepts this CONNACK (its Connected event): a
            // second CONNACK on a connection is refused, not obeyed.
            if !self.server_side && self.decoder.protocol().is_v5() && !ack.reason_code.is_error() {
                self.offered = Some(connack_limits(ack));
            }
            return;
        }
        let (pid, final_for) = match packet {
            Packet::PubAck(a) => (a.packet_id, QoS::AtLeastOnce),
            Packet::PubComp(a) => (a.packet_id, QoS::ExactlyOnce),
            Packet::PubRec(a) if a.reason_code.is_error() => (a.packet_id, QoS::ExactlyOnce),
            _ => return,
        };
        if self.unacked.get(&pid) == Some(&final_for) {
            self.unacked.remove(&pid);
        }
    }
}

/// `FUZZ_TRACE=1` prints each input and what the session sends (to study a crash).
fn tracing() -> bool {
    std::env::var_os("FUZZ_TRACE").is_some()
}

fn encode(protocol: Protocol, packet: &Packet) -> Option<BytesMut> {
    let mut out = BytesMut::new();
    packet.encode(protocol, &mut out).ok()?;
    Some(out)
}

fn connect_limits(connect: &Connect) -> Limits {
    let v5 = connect.protocol.is_v5();
    Limits {
        max_packet_size: connect.properties.maximum_packet_size.map(NonZeroU32::get).filter(|_| v5),
        topic_alias_maximum: if v5 { connect.properties.topic_alias_maximum.unwrap_or(0) } else { 0 },
        receive_maximum: connect.properties.receive_maximum.map(NonZeroU16::get).filter(|_| v5),
        maximum_qos: QoS::ExactlyOnce,
        retain_available: true,
    }
}

fn connack_limits(ack: &ConnAck) -> Limits {
    Limits {
        max_packet_size: ack.properties.maximum_packet_size.map(NonZeroU32::get),
        topic_alias_maximum: ack.properties.topic_alias_maximum.unwrap_or(0),
        receive_maximum: ack.properties.receive_maximum.map(NonZeroU16::get),
        maximum_qos: ack.properties.maximum_qos.unwrap_or(QoS::ExactlyOnce),
        retain_available: ack.properties.retain_available.unwrap_or(true),
    }
}

/// Target `server_session`: a server session fed a CONNECT and then an `Arbitrary` sequence of
/// client packets, raw bytes, waits, broker deliveries and reconnects.
pub fn server_session(data: &[u8]) {
    let Ok(mut script) = ServerScript::arbitrary_take_rest(Unstructured::new(data)) else { return };
    if tracing() {
        eprintln!("{script:#?}");
    }
    script.connect.protocol = if script.v5 { Protocol::V5 } else { Protocol::V3_1_1 };
    let protocol = script.connect.protocol;
    #[allow(clippy::disallowed_methods)] // the harness owns the clock
    let mut now = Instant::now();
    let config = ServerSessionConfig {
        receive_maximum: 4,
        topic_alias_maximum: 2,
        maximum_packet_size: 4096,
        max_inflight: 8,
        max_queued: 16,
        ..Default::default()
    };
    let Some(connect_bytes) = encode(protocol, &Packet::Connect(Box::new(script.connect.clone()))) else { return };
    let mut session = ServerSession::new(now, config.clone());
    let mut watch = Watch::new(protocol, true, connect_limits(&script.connect));
    let mut resumed = false;
    session.handle_stream_data(now, &connect_bytes);
    serve(&mut session, &mut watch, now, &mut resumed, None);
    // With `data_stream`, the steps go to a data stream of the connection, once accepted.
    let lane = |session: &ServerSession, now| {
        script
            .data_stream
            .then(|| session.data_stream(now).ok())
            .flatten()
            .map(|lane| (lane, Watch::data_stream(protocol, connect_limits(&script.connect)), true))
    };
    let mut stream = lane(&session, now);
    for step in script.steps {
        let (target, target_watch) = match &mut stream {
            Some((lane, lane_watch, _)) => (lane, lane_watch),
            None => (&mut session, &mut watch),
        };
        match step {
            ServerStep::Packet(packet) => {
                if let Some(bytes) = encode(protocol, &packet) {
                    target_watch.acknowledged(&packet);
                    target.handle_stream_data(now, &bytes);
                }
            }
            ServerStep::Raw(bytes) => target.handle_stream_data(now, &bytes),
            ServerStep::Wait(t) => {
                now += Duration::from_millis(u64::from(t) * 10);
                target.handle_timeout(now);
                if stream.is_some() {
                    session.handle_timeout(now);
                }
            }
            ServerStep::Route(publish) => {
                let _ = target.publish(now, publish);
            }
            ServerStep::Reconnect => {
                session.handle_stream_closed(now);
                while session.poll_event().is_some() {}
                let state = session.take_state();
                let mut connect = script.connect.clone();
                connect.clean_start = false;
                let Some(bytes) = encode(protocol, &Packet::Connect(Box::new(connect))) else { return };
                session = ServerSession::new(now, config.clone());
                watch = Watch::new(protocol, true, connect_limits(&script.connect));
                resumed = false;
                session.handle_stream_data(now, &bytes);
                serve(&mut session, &mut watch, now, &mut resumed, Some(state));
                stream = lane(&session, now);
                continue;
            }
        }
        if let Some((lane, lane_watch, accepted)) = &mut stream {
            serve(lane, lane_watch, now, accepted, None);
        }
        serve(&mut session, &mut watch, now, &mut resumed, None);
    }
}

/// Answers the session's events as a broker would, and checks what it writes.
fn serve(
    session: &mut ServerSession,
    watch: &mut Watch,
    now: Instant,
    accepted: &mut bool,
    mut state: Option<mqtt_quic_core::session::server::SessionState>,
) {
    while let Some(event) = session.poll_event() {
        match event {
            ServerEvent::Connect(connect) => {
                assert!(!*accepted, "a second CONNECT reported");
                *accepted = true;
                let assigned = connect.client_id.is_empty().then_some("assigned");
                match state.take() {
                    Some(state) => session.resume(now, state).expect("resume after CONNECT"),
                    None => session.accept(now, false, assigned).expect("accept after CONNECT"),
                }
            }
            ServerEvent::Publish(p) => {
                assert!(*accepted, "PUBLISH reported before the connection was accepted");
                if p.qos() != QoS::AtMostOnce {
                    session.acknowledge(p.qos_pid, ReasonCode::Success);
                }
            }
            ServerEvent::Subscribe { packet_id, subscriptions, .. } => {
                assert!(!subscriptions.is_empty(), "SUBSCRIBE with no filter reported");
                let codes = subscriptions.iter().map(|s| granted(s.options.qos)).collect();
                let _ = session.suback(packet_id, codes);
            }
            ServerEvent::Unsubscribe { packet_id, filters } => {
                assert!(!filters.is_empty(), "UNSUBSCRIBE with no filter reported");
                let _ = session.unsuback(packet_id, vec![ReasonCode::Success; filters.len()]);
            }
            _ => {}
        }
        while let Some(bytes) = session.poll_transmit() {
            watch.sent(&bytes);
        }
    }
    while let Some(bytes) = session.poll_transmit() {
        watch.sent(&bytes);
    }
}

/// What the client session's peer (the server) or its application does next.
#[derive(Arbitrary, Debug)]
enum ClientStep {
    /// The server accepts the connection announcing these limits.
    Accept { session_present: bool, receive_maximum: u8, maximum_packet_size: u16, topic_alias_maximum: u8 },
    /// The server sends this packet (skipped if it cannot be encoded).
    Packet(Packet),
    /// The server sends these bytes.
    Raw(Vec<u8>),
    /// Time passes (in units of 100 ms).
    Wait(u8),
    /// The application publishes to one of four topics.
    Publish { topic: u8, qos: u8, retain: bool, payload: Vec<u8> },
    /// The application subscribes to one of four filters.
    Subscribe { filter: u8, qos: u8 },
    /// The application unsubscribes.
    Unsubscribe { filter: u8 },
    /// The application disconnects.
    Disconnect,
    /// The connection drops and the client connects again.
    Reconnect,
}

#[derive(Arbitrary, Debug)]
struct ClientScript {
    v5: bool,
    steps: Vec<ClientStep>,
}

const TOPICS: [&str; 4] = ["a", "a/b", "c/d/e", "$x/y"];
const FILTERS: [&str; 4] = ["a", "a/+", "#", "c/#"];

/// Target `client_session`: a client session fed an `Arbitrary` sequence of server packets,
/// raw bytes, waits, application commands and reconnects.
pub fn client_session(data: &[u8]) {
    let Ok(script) = ClientScript::arbitrary_take_rest(Unstructured::new(data)) else { return };
    if tracing() {
        eprintln!("{script:#?}");
    }
    let protocol = if script.v5 { Protocol::V5 } else { Protocol::V3_1_1 };
    #[allow(clippy::disallowed_methods)] // the harness owns the clock
    let mut now = Instant::now();
    let config = ClientSessionConfig {
        protocol,
        client_id: "fuzz".into(),
        receive_maximum: 4,
        topic_alias_maximum: 2,
        maximum_packet_size: 4096,
        max_inflight: 16,
        max_queued: 32,
        ..Default::default()
    };
    let unlimited = || Limits {
        max_packet_size: None,
        topic_alias_maximum: 0,
        receive_maximum: None,
        maximum_qos: QoS::ExactlyOnce,
        retain_available: true,
    };
    let mut client = ClientSession::new(config).expect("valid config");
    let mut watch = Watch::new(protocol, false, unlimited());
    let _ = client.connect(now);
    drain_client(&mut client, &mut watch);
    for step in script.steps {
        match step {
            ClientStep::Accept { session_present, receive_maximum, maximum_packet_size, topic_alias_maximum } => {
                let mut ack =
                    ConnAck { session_present, reason_code: ReasonCode::Success, properties: PropBox::default() };
                if protocol.is_v5() {
                    let mut props = ConnAckProperties::default();
                    props.receive_maximum = NonZeroU16::new(receive_maximum.into());
                    props.maximum_packet_size = NonZeroU32::new(u32::from(maximum_packet_size).max(64));
                    props.topic_alias_maximum = Some(topic_alias_maximum.into());
                    ack.properties = PropBox::new(props);
                }
                let packet = Packet::ConnAck(Box::new(ack));
                watch.acknowledged(&packet);
                let bytes = encode(protocol, &packet).expect("CONNACK encodes");
                client.handle_stream_data(now, &bytes);
            }
            ClientStep::Packet(packet) => {
                if let Some(bytes) = encode(protocol, &packet) {
                    watch.acknowledged(&packet);
                    client.handle_stream_data(now, &bytes);
                }
            }
            ClientStep::Raw(bytes) => client.handle_stream_data(now, &bytes),
            ClientStep::Wait(t) => {
                now += Duration::from_millis(u64::from(t) * 100);
                client.handle_timeout(now);
            }
            ClientStep::Publish { topic, qos, retain, payload } => {
                let topic = TopicName::new(TOPICS[usize::from(topic % 4)]).expect("valid topic");
                let mut publish = Publish::new(topic, payload).with_qos(qos_of(qos));
                publish.retain = retain;
                let _ = client.publish(now, publish);
            }
            ClientStep::Subscribe { filter, qos } => {
                let filter = TopicFilter::new(FILTERS[usize::from(filter % 4)]).expect("valid filter");
                let _ = client.subscribe(now, vec![Subscription::new(filter, qos_of(qos))], None);
            }
            ClientStep::Unsubscribe { filter } => {
                let filter = TopicFilter::new(FILTERS[usize::from(filter % 4)]).expect("valid filter");
                let _ = client.unsubscribe(now, vec![filter]);
            }
            ClientStep::Disconnect => {
                let _ = client.disconnect(now, ReasonCode::Success);
            }
            ClientStep::Reconnect => {
                client.handle_stream_closed(now);
                drain_client(&mut client, &mut watch);
                watch = Watch::new(protocol, false, unlimited());
                let _ = client.connect(now);
            }
        }
        drain_client(&mut client, &mut watch);
        assert!(client.pending_publishes() <= 16 + 32, "the client holds more than its limits allow");
    }
}

fn drain_client(client: &mut ClientSession, watch: &mut Watch) {
    loop {
        let mut any = false;
        // Events first: a Connected event puts the CONNACK's limits in force before we check
        // what the client sent in answer to it.
        while let Some(event) = client.poll_event() {
            any = true;
            match event {
                ClientEvent::Connected { .. } => {
                    if let Some(limits) = watch.offered.take() {
                        watch.limits = limits;
                    }
                }
                ClientEvent::Message(p) => {
                    assert!(TOPICS.contains(&p.topic.as_str()) || !p.topic.is_empty(), "a message without a topic");
                }
                _ => {}
            }
        }
        while let Some(bytes) = client.poll_transmit() {
            watch.sent(&bytes);
            any = true;
        }
        if !any {
            break;
        }
    }
}

fn granted(qos: QoS) -> ReasonCode {
    match qos {
        QoS::AtMostOnce => ReasonCode::GRANTED_QOS_0,
        QoS::AtLeastOnce => ReasonCode::GrantedQos1,
        QoS::ExactlyOnce => ReasonCode::GrantedQos2,
    }
}

fn qos_of(n: u8) -> QoS {
    match n % 3 {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}
