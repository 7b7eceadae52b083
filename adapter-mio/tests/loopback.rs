//! The mio broker and the blocking client over real loopback sockets.

use adapter_mio::blocking::Client;
use adapter_mio::broker::spawn;
use mqtt_proto::{Publish, QoS, TopicFilter, TopicName};
use mqtt_quic_core::driver::{ClientOptions, ServerOptions};
use mqtt_quic_core::tls::{ClientTls, SelfSigned, ServerTls};
use std::time::Duration;

fn broker_options() -> ServerOptions {
    ServerOptions::loopback(ServerTls::from_self_signed(&SelfSigned::generate(&["localhost"]).unwrap()).unwrap())
}

fn options(id: &str) -> ClientOptions {
    ClientOptions::new().client_id(id).tls(ClientTls::insecure())
}

#[test]
fn qos_0_1_2_over_quic_and_tcp() {
    let broker = spawn(broker_options()).unwrap();
    // By name: the client resolves it (found in review: a name's first QUIC packet was once
    // never sent by this adapter).
    let quic = format!("quic://localhost:{}", broker.quic_addr().unwrap().port());
    let tcp = format!("mqtt://{}", broker.tcp_addr().unwrap());
    for (from, to) in [(&quic, &quic), (&tcp, &tcp), (&tcp, &quic), (&quic, &tcp)] {
        let mut sub = Client::connect(to, options("sub")).unwrap();
        sub.subscribe(TopicFilter::new("t/#").unwrap(), QoS::ExactlyOnce).unwrap();
        let mut publisher = Client::connect(from, options("pub")).unwrap();
        for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce].into_iter().enumerate() {
            let p = Publish::new(TopicName::new(format!("t/{i}")).unwrap(), format!("m{i}")).with_qos(qos);
            publisher.publish(p).unwrap();
        }
        for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce].into_iter().enumerate() {
            let m = sub.recv(Duration::from_secs(5)).unwrap().unwrap_or_else(|| panic!("{from} -> {to}: nothing"));
            assert_eq!((m.topic.as_str(), m.qos()), (format!("t/{i}").as_str(), qos), "{from} -> {to}");
        }
        publisher.disconnect().unwrap();
        sub.disconnect().unwrap();
    }
    broker.shutdown();
}

#[test]
fn connect_errors_are_reported() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let e = Client::connect(&format!("mqtt://{closed}"), options("x")).err().unwrap();
    assert!(e.to_string().contains("refused"), "{e}");
    let e = Client::connect("mqtts://127.0.0.1:1", options("x")).err().unwrap();
    assert!(e.to_string().contains("no TLS over TCP"), "{e}");
}

/// An in-process subscription on a broker in the application's own loop receives what an MQTT
/// client publishes (over QUIC and TCP), retained messages included: the broker hands its
/// in-process messages to the application instead of discarding them with its other events.
#[test]
fn in_process_subscribers_of_a_mio_broker_get_published_messages() {
    use adapter_mio::broker::MioBroker;
    use mio::{Events, Poll, Token};
    let mut poll = Poll::new().unwrap();
    let mut broker = MioBroker::bind(broker_options(), poll.registry(), Token(10)).unwrap();
    #[allow(clippy::disallowed_methods)]
    let now = std::time::Instant::now();
    let subscription = broker.broker().subscribe_local(now, &TopicFilter::new("local/#").unwrap(), QoS::AtLeastOnce);
    let urls = [format!("quic://{}", broker.quic_addr().unwrap()), format!("mqtt://{}", broker.tcp_addr().unwrap())];
    // The client runs on a thread of its own: the broker's loop is this thread.
    let publisher = std::thread::spawn(move || {
        for (i, url) in urls.iter().enumerate() {
            let mut client = Client::connect(url, options(&format!("publisher-{i}"))).unwrap();
            let mut p =
                Publish::new(TopicName::new(format!("local/{i}")).unwrap(), format!("m{i}")).with_qos(QoS::AtLeastOnce);
            p.retain = i == 1;
            client.publish(p).unwrap();
            client.disconnect().unwrap();
        }
    });
    let mut events = Events::with_capacity(256);
    let mut received = Vec::new();
    #[allow(clippy::disallowed_methods)]
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    #[allow(clippy::disallowed_methods)]
    while received.len() < 2 && std::time::Instant::now() < deadline {
        let timeout = broker.timeout().map_or(Duration::from_millis(50), |t| t.min(Duration::from_millis(50)));
        poll.poll(&mut events, Some(timeout)).unwrap();
        for event in events.iter() {
            broker.handle_event(poll.registry(), event);
        }
        broker.handle_timeout(poll.registry());
        while let Some((sub, m)) = broker.poll_message() {
            assert_eq!(sub, subscription);
            received.push((m.topic.to_string(), m.payload.clone(), m.qos()));
        }
    }
    publisher.join().unwrap();
    assert_eq!(
        received,
        [
            ("local/0".to_string(), bytes::Bytes::from("m0"), QoS::AtLeastOnce),
            ("local/1".to_string(), bytes::Bytes::from("m1"), QoS::AtLeastOnce)
        ]
    );
    // A later in-process subscription gets the retained one at once.
    let _later = broker.broker().subscribe_local(now, &TopicFilter::new("local/+").unwrap(), QoS::AtMostOnce);
    broker.handle_timeout(poll.registry());
    let (_, retained) = broker.poll_message().expect("the retained message");
    assert_eq!((retained.topic.as_str(), retained.retain), ("local/1", true));
}

