//! Clients of each adapter against brokers of each adapter (tokio, mio, async-std), QoS 0, 1
//! and 2 publish/subscribe over QUIC, TCP and WebSocket, on real loopback sockets; and what every
//! broker adapter does with the store (persistence).

use mqtt_proto::{Publish, QoS, TopicFilter, TopicName};
use mqtt_quic_core::driver::{ClientOptions, ServerError, ServerOptions};
use mqtt_quic_core::tls::{ClientTls, SelfSigned, ServerTls};
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Adapter {
    Tokio,
    Mio,
    AsyncStd,
}

const ADAPTERS: [Adapter; 3] = [Adapter::Tokio, Adapter::Mio, Adapter::AsyncStd];

/// The operations the matrix needs, in blocking form.
trait TestClient {
    fn subscribe(&mut self, filter: &str, qos: QoS);
    fn publish(&mut self, publish: Publish);
    fn recv(&mut self) -> Publish;
    fn disconnect(self: Box<Self>);
}

fn options(id: &str) -> ClientOptions {
    ClientOptions::new().client_id(id).tls(ClientTls::insecure())
}

const WAIT: Duration = Duration::from_secs(10);

struct Tokio {
    rt: tokio::runtime::Runtime,
    client: adapter_tokio::client::Client,
    messages: adapter_tokio::client::Messages,
}

impl TestClient for Tokio {
    fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.rt.block_on(self.client.subscribe(TopicFilter::new(filter).unwrap(), qos)).unwrap();
    }
    fn publish(&mut self, publish: Publish) {
        self.rt.block_on(self.client.publish(publish)).unwrap();
    }
    fn recv(&mut self) -> Publish {
        self.rt.block_on(async { tokio::time::timeout(WAIT, self.messages.recv()).await }).unwrap().unwrap()
    }
    fn disconnect(self: Box<Self>) {
        self.rt.block_on(self.client.disconnect()).unwrap();
    }
}

struct Mio(adapter_mio::blocking::Client);

impl TestClient for Mio {
    fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.0.subscribe(TopicFilter::new(filter).unwrap(), qos).unwrap();
    }
    fn publish(&mut self, publish: Publish) {
        self.0.publish(publish).unwrap();
    }
    fn recv(&mut self) -> Publish {
        self.0.recv(WAIT).unwrap().expect("no message")
    }
    fn disconnect(self: Box<Self>) {
        self.0.disconnect().unwrap();
    }
}

struct AsyncStd {
    client: adapter_async_std::client::Client,
    messages: adapter_async_std::client::Messages,
}

impl TestClient for AsyncStd {
    fn subscribe(&mut self, filter: &str, qos: QoS) {
        async_std::task::block_on(self.client.subscribe(TopicFilter::new(filter).unwrap(), qos)).unwrap();
    }
    fn publish(&mut self, publish: Publish) {
        async_std::task::block_on(self.client.publish(publish)).unwrap();
    }
    fn recv(&mut self) -> Publish {
        async_std::task::block_on(async_std::future::timeout(WAIT, self.messages.recv())).unwrap().unwrap()
    }
    fn disconnect(self: Box<Self>) {
        async_std::task::block_on(self.client.disconnect()).unwrap();
    }
}

fn connect(adapter: Adapter, url: &str, id: &str) -> Box<dyn TestClient> {
    match adapter {
        Adapter::Tokio => {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            let client = rt.block_on(adapter_tokio::client::Client::connect(url, options(id))).unwrap();
            let messages = client.messages().unwrap();
            Box::new(Tokio { rt, client, messages })
        }
        Adapter::Mio => Box::new(Mio(adapter_mio::blocking::Client::connect(url, options(id)).unwrap())),
        Adapter::AsyncStd => {
            let client =
                async_std::task::block_on(adapter_async_std::client::Client::connect(url, options(id))).unwrap();
            let messages = client.messages().unwrap();
            Box::new(AsyncStd { client, messages })
        }
    }
}

/// A running broker of some adapter.
struct TestBroker {
    quic: SocketAddr,
    tcp: SocketAddr,
    /// MQTT over WebSocket.
    ws: SocketAddr,
    stop: Box<dyn FnOnce()>,
}

