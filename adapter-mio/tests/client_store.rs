//! The mio clients' store over real sockets: QoS 1 and 2 messages published (from a
//! `MioClient` in the test's own loop) to a broker that never acknowledges them survive the
//! client being dropped (as a process that dies: no DISCONNECT), and a blocking client with the
//! same id and store directory delivers them through the mio broker.

// Threads and real sockets: the deadlines here are real time.
#![allow(clippy::disallowed_methods)]

use adapter_mio::blocking::Client;
use adapter_mio::broker::spawn;
use adapter_mio::client::MioClient;
use bytes::BytesMut;
use mio::{Events, Poll, Token};
use mqtt_proto::{Decoder, Packet, Protocol, Publish, QoS, TopicFilter, TopicName};
use mqtt_quic_core::driver::{ClientOptions, ServerOptions};
use mqtt_quic_core::tls::{SelfSigned, ServerTls};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

/// A temporary directory removed when dropped (kept, and printed, when the test failed).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("mqttq-mio-client-store-{name}-{}", std::process::id()));
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

/// A "broker" on loopback TCP that answers CONNECT with a CONNACK and then only reads: every
/// PUBLISH goes on the channel, none is acknowledged.
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
    let qos = if i == 2 { QoS::ExactlyOnce } else { QoS::AtLeastOnce };
    Publish::new(TopicName::new("restart/t").unwrap(), format!("m{i}")).with_qos(qos)
}

/// Runs `client`'s loop once (at most 50 ms).
fn turn(poll: &mut Poll, events: &mut Events, client: &mut MioClient) {
    let wait = client.timeout().map_or(Duration::from_millis(50), |t| t.min(Duration::from_millis(50)));
    poll.poll(events, Some(wait)).unwrap();
    for event in events.iter() {
        client.handle_event(poll.registry(), event);
    }
    client.handle_timeout(poll.registry());
}

#[test]
fn unacknowledged_publishes_survive_a_client_restart() {
    let dir = TempDir::new("restart");
    let (silent, published) = silent_broker();
    // The first run: four messages (the third QoS 2) that are never acknowledged.
    let mut poll = Poll::new().unwrap();
    let mut events = Events::with_capacity(64);
    let mut client =
        MioClient::connect(&format!("mqtt://{silent}"), options(dir.path()), poll.registry(), Token(0)).unwrap();
    let deadline = Instant::now() + WAIT;
    let connected = loop {
        if let Some(r) = client.poll_connected() {
            break r;
        }
        assert!(Instant::now() < deadline, "no CONNACK");
        turn(&mut poll, &mut events, &mut client);
    };
    connected.unwrap();
    for i in 0..4 {
        client.publish(poll.registry(), message(i));
    }
    let mut got = Vec::new();
    while got.len() < 4 {
        assert!(Instant::now() < deadline, "the silent broker got {got:?}");
        turn(&mut poll, &mut events, &mut client);
        got.extend(published.try_iter().map(|p| String::from_utf8(p.payload.to_vec()).unwrap()));
    }
    assert_eq!(got, ["m0", "m1", "m2", "m3"]);
    // The process dies: the client goes without a DISCONNECT. Every change was committed
    // before its PUBLISH went out.
    drop(client);

    // The second run, a blocking client against a working broker.
    let cert = SelfSigned::generate(&["localhost"]).unwrap();
    let broker = spawn(ServerOptions::loopback(ServerTls::from_self_signed(&cert).unwrap())).unwrap();
    let url = format!("mqtt://{}", broker.tcp_addr().unwrap());
    let mut sub = Client::connect(&url, ClientOptions::new().client_id("sub")).unwrap();
    sub.subscribe(TopicFilter::new("restart/#").unwrap(), QoS::ExactlyOnce).unwrap();
    let mut restarted = Client::connect(&url, options(dir.path())).unwrap();
    // A new QoS 2 message after the restored ones: when it completes, so have they (one
    // stream, answered in order), and it numbers after them.
    restarted.publish(Publish::new(TopicName::new("restart/t").unwrap(), "m4").with_qos(QoS::ExactlyOnce)).unwrap();
    for i in 0..5 {
        let m = sub.recv(WAIT).unwrap().expect("a restored message arrives");
        let qos = if i >= 2 && i != 3 { QoS::ExactlyOnce } else { QoS::AtLeastOnce };
        assert_eq!((&m.payload[..], m.qos()), (format!("m{i}").as_bytes(), qos));
    }
    assert!(sub.recv(Duration::from_millis(300)).unwrap().is_none(), "each went out once");
    restarted.disconnect().unwrap();
    sub.disconnect().unwrap();
    broker.shutdown();
    // Everything was acknowledged: the store is empty again.
    let store = mqtt_store::Store::open(dir.path()).unwrap();
    assert_eq!(store.load().unwrap(), vec![]);
}
