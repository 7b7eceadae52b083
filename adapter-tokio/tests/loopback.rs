//! The tokio broker and client over real loopback sockets (ports chosen by the system).

use adapter_tokio::client::{Client, ClientError, ClientOptions, ConnectionState};
use adapter_tokio::server::{Server, ServerOptions};
use bytes::BytesMut;
use mqtt_proto::{Connect, MqttString, Packet, Protocol, Publish, QoS, ReasonCode, TopicFilter, TopicName, Will};
use mqtt_quic_core::client::ReconnectPolicy;
use mqtt_quic_core::tls::{fingerprint_hex, ClientTls, SelfSigned, ServerTls};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::time::timeout;

fn cert() -> &'static SelfSigned {
    static CERT: OnceLock<SelfSigned> = OnceLock::new();
    CERT.get_or_init(|| SelfSigned::generate(&["localhost"]).unwrap())
}

fn pinned() -> ClientTls {
    ClientTls::pinned(&fingerprint_hex(&cert().fingerprint)).unwrap()
}

async fn server() -> Server {
    let mut options = ServerOptions::loopback(ServerTls::from_self_signed(cert()).unwrap());
    options.tls = Some("127.0.0.1:0".parse().unwrap());
    Server::start(options).await.unwrap()
}

fn url(scheme: &str, addr: Option<SocketAddr>) -> String {
    format!("{scheme}://localhost:{}", addr.unwrap().port())
}

async fn client(url: &str, id: &str) -> Client {
    let options = ClientOptions::new().client_id(id).tls(pinned());
    timeout(Duration::from_secs(10), Client::connect(url, options)).await.expect("connect timed out").unwrap()
}

fn topic(s: &str) -> TopicName {
    TopicName::new(s).unwrap()
}

/// Publishes one message at each QoS from `from` and checks `to` receives all three, in order.
async fn pub_sub(from: &str, to: &str) {
    let s = server().await;
    let (from, to) = (url(from, from_addr(&s, from)), url(to, from_addr(&s, to)));
    let sub = client(&to, "sub").await;
    let mut messages = sub.messages().unwrap();
    assert!(sub.messages().is_none(), "the stream is taken once");
    assert_eq!(sub.subscribe(TopicFilter::new("t/#").unwrap(), QoS::ExactlyOnce).await.unwrap(), QoS::ExactlyOnce);
    let publisher = client(&from, "pub").await;
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce].into_iter().enumerate() {
        publisher.publish(Publish::new(topic(&format!("t/{i}")), format!("m{i}")).with_qos(qos)).await.unwrap();
    }
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce].into_iter().enumerate() {
        let m = timeout(Duration::from_secs(5), messages.recv()).await.expect("message timed out").unwrap();
        assert_eq!(
            (m.topic.as_str(), &m.payload[..], m.qos()),
            (format!("t/{i}").as_str(), format!("m{i}").as_bytes(), qos)
        );
    }
    publisher.disconnect().await.unwrap();
    sub.disconnect().await.unwrap();
    assert!(matches!(sub.state(), ConnectionState::Closed { .. }));
    assert!(matches!(sub.publish(Publish::new(topic("t/x"), "late")).await, Err(ClientError::Closed)));
    s.shutdown().await;
}