/// The threaded client and server (the API the tokio and async-std adapters share): SUBACK as
/// the granted QoS, UNSUBACK's codes, messages pulled and pushed, state changes, and with
/// room for one message the application still gets every one, in order (the client stops
/// reading while it is behind and reads again when it catches up).
#[test]
fn threaded_client_and_server() {
    use adapter_mio::client::{Client as ThreadedClient, ConnectionState};
    use adapter_mio::server::Server;
    let server = Server::start(broker_options()).unwrap();
    let addresses = server.addresses();
    assert_eq!((addresses.quic, addresses.tcp, addresses.tls), (server.quic_addr(), server.tcp_addr(), None));
    for url in [format!("quic://{}", addresses.quic.unwrap()), format!("mqtt://{}", addresses.tcp.unwrap())] {
        let mut slow = options("slow");
        slow.message_buffer = 1;
        let sub = ThreadedClient::connect(&url, slow).unwrap();
        let mut changes = sub.state_changes();
        let mut messages = sub.messages().unwrap();
        assert!(sub.messages().is_none(), "taken once");
        assert_eq!(sub.subscribe(TopicFilter::new("t/#").unwrap(), QoS::ExactlyOnce).unwrap(), QoS::ExactlyOnce);
        let publisher = ThreadedClient::connect(&url, options("pub")).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        assert!(publisher.on_message(move |m| drop(tx.send(m))));
        assert_eq!(publisher.subscribe(TopicFilter::new("echo").unwrap(), QoS::AtMostOnce).unwrap(), QoS::AtMostOnce);
        for i in 0..50 {
            let p = Publish::new(TopicName::new(format!("t/{i}")).unwrap(), format!("m{i}")).with_qos(QoS::AtLeastOnce);
            publisher.publish(p).unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        for i in 0..50 {
            let m = messages.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|| panic!("{url}: message {i}"));
            assert_eq!(m.topic.as_str(), format!("t/{i}"), "{url}");
        }
        sub.publish(Publish::new(TopicName::new("echo").unwrap(), "hi")).unwrap();
        let echo = rx.recv_timeout(Duration::from_secs(5)).expect("the callback got nothing");
        assert_eq!(&echo.payload[..], b"hi");
        let codes = sub.unsubscribe(vec![TopicFilter::new("t/#").unwrap()]).unwrap();
        assert_eq!(codes, [mqtt_proto::ReasonCode::Success], "{url}");
        publisher.disconnect().unwrap();
        sub.disconnect().unwrap();
        assert!(matches!(sub.state(), ConnectionState::Closed { .. }));
        let closed = changes.wait_for(|s| matches!(s, ConnectionState::Closed { .. }));
        assert!(closed.is_some(), "{url}");
        assert!(sub.publish(Publish::new(TopicName::new("late").unwrap(), "x")).is_err());
    }
    server.shutdown();
}

