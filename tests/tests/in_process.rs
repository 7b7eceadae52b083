//! In-process handlers on every broker (mqttd's `@app.subscribe`): `Server::subscribe`,
//! `on_message` and `publish` on the tokio, async-std and mio servers, with the broker's window
//! holding back what an application does not take, without holding up anyone else.

// Real sockets and threads: the wall clock is the only clock here.
#![allow(clippy::disallowed_methods)]

use mqtt_proto::{Publish, QoS, ReasonCode, TopicFilter, TopicName};
use mqtt_quic_core::broker::local::DEFAULT_WINDOW;
use mqtt_quic_core::driver::{ClientOptions, ServerError, ServerOptions};
use mqtt_quic_core::tls::{SelfSigned, ServerTls};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);
/// More than the window and the broker's queue behind it can hold (1,024 + 1,000).
const FLOOD: usize = 2_500;

fn options() -> ServerOptions {
    let cert = SelfSigned::generate(&["localhost"]).unwrap();
    let mut options = ServerOptions::loopback(ServerTls::from_self_signed(&cert).unwrap());
    options.broker.max_topic_levels = 8;
    options
}

fn topic(t: &str) -> TopicName {
    TopicName::new(t).unwrap()
}

/// A client over TCP (the tokio one, on its own runtime) that subscribes to `filter`, then
/// publishes `payload` to `t` at QoS 1, and returns the first message it gets.
fn client_round_trip(tcp: SocketAddr, t: &str, payload: &'static str, filter: &str) -> Publish {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client =
            adapter_tokio::client::Client::connect(&format!("mqtt://{tcp}"), ClientOptions::new()).await.unwrap();
        let mut messages = client.messages().unwrap();
        client.subscribe(TopicFilter::new(filter).unwrap(), QoS::AtLeastOnce).await.unwrap();
        client.publish(Publish::new(topic(t), payload).with_qos(QoS::AtLeastOnce)).await.unwrap();
        let m = tokio::time::timeout(WAIT, messages.recv()).await.unwrap().unwrap();
        client.disconnect().await.unwrap();
        m
    })
}

fn deep() -> Publish {
    Publish::new(topic("a/b/c/d/e/f/g/h/i/j"), "too deep")
}

#[test]
fn tokio_server_subscribe_on_message_and_publish() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(adapter_tokio::server::Server::start(options())).unwrap();
    let tcp = server.tcp_addr().unwrap();
    let mut app = runtime.block_on(server.subscribe(TopicFilter::new("app/#").unwrap(), QoS::AtLeastOnce)).unwrap();
    let counted = Arc::new(AtomicUsize::new(0));
    let count = counted.clone();
    let handler = move |_| {
        count.fetch_add(1, Ordering::SeqCst);
    };
    runtime.block_on(server.on_message(TopicFilter::new("app/#").unwrap(), QoS::AtMostOnce, handler)).unwrap();
    // A stuck subscription: never read.
    let stuck = runtime.block_on(server.subscribe(TopicFilter::new("flood/#").unwrap(), QoS::AtLeastOnce)).unwrap();

    // From a client to the application, and from the application (retained) to a client.
    let state = Publish { retain: true, ..Publish::new(topic("app/state"), "ready").with_qos(QoS::AtLeastOnce) };
    runtime.block_on(server.publish(state)).unwrap();
    let got = client_round_trip(tcp, "app/in", "from a client", "app/state");
    assert_eq!((&got.payload[..], got.retain), (&b"ready"[..], true));
    let first = runtime.block_on(async { tokio::time::timeout(WAIT, app.recv()).await }).unwrap().unwrap();
    let second = runtime.block_on(async { tokio::time::timeout(WAIT, app.recv()).await }).unwrap().unwrap();
    assert_eq!([&first.payload[..], &second.payload[..]], [&b"ready"[..], &b"from a client"[..]]);
    assert!(matches!(
        runtime.block_on(server.publish(deep())),
        Err(ServerError::Refused(ReasonCode::TopicNameInvalid))
    ));

    // The stuck subscription holds its window, the broker queues the rest up to its limit and
    // drops the others, and clients are served meanwhile.
    for i in 0..FLOOD {
        let p = Publish::new(topic(&format!("flood/{}", i % 7)), format!("{i}")).with_qos(QoS::AtLeastOnce);
        runtime.block_on(server.publish(p)).unwrap();
    }
    let got = client_round_trip(tcp, "app/later", "still served", "app/later");
    assert_eq!(&got.payload[..], b"still served");
    let mut stuck = stuck;
    let mut taken = 0;
    while runtime.block_on(async { tokio::time::timeout(Duration::from_millis(500), stuck.recv()).await }).is_ok() {
        taken += 1;
    }
    assert_eq!(taken, DEFAULT_WINDOW + 1_000, "the window, then the broker's queue; the rest dropped");
    let deadline = std::time::Instant::now() + WAIT;
    while counted.load(Ordering::SeqCst) < 3 {
        assert!(std::time::Instant::now() < deadline, "the handler saw the three app/ messages");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(app);
    runtime.block_on(server.shutdown());
}