fn from_addr(s: &Server, scheme: &str) -> Option<SocketAddr> {
    match scheme {
        "quic" => s.quic_addr(),
        "mqtt" => s.tcp_addr(),
        "mqtts" => s.tls_addr(),
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn qos_0_1_2_over_quic() {
    pub_sub("quic", "quic").await;
}

#[tokio::test]
async fn qos_0_1_2_over_tcp() {
    pub_sub("mqtt", "mqtt").await;
}

#[tokio::test]
async fn qos_0_1_2_over_tls() {
    pub_sub("mqtts", "mqtts").await;
}

#[tokio::test]
async fn tcp_publisher_reaches_quic_subscriber() {
    pub_sub("mqtt", "quic").await;
}

#[tokio::test]
async fn quic_publisher_reaches_tcp_subscriber() {
    pub_sub("quic", "mqtt").await;
}

#[tokio::test]
async fn retained_message_reaches_a_later_subscriber_through_the_callback() {
    let s = server().await;
    let publisher = client(&url("quic", s.quic_addr()), "p").await;
    publisher.publish(Publish { retain: true, ..Publish::new(topic("status/door"), "open") }).await.unwrap();
    publisher.disconnect().await.unwrap();
    let sub = client(&url("mqtt", s.tcp_addr()), "s").await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    assert!(sub.on_message(move |m| drop(tx.send(m))));
    sub.subscribe(TopicFilter::new("status/+").unwrap(), QoS::AtLeastOnce).await.unwrap();
    let m = timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
    assert!(m.retain);
    assert_eq!(&m.payload[..], b"open");
    s.shutdown().await;
}

#[tokio::test]
async fn will_is_published_when_a_client_is_killed() {
    let s = server().await;
    let sub = client(&url("quic", s.quic_addr()), "watcher").await;
    let mut messages = sub.messages().unwrap();
    sub.subscribe(TopicFilter::new("wills/#").unwrap(), QoS::AtLeastOnce).await.unwrap();
    // A raw TCP client with a will, killed without DISCONNECT.
    let mut raw = tokio::net::TcpStream::connect(s.tcp_addr().unwrap()).await.unwrap();
    let mut connect = Connect::new(Protocol::V3_1_1, MqttString::from_static("doomed"));
    connect.will = Some(Will {
        topic: topic("wills/doomed"),
        payload: "gone".into(),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    });
    let mut buf = BytesMut::new();
    Packet::from(connect).encode(Protocol::V3_1_1, &mut buf).unwrap();
    raw.write_all(&buf).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(raw);
    let m = timeout(Duration::from_secs(5), messages.recv()).await.expect("no will").unwrap();
    assert_eq!((m.topic.as_str(), &m.payload[..]), ("wills/doomed", &b"gone"[..]));
    s.shutdown().await;
}

#[tokio::test]
async fn client_reconnects_after_a_broker_restart_and_resends_what_was_pending() {
    let first = server().await;
    let (quic, tcp, tls) = (first.quic_addr(), first.tcp_addr(), first.tls_addr());
    let mut options = ClientOptions::new().client_id("survivor").tls(pinned());
    options.reconnect = Some(ReconnectPolicy { initial: Duration::from_millis(50), max: Duration::from_millis(200) });
    options.session.session_expiry = 3600;
    let survivor = Client::connect(&url("quic", quic), options).await.unwrap();
    let mut states = survivor.state_changes();
    let mut messages = survivor.messages().unwrap();
    survivor.subscribe(TopicFilter::new("back/#").unwrap(), QoS::AtLeastOnce).await.unwrap();

    first.shutdown().await;
    timeout(Duration::from_secs(5), states.wait_for(|s| matches!(s, ConnectionState::Reconnecting { .. })))
        .await
        .expect("the loss was not noticed")
        .unwrap();
    // Published while the broker is down: held and sent on the next connection.
    let pending = {
        let survivor = survivor.clone();
        tokio::spawn(async move {
            survivor.publish(Publish::new(topic("back/pending"), "kept").with_qos(QoS::AtLeastOnce)).await
        })
    };
    let mut options = ServerOptions::loopback(ServerTls::from_self_signed(cert()).unwrap());
    (options.quic, options.tcp, options.tls) = (quic, tcp, tls);
    let second = Server::start(options).await.unwrap();
    timeout(Duration::from_secs(10), states.wait_for(|s| matches!(s, ConnectionState::Connected { .. })))
        .await
        .expect("no reconnect")
        .unwrap();
    timeout(Duration::from_secs(5), pending).await.unwrap().unwrap().unwrap();
    // The new broker knew nothing of the session: the client subscribed again by itself, so
    // its own pending message came back to it.
    let m = timeout(Duration::from_secs(5), messages.recv()).await.expect("no message after restart").unwrap();
    assert_eq!(&m.payload[..], b"kept");
    survivor.disconnect().await.unwrap();
    second.shutdown().await;
}

#[tokio::test]
async fn connect_errors_are_specific() {
    let s = server().await;
    // Wrong certificate pin over QUIC and TLS.
    let wrong = ClientTls::pinned(&"ab".repeat(32)).unwrap();
    for u in [url("quic", s.quic_addr()), url("mqtts", s.tls_addr())] {
        let e = Client::connect(&u, ClientOptions::new().tls(wrong.clone())).await.err().expect("connected anyway");
        assert!(matches!(e, ClientError::Unreachable { .. }), "{u}: {e}");
        assert!(e.to_string().to_lowercase().contains("certificate"), "{u}: {e}");
    }
    // Nobody listening (a closed TCP port).
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let e = Client::connect(&url("mqtt", Some(closed)), ClientOptions::new()).await.err().unwrap();
    assert!(e.to_string().contains("refused"), "{e}");
    // A client id the broker refuses (MQTT 5 with an empty id and no clean start).
    let mut options = ClientOptions::new();
    options.session.protocol = Protocol::V3_1_1;
    options.session.clean_start = false;
    let e = Client::connect(&url("mqtt", s.tcp_addr()), options).await.err().unwrap();
    assert!(matches!(e, ClientError::Refused(ReasonCode::ClientIdentifierNotValid)), "{e}");
    assert!(e.to_string().contains("0x85"), "{e}");
    s.shutdown().await;
}

#[tokio::test]
async fn garbage_on_a_listener_only_costs_that_client() {
    let s = server().await;
    let sub = client(&url("mqtt", s.tcp_addr()), "steady").await;
    let mut messages = sub.messages().unwrap();
    sub.subscribe(TopicFilter::new("x").unwrap(), QoS::AtMostOnce).await.unwrap();
    let mut raw = tokio::net::TcpStream::connect(s.tcp_addr().unwrap()).await.unwrap();
    // An HTTP request: its first bytes read as a PUBACK header of 69 bytes, before CONNECT.
    raw.write_all(format!("GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: {}\r\n\r\n", "x".repeat(60)).as_bytes())
        .await
        .unwrap();
    let mut rest = Vec::new();
    let n = timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read_to_end(&mut raw, &mut rest)).await;
    assert!(n.is_ok(), "the broker did not close the garbage connection");
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.send_to(&[0xff; 1200], s.quic_addr().unwrap()).await.unwrap();
    let publisher = client(&url("quic", s.quic_addr()), "pub").await;
    publisher.publish(Publish::new(topic("x"), "still here")).await.unwrap();
    let m = timeout(Duration::from_secs(5), messages.recv()).await.unwrap().unwrap();
    assert_eq!(&m.payload[..], b"still here");
    s.shutdown().await;
}

/// Connects a raw MQTT 3.1.1 client over TCP and subscribes it to `filter` at QoS 0.
async fn raw_subscriber(addr: SocketAddr, id: &'static str, filter: &str) -> tokio::net::TcpStream {
    raw_subscriber_at(addr, id, filter, QoS::AtMostOnce).await
}

async fn raw_subscriber_at(addr: SocketAddr, id: &'static str, filter: &str, qos: QoS) -> tokio::net::TcpStream {
    use mqtt_proto::{Decoder, PacketId, Subscribe, Subscription};
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = BytesMut::new();
    Packet::from(Connect::new(Protocol::V3_1_1, MqttString::from_static(id)))
        .encode(Protocol::V3_1_1, &mut buf)
        .unwrap();
    let sub = Subscribe {
        packet_id: PacketId::MIN,
        properties: Default::default(),
        subscriptions: [Subscription::new(TopicFilter::new(filter).unwrap(), qos)].into_iter().collect(),
    };
    Packet::from(sub).encode(Protocol::V3_1_1, &mut buf).unwrap();
    raw.write_all(&buf).await.unwrap();
    // Read CONNACK and SUBACK.
    let mut decoder = Decoder::new(Protocol::V3_1_1);
    let mut inbuf = BytesMut::new();
    let mut got = 0;
    while got < 2 {
        let n = tokio::io::AsyncReadExt::read_buf(&mut raw, &mut inbuf).await.unwrap();
        assert!(n > 0, "the broker closed the connection");
        while let Some(p) = decoder.decode(&mut inbuf).unwrap() {
            assert!(matches!(p, Packet::ConnAck(_) | Packet::SubAck(_)), "{p:?}");
            got += 1;
        }
    }
    raw
}

#[tokio::test]
async fn qos_0_for_a_subscriber_that_stops_reading_is_dropped_and_the_others_keep_going() {
    let mut options = ServerOptions::loopback(ServerTls::from_self_signed(cert()).unwrap());
    options.broker.max_queued_bytes = 1 << 20;
    let s = Server::start(options).await.unwrap();
    let mut stalled = raw_subscriber(s.tcp_addr().unwrap(), "stalled", "flood").await;
    let healthy = client(&url("quic", s.quic_addr()), "healthy").await;
    let mut messages = healthy.messages().unwrap();
    healthy.subscribe(TopicFilter::new("flood").unwrap(), QoS::AtLeastOnce).await.unwrap();
    let publisher = client(&url("mqtt", s.tcp_addr()), "firehose").await;
    let chunk = bytes::Bytes::from(vec![7u8; 32 * 1024]);
    const N: usize = 800; // 25 MiB: far beyond the socket buffers and the 1 MiB allowance
    let consumer = tokio::spawn(async move {
        for _ in 0..N {
            timeout(Duration::from_secs(20), messages.recv()).await.expect("healthy subscriber starved").unwrap();
        }
    });
    for _ in 0..N {
        publisher.publish(Publish::new(topic("flood"), chunk.clone()).with_qos(QoS::AtLeastOnce)).await.unwrap();
    }
    consumer.await.unwrap();
    // The stalled subscriber got what fit in the buffers; the rest was dropped, not queued, and
    // its connection is still there.
    let mut got = 0;
    let mut buf = vec![0u8; 1 << 16];
    while let Ok(n) = timeout(Duration::from_millis(500), tokio::io::AsyncReadExt::read(&mut stalled, &mut buf)).await {
        let n = n.unwrap();
        assert!(n > 0, "the stalled subscriber was disconnected");
        got += n;
    }
    assert!(got < N * chunk.len() / 2, "it was sent {got} bytes");
    assert!(got > 0);
    s.shutdown().await;
}

#[tokio::test]
async fn tcp_listener_connection_limit() {
    let mut options = ServerOptions::loopback(ServerTls::from_self_signed(cert()).unwrap());
    options.tcp_max_connections = 1;
    let s = Server::start(options).await.unwrap();
    let first = client(&url("mqtt", s.tcp_addr()), "first").await;
    let mut second = tokio::net::TcpStream::connect(s.tcp_addr().unwrap()).await.unwrap();
    let mut byte = [0u8; 1];
    let n = timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read(&mut second, &mut byte)).await.unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "the connection over the limit was kept");
    // QUIC is not affected by the TCP listener's limit.
    let other = client(&url("quic", s.quic_addr()), "other").await;
    other.publish(Publish::new(topic("a"), "b")).await.unwrap();
    first.disconnect().await.unwrap();
    s.shutdown().await;
}

