//! The async-std client's store over real sockets: QoS 1 and 2 messages published to a
//! broker that never acknowledges them stay in the store when the client disconnects, and a
//! new client with the same id and store directory delivers them through a working broker.
//! (The tokio and mio tests drop the client as a dying process would; async-std's global
//! executor cannot be dropped, so this one takes the clean way out.)

// Threads and real sockets: the deadlines here are real time.
#![allow(clippy::disallowed_methods)]

use adapter_async_std::client::Client;
use adapter_async_std::server::{Server, ServerOptions};
use async_std::future::timeout;
use bytes::BytesMut;
use mqtt_proto::{Decoder, Packet, Protocol, Publish, QoS, TopicFilter, TopicName};
use mqtt_quic_core::driver::ClientOptions;
use mqtt_quic_core::tls::{SelfSigned, ServerTls};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

/// A temporary directory removed when dropped (kept, and printed, when the test failed).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("mqttq-async-std-client-store-{name}-{}", std::process::id()));
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

fn options(dir: &Path) -> ClientOptions {
    ClientOptions::new().client_id("restart-me").store(dir)
}

fn message(i: usize) -> Publish {
    let qos = if i % 2 == 1 { QoS::ExactlyOnce } else { QoS::AtLeastOnce };
    Publish::new(TopicName::new("restart/t").unwrap(), format!("m{i}")).with_qos(qos)
}

#[test]
fn unacknowledged_publishes_survive_a_client_restart() {
    let dir = TempDir::new("restart");
    let (silent, published) = silent_broker();
    async_std::task::block_on(async {
        let client = Client::connect(&format!("mqtt://{silent}"), options(dir.path())).await.unwrap();
        for i in 0..3 {
            drop(client.publish(message(i)));
        }
        for i in 0..3 {
            // Blocking here is fine: the client's task runs on the executor's threads.
            let p = published.recv_timeout(WAIT).expect("the silent broker gets every PUBLISH");
            assert_eq!(&p.payload[..], format!("m{i}").as_bytes());
        }
        // Unacknowledged: they stay in the store, which is closed when this returns.
        client.disconnect().await.unwrap();

        let cert = SelfSigned::generate(&["localhost"]).unwrap();
        let server = Server::start(ServerOptions::loopback(ServerTls::from_self_signed(&cert).unwrap())).await.unwrap();
        let url = format!("mqtt://{}", server.tcp_addr().unwrap());
        let sub = Client::connect(&url, ClientOptions::new().client_id("sub")).await.unwrap();
        let mut messages = sub.messages().unwrap();
        sub.subscribe(TopicFilter::new("restart/#").unwrap(), QoS::ExactlyOnce).await.unwrap();
        let restarted = Client::connect(&url, options(dir.path())).await.unwrap();
        // A new QoS 2 message after the restored ones: once it completes, so have they (one
        // stream, answered in order; its PUBREL goes after theirs).
        timeout(WAIT, restarted.publish(message(3))).await.unwrap().unwrap();
        for i in 0..4 {
            let m = timeout(WAIT, messages.recv()).await.expect("a restored message arrives").unwrap();
            assert_eq!((&m.payload[..], m.qos()), (format!("m{i}").as_bytes(), message(i).qos()));
        }
        restarted.disconnect().await.unwrap();
        sub.disconnect().await.unwrap();
        server.shutdown().await;
    });
    let store = mqtt_store::Store::open(dir.path()).unwrap();
    assert_eq!(store.load().unwrap(), vec![]);
}
