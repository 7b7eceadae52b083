//! Every adapter's client store over real sockets: QoS 1 messages published to a broker that
//! never acknowledges them survive the client's process "dying", and a new client with the same
//! id and store directory delivers them through a working broker.

// Threads, runtimes and real sockets: the deadlines here are real time.
#![allow(clippy::disallowed_methods)]

/// The async client's store over real sockets: QoS 1 messages published to a broker that never
/// acknowledges them survive the client's process "dying" (its runtime dropped, with no
/// DISCONNECT), and a new client with the same id and store directory delivers them through a
/// working broker.
mod tokio {
    use adapter_tokio::client::{Client, ClientError, ClientOptions};
    use adapter_tokio::server::{Server, ServerOptions};
    use mqtt_proto::{Publish, QoS, TopicFilter, TopicName};
    use mqtt_quic_core::tls::{SelfSigned, ServerTls};
    use mqtt_tests::fixtures::{silent_broker, TempDir};
    use std::path::Path;
    use std::time::Duration;
    use tokio::time::timeout;

    const WAIT: Duration = Duration::from_secs(10);

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
        let dir = TempDir::new("tokio-restart");
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
        let dir = TempDir::new("tokio-in-use");
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
        let dir = TempDir::new("tokio-clean");
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
        let dir = TempDir::new("tokio-quic");
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
}

/// The mio clients' store over real sockets: QoS 1 and 2 messages published (from a
/// `MioClient` in the test's own loop) to a broker that never acknowledges them survive the
/// client being dropped (as a process that dies: no DISCONNECT), and a blocking client with the
/// same id and store directory delivers them through the mio broker.
mod mio {
    use mqtt_tests::fixtures::{silent_broker, TempDir};
    // Threads and real sockets: the deadlines here are real time.

    use adapter_mio::blocking::Client;
    use adapter_mio::broker::spawn;
    use adapter_mio::client::MioClient;
    use mio::{Events, Poll, Token};
    use mqtt_proto::{Publish, QoS, TopicFilter, TopicName};
    use mqtt_quic_core::driver::{ClientOptions, ServerOptions};
    use mqtt_quic_core::tls::{SelfSigned, ServerTls};
    use std::path::Path;
    use std::time::{Duration, Instant};

    const WAIT: Duration = Duration::from_secs(10);

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
        let dir = TempDir::new("mio-restart");
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
}

/// The async-std client's store over real sockets: QoS 1 and 2 messages published to a
/// broker that never acknowledges them stay in the store when the client disconnects, and a
/// new client with the same id and store directory delivers them through a working broker.
/// (The tokio and mio tests drop the client as a dying process would; async-std's global
/// executor cannot be dropped, so this one takes the clean way out.)
mod async_std {
    use mqtt_tests::fixtures::{silent_broker, TempDir};
    // Threads and real sockets: the deadlines here are real time.

    use adapter_async_std::client::Client;
    use adapter_async_std::server::{Server, ServerOptions};
    use async_std::future::timeout;
    use mqtt_proto::{Publish, QoS, TopicFilter, TopicName};
    use mqtt_quic_core::driver::ClientOptions;
    use mqtt_quic_core::tls::{SelfSigned, ServerTls};
    use std::path::Path;
    use std::time::Duration;

    const WAIT: Duration = Duration::from_secs(10);

    fn options(dir: &Path) -> ClientOptions {
        ClientOptions::new().client_id("restart-me").store(dir)
    }

    fn message(i: usize) -> Publish {
        let qos = if i % 2 == 1 { QoS::ExactlyOnce } else { QoS::AtLeastOnce };
        Publish::new(TopicName::new("restart/t").unwrap(), format!("m{i}")).with_qos(qos)
    }

    #[test]
    fn unacknowledged_publishes_survive_a_client_restart() {
        let dir = TempDir::new("async_std-restart");
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
            let server =
                Server::start(ServerOptions::loopback(ServerTls::from_self_signed(&cert).unwrap())).await.unwrap();
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
}