#[tokio::test]
async fn a_quic_subscriber_that_stops_reading_entirely_is_cut_off() {
    let mut options = ServerOptions::loopback(ServerTls::from_self_signed(cert()).unwrap());
    options.broker.max_queued_bytes = 256 * 1024;
    let s = Server::start(options).await.unwrap();
    let watcher = client(&url("mqtt", s.tcp_addr()), "watcher").await;
    let mut wills = watcher.messages().unwrap();
    watcher.subscribe(TopicFilter::new("wills/#").unwrap(), QoS::AtLeastOnce).await.unwrap();
    // An application that never takes its messages: with room for one, the client stops
    // reading from the network almost at once, and QUIC flow control holds the broker's sends.
    // Its QoS 1 messages cannot be dropped, so its backlog grows to the hard limit (4 x 256 KiB).
    let mut lazy = ClientOptions::new().client_id("lazy").tls(pinned());
    lazy.message_buffer = 1;
    lazy.session.will = Some(Will {
        topic: topic("wills/lazy"),
        payload: "cut off".into(),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    });
    let lazy = Client::connect(&url("quic", s.quic_addr()), lazy).await.unwrap();
    lazy.subscribe(TopicFilter::new("flood").unwrap(), QoS::AtLeastOnce).await.unwrap();
    let publisher = client(&url("mqtt", s.tcp_addr()), "firehose").await;
    let chunk = bytes::Bytes::from(vec![7u8; 32 * 1024]);
    for _ in 0..200 {
        publisher.publish(Publish::new(topic("flood"), chunk.clone()).with_qos(QoS::AtLeastOnce)).await.unwrap();
    }
    // The broker ended the lazy client's session as if its connection had dropped: its will.
    let will = timeout(Duration::from_secs(10), wills.recv()).await.expect("the lazy subscriber was kept").unwrap();
    assert_eq!(&will.payload[..], b"cut off");
    s.shutdown().await;
}