fn start_broker(adapter: Adapter) -> TestBroker {
    start_broker_with(adapter, |_| {})
}

fn start_broker_with(adapter: Adapter, tweak: impl FnOnce(&mut ServerOptions)) -> TestBroker {
    try_start_broker(adapter, tweak).unwrap_or_else(|e| panic!("{adapter:?} broker: {e}"))
}

fn try_start_broker(adapter: Adapter, tweak: impl FnOnce(&mut ServerOptions)) -> Result<TestBroker, ServerError> {
    let cert = SelfSigned::generate(&["localhost"]).unwrap();
    let mut options = ServerOptions::loopback(ServerTls::from_self_signed(&cert).unwrap());
    options.ws = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    tweak(&mut options);
    Ok(match adapter {
        Adapter::Tokio => {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            let server = rt.block_on(adapter_tokio::server::Server::start(options))?;
            let at = server.addresses();
            let (quic, tcp, ws) = (at.quic.unwrap(), at.tcp.unwrap(), at.ws.unwrap());
            TestBroker { quic, tcp, ws, stop: Box::new(move || rt.block_on(server.shutdown())) }
        }
        Adapter::Mio => {
            let handle = adapter_mio::broker::spawn(options)?;
            let at = handle.addresses();
            let (quic, tcp, ws) = (at.quic.unwrap(), at.tcp.unwrap(), at.ws.unwrap());
            TestBroker { quic, tcp, ws, stop: Box::new(move || handle.shutdown()) }
        }
        Adapter::AsyncStd => {
            let server = async_std::task::block_on(adapter_async_std::server::Server::start(options))?;
            let at = server.addresses();
            let (quic, tcp, ws) = (at.quic.unwrap(), at.tcp.unwrap(), at.ws.unwrap());
            TestBroker { quic, tcp, ws, stop: Box::new(move || async_std::task::block_on(server.shutdown())) }
        }
    })
}

/// One broker adapter against every client adapter, over QUIC, TCP and WebSocket.
fn matrix_for(broker_adapter: Adapter) {
    let broker = start_broker(broker_adapter);
    for client_adapter in ADAPTERS {
        let urls = [
            ("quic", format!("quic://{}", broker.quic)),
            ("tcp", format!("mqtt://{}", broker.tcp)),
            ("ws", format!("ws://{}/mqtt", broker.ws)),
        ];
        for (transport, url) in urls {
            let case = format!("{client_adapter:?} clients, {broker_adapter:?} broker, {transport}");
            let topic = format!("m/{client_adapter:?}/{transport}");
            let mut sub = connect(client_adapter, &url, &format!("sub-{client_adapter:?}-{transport}"));
            sub.subscribe(&format!("{topic}/#"), QoS::ExactlyOnce);
            let mut publisher = connect(client_adapter, &url, &format!("pub-{client_adapter:?}-{transport}"));
            let qos = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];
            for (i, q) in qos.into_iter().enumerate() {
                publisher
                    .publish(Publish::new(TopicName::new(format!("{topic}/{i}")).unwrap(), case.clone()).with_qos(q));
            }
            for (i, q) in qos.into_iter().enumerate() {
                let m = sub.recv();
                assert_eq!(
                    (m.topic.to_string(), m.qos(), &m.payload[..]),
                    (format!("{topic}/{i}"), q, case.as_bytes()),
                    "{case}"
                );
            }
            publisher.disconnect();
            sub.disconnect();
        }
    }
    (broker.stop)();
}

#[test]
fn clients_of_every_adapter_against_the_tokio_broker() {
    matrix_for(Adapter::Tokio);
}

#[test]
fn clients_of_every_adapter_against_the_mio_broker() {
    matrix_for(Adapter::Mio);
}

#[test]
fn clients_of_every_adapter_against_the_async_std_broker() {
    matrix_for(Adapter::AsyncStd);
}

