//! "Your own connection": each adapter's client over a connection the application opens itself
//! (here a Unix socket, through a proxy to the broker's TCP listener), opened again by the
//! client on each reconnect.

// Real sockets and threads: the wall clock is the only clock here.
#![allow(clippy::disallowed_methods)]

use mqtt_proto::{Publish, QoS, TopicFilter, TopicName};
use mqtt_quic_core::driver::{ClientOptions, ConnectionState};

fn connected(s: &ConnectionState) -> bool {
    matches!(s, ConnectionState::Connected { .. })
}
use mqtt_quic_core::tls::{SelfSigned, ServerTls};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

/// A Unix socket that forwards each connection to a TCP address; it counts the connections and
/// can cut them all.
struct UnixProxy {
    path: PathBuf,
    accepted: Arc<AtomicUsize>,
    live: Arc<Mutex<Vec<UnixStream>>>,
}

impl UnixProxy {
    fn start(to: SocketAddr, name: &str) -> UnixProxy {
        let path = std::env::temp_dir().join(format!("mqtt-own-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind the Unix socket");
        let (accepted, live) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::new())));
        let (count, conns) = (accepted.clone(), live.clone());
        std::thread::spawn(move || {
            for unix in listener.incoming() {
                let Ok(unix) = unix else { break };
                let Ok(tcp) = TcpStream::connect(to) else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                conns.lock().unwrap().push(unix.try_clone().unwrap());
                let (mut unix_in, mut tcp_out) = (unix.try_clone().unwrap(), tcp.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut unix_in, &mut tcp_out);
                    let _ = tcp_out.shutdown(Shutdown::Both);
                });
                let (mut tcp_in, mut unix_out) = (tcp, unix);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut tcp_in, &mut unix_out);
                    let _ = unix_out.shutdown(Shutdown::Both);
                });
            }
        });
        UnixProxy { path, accepted, live }
    }

    /// Breaks every connection now, as a network failure would.
    fn cut(&self) {
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for UnixProxy {
    fn drop(&mut self) {
        self.cut();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Our tokio broker on loopback, on a runtime of its own; its TCP address.
fn broker() -> (tokio::runtime::Runtime, adapter_tokio::server::Server, SocketAddr) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cert = SelfSigned::generate(&["localhost"]).unwrap();
    let options = adapter_tokio::server::ServerOptions::loopback(ServerTls::from_self_signed(&cert).unwrap());
    let server = runtime.block_on(adapter_tokio::server::Server::start(options)).unwrap();
    let tcp = server.tcp_addr().unwrap();
    (runtime, server, tcp)
}

/// A kept session, so that the subscription survives the reconnect.
fn kept(id: &str) -> ClientOptions {
    let mut options = ClientOptions::new().client_id(id);
    options.session.clean_start = false;
    options.session.session_expiry = 600;
    options
}

/// A publisher over plain TCP, with the tokio client.
fn publish(runtime: &tokio::runtime::Runtime, tcp: SocketAddr, topic: &str, payload: &'static str) {
    runtime.block_on(async {
        let client =
            adapter_tokio::client::Client::connect(&format!("mqtt://{tcp}"), ClientOptions::new()).await.unwrap();
        let publish = Publish::new(TopicName::new(topic).unwrap(), payload).with_qos(QoS::AtLeastOnce);
        client.publish(publish).await.unwrap();
        client.disconnect().await.unwrap();
    });
}

#[test]
fn tokio_client_over_its_own_connection_reconnects_through_it() {
    let (runtime, server, tcp) = broker();
    let proxy = UnixProxy::start(tcp, "tokio");
    let path = proxy.path.clone();
    let client = runtime
        .block_on(adapter_tokio::client::Client::connect_with("unix proxy", kept("own-tokio"), move || {
            tokio::net::UnixStream::connect(path.clone())
        }))
        .unwrap();
    let mut messages = client.messages().unwrap();
    runtime.block_on(client.subscribe(TopicFilter::new("own/tokio").unwrap(), QoS::AtLeastOnce)).unwrap();
    for (round, payload) in ["first", "after the cut"].into_iter().enumerate() {
        if round == 1 {
            proxy.cut();
            let mut states = client.state_changes();
            let reconnected = runtime.block_on(async {
                tokio::time::timeout(WAIT, states.wait_for(|s| connected(s) && proxy.accepted() == 2)).await
            });
            assert!(reconnected.is_ok(), "reconnected through the connector");
        }
        publish(&runtime, tcp, "own/tokio", payload);
        // QoS 1 is at least once: "first" may come again after the cut (its PUBACK lost with
        // the connection); then the new one.
        let m = loop {
            let m = runtime.block_on(async { tokio::time::timeout(WAIT, messages.recv()).await }).unwrap().unwrap();
            if !(round == 1 && m.dup && &m.payload[..] == b"first") {
                break m;
            }
        };
        assert_eq!(&m.payload[..], payload.as_bytes());
    }
    assert_eq!(proxy.accepted(), 2);
    runtime.block_on(client.disconnect()).unwrap();
    runtime.block_on(server.shutdown());
}

#[test]
fn async_std_client_over_its_own_connection_reconnects_through_it() {
    let (runtime, server, tcp) = broker();
    let proxy = UnixProxy::start(tcp, "async-std");
    let path = proxy.path.clone();
    async_std::task::block_on(async {
        let connector = move || async_std::os::unix::net::UnixStream::connect(path.clone());
        let client = adapter_async_std::client::Client::connect_with("unix proxy", kept("own-async-std"), connector)
            .await
            .unwrap();
        let mut messages = client.messages().unwrap();
        client.subscribe(TopicFilter::new("own/async-std").unwrap(), QoS::AtLeastOnce).await.unwrap();
        for (round, payload) in ["first", "after the cut"].into_iter().enumerate() {
            if round == 1 {
                proxy.cut();
                let mut states = client.state_changes();
                let back = async_std::future::timeout(WAIT, async {
                    while !(states.recv().await.is_some_and(|s| connected(&s)) && proxy.accepted() == 2) {}
                });
                assert!(back.await.is_ok(), "reconnected through the connector");
            }
            publish(&runtime, tcp, "own/async-std", payload);
            // At least once: a resent "first" may come before the new one (see the tokio test).
            let m = loop {
                let m = async_std::future::timeout(WAIT, messages.recv()).await.unwrap().unwrap();
                if !(round == 1 && m.dup && &m.payload[..] == b"first") {
                    break m;
                }
            };
            assert_eq!(&m.payload[..], payload.as_bytes());
        }
        client.disconnect().await.unwrap();
    });
    assert_eq!(proxy.accepted(), 2);
    runtime.block_on(server.shutdown());
}

/// The mio clients take a blocking `Read + Write` connection (`OwnConnection`: it can be
/// cloned and shut down).
#[test]
fn mio_clients_over_their_own_connection_reconnect_through_it() {
    let (runtime, server, tcp) = broker();
    let proxy = UnixProxy::start(tcp, "mio");
    let path = proxy.path.clone();
    let connect = move || UnixStream::connect(&path);
    let client = adapter_mio::client::Client::connect_with("unix proxy", kept("own-mio"), connect.clone()).unwrap();
    let mut messages = client.messages().unwrap();
    client.subscribe(TopicFilter::new("own/mio").unwrap(), QoS::AtLeastOnce).unwrap();
    for (round, payload) in ["first", "after the cut"].into_iter().enumerate() {
        if round == 1 {
            proxy.cut();
            let deadline = std::time::Instant::now() + WAIT;
            while !(connected(&client.state()) && proxy.accepted() == 2) {
                assert!(std::time::Instant::now() < deadline, "reconnected through the connector");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        publish(&runtime, tcp, "own/mio", payload);
        // At least once: a resent "first" may come before the new one (see the tokio test).
        let m = loop {
            let m = messages.recv_timeout(WAIT).unwrap();
            if !(round == 1 && m.dup && &m.payload[..] == b"first") {
                break m;
            }
        };
        assert_eq!(&m.payload[..], payload.as_bytes());
    }
    client.disconnect().unwrap();
    // The blocking client, once, over the same kind of connection.
    let mut blocking =
        adapter_mio::blocking::Client::connect_with("unix proxy", ClientOptions::new(), connect).unwrap();
    blocking.subscribe(TopicFilter::new("own/blocking").unwrap(), QoS::AtLeastOnce).unwrap();
    publish(&runtime, tcp, "own/blocking", "blocking");
    let m = blocking.recv(WAIT).unwrap().unwrap();
    assert_eq!(&m.payload[..], b"blocking");
    blocking.disconnect().unwrap();
    assert_eq!(proxy.accepted(), 3);
    runtime.block_on(server.shutdown());
}

/// The names of this process's threads that start with `prefix`.
fn threads_named(prefix: &str) -> usize {
    let tasks = std::fs::read_dir("/proc/self/task").unwrap();
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

/// Found in review: when the client gave up on a broker that never answered, the thread reading
/// the application's connection stayed blocked for as long as the connection stayed open. Giving
/// up now shuts the connection down, and both of its threads end.
#[test]
fn a_mio_client_that_gives_up_leaves_no_thread_behind() {
    let path = std::env::temp_dir().join(format!("mqtt-own-{}-silent.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    // Accepts and holds connections, answering nothing.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.push(conn);
        }
    });
    let mut options = ClientOptions::new();
    options.session.connect_timeout = Duration::from_millis(500);
    options.reconnect = None;
    let target = path.clone();
    let result = adapter_mio::blocking::Client::connect_with("silent", options, move || UnixStream::connect(&target));
    assert!(result.is_err(), "nobody answered");
    let deadline = std::time::Instant::now() + WAIT;
    while threads_named("mqtt-conn-") > 0 {
        assert!(std::time::Instant::now() < deadline, "the connection's threads ended");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(&path);
}