#[tokio::test]
async fn mqtt_3_1_1_timed_redelivery_when_configured() {
    use mqtt_proto::Decoder;
    let mut options = ServerOptions::loopback(ServerTls::from_self_signed(cert()).unwrap());
    options.broker.session.retry_interval = Some(Duration::from_millis(200));
    let s = Server::start(options).await.unwrap();
    let mut raw = raw_subscriber_at(s.tcp_addr().unwrap(), "forgetful", "r", QoS::AtLeastOnce).await;
    let publisher = client(&url("quic", s.quic_addr()), "p").await;
    publisher.publish(Publish::new(topic("r"), "again").with_qos(QoS::AtLeastOnce)).await.unwrap();
    // The raw client never sends PUBACK: the same message comes again, marked DUP.
    let (mut decoder, mut inbuf, mut seen) = (Decoder::new(Protocol::V3_1_1), BytesMut::new(), Vec::new());
    while seen.len() < 2 {
        let n = timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read_buf(&mut raw, &mut inbuf))
            .await
            .expect("no redelivery")
            .unwrap();
        assert!(n > 0, "closed");
        while let Some(Packet::Publish(p)) = decoder.decode(&mut inbuf).unwrap() {
            seen.push(p);
        }
    }
    assert!(!seen[0].dup && seen[1].dup);
    assert_eq!((seen[0].packet_id(), &seen[1].payload[..]), (seen[1].packet_id(), &b"again"[..]));
    s.shutdown().await;
}