/// Every broker adapter runs the password checks the broker hands out (off its event loop) and
/// gives the verdicts back: the right password gets in over QUIC and TCP, a wrong one is refused.
#[test]
fn every_broker_adapter_verifies_passwords() {
    use mqtt_quic_core::broker::auth::FileAuth;
    let entry = FileAuth::hash_password("alice", "s3cret", [5; 16], std::num::NonZeroU32::new(1000).unwrap());
    let auth = std::sync::Arc::new(FileAuth::new(false).with_passwords(&entry).unwrap());
    for adapter in ADAPTERS {
        let broker = start_broker_with(adapter, |o| o.broker.auth = Some(auth.clone()));
        for url in [format!("quic://{}", broker.quic), format!("mqtt://{}", broker.tcp)] {
            let login = |password: &'static [u8]| {
                let mut o = options("login");
                o.session.username = Some("alice".into());
                o.session.password = Some(bytes::Bytes::from_static(password));
                o.reconnect = None;
                adapter_mio::blocking::Client::connect(&url, o)
            };
            let client = login(b"s3cret").unwrap_or_else(|e| panic!("{adapter:?} broker, {url}: {e}"));
            client.disconnect().unwrap();
            assert!(login(b"wrong").is_err(), "{adapter:?} broker, {url}: a wrong password got in");
        }
        (broker.stop)();
    }
}

/// A client that pipelines Receive Maximum + 1 QoS 2 PUBLISHes (and more after them) reads the
/// DISCONNECT 0x93 the broker sends, from every broker adapter: the broker shuts its write side
/// down and drains the client's input before closing, instead of closing on unread input (which
/// makes the kernel answer with a reset that can destroy the DISCONNECT before it is read).
#[test]
fn every_broker_adapter_lets_a_client_read_its_disconnect() {
    use bytes::BytesMut;
    use mqtt_proto::{Decoder, MqttString, Packet, PacketId, Protocol, QosPid, ReasonCode};
    use std::io::{Read, Write};
    for adapter in ADAPTERS {
        let broker = start_broker_with(adapter, |o| o.broker.session.receive_maximum = 4);
        let mut wire = BytesMut::new();
        let connect = mqtt_proto::Connect::new(Protocol::V5, MqttString::try_from("pipeliner").unwrap());
        Packet::from(connect).encode(Protocol::V5, &mut wire).unwrap();
        for i in 1..=5u16 {
            let mut p = Publish::new(TopicName::new("q2").unwrap(), vec![0u8; 100]);
            p.qos_pid = QosPid::from_parts(QoS::ExactlyOnce, PacketId::new(i).unwrap());
            Packet::Publish(p).encode(Protocol::V5, &mut wire).unwrap();
        }
        let mut socket = std::net::TcpStream::connect(broker.tcp).unwrap();
        socket.set_read_timeout(Some(WAIT)).unwrap();
        socket.write_all(&wire).unwrap();
        // Goes on writing for a while after the broker has answered, as a pipelining client
        // does: into a closed socket these writes would draw a reset (and then EPIPE).
        let mut ping = BytesMut::new();
        Packet::PingReq.encode(Protocol::V5, &mut ping).unwrap();
        for _ in 0..30 {
            std::thread::sleep(Duration::from_millis(10));
            if let Err(e) = socket.write_all(&ping) {
                panic!("{adapter:?} broker: writing after the DISCONNECT failed: {e}");
            }
        }
        socket.shutdown(std::net::Shutdown::Write).unwrap();
        let mut received = BytesMut::new();
        let mut buf = [0u8; 4096];
        let end = loop {
            match socket.read(&mut buf) {
                Ok(0) => break None,
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e) => break Some(e),
            }
        };
        let mut decoder = Decoder::new(Protocol::V5);
        let mut packets = Vec::new();
        while let Ok(Some(p)) = decoder.decode(&mut received) {
            packets.push(p);
        }
        let disconnect = packets.iter().find_map(|p| match p {
            Packet::Disconnect(d) => Some(d.reason_code),
            _ => None,
        });
        assert_eq!(
            disconnect,
            Some(ReasonCode::ReceiveMaximumExceeded),
            "{adapter:?} broker: {packets:?}, then {end:?}"
        );
        assert!(end.is_none(), "{adapter:?} broker: the connection ended with {end:?}, not a clean close");
        (broker.stop)();
    }
}

