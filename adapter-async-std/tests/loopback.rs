//! The async-std broker and client over real loopback sockets.

use adapter_async_std::client::{Client, ConnectionState};
use adapter_async_std::server::{Server, ServerOptions};
use async_std::future::timeout;
use mqtt_proto::{Publish, QoS, TopicFilter, TopicName};
use mqtt_quic_core::driver::ClientOptions;
use mqtt_quic_core::tls::{ClientTls, SelfSigned, ServerTls};
use std::time::Duration;

fn server_options() -> ServerOptions {
    ServerOptions::loopback(ServerTls::from_self_signed(&SelfSigned::generate(&["localhost"]).unwrap()).unwrap())
}

fn options(id: &str) -> ClientOptions {
    ClientOptions::new().client_id(id).tls(ClientTls::insecure())
}

#[test]
fn qos_0_1_2_over_quic_and_tcp() {
    async_std::task::block_on(async {
        let server = Server::start(server_options()).await.unwrap();
        let quic = format!("quic://{}", server.quic_addr().unwrap());
        let tcp = format!("mqtt://{}", server.tcp_addr().unwrap());
        for (from, to) in [(&quic, &quic), (&tcp, &tcp), (&tcp, &quic), (&quic, &tcp)] {
            let sub = Client::connect(to, options("sub")).await.unwrap();
            let mut messages = sub.messages().unwrap();
            sub.subscribe(TopicFilter::new("t/#").unwrap(), QoS::ExactlyOnce).await.unwrap();
            let publisher = Client::connect(from, options("pub")).await.unwrap();
            for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce].into_iter().enumerate() {
                let p = Publish::new(TopicName::new(format!("t/{i}")).unwrap(), format!("m{i}")).with_qos(qos);
                publisher.publish(p).await.unwrap();
            }
            for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce].into_iter().enumerate() {
                let m = timeout(Duration::from_secs(5), messages.recv()).await.expect("timed out").unwrap();
                assert_eq!((m.topic.as_str(), m.qos()), (format!("t/{i}").as_str(), qos), "{from} -> {to}");
            }
            publisher.disconnect().await.unwrap();
            sub.disconnect().await.unwrap();
            assert!(matches!(sub.state(), ConnectionState::Closed { .. }));
        }
        server.shutdown().await;
    });
}

#[test]
fn server_shutdown_is_seen_by_clients() {
    async_std::task::block_on(async {
        let server = Server::start(server_options()).await.unwrap();
        let mut o = options("watcher");
        o.reconnect = None;
        let client = Client::connect(&format!("mqtt://{}", server.tcp_addr().unwrap()), o).await.unwrap();
        let mut changes = client.state_changes();
        server.shutdown().await;
        let state = timeout(Duration::from_secs(5), async {
            loop {
                if let s @ ConnectionState::Closed { .. } = changes.recv().await.unwrap() {
                    return s;
                }
            }
        })
        .await
        .expect("never closed");
        assert!(format!("{state:?}").contains("0x8B"), "{state:?}");
    });
}

#[test]
fn data_streams_carry_their_own_subscriptions_and_publishes() {
    async_std::task::block_on(async {
        let server = Server::start(server_options()).await.unwrap();
        let quic = format!("quic://{}", server.quic_addr().unwrap());
        let sub = Client::connect(&quic, options("sub")).await.unwrap();
        let mut messages = sub.messages().unwrap();
        let a = sub.open_stream(1).await.unwrap();
        assert_eq!(a.subscribe(TopicFilter::new("a/#").unwrap(), QoS::AtLeastOnce).await.unwrap(), QoS::AtLeastOnce);
        let publisher = Client::connect(&quic, options("pub")).await.unwrap();
        let out = publisher.open_stream(0).await.unwrap();
        out.publish(Publish::new(TopicName::new("a/1").unwrap(), "one").with_qos(QoS::ExactlyOnce)).await.unwrap();
        let m = timeout(Duration::from_secs(5), messages.recv()).await.expect("timed out").unwrap();
        assert_eq!(&m.payload[..], b"one");
        // Closing the stream ends its subscription.
        a.close().await.unwrap();
        out.publish(Publish::new(TopicName::new("a/2").unwrap(), "gone").with_qos(QoS::AtLeastOnce)).await.unwrap();
        sub.subscribe(TopicFilter::new("marker").unwrap(), QoS::AtLeastOnce).await.unwrap();
        publisher
            .publish(Publish::new(TopicName::new("marker").unwrap(), "m").with_qos(QoS::AtLeastOnce))
            .await
            .unwrap();
        let m = timeout(Duration::from_secs(5), messages.recv()).await.expect("timed out").unwrap();
        assert_eq!(m.topic.as_str(), "marker", "the closed stream's subscription still delivered");
        drop(out);
        publisher.disconnect().await.unwrap();
        sub.disconnect().await.unwrap();
        server.shutdown().await;
    });
}

#[test]
fn falls_back_to_tcp_when_nothing_answers_on_udp() {
    async_std::task::block_on(async {
        let server = Server::start(server_options()).await.unwrap();
        // A UDP port that takes datagrams and never answers (a network that drops UDP).
        let hole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let urls = [format!("quic://{}", hole.local_addr().unwrap()), format!("mqtt://{}", server.tcp_addr().unwrap())];
        let mut o = options("fallback");
        o.fallback.handshake_timeout = Duration::from_millis(300);
        #[allow(clippy::disallowed_methods)] // a real-socket test reads the real clock
        let started = std::time::Instant::now();
        let c = timeout(Duration::from_secs(10), Client::connect_urls(&urls, o)).await.unwrap().unwrap();
        assert!(started.elapsed() >= Duration::from_millis(300));
        let mut messages = c.messages().unwrap();
        c.subscribe(TopicFilter::new("fb").unwrap(), QoS::AtLeastOnce).await.unwrap();
        c.publish(Publish::new(TopicName::new("fb").unwrap(), "tcp").with_qos(QoS::AtLeastOnce)).await.unwrap();
        let m = timeout(Duration::from_secs(5), messages.recv()).await.expect("timed out").unwrap();
        assert_eq!(&m.payload[..], b"tcp");
        c.disconnect().await.unwrap();
        server.shutdown().await;
    });
}