#[tokio::test]
async fn concurrent_publishes_keep_the_order_of_the_calls() {
    let s = server().await;
    let sub = client(&url("mqtt", s.tcp_addr()), "sub").await;
    let mut messages = sub.messages().unwrap();
    sub.subscribe(TopicFilter::new("o").unwrap(), QoS::AtLeastOnce).await.unwrap();
    let publisher = client(&url("quic", s.quic_addr()), "pub").await;
    let mut pending = tokio::task::JoinSet::new();
    for i in 0..200 {
        pending.spawn(publisher.publish(Publish::new(topic("o"), i.to_string()).with_qos(QoS::AtLeastOnce)));
    }
    while let Some(r) = pending.join_next().await {
        r.unwrap().unwrap();
    }
    for i in 0..200 {
        let m = timeout(Duration::from_secs(5), messages.recv()).await.unwrap().unwrap();
        assert_eq!(m.payload, i.to_string());
    }
    s.shutdown().await;
}

/// `state_changes` reports what changes after the call, as in the other adapters: its first
/// `recv` is the next state, not the one the client is in (found in review).
#[tokio::test]
async fn state_changes_start_after_the_call() {
    let s = server().await;
    let c = client(&url("quic", s.quic_addr()), "watcher").await;
    let mut changes = c.state_changes();
    assert!(matches!(c.state(), ConnectionState::Connected { .. }));
    let early = timeout(Duration::from_millis(200), changes.recv()).await;
    assert!(early.is_err(), "nothing changed yet, but recv gave {early:?}");
    c.disconnect().await.unwrap();
    let next = timeout(Duration::from_secs(5), changes.recv()).await.unwrap();
    assert!(matches!(next, Some(ConnectionState::Closed { .. })), "{next:?}");
    s.shutdown().await;
}

