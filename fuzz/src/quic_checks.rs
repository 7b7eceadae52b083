//! The checks behind the `quic_server` and `sessions` fuzz targets (the mqtt-quic-core ones).
//!
//! - `quic_server`: a QUIC server machine fed fuzzer-chosen datagrams at fuzzer-chosen
//!   (monotonic) times never panics and never holds more connections than its limit.
//! - `sessions`: a server session and a client session fed fuzzer-chosen bytes as if from their
//!   peers never panic, and keep what they hold within their limits.
//! - `broker`: the broker machine with four byte-stream clients sending fuzzer-chosen bytes
//!   (routing, takeovers, wills, retained messages and limits all reachable), and two MQTT over
//!   WebSocket clients (one sending raw frames, one whose bytes the harness frames), never
//!   panics.
//!
//! - `broker_quic`: the broker machine and three QUIC client machines joined by a network the
//!   fuzzer controls (delivery, loss, duplication, corruption, reordering, injected datagrams,
//!   time) while the clients publish, subscribe (on data streams too), disconnect, die and
//!   reconnect, and a bare QUIC peer opens, writes, finishes and resets data streams (both
//!   kinds) and sends datagrams, never panic.
//!
//! `tests/tests/fuzz_corpus_quic.rs` replays the committed corpora.

use mqtt_quic_core::broker::auth::FileAuth;
use mqtt_quic_core::broker::machine::{Broker, BrokerConfig};
use mqtt_quic_core::config::ServerConfig;
use mqtt_quic_core::quic::QuicEndpoint;
use mqtt_quic_core::session::client::{ClientSession, ClientSessionConfig};
use mqtt_quic_core::session::server::{ServerEvent, ServerSession, ServerSessionConfig};
use mqtt_quic_core::tls::{SelfSigned, ServerTls};
use mqtt_quic_core::Datagram;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const MAX_CONNECTIONS: usize = 8;

/// One certificate for every input (generating one per input would dominate the run).
fn server_tls() -> &'static ServerTls {
    static TLS: OnceLock<ServerTls> = OnceLock::new();
    TLS.get_or_init(|| ServerTls::from_self_signed(&SelfSigned::generate(&["fuzz"]).unwrap()).unwrap())
}

fn server() -> QuicEndpoint {
    let tls = server_tls();
    let mut config = ServerConfig::new(tls.clone());
    config.max_connections = MAX_CONNECTIONS;
    QuicEndpoint::server(&config).unwrap()
}

/// Input: records of `[delay_ms: u8][source: u8][len: u16 BE][len bytes]` until the data ends.
/// A delay advances the clock (and fires timers); the source picks one of 16 client addresses.
pub fn quic_server(data: &[u8]) {
    let mut server = server();
    #[allow(clippy::disallowed_methods)] // the fuzz harness is the driver: it owns the clock
    let mut now = Instant::now();
    let mut buf = Vec::new();
    let mut rest = data;
    while let [delay, source, hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (datagram, next) = tail.split_at(len);
        rest = next;
        now += Duration::from_millis(u64::from(*delay));
        server.handle_timeout(now);
        let from = SocketAddr::from(([10, 0, 0, source % 16], 40_000 + u16::from(source % 16)));
        server.handle_datagram(now, Datagram::new(from, datagram));
        while server.poll_transmit(now, &mut buf).is_some() {}
        while server.poll_event().is_some() {}
        assert!(server.connection_count() <= MAX_CONNECTIONS, "connection limit exceeded");
        if let Some(deadline) = server.poll_timeout() {
            assert!(deadline >= now - Duration::from_secs(1), "deadline in the past");
        }
    }
}