/// A blocking MQTT 5 client on a raw TCP socket, for the persistence tests: they need what the
/// adapters' clients do not show (CONNACK's session present flag) and exact control of each
/// packet. Every read waits at most [`WAIT`].
struct Raw {
    stream: std::net::TcpStream,
    decoder: mqtt_proto::Decoder,
    buf: bytes::BytesMut,
    next_id: u16,
}

impl Raw {
    /// Connects over TCP and sends CONNECT (clean start unless `persistent`, which also asks
    /// for an hour of session expiry); returns the client and CONNACK's session present flag.
    fn connect(addr: SocketAddr, id: &str, persistent: bool) -> (Raw, bool) {
        use mqtt_proto::{Connect, MqttString, Packet, Protocol, ReasonCode};
        let stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut raw =
            Raw { stream, decoder: mqtt_proto::Decoder::new(Protocol::V5), buf: bytes::BytesMut::new(), next_id: 0 };
        let mut connect = Connect::new(Protocol::V5, MqttString::try_from(id).unwrap());
        if persistent {
            connect.clean_start = false;
            connect.properties.session_expiry_interval = Some(3600);
        }
        raw.send(Packet::from(connect));
        match raw.recv() {
            Packet::ConnAck(ack) if ack.reason_code == ReasonCode::Success => (raw, ack.session_present),
            other => panic!("client {id}: expected a successful CONNACK, got {other:?}"),
        }
    }

    fn send(&mut self, packet: mqtt_proto::Packet) {
        use std::io::Write;
        let mut out = bytes::BytesMut::new();
        packet.encode(mqtt_proto::Protocol::V5, &mut out).unwrap();
        self.stream.write_all(&out).unwrap();
    }

    /// The next packet; fails if none comes within [`WAIT`] or the connection ends.
    fn recv(&mut self) -> mqtt_proto::Packet {
        use std::io::Read;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(packet) = self.decoder.decode(&mut self.buf).unwrap() {
                return packet;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("the broker closed the connection while a packet was expected"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("no packet from the broker within {WAIT:?}: {e}"),
            }
        }
    }

    fn packet_id(&mut self) -> mqtt_proto::PacketId {
        self.next_id += 1;
        mqtt_proto::PacketId::new(self.next_id).unwrap()
    }

    /// Subscribes to one filter at QoS 1 and waits for the SUBACK granting it.
    fn subscribe(&mut self, filter: &str) {
        use mqtt_proto::{Packet, ReasonCode, Subscribe, Subscription};
        let packet_id = self.packet_id();
        let subscriptions = vec![Subscription::new(TopicFilter::new(filter).unwrap(), QoS::AtLeastOnce)];
        self.send(Packet::Subscribe(Subscribe {
            packet_id,
            properties: Default::default(),
            subscriptions: subscriptions.into(),
        }));
        match self.recv() {
            Packet::SubAck(ack) if ack.packet_id == packet_id => {
                assert_eq!(&ack.reason_codes[..], [ReasonCode::GrantedQos1], "SUBACK for {filter}")
            }
            other => panic!("expected SUBACK {packet_id}, got {other:?}"),
        }
    }

    /// Publishes at QoS 1 and waits for the PUBACK (success).
    fn publish(&mut self, topic: &str, payload: &str, retain: bool) {
        use mqtt_proto::{Packet, QosPid, ReasonCode};
        let packet_id = self.packet_id();
        let mut p = Publish::new(TopicName::new(topic).unwrap(), payload.to_string());
        p.qos_pid = QosPid::from_parts(QoS::AtLeastOnce, packet_id);
        p.retain = retain;
        self.send(Packet::Publish(p));
        match self.recv() {
            Packet::PubAck(ack) if ack.packet_id == packet_id => assert_eq!(ack.reason_code, ReasonCode::Success),
            other => panic!("expected PUBACK {packet_id}, got {other:?}"),
        }
    }