/// Data streams over real sockets: a subscriber with a subscription on each of two streams, a
/// publisher publishing on a stream of its own, and a stream handle over TCP (which falls back
/// to the one stream there is).
#[tokio::test]
async fn data_streams_publish_and_receive_over_quic_and_fall_back_over_tcp() {
    let s = server().await;
    let quic = url("quic", s.quic_addr());
    let sub = client(&quic, "stream-sub").await;
    let mut messages = sub.messages().unwrap();
    let a = sub.open_stream(1).await.unwrap();
    let b = sub.open_stream(0).await.unwrap();
    assert_ne!(a.handle(), b.handle());
    assert_eq!(a.subscribe(TopicFilter::new("a/#").unwrap(), QoS::AtLeastOnce).await.unwrap(), QoS::AtLeastOnce);
    assert_eq!(b.subscribe(TopicFilter::new("b/#").unwrap(), QoS::ExactlyOnce).await.unwrap(), QoS::ExactlyOnce);
    let publisher = client(&quic, "stream-pub").await;
    let out = publisher.open_stream(5).await.unwrap();
    out.publish(Publish::new(topic("a/1"), "one").with_qos(QoS::AtLeastOnce)).await.unwrap();
    out.publish(Publish::new(topic("b/1"), "two").with_qos(QoS::ExactlyOnce)).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = timeout(Duration::from_secs(5), messages.recv()).await.expect("message timed out").unwrap();
        got.push(String::from_utf8_lossy(&m.payload).into_owned());
    }
    got.sort();
    assert_eq!(got, ["one", "two"]);
    // Closing a stream ends its subscription: "b/#" no longer delivers, "a/#" still does.
    b.close().await.unwrap();
    out.publish(Publish::new(topic("b/2"), "gone").with_qos(QoS::AtLeastOnce)).await.unwrap();
    out.publish(Publish::new(topic("a/2"), "three").with_qos(QoS::AtLeastOnce)).await.unwrap();
    let m = timeout(Duration::from_secs(5), messages.recv()).await.expect("message timed out").unwrap();
    assert_eq!(&m.payload[..], b"three");

    // Over TCP a stream handle works the same, on the one stream.
    let tcp = client(&url("mqtt", s.tcp_addr()), "stream-tcp").await;
    let t = tcp.open_stream(0).await.unwrap();
    t.publish(Publish::new(topic("a/3"), "four").with_qos(QoS::ExactlyOnce)).await.unwrap();
    let m = timeout(Duration::from_secs(5), messages.recv()).await.expect("message timed out").unwrap();
    assert_eq!(&m.payload[..], b"four");
    drop(t);
    drop(a);
    tcp.disconnect().await.unwrap();
    publisher.disconnect().await.unwrap();
    sub.disconnect().await.unwrap();
    s.shutdown().await;
}

