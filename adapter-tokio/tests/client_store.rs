//! The async client's store over real sockets: QoS 1 messages published to a broker that never
//! acknowledges them survive the client's process "dying" (its runtime dropped, with no
//! DISCONNECT), and a new client with the same id and store directory delivers them through a
//! working broker.

// Threads, runtimes and real sockets: the deadlines here are real time.
#![allow(clippy::disallowed_methods)]

use adapter_tokio::client::{Client, ClientError, ClientOptions};
use adapter_tokio::server::{Server, ServerOptions};
use bytes::BytesMut;
use mqtt_proto::{Decoder, Packet, Protocol, Publish, QoS, TopicFilter, TopicName};
use mqtt_quic_core::tls::{SelfSigned, ServerTls};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

/// A temporary directory removed when dropped (kept, and printed, when the test failed).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("mqttq-client-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept for inspection: {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A "broker" on loopback TCP that accepts one connection, answers CONNECT with a CONNACK
/// (no session present), and then only reads: every PUBLISH it gets goes on the channel, none
/// is ever acknowledged.
fn silent_broker() -> (SocketAddr, mpsc::Receiver<Publish>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else { return };
        let mut decoder = Decoder::new(Protocol::V5);
        let mut buf = BytesMut::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            while let Ok(Some(packet)) = decoder.decode(&mut buf) {
                match packet {
                    Packet::Connect(_) => {
                        let mut out = BytesMut::new();
                        Packet::ConnAck(Box::default()).encode(Protocol::V5, &mut out).unwrap();
                        stream.write_all(&out).unwrap();
                    }
                    Packet::Publish(p) => drop(tx.send(p)),
                    _ => {}
                }
            }
        }
    });
    (addr, rx)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn topic(s: &str) -> TopicName {
    TopicName::new(s).unwrap()
}

fn options(dir: &Path) -> ClientOptions {
    ClientOptions::new().client_id("restart-me").store(dir)
}

async fn server() -> Server {
    let cert = SelfSigned::generate(&["localhost"]).unwrap();
    Server::start(ServerOptions::loopback(ServerTls::from_self_signed(&cert).unwrap())).await.unwrap()
}

#[test]
fn unacknowledged_publishes_survive_a_client_restart() {
    let dir = TempDir::new("restart");
    let (silent, published) = silent_broker();
    // The first run: publishes five QoS 1 messages that are never acknowledged.
    let first = runtime();
    let client = first.block_on(Client::connect(&format!("mqtt://{silent}"), options(dir.path()))).unwrap();
    for i in 0..5 {
        // Queued when called: the future (resolved on PUBACK, never here) is not needed.
        drop(client.publish(Publish::new(topic("restart/t"), format!("m{i}")).with_qos(QoS::AtLeastOnce)));
    }
    for i in 0..5 {
        let p = published.recv_timeout(WAIT).expect("the silent broker gets every PUBLISH");
        assert_eq!(&p.payload[..], format!("m{i}").as_bytes());
    }
    // The process dies: its runtime goes, with the client's task, without a DISCONNECT.
    drop(first);
    drop(client);

    // The second run, against a working broker.
    let second = runtime();
    second.block_on(async {
        let server = server().await;
        let url = format!("mqtt://{}", server.tcp_addr().unwrap());
        let sub = Client::connect(&url, ClientOptions::new().client_id("sub")).await.unwrap();
        let mut messages = sub.messages().unwrap();
        sub.subscribe(TopicFilter::new("restart/#").unwrap(), QoS::AtLeastOnce).await.unwrap();
        let restarted = timeout(WAIT, Client::connect(&url, options(dir.path()))).await.unwrap().unwrap();
        // A new message after the restored ones: once it is acknowledged, so are they (one
        // stream, answered in order), and it goes after them.
        let p = Publish::new(topic("restart/t"), "m5").with_qos(QoS::AtLeastOnce);
        timeout(WAIT, restarted.publish(p)).await.unwrap().unwrap();
        for i in 0..6 {
            let m = timeout(WAIT, messages.recv()).await.expect("a restored message arrives").unwrap();
            assert_eq!((m.topic.as_str(), &m.payload[..]), ("restart/t", format!("m{i}").as_bytes()));
        }
        // Nothing more: each went out once.
        assert!(timeout(Duration::from_millis(300), messages.recv()).await.is_err());
        restarted.disconnect().await.unwrap();
        sub.disconnect().await.unwrap();
        server.shutdown().await;
    });
    // Everything was acknowledged: the store is empty again.
    let store = mqtt_store::Store::open(dir.path()).unwrap();
    assert_eq!(store.load().unwrap(), vec![]);
}