/// Input: the first byte picks the protocol and which session is fed; then records of
/// `[delay_ms: u8][len: u8][len bytes]`, each a piece of the peer's byte stream.
pub fn sessions(data: &[u8]) {
    let Some((&mode, mut rest)) = data.split_first() else { return };
    #[allow(clippy::disallowed_methods)] // the harness owns the clock
    let mut now = Instant::now();
    let protocol = if mode & 1 == 0 { mqtt_proto::Protocol::V5 } else { mqtt_proto::Protocol::V3_1_1 };
    let server_config = ServerSessionConfig { receive_maximum: 4, topic_alias_maximum: 2, ..Default::default() };
    let mut server = ServerSession::new(now, server_config);
    let client_config =
        ClientSessionConfig { protocol, receive_maximum: 4, topic_alias_maximum: 2, ..Default::default() };
    let mut client = ClientSession::new(client_config).expect("valid config");
    let _ = client.connect(now);
    while let [delay, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (piece, next) = tail.split_at(n);
        rest = next;
        now += Duration::from_millis(u64::from(*delay) * 10);
        if mode & 2 == 0 {
            server.handle_timeout(now);
            server.handle_stream_data(now, piece);
            while let Some(event) = server.poll_event() {
                match event {
                    ServerEvent::Connect(_) => {
                        let _ = server.accept(now, false, Some("fuzz"));
                    }
                    ServerEvent::Publish(p) => server.acknowledge(p.qos_pid, mqtt_proto::ReasonCode::Success),
                    ServerEvent::Subscribe { packet_id, subscriptions, .. } => {
                        let _ = server.suback(packet_id, vec![mqtt_proto::ReasonCode::Success; subscriptions.len()]);
                    }
                    _ => {}
                }
            }
            while server.poll_transmit().is_some() {}
        } else {
            client.handle_timeout(now);
            client.handle_stream_data(now, piece);
            while client.poll_event().is_some() {}
            while client.poll_transmit().is_some() {}
            assert!(client.pending_publishes() == 0, "nothing was published, nothing may be pending");
        }
    }
}

/// Input: records of `[delay_ms: u8][stream: u8][len: u8][len bytes]`. Stream numbers below
/// 192 pick one of four byte-stream clients (252 and up close one); 192 to 251 one of two
/// WebSocket clients, upgraded by the harness when opened: an even number sends its bytes as
/// they are (frames as the fuzzer makes them), an odd one has them framed (masked, binary) by
/// the harness, so MQTT reaches the session through the framing; 248 to 251 close one. A stream
/// that was closed is opened again on its next record.
pub fn broker(data: &[u8]) {
    const UPGRADE: &[u8] = b"GET /mqtt HTTP/1.1\r\nHost: fuzz\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n";
    let mut broker = Broker::new(fuzz_broker_config()).expect("valid config");
    #[allow(clippy::disallowed_methods)] // the harness owns the clock
    let mut now = Instant::now();
    let mut streams = [None; 6];
    // Frames the odd WebSocket client's bytes as a client would.
    let mut framer = mqtt_quic_core::ws::WsConn::client("fuzz", "/mqtt", 1);
    let mut rest = data;
    while let Some((delay, which, piece)) = next_record(&mut rest) {
        now += Duration::from_millis(u64::from(delay) * 50);
        advance(&mut broker, now);
        let websocket = (192..252).contains(&which);
        let slot = if websocket { 4 + usize::from(which & 1) } else { usize::from(which % 4) };
        let id = *streams[slot].get_or_insert_with(|| match websocket {
            false => broker.handle_stream_open(now, None),
            true => {
                let id = broker.handle_stream_open_ws(now, None);
                broker.handle_stream_data(now, id, UPGRADE);
                id
            }
        });
        if which >= 248 {
            broker.handle_stream_closed(now, id);
            streams[slot] = None;
        } else if slot == 5 {
            broker.handle_stream_data(now, id, &framer.frame(piece));
        } else {
            broker.handle_stream_data(now, id, piece);
        }
        drain(&mut broker, &mut streams);
    }
}