/// A UDP relay to the broker's QUIC port that drops everything while `blocked` (a network
/// that blocks UDP); returns its address.
async fn udp_relay(to: SocketAddr, blocked: std::sync::Arc<std::sync::atomic::AtomicBool>) -> SocketAddr {
    use std::sync::atomic::Ordering;
    let outside = std::sync::Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = outside.local_addr().unwrap();
    tokio::spawn(async move {
        // One client: the relay's inside socket stands for it towards the broker.
        let inside = std::sync::Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let client = std::sync::Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
        let (back_in, back_out, back_client, back_blocked) =
            (inside.clone(), outside.clone(), client.clone(), blocked.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok(n) = back_in.recv(&mut buf).await {
                let to = *back_client.lock().unwrap();
                if let (Some(to), false) = (to, back_blocked.load(Ordering::SeqCst)) {
                    let _ = back_out.send_to(&buf[..n], to).await;
                }
            }
        });
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = outside.recv_from(&mut buf).await {
            if blocked.load(Ordering::SeqCst) {
                continue;
            }
            *client.lock().unwrap() = Some(from);
            let _ = inside.send_to(&buf[..n], to).await;
        }
    });
    addr
}

#[tokio::test]
async fn falls_back_to_tcp_when_udp_is_blocked_and_moves_back_to_quic() {
    use std::sync::atomic::Ordering;
    let s = server().await;
    let blocked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let relay = udp_relay(s.addresses().quic.unwrap(), blocked.clone()).await;
    let mut options = ClientOptions::new().client_id("roamer").tls(pinned());
    options.session.session_expiry = 600;
    options.fallback.handshake_timeout = Duration::from_millis(300);
    options.fallback.retry_primary = Duration::from_millis(500);
    let urls = [format!("quic://localhost:{}", relay.port()), url("mqtt", s.addresses().tcp)];
    let c = timeout(Duration::from_secs(10), Client::connect_urls(&urls, options)).await.unwrap().unwrap();
    let mut messages = c.messages().unwrap();
    c.subscribe(TopicFilter::new("fb/#").unwrap(), QoS::AtLeastOnce).await.unwrap();
    let other = client(&url("mqtt", s.addresses().tcp), "other").await;
    other.publish(Publish::new(topic("fb/1"), "over tcp").with_qos(QoS::AtLeastOnce)).await.unwrap();
    let m = timeout(Duration::from_secs(5), messages.recv()).await.unwrap().unwrap();
    assert_eq!(&m.payload[..], b"over tcp");

    // UDP passes again: the client moves back to QUIC by itself, keeping its subscription
    // (the session was new on TCP: `session_present` now says it moved).
    blocked.store(false, Ordering::SeqCst);
    let mut states = c.state_changes();
    timeout(
        Duration::from_secs(10),
        states.wait_for(|s| matches!(s, ConnectionState::Connected { session_present: true })),
    )
    .await
    .expect("moved back")
    .unwrap();
    other.publish(Publish::new(topic("fb/2"), "over quic").with_qos(QoS::AtLeastOnce)).await.unwrap();
    let m = timeout(Duration::from_secs(5), messages.recv()).await.unwrap().unwrap();
    assert_eq!(&m.payload[..], b"over quic");
    c.disconnect().await.unwrap();
}