#[tokio::test]
async fn a_store_directory_belongs_to_one_running_client() {
    let dir = TempDir::new("in-use");
    let server = server().await;
    let url = format!("mqtt://{}", server.tcp_addr().unwrap());
    let first = Client::connect(&url, options(dir.path())).await.unwrap();
    let second = Client::connect(&url, ClientOptions::new().client_id("other").store(dir.path())).await;
    let Err(ClientError::Store(e)) = second else { panic!("{:?}", second.err()) };
    assert!(e.contains("in use by another client"), "{e}");
    first.disconnect().await.unwrap();
    // Closed with the client: the next one opens it, and a different client id is refused
    // only if the store holds that client's records (here it holds none).
    let again = Client::connect(&url, options(dir.path())).await.unwrap();
    again.disconnect().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn a_store_with_a_clean_start_is_refused() {
    let dir = TempDir::new("clean");
    let server = server().await;
    let url = format!("mqtt://{}", server.tcp_addr().unwrap());
    let mut options = options(dir.path());
    options.session.clean_start = true;
    let refused = Client::connect(&url, options).await;
    let Err(ClientError::Config(e)) = refused else { panic!("{:?}", refused.err()) };
    assert!(e.to_string().contains("clean_start"), "{e}");
    server.shutdown().await;
}

/// Over QUIC too, QoS 2 output that waits for the store goes out once it is stored (the
/// machine sends the session's released bytes on the QUIC stream), both ways.
#[tokio::test]
async fn qos2_over_quic_with_a_store() {
    use mqtt_quic_core::tls::{fingerprint_hex, ClientTls};
    let dir = TempDir::new("quic");
    let cert = SelfSigned::generate(&["localhost"]).unwrap();
    let server = Server::start(ServerOptions::loopback(ServerTls::from_self_signed(&cert).unwrap())).await.unwrap();
    let url = format!("quic://localhost:{}", server.quic_addr().unwrap().port());
    let tls = ClientTls::pinned(&fingerprint_hex(&cert.fingerprint)).unwrap();
    let client = Client::connect(&url, options(dir.path()).tls(tls)).await.unwrap();
    let mut messages = client.messages().unwrap();
    client.subscribe(TopicFilter::new("quic/#").unwrap(), QoS::ExactlyOnce).await.unwrap();
    for i in 0..3 {
        let p = Publish::new(topic("quic/t"), format!("m{i}")).with_qos(QoS::ExactlyOnce);
        timeout(WAIT, client.publish(p)).await.unwrap().unwrap();
    }
    for i in 0..3 {
        let m = timeout(WAIT, messages.recv()).await.unwrap().unwrap();
        assert_eq!((&m.payload[..], m.qos()), (format!("m{i}").as_bytes(), QoS::ExactlyOnce));
    }
    // A round trip after our last PUBREC: once it is answered, the broker's PUBREL for the last
    // message has come too (one stream, answered in order).
    let p = Publish::new(topic("elsewhere"), "x").with_qos(QoS::AtLeastOnce);
    timeout(WAIT, client.publish(p)).await.unwrap().unwrap();
    client.disconnect().await.unwrap();
    server.shutdown().await;
    let store = mqtt_store::Store::open(dir.path()).unwrap();
    assert_eq!(store.load().unwrap(), vec![], "every exchange completed, both ways");
}