/// The `broker` target's records fed to a broker of three shards with `Persistence::Sync` (its
/// store answered at once), driven together by a `ShardSet`: connections are relayed to their
/// session's home after a CONNECT the fuzzer writes, messages routed across shards with
/// acknowledgements held for the other shards' stores. Every stream goes to the shard the
/// round robin gives it, so the same client id arrives through different shards.
pub fn broker_shards(data: &[u8]) {
    use mqtt_quic_core::broker::machine::StreamOutput;
    use mqtt_quic_core::broker::shard::ShardSet;
    let mut config = fuzz_broker_config();
    config.persistence = mqtt_quic_core::persist::Persistence::Sync;
    let mut set = ShardSet::new(&config, 3).expect("valid config");
    #[allow(clippy::disallowed_methods)] // the harness owns the clock
    let mut now = Instant::now();
    let mut streams = [None; 6];
    let mut rest = data;
    while let Some((delay, which, piece)) = next_record(&mut rest) {
        now += Duration::from_millis(u64::from(delay) * 50);
        set.handle_timeout(now);
        for broker in set.shards() {
            while let Some(batch) = broker.poll_store(now) {
                broker.handle_stored(now, batch.seq);
            }
            while let Some(request) = broker.poll_auth() {
                let verdict = request.verify();
                broker.handle_auth_result(now, request.id(), verdict);
            }
        }
        set.exchange(now);
        let slot = usize::from(which % 6);
        let id = *streams[slot].get_or_insert_with(|| set.handle_stream_open(now, None, false));
        if which >= 248 {
            set.handle_stream_closed(now, id);
            streams[slot] = None;
        } else {
            set.handle_stream_data(now, id, piece);
        }
        while let Some((id, out)) = set.poll_stream() {
            match out {
                StreamOutput::Data(bytes) => set.handle_stream_written(id, bytes.len()),
                _ => {
                    for s in streams.iter_mut().filter(|s| **s == Some(id)) {
                        *s = None;
                    }
                }
            }
        }
        while set.shards().iter_mut().any(|b| b.poll_event().is_some()) {}
    }
}

/// Takes the next `[delay: u8][which: u8][len: u8][len bytes]` record off the front of `rest`
/// (the bytes cut short at the end of the input).
pub(crate) fn next_record<'a>(rest: &mut &'a [u8]) -> Option<(u8, u8, &'a [u8])> {
    let [delay, which, len, tail @ ..] = *rest else { return None };
    let (piece, next) = tail.split_at(usize::from(*len).min(tail.len()));
    *rest = next;
    Some((*delay, *which, piece))
}

/// The broker's timers at `now`, and the password checks it handed out, answered at once.
pub(crate) fn advance(broker: &mut Broker, now: Instant) {
    mqtt_quic_core::Machine::handle_timeout(broker, now);
    while let Some(request) = broker.poll_auth() {
        let verdict = request.verify();
        broker.handle_auth_result(now, request.id(), verdict);
    }
}

/// Takes the broker's stream output and events; a stream it closed is forgotten (the next
/// record for its slot opens a new one).
pub(crate) fn drain(broker: &mut Broker, streams: &mut [Option<mqtt_quic_core::broker::machine::StreamId>]) {
    while let Some((id, out)) = broker.poll_stream() {
        if matches!(out, mqtt_quic_core::broker::machine::StreamOutput::Close) {
            for s in streams.iter_mut() {
                if *s == Some(id) {
                    *s = None;
                }
            }
        }
    }
    while broker.poll_event().is_some() {}
}

/// The `broker` targets' configuration: small limits, no depth limits, authentication.
pub(crate) fn fuzz_broker_config() -> BrokerConfig {
    let mut config = BrokerConfig::new(ServerConfig::new(server_tls().clone()));
    config.max_retained = 8;
    config.max_offline_queue = 8;
    config.max_subscriptions_per_client = 8;
    // No depth limit here: what the fuzzer builds (wills, retained topics, filters thousands of
    // levels deep) must reach the subscription trie and the retained store, whose walks and
    // drops must not recurse.
    config.max_topic_levels = usize::MAX;
    config.max_topic_length = usize::MAX;
    // Authentication and an ACL, so the fuzzer also drives password checks (handed out and
    // answered at the next step, or never when the connection goes first), session ownership,
    // will and delivery-time authorization.
    config.auth = Some(std::sync::Arc::new(fuzz_auth()));
    config.max_pending_auth = 2;
    config
}

/// The `broker` target's authentication: anonymous clients allowed, user `u` with password `p`
/// (one PBKDF2 round: the fuzzer needs speed, not strength), and an ACL with every kind of rule.
fn fuzz_auth() -> FileAuth {
    static AUTH: OnceLock<FileAuth> = OnceLock::new();
    AUTH.get_or_init(|| {
        let entry = FileAuth::hash_password("u", "p", [9; 16], std::num::NonZeroU32::MIN);
        let acl =
            "topic readwrite #\ntopic deny d/#\nuser u\ntopic read #\ntopic write u/#\npattern readwrite c/%c/#\n";
        FileAuth::new(true).with_passwords(&entry).and_then(|a| a.with_acl(acl)).expect("valid auth files")
    })
    .clone()
}