/// A `MioBroker` with `Persistence::Sync` in the application's own loop, driven as before
/// (`handle_event`, `handle_timeout`, `timeout`) and given no waker: the store's reports still
/// reach it (PUBACK waits for the disk, and comes), `close` makes the last commit, and a new
/// broker on the same directory has the retained message.
#[test]
fn an_embedded_mio_broker_persists_without_a_waker() {
    use adapter_mio::broker::MioBroker;
    use mio::{Poll, Token};
    use mqtt_quic_core::persist::Persistence;
    let dir = std::env::temp_dir().join(format!("mqtt-adapter-mio-embedded-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let persistent = || {
        let mut o = broker_options();
        o.broker.persistence = Persistence::Sync;
        o.data_dir = Some(dir.clone());
        o
    };
    #[allow(clippy::disallowed_methods)]
    let deadline = std::time::Instant::now() + Duration::from_secs(20);

    let mut poll = Poll::new().unwrap();
    let mut broker = MioBroker::bind(persistent(), poll.registry(), Token(10)).unwrap();
    let url = format!("mqtt://{}", broker.tcp_addr().unwrap());
    let publisher = std::thread::spawn(move || {
        let mut client = Client::connect(&url, options("publisher")).unwrap();
        let mut p = Publish::new(TopicName::new("embedded/kept").unwrap(), "stored").with_qos(QoS::AtLeastOnce);
        p.retain = true;
        #[allow(clippy::disallowed_methods)]
        let start = std::time::Instant::now();
        client.publish(p).unwrap();
        // The loop sleeps up to 5 s when the broker says nothing is due: the PUBACK, held until
        // the store reports, comes at once only if `timeout` keeps the loop looking for it.
        assert!(start.elapsed() < Duration::from_secs(2), "PUBACK took {:?}", start.elapsed());
        client.disconnect().unwrap();
    });
    drive(&mut poll, &mut broker, deadline, &|_| publisher.is_finished());
    publisher.join().unwrap();
    broker.shutdown(poll.registry());
    drive(&mut poll, &mut broker, deadline, &MioBroker::is_done);
    assert!(broker.is_done());
    broker.close().unwrap();

    let poll = Poll::new().unwrap();
    let mut broker = MioBroker::bind(persistent(), poll.registry(), Token(10)).unwrap();
    #[allow(clippy::disallowed_methods)]
    let now = std::time::Instant::now();
    broker.broker().subscribe_local(now, &TopicFilter::new("embedded/#").unwrap(), QoS::AtLeastOnce);
    broker.handle_timeout(poll.registry());
    let (_, retained) = broker.poll_message().expect("the retained message, restored");
    assert_eq!(
        (retained.topic.as_str(), &retained.payload[..], retained.retain),
        ("embedded/kept", &b"stored"[..], true)
    );
    broker.shutdown(poll.registry());
    assert!(broker.is_done());
    broker.close().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Drives `broker` in `poll`'s loop, as an application does, until `until` or the deadline.
fn drive(
    poll: &mut mio::Poll,
    broker: &mut adapter_mio::broker::MioBroker,
    deadline: std::time::Instant,
    until: &dyn Fn(&adapter_mio::broker::MioBroker) -> bool,
) {
    let mut events = mio::Events::with_capacity(256);
    #[allow(clippy::disallowed_methods)]
    while !until(broker) && std::time::Instant::now() < deadline {
        let timeout = broker.timeout().map_or(Duration::from_secs(5), |t| t.min(Duration::from_secs(5)));
        poll.poll(&mut events, Some(timeout)).unwrap();
        for event in events.iter() {
            broker.handle_event(poll.registry(), event);
        }
        broker.handle_timeout(poll.registry());
    }
}

#[test]
fn data_streams_carry_their_own_subscriptions_and_publishes() {
    let broker = spawn(broker_options()).unwrap();
    let quic = format!("quic://{}", broker.quic_addr().unwrap());
    let mut sub = Client::connect(&quic, options("sub")).unwrap();
    let a = sub.open_stream(1).unwrap();
    assert_eq!(sub.subscribe_on(a, TopicFilter::new("a/#").unwrap(), QoS::AtLeastOnce).unwrap(), QoS::AtLeastOnce);
    let mut publisher = Client::connect(&quic, options("pub")).unwrap();
    let out = publisher.open_stream(0).unwrap();
    let p = Publish::new(TopicName::new("a/1").unwrap(), "one").with_qos(QoS::ExactlyOnce);
    publisher.publish_on(out, p).unwrap();
    let m = sub.recv(Duration::from_secs(5)).unwrap().expect("nothing arrived");
    assert_eq!(&m.payload[..], b"one");
    publisher.disconnect().unwrap();
    sub.disconnect().unwrap();
    broker.shutdown();
}

#[test]
fn falls_back_to_tcp_when_nothing_answers_on_udp() {
    let broker = spawn(broker_options()).unwrap();
    // A UDP port that takes datagrams and never answers (a network that drops UDP).
    let hole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (quic, tcp) =
        (format!("quic://{}", hole.local_addr().unwrap()), format!("mqtt://{}", broker.tcp_addr().unwrap()));
    let mut o = options("fallback");
    o.fallback.handshake_timeout = Duration::from_millis(300);
    #[allow(clippy::disallowed_methods)] // a real-socket test reads the real clock
    let started = std::time::Instant::now();
    let mut c = Client::connect_urls([&quic, &tcp], o).unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    c.subscribe(TopicFilter::new("fb").unwrap(), QoS::AtLeastOnce).unwrap();
    c.publish(Publish::new(TopicName::new("fb").unwrap(), "tcp").with_qos(QoS::AtLeastOnce)).unwrap();
    let m = c.recv(Duration::from_secs(5)).unwrap().expect("a message");
    assert_eq!(&m.payload[..], b"tcp");
    c.disconnect().unwrap();
    broker.shutdown();
}

/// A mio broker bridged to another over TCP (dialled on a thread) and over QUIC (through its
/// own UDP socket): a message published at the edge reaches the upstream under its prefix.
#[test]
fn a_bridge_carries_messages_over_tcp_and_quic() {
    use mqtt_quic_core::bridge::config::BridgeConfig;
    let cloud = spawn(broker_options()).unwrap();
    let upstreams = [
        format!("mqtt://127.0.0.1:{}", cloud.tcp_addr().unwrap().port()),
        format!("quic://localhost:{}", cloud.quic_addr().unwrap().port()),
    ];
    for upstream in upstreams {
        let mut bridge = BridgeConfig::new("cloud", vec![upstream.parse().unwrap()]);
        bridge.tls = Some(ClientTls::insecure());
        bridge.client_id = format!("edge-{}", &upstream[..4]);
        bridge.mappings = vec!["up/# out 1 \"\" site/".parse().unwrap()];
        let mut edge_options = broker_options();
        edge_options.broker.bridges = vec![bridge];
        let edge = spawn(edge_options).unwrap();
        let mut at_cloud =
            Client::connect(&format!("mqtt://{}", cloud.tcp_addr().unwrap()), options("cloud-app")).unwrap();
        at_cloud.subscribe(TopicFilter::new("site/#").unwrap(), QoS::AtLeastOnce).unwrap();
        let mut at_edge =
            Client::connect(&format!("mqtt://{}", edge.tcp_addr().unwrap()), options("edge-app")).unwrap();
        // Queued in the bridge's session until it connects upstream.
        at_edge.publish(Publish::new(TopicName::new("up/t").unwrap(), "reading").with_qos(QoS::AtLeastOnce)).unwrap();
        let m = at_cloud.recv(Duration::from_secs(10)).unwrap().unwrap_or_else(|| panic!("{upstream}: nothing"));
        assert_eq!((m.topic.as_str(), &m.payload[..]), ("site/up/t", &b"reading"[..]), "{upstream}");
        at_edge.disconnect().unwrap();
        at_cloud.disconnect().unwrap();
        edge.shutdown();
    }
    cloud.shutdown();
}