#[test]
fn async_std_server_subscribe_on_message_and_publish() {
    async_std::task::block_on(async {
        let server = adapter_async_std::server::Server::start(options()).await.unwrap();
        let tcp = server.tcp_addr().unwrap();
        let mut app = server.subscribe(TopicFilter::new("app/#").unwrap(), QoS::AtLeastOnce).await.unwrap();
        let counted = Arc::new(AtomicUsize::new(0));
        let count = counted.clone();
        let handler = move |_| {
            count.fetch_add(1, Ordering::SeqCst);
        };
        server.on_message(TopicFilter::new("app/#").unwrap(), QoS::AtMostOnce, handler).await.unwrap();
        let mut stuck = server.subscribe(TopicFilter::new("flood/#").unwrap(), QoS::AtLeastOnce).await.unwrap();

        let state = Publish { retain: true, ..Publish::new(topic("app/state"), "ready").with_qos(QoS::AtLeastOnce) };
        server.publish(state).await.unwrap();
        let got = client_round_trip(tcp, "app/in", "from a client", "app/state");
        assert_eq!(&got.payload[..], b"ready");
        let first = async_std::future::timeout(WAIT, app.recv()).await.unwrap().unwrap();
        let second = async_std::future::timeout(WAIT, app.recv()).await.unwrap().unwrap();
        assert_eq!([&first.payload[..], &second.payload[..]], [&b"ready"[..], &b"from a client"[..]]);
        assert!(matches!(server.publish(deep()).await, Err(ServerError::Refused(ReasonCode::TopicNameInvalid))));

        for i in 0..FLOOD {
            let p = Publish::new(topic(&format!("flood/{}", i % 7)), format!("{i}")).with_qos(QoS::AtLeastOnce);
            server.publish(p).await.unwrap();
        }
        let got = client_round_trip(tcp, "app/later", "still served", "app/later");
        assert_eq!(&got.payload[..], b"still served");
        let mut taken = 0;
        while async_std::future::timeout(Duration::from_millis(500), stuck.recv()).await.is_ok() {
            taken += 1;
        }
        assert_eq!(taken, DEFAULT_WINDOW + 1_000);
        let deadline = std::time::Instant::now() + WAIT;
        while counted.load(Ordering::SeqCst) < 3 {
            assert!(std::time::Instant::now() < deadline, "the handler saw the three app/ messages");
            async_std::task::sleep(Duration::from_millis(10)).await;
        }
        drop(app);
        server.shutdown().await;
    });
}

#[test]
fn mio_server_subscribe_on_message_and_publish() {
    let server = adapter_mio::server::Server::start(options()).unwrap();
    let tcp = server.tcp_addr().unwrap();
    let mut app = server.subscribe(TopicFilter::new("app/#").unwrap(), QoS::AtLeastOnce).unwrap();
    let counted = Arc::new(AtomicUsize::new(0));
    let count = counted.clone();
    server
        .on_message(TopicFilter::new("app/#").unwrap(), QoS::AtMostOnce, move |_| {
            count.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    let mut stuck = server.subscribe(TopicFilter::new("flood/#").unwrap(), QoS::AtLeastOnce).unwrap();

    let state = Publish { retain: true, ..Publish::new(topic("app/state"), "ready").with_qos(QoS::AtLeastOnce) };
    server.publish(state).unwrap();
    let got = client_round_trip(tcp, "app/in", "from a client", "app/state");
    assert_eq!(&got.payload[..], b"ready");
    let first = app.recv_timeout(WAIT).unwrap();
    let second = app.recv_timeout(WAIT).unwrap();
    assert_eq!([&first.payload[..], &second.payload[..]], [&b"ready"[..], &b"from a client"[..]]);
    assert!(matches!(server.publish(deep()), Err(ServerError::Refused(ReasonCode::TopicNameInvalid))));

    for i in 0..FLOOD {
        let p = Publish::new(topic(&format!("flood/{}", i % 7)), format!("{i}")).with_qos(QoS::AtLeastOnce);
        server.publish(p).unwrap();
    }
    let got = client_round_trip(tcp, "app/later", "still served", "app/later");
    assert_eq!(&got.payload[..], b"still served");
    let mut taken = 0;
    while stuck.recv_timeout(Duration::from_millis(500)).is_some() {
        taken += 1;
    }
    assert_eq!(taken, DEFAULT_WINDOW + 1_000);
    let deadline = std::time::Instant::now() + WAIT;
    while counted.load(Ordering::SeqCst) < 3 {
        assert!(std::time::Instant::now() < deadline, "the handler saw the three app/ messages");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(app);
    server.shutdown();
}