/// One step of the `broker_quic` target: the network between three QUIC clients and the broker,
/// what the clients' applications do, and time.
#[derive(arbitrary::Arbitrary, Debug)]
enum NetStep {
    /// Time passes (in units of 5 ms) and every timer due fires.
    Wait(u8),
    /// Every datagram in flight arrives, in order, until the network is quiet (at most 32
    /// rounds).
    Flush,
    /// The oldest datagram to the broker (or to client `which` % 3) arrives.
    Deliver { to_broker: bool, which: u8 },
    /// It is lost instead.
    Drop { to_broker: bool, which: u8 },
    /// It arrives twice.
    Duplicate { to_broker: bool, which: u8 },
    /// It arrives with one byte flipped.
    Corrupt { to_broker: bool, which: u8, at: u16, xor: u8 },
    /// The two oldest swap places.
    Reorder { to_broker: bool, which: u8 },
    /// A datagram from nowhere reaches the broker from one of 16 addresses.
    Inject { source: u8, bytes: Vec<u8> },
    /// Client `which` publishes to one of six topics (two beyond the broker's limits).
    Publish { which: u8, topic: u8, qos: u8, retain: bool, payload: Vec<u8> },
    /// Client `which` subscribes to one of five filters (one beyond the depth limit), or to 300
    /// copies of `#` in one SUBSCRIBE.
    Subscribe { which: u8, filter: u8, qos: u8 },
    /// Client `which` unsubscribes.
    Unsubscribe { which: u8, filter: u8 },
    /// Client `which` disconnects cleanly.
    Disconnect { which: u8 },
    /// Client `which` loses its connection without a word.
    Kill { which: u8 },
    /// Client `which` connects again (a new QUIC connection; 0-RTT when it holds a ticket).
    Start { which: u8 },
    /// Client `which` opens a data stream with this priority.
    OpenStream { which: u8, priority: i8 },
    /// Client `which` publishes on one of its data streams.
    PublishOn { which: u8, stream: u8, topic: u8, qos: u8, payload: Vec<u8> },
    /// Client `which` subscribes on one of its data streams.
    SubscribeOn { which: u8, stream: u8, filter: u8, qos: u8 },
    /// Client `which` closes one of its data streams.
    CloseStream { which: u8, stream: u8 },
    /// The bare peer connects (again) and sends CONNECT on its control stream.
    BareConnect { id: u8 },
    /// The bare peer opens a data stream, two-way or one-way.
    BareOpen { two_way: bool },
    /// The bare peer writes on one of its streams (0: control) a canned packet, or the bytes.
    BareSend { stream: u8, canned: u8, bytes: Vec<u8> },
    /// The bare peer finishes one of its streams (0: control).
    BareFinish { stream: u8 },
    /// The bare peer resets one of its data streams with a code.
    BareReset { stream: u8, code: u8 },
    /// The bare peer sends a datagram: a canned packet, or the bytes.
    BareDatagram { canned: u8, bytes: Vec<u8> },
}

/// Packets the bare peer can send whole (`canned` picks one; past the end, the fuzzer's bytes).
fn canned_packets() -> Vec<Vec<u8>> {
    use mqtt_proto::{
        Ack, Connect, MqttString, Packet, PacketId, Protocol, Publish, QoS, Subscribe, Subscription, TopicFilter,
        TopicName,
    };
    let id = PacketId::new(1).unwrap();
    let sub = |f: &str, qos| Subscription::new(TopicFilter::new(f).unwrap(), qos);
    let packets: Vec<Packet> = vec![
        Packet::Subscribe(Subscribe {
            packet_id: id,
            properties: Default::default(),
            subscriptions: vec![sub("a/#", QoS::AtLeastOnce)].into(),
        }),
        Packet::Subscribe(Subscribe {
            packet_id: PacketId::new(2).unwrap(),
            properties: Default::default(),
            subscriptions: vec![sub("#", QoS::ExactlyOnce)].into(),
        }),
        Packet::Publish(Publish::new(TopicName::new("a/b").unwrap(), &b"x"[..])),
        Packet::Publish(Publish::new(TopicName::new("a").unwrap(), &b"q1"[..]).with_qos(QoS::AtLeastOnce)),
        Packet::Publish(Publish::new(TopicName::new("a/b").unwrap(), &b"q2"[..]).with_qos(QoS::ExactlyOnce)),
        Packet::PubAck(Ack::new(id)),
        Packet::PubRec(Ack::new(id)),
        Packet::PubRel(Ack::new(id)),
        Packet::PubComp(Ack::new(id)),
        Packet::PingReq,
        Packet::Disconnect(Default::default()),
        Packet::Connect(Box::new(Connect::new(Protocol::V5, MqttString::try_from("bare").unwrap()))),
    ];
    packets
        .iter()
        .map(|p| {
            let mut out = bytes::BytesMut::new();
            p.encode(Protocol::V5, &mut out).expect("encodes");
            out.to_vec()
        })
        .collect()
}

