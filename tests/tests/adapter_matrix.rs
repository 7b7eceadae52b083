//! Clients of each adapter against brokers of each adapter (tokio, mio, async-std), QoS 0, 1
//! and 2 publish/subscribe over QUIC and over TCP, on real loopback sockets.

use mqtt_proto::{Publish, QoS, TopicFilter, TopicName};
use mqtt_quic_core::driver::{ClientOptions, ServerOptions};
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
    stop: Box<dyn FnOnce()>,
}

fn start_broker(adapter: Adapter) -> TestBroker {
    start_broker_with(adapter, |_| {})
}

fn start_broker_with(adapter: Adapter, tweak: impl FnOnce(&mut ServerOptions)) -> TestBroker {
    let cert = SelfSigned::generate(&["localhost"]).unwrap();
    let mut options = ServerOptions::loopback(ServerTls::from_self_signed(&cert).unwrap());
    tweak(&mut options);
    match adapter {
        Adapter::Tokio => {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            let server = rt.block_on(adapter_tokio::server::Server::start(options)).unwrap();
            let (quic, tcp) = (server.quic_addr().unwrap(), server.tcp_addr().unwrap());
            TestBroker { quic, tcp, stop: Box::new(move || rt.block_on(server.shutdown())) }
        }
        Adapter::Mio => {
            let handle = adapter_mio::broker::spawn(options).unwrap();
            let (quic, tcp) = (handle.quic_addr().unwrap(), handle.tcp_addr().unwrap());
            TestBroker { quic, tcp, stop: Box::new(move || handle.shutdown()) }
        }
        Adapter::AsyncStd => {
            let server = async_std::task::block_on(adapter_async_std::server::Server::start(options)).unwrap();
            let (quic, tcp) = (server.quic_addr().unwrap(), server.tcp_addr().unwrap());
            TestBroker { quic, tcp, stop: Box::new(move || async_std::task::block_on(server.shutdown())) }
        }
    }
}

/// One broker adapter against every client adapter, over both transports.
fn matrix_for(broker_adapter: Adapter) {
    let broker = start_broker(broker_adapter);
    for client_adapter in ADAPTERS {
        for (transport, url) in [("quic", format!("quic://{}", broker.quic)), ("tcp", format!("mqtt://{}", broker.tcp))]
        {
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