/// An edge broker bridged to a cloud broker, over QUIC and over TCP (dialled by the adapter):
/// messages go out and come in, each once.
#[tokio::test]
async fn a_bridge_carries_messages_both_ways_over_quic_and_tcp() {
    use mqtt_quic_core::bridge::config::BridgeConfig;
    let cloud = server().await;
    for upstream in [url("quic", cloud.addresses().quic), url("mqtt", cloud.addresses().tcp)] {
        let mut bridge = BridgeConfig::new("cloud", vec![upstream.parse().unwrap()]);
        bridge.tls = Some(pinned());
        bridge.client_id = format!("edge-{}", upstream.split(':').next().unwrap());
        bridge.mappings = ["up/# out 1 \"\" site/", "down/# in 1"].iter().map(|m| m.parse().unwrap()).collect();
        let mut options = ServerOptions::loopback(ServerTls::from_self_signed(cert()).unwrap());
        options.broker.bridges = vec![bridge];
        let edge = Server::start(options).await.unwrap();

        let at_cloud = client(&url("mqtt", cloud.addresses().tcp), "cloud-app").await;
        let mut cloud_messages = at_cloud.messages().unwrap();
        at_cloud.subscribe(TopicFilter::new("site/#").unwrap(), QoS::AtLeastOnce).await.unwrap();
        let at_edge = client(&url("quic", edge.addresses().quic), "edge-app").await;
        let mut edge_messages = at_edge.messages().unwrap();
        at_edge.subscribe(TopicFilter::new("down/#").unwrap(), QoS::AtLeastOnce).await.unwrap();
        // The bridge connects by itself; its subscription upstream is made once it does.
        let mut delivered = false;
        for i in 0..50 {
            at_cloud
                .publish(Publish::new(topic("down/cmd"), format!("c{i}")).with_qos(QoS::AtLeastOnce))
                .await
                .unwrap();
            if let Ok(Some(m)) = timeout(Duration::from_millis(200), edge_messages.recv()).await {
                assert_eq!(m.topic.as_str(), "down/cmd", "{upstream}");
                delivered = true;
                break;
            }
        }
        assert!(delivered, "{upstream}: nothing came in over the bridge");
        at_edge.publish(Publish::new(topic("up/t"), "reading").with_qos(QoS::AtLeastOnce)).await.unwrap();
        let m = timeout(Duration::from_secs(5), cloud_messages.recv()).await.expect("out over the bridge").unwrap();
        assert_eq!((m.topic.as_str(), &m.payload[..]), ("site/up/t", &b"reading"[..]), "{upstream}");
        at_edge.disconnect().await.unwrap();
        at_cloud.disconnect().await.unwrap();
        edge.shutdown().await;
    }
    cloud.shutdown().await;
}

/// A broker listening on `[::]` bridged over QUIC to an IPv4 upstream: the bridge's packets
/// leave from the broker's dual-stack socket to the IPv4-mapped address.
#[tokio::test]
async fn a_quic_bridge_from_a_dual_stack_socket_to_ipv4() {
    use mqtt_quic_core::bridge::config::BridgeConfig;
    if std::net::UdpSocket::bind("[::]:0").is_err() {
        eprintln!("no IPv6 here: skipped");
        return;
    }
    let cloud = server().await;
    let upstream = format!("quic://127.0.0.1:{}", cloud.addresses().quic.unwrap().port());
    let mut bridge = BridgeConfig::new("cloud", vec![upstream.parse().unwrap()]);
    bridge.tls = Some(ClientTls::insecure());
    bridge.client_id = "edge-v6".into();
    bridge.mappings = vec!["up/# out 1".parse().unwrap()];
    let mut options = ServerOptions::loopback(ServerTls::from_self_signed(cert()).unwrap());
    options.quic = Some("[::]:0".parse().unwrap());
    options.broker.bridges = vec![bridge];
    let edge = Server::start(options).await.unwrap();
    let at_cloud = client(&url("mqtt", cloud.addresses().tcp), "cloud-app").await;
    let mut messages = at_cloud.messages().unwrap();
    at_cloud.subscribe(TopicFilter::new("up/#").unwrap(), QoS::AtLeastOnce).await.unwrap();
    let at_edge = client(&url("mqtt", edge.addresses().tcp), "edge-app").await;
    at_edge.publish(Publish::new(topic("up/t"), "via v4-mapped").with_qos(QoS::AtLeastOnce)).await.unwrap();
    let m = timeout(Duration::from_secs(10), messages.recv()).await.expect("over the bridge").unwrap();
    assert_eq!(&m.payload[..], b"via v4-mapped");
    edge.shutdown().await;
    cloud.shutdown().await;
}