    /// The next packet, which must be a PUBLISH (acknowledged if QoS 1): its topic, payload and
    /// retain flag.
    fn message(&mut self) -> (String, String, bool) {
        use mqtt_proto::{Ack, Packet, QosPid};
        match self.recv() {
            Packet::Publish(p) => {
                if let QosPid::AtLeastOnce(id) = p.qos_pid {
                    self.send(Packet::PubAck(Ack::new(id)));
                }
                (p.topic.to_string(), String::from_utf8_lossy(&p.payload).into_owned(), p.retain)
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Sends DISCONNECT (normal, session kept as asked at CONNECT) and waits until the broker
    /// closes the connection.
    fn disconnect(mut self) {
        use mqtt_proto::{Disconnect, Packet, ReasonCode};
        use std::io::Read;
        self.send(Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
        let mut chunk = [0u8; 256];
        while matches!(self.stream.read(&mut chunk), Ok(n) if n > 0) {}
    }
}

/// A data directory of its own under the system's temporary directory, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mqtt-adapter-matrix-{what}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One broker adapter with `Persistence::Sync`: a kept session (with its subscription and the
/// QoS 1 messages queued for it while offline) and a retained message survive a graceful
/// shutdown and a new server on the same data directory.
fn restart_keeps_state(adapter: Adapter) {
    use mqtt_quic_core::persist::Persistence;
    let dir = TempDir::new(&format!("{adapter:?}"));
    let persistent = |o: &mut ServerOptions| {
        o.broker.persistence = Persistence::Sync;
        o.data_dir = Some(dir.0.clone());
    };

    let broker = start_broker_with(adapter, persistent);
    let (sub, present) = Raw::connect(broker.tcp, "keeper", true);
    assert!(!present, "{adapter:?} broker: a session was present before any was made");
    let mut sub = sub;
    sub.subscribe("persist/queue/#");
    sub.disconnect();
    let (mut publisher, _) = Raw::connect(broker.tcp, "publisher", false);
    for i in 0..3 {
        publisher.publish(&format!("persist/queue/{i}"), &format!("queued {i}"), false);
    }
    publisher.publish("persist/retained", "kept", true);
    publisher.disconnect();
    (broker.stop)();

    let broker = start_broker_with(adapter, persistent);
    let (mut sub, present) = Raw::connect(broker.tcp, "keeper", true);
    assert!(present, "{adapter:?} broker: the session was not restored");
    for i in 0..3 {
        assert_eq!(
            sub.message(),
            (format!("persist/queue/{i}"), format!("queued {i}"), false),
            "{adapter:?} broker: queued message {i}"
        );
    }
    let (mut fresh, present) = Raw::connect(broker.tcp, "fresh", false);
    assert!(!present);
    fresh.subscribe("persist/retained");
    assert_eq!(
        fresh.message(),
        ("persist/retained".to_string(), "kept".to_string(), true),
        "{adapter:?} broker: the retained message"
    );
    fresh.disconnect();
    sub.disconnect();
    (broker.stop)();
}

#[test]
fn the_tokio_broker_restores_sessions_queues_and_retained_messages_from_its_store() {
    restart_keeps_state(Adapter::Tokio);
}

#[test]
fn the_mio_broker_restores_sessions_queues_and_retained_messages_from_its_store() {
    restart_keeps_state(Adapter::Mio);
}

#[test]
fn the_async_std_broker_restores_sessions_queues_and_retained_messages_from_its_store() {
    restart_keeps_state(Adapter::AsyncStd);
}

/// Persistence on without a data directory: every broker adapter refuses to start, with
/// `ServerError::Store` saying why.
#[test]
fn every_broker_adapter_refuses_persistence_without_a_data_directory() {
    use mqtt_quic_core::persist::Persistence;
    for adapter in ADAPTERS {
        let started = try_start_broker(adapter, |o| {
            o.broker.persistence = Persistence::Sync;
            o.data_dir = None;
        });
        match started {
            Err(ServerError::Store(message)) => {
                assert!(message.contains("no data directory"), "{adapter:?} broker: {message}")
            }
            Err(other) => panic!("{adapter:?} broker: expected ServerError::Store, got {other}"),
            Ok(broker) => {
                (broker.stop)();
                panic!("{adapter:?} broker: started with persistence on and no data directory");
            }
        }
    }
}