const CLIENTS: usize = 3;
/// Datagrams in flight per direction; more are lost, as on a full link.
const QUEUE: usize = 64;
const BROKER_ADDR: ([u8; 4], u16) = ([10, 0, 0, 1], 14567);

/// Input: an `Arbitrary` sequence of [`NetStep`]s. Checks that the broker machine (QUIC endpoint,
/// sessions, routing) and the client machines never panic, that after `handle_timeout` no
/// deadline is left in the past, and that the broker never holds more connections than its
/// limit.
pub fn broker_quic(data: &[u8]) {
    use arbitrary::{Arbitrary, Unstructured};
    use mqtt_proto::{Publish, QoS, ReasonCode, Subscription, TopicFilter, TopicName};
    use mqtt_quic_core::client::{ClientMachine, ClientMachineConfig};
    use mqtt_quic_core::config::ClientConfig;
    use mqtt_quic_core::tls::ClientTls;
    use std::collections::VecDeque;

    let Ok(steps) = Vec::<NetStep>::arbitrary_take_rest(Unstructured::new(data)) else { return };
    let tls = server_tls();
    let mut quic = ServerConfig::new(tls.clone());
    quic.max_connections = 4;
    quic.transport.datagrams = true;
    quic.transport.data_streams = 4;
    let mut config = BrokerConfig::new(quic);
    config.max_retained = 8;
    config.max_offline_queue = 8;
    config.max_subscriptions_per_client = 8;
    let mut broker = Broker::new(config).expect("valid config");
    #[allow(clippy::disallowed_methods)] // the harness owns the clock
    let mut now = Instant::now();
    let broker_addr = SocketAddr::from(BROKER_ADDR);
    let client_addr = |i: usize| SocketAddr::from(([10, 0, 1, i as u8], 50_000));
    let mut clients: Vec<ClientMachine> = (0..CLIENTS)
        .map(|i| {
            let mut quic = ClientConfig::new(ClientTls::insecure());
            quic.seed = i as u64;
            quic.transport.datagrams = i == 2;
            let session = mqtt_quic_core::session::client::ClientSessionConfig {
                client_id: format!("c{}", i % 2), // two share an id: takeovers
                clean_start: i == 0,
                session_expiry: 60,
                will: (i == 1).then(|| mqtt_proto::Will {
                    topic: TopicName::new("will/c1").unwrap(),
                    payload: bytes::Bytes::from_static(b"gone"),
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    properties: Default::default(),
                }),
                ..Default::default()
            };
            let config =
                ClientMachineConfig { quic, session, server: broker_addr, server_name: "fuzz".into(), reconnect: None };
            let mut client = ClientMachine::new(config).expect("valid config");
            client.start(now).expect("connects");
            client
        })
        .collect();
    // The bare peer: a QUIC endpoint written to packet by packet, at the address after the
    // clients'; its datagrams travel in the clients' queues under its index.
    let mut bare = {
        let mut quic = ClientConfig::new(ClientTls::insecure());
        quic.seed = 99;
        quic.transport.datagrams = true;
        QuicEndpoint::client(&quic).expect("valid config")
    };
    let mut bare_conn = None;
    let mut bare_lanes: Vec<mqtt_quic_core::quic::Lane> = Vec::new();
    let canned = canned_packets();
    let mut streams: Vec<Vec<mqtt_quic_core::client::StreamHandle>> = vec![Vec::new(); CLIENTS];
    let mut to_broker: VecDeque<(usize, Vec<u8>)> = VecDeque::new();
    let mut to_client: [VecDeque<Vec<u8>>; CLIENTS + 1] = Default::default();
    let mut buf = Vec::new();
    // Besides four ordinary ones, topics and filters past the broker's depth and length limits
    // (refused with 0x90 / 0x8F), and a SUBSCRIBE of 300 copies of `#` (merged into one).
    let deep_topic = "/".repeat(3000);
    let long_topic = "x".repeat(5000);
    let topics = ["a", "a/b", "will/c1", "$SYS/x", deep_topic.as_str(), long_topic.as_str()];
    let deep_filter = "+/".repeat(1000) + "#";
    let filters = ["a", "a/+", "#", "will/#", deep_filter.as_str()];
    let subscriptions = |filter: u8, qos: QoS| -> Vec<Subscription> {
        let pick = usize::from(filter) % (filters.len() + 1);
        match filters.get(pick) {
            Some(f) => vec![Subscription::new(TopicFilter::new(*f).unwrap(), qos)],
            None => vec![Subscription::new(TopicFilter::new("#").unwrap(), qos); 300],
        }
    };
    let qos = |n: u8| [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][usize::from(n % 3)];

    for step in steps {
        let waited = matches!(step, NetStep::Wait(_));
        // Collect what everyone wants to send.
        let mut pump = |broker: &mut Broker,
                        clients: &mut [ClientMachine],
                        bare: &mut QuicEndpoint,
                        to_broker: &mut VecDeque<(usize, Vec<u8>)>,
                        to_client: &mut [VecDeque<Vec<u8>>; CLIENTS + 1],
                        now: Instant| {
            while let Some(t) = bare.poll_transmit(now, &mut buf) {
                if to_broker.len() < QUEUE {
                    to_broker.push_back((CLIENTS, buf[..t.size].to_vec()));
                }
            }
            while bare.poll_event().is_some() {}
            for (i, client) in clients.iter_mut().enumerate() {
                while let Some(t) = client.poll_transmit(now, &mut buf) {
                    if to_broker.len() < QUEUE {
                        to_broker.push_back((i, buf[..t.size].to_vec()));
                    }
                }
                while client.poll_event().is_some() {}
            }
            while let Some(t) = broker.poll_transmit(now, &mut buf) {
                if let Some(i) = (0..=CLIENTS).find(|&i| client_addr(i) == t.destination) {
                    if to_client[i].len() < QUEUE {
                        to_client[i].push_back(buf[..t.size].to_vec());
                    }
                }
            }
            while broker.poll_event().is_some() {}
        };
        pump(&mut broker, &mut clients, &mut bare, &mut to_broker, &mut to_client, now);
        let deliver = |broker: &mut Broker,
                       clients: &mut [ClientMachine],
                       bare: &mut QuicEndpoint,
                       to_broker: bool,
                       which: u8,
                       data: Vec<u8>,
                       from: usize,
                       now: Instant| {
            if to_broker {
                broker.handle_datagram(now, Datagram::new(client_addr(from), &data));
            } else {
                match usize::from(which) % (CLIENTS + 1) {
                    CLIENTS => bare.handle_datagram(now, Datagram::new(broker_addr, &data)),
                    i => clients[i].handle_datagram(now, Datagram::new(broker_addr, &data)),
                }
            }
        };
        let pop = |to_broker_q: &mut VecDeque<(usize, Vec<u8>)>,
                   to_client: &mut [VecDeque<Vec<u8>>; CLIENTS + 1],
                   to_broker: bool,
                   which: u8| {
            if to_broker {
                to_broker_q.pop_front()
            } else {
                to_client[usize::from(which) % (CLIENTS + 1)].pop_front().map(|d| (0, d))
            }
        };
        match step {
            NetStep::Wait(t) => {
                now += Duration::from_millis(u64::from(t) * 5);
                broker.handle_timeout(now);
                bare.handle_timeout(now);
                for client in clients.iter_mut() {
                    client.handle_timeout(now);
                }
            }
            NetStep::Flush => {
                for _ in 0..32 {
                    if to_broker.is_empty() && to_client.iter().all(VecDeque::is_empty) {
                        break;
                    }
                    while let Some((from, d)) = to_broker.pop_front() {
                        broker.handle_datagram(now, Datagram::new(client_addr(from), &d));
                    }
                    for (i, q) in to_client.iter_mut().enumerate() {
                        while let Some(d) = q.pop_front() {
                            match clients.get_mut(i) {
                                Some(client) => client.handle_datagram(now, Datagram::new(broker_addr, &d)),
                                None => bare.handle_datagram(now, Datagram::new(broker_addr, &d)),
                            }
                        }
                    }
                    pump(&mut broker, &mut clients, &mut bare, &mut to_broker, &mut to_client, now);
                }
            }
            NetStep::Deliver { to_broker: tb, which } => {
                if let Some((from, d)) = pop(&mut to_broker, &mut to_client, tb, which) {
                    deliver(&mut broker, &mut clients, &mut bare, tb, which, d, from, now);
                }
            }
            NetStep::Drop { to_broker: tb, which } => {
                pop(&mut to_broker, &mut to_client, tb, which);
            }
            NetStep::Duplicate { to_broker: tb, which } => {
                if let Some((from, d)) = pop(&mut to_broker, &mut to_client, tb, which) {
                    deliver(&mut broker, &mut clients, &mut bare, tb, which, d.clone(), from, now);
                    deliver(&mut broker, &mut clients, &mut bare, tb, which, d, from, now);
                }
            }
            NetStep::Corrupt { to_broker: tb, which, at, xor } => {
                if let Some((from, mut d)) = pop(&mut to_broker, &mut to_client, tb, which) {
                    if !d.is_empty() {
                        let i = usize::from(at) % d.len();
                        d[i] ^= xor;
                    }
                    deliver(&mut broker, &mut clients, &mut bare, tb, which, d, from, now);
                }
            }
            NetStep::Reorder { to_broker: tb, which } => {
                if tb {
                    if to_broker.len() >= 2 {
                        to_broker.swap(0, 1);
                    }
                } else {
                    let q = &mut to_client[usize::from(which) % (CLIENTS + 1)];
                    if q.len() >= 2 {
                        q.swap(0, 1);
                    }
                }
            }
            NetStep::Inject { source, bytes } => {
                let from = SocketAddr::from(([10, 0, 2, source % 16], 40_000));
                broker.handle_datagram(now, Datagram::new(from, &bytes));
            }
            NetStep::Publish { which, topic, qos: q, retain, payload } => {
                let mut p = Publish::new(TopicName::new(topics[usize::from(topic) % topics.len()]).unwrap(), payload)
                    .with_qos(qos(q));
                p.retain = retain;
                let _ = clients[usize::from(which) % CLIENTS].publish(now, p);
            }
            NetStep::Subscribe { which, filter, qos: q } => {
                let _ = clients[usize::from(which) % CLIENTS].subscribe(now, subscriptions(filter, qos(q)), None);
            }
            NetStep::Unsubscribe { which, filter } => {
                let f = TopicFilter::new(filters[usize::from(filter) % filters.len()]).unwrap();
                let _ = clients[usize::from(which) % CLIENTS].unsubscribe(now, vec![f]);
            }
            NetStep::Disconnect { which } => {
                let _ = clients[usize::from(which) % CLIENTS].disconnect(now, ReasonCode::Success);
            }
            NetStep::Kill { which } => clients[usize::from(which) % CLIENTS].drop_connection(now),
            NetStep::Start { which } => {
                let _ = clients[usize::from(which) % CLIENTS].start(now);
            }
            NetStep::OpenStream { which, priority } => {
                let i = usize::from(which) % CLIENTS;
                if streams[i].len() < 4 {
                    if let Ok(h) = clients[i].open_stream(now, i32::from(priority)) {
                        streams[i].push(h);
                    }
                }
            }
            NetStep::PublishOn { which, stream, topic, qos: q, payload } => {
                let i = usize::from(which) % CLIENTS;
                if let Some(&h) = streams[i].get(usize::from(stream) % streams[i].len().max(1)) {
                    let p = Publish::new(TopicName::new(topics[usize::from(topic) % topics.len()]).unwrap(), payload)
                        .with_qos(qos(q));
                    let _ = clients[i].publish_on(now, h, p);
                }
            }
            NetStep::SubscribeOn { which, stream, filter, qos: q } => {
                let i = usize::from(which) % CLIENTS;
                if let Some(&h) = streams[i].get(usize::from(stream) % streams[i].len().max(1)) {
                    let _ = clients[i].subscribe_on(now, h, subscriptions(filter, qos(q)), None);
                }
            }
            NetStep::CloseStream { which, stream } => {
                let i = usize::from(which) % CLIENTS;
                if !streams[i].is_empty() {
                    let at = usize::from(stream) % streams[i].len();
                    let h = streams[i].remove(at);
                    let _ = clients[i].close_stream(now, h);
                }
            }
            NetStep::BareConnect { id } => {
                if let Some(c) = bare_conn.take() {
                    let _ = bare.close(now, c, 0, "again");
                }
                bare_lanes.clear();
                if let Ok(c) = bare.connect(now, broker_addr, "fuzz") {
                    let connect = mqtt_proto::Connect::new(
                        mqtt_proto::Protocol::V5,
                        mqtt_proto::MqttString::try_from(format!("c{}", id % 3)).unwrap(),
                    );
                    let mut out = bytes::BytesMut::new();
                    mqtt_proto::Packet::Connect(Box::new(connect)).encode(mqtt_proto::Protocol::V5, &mut out).unwrap();
                    let _ = bare.send(now, c, out.freeze());
                    bare_conn = Some(c);
                }
            }
            NetStep::BareOpen { two_way } => {
                if let (Some(c), true) = (bare_conn, bare_lanes.len() < 8) {
                    let lane = if two_way { bare.open_lane(now, c) } else { bare.open_uni_lane(now, c) };
                    bare_lanes.extend(lane.ok());
                }
            }
            NetStep::BareSend { stream, canned: pick, bytes } => {
                if let Some(c) = bare_conn {
                    let data = canned.get(usize::from(pick)).cloned().unwrap_or(bytes);
                    let lane = match usize::from(stream) % (bare_lanes.len() + 1) {
                        0 => mqtt_quic_core::quic::Lane::CONTROL,
                        n => bare_lanes[n - 1],
                    };
                    let _ = bare.send_lane(now, c, lane, data.into());
                }
            }
            NetStep::BareFinish { stream } => {
                if let Some(c) = bare_conn {
                    match usize::from(stream) % (bare_lanes.len() + 1) {
                        0 => {
                            let _ = bare.finish(now, c);
                        }
                        n => {
                            let _ = bare.finish_lane(now, c, bare_lanes[n - 1]);
                        }
                    }
                }
            }
            NetStep::BareReset { stream, code } => {
                if let (Some(c), false) = (bare_conn, bare_lanes.is_empty()) {
                    let at = usize::from(stream) % bare_lanes.len();
                    let lane = bare_lanes.remove(at);
                    let _ = bare.reset_lane(now, c, lane, u32::from(code));
                }
            }
            NetStep::BareDatagram { canned: pick, bytes } => {
                if let Some(c) = bare_conn {
                    let data = canned.get(usize::from(pick)).cloned().unwrap_or(bytes);
                    let _ = bare.send_datagram(now, c, data.into());
                }
            }
        }
        pump(&mut broker, &mut clients, &mut bare, &mut to_broker, &mut to_client, now);
        assert!(broker.connections() <= 4, "the broker holds more connections than it may");
        // A deadline may fall due while datagrams are handled (a loss time from a late ACK):
        // that means "call handle_timeout now". After handle_timeout, none may be left due, or
        // a driver would spin.
        if !waited {
            continue;
        }
        if let Some(deadline) = broker.poll_timeout() {
            assert!(deadline > now, "broker deadline not in the future after handle_timeout");
        }
        for client in clients.iter_mut() {
            if let Some(deadline) = client.poll_timeout() {
                assert!(deadline > now, "client deadline not in the future after handle_timeout");
            }
        }
        if let Some(deadline) = bare.poll_timeout() {
            assert!(deadline > now, "bare peer deadline not in the future after handle_timeout");
        }
    }
}
