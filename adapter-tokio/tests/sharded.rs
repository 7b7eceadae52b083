//! The tokio broker with several shards over real loopback sockets: each shard a broker task
//! with its own UDP socket on the shared QUIC port, connections spread by the kernel and
//! round robin, sessions on their client id's home shard.

use adapter_tokio::client::{Client, ClientOptions};
use adapter_tokio::server::{Server, ServerError, ServerOptions};
use mqtt_proto::{Publish, QoS, TopicFilter, TopicName};
use mqtt_quic_core::persist::Persistence;
use mqtt_quic_core::tls::{fingerprint_hex, ClientTls, SelfSigned, ServerTls};
use std::sync::OnceLock;
use std::time::Duration;
use tokio::time::timeout;

fn cert() -> &'static SelfSigned {
    static CERT: OnceLock<SelfSigned> = OnceLock::new();
    CERT.get_or_init(|| SelfSigned::generate(&["localhost"]).unwrap())
}

fn options(shards: u16) -> ServerOptions {
    let mut options = ServerOptions::loopback(ServerTls::from_self_signed(cert()).unwrap());
    options.tls = Some("127.0.0.1:0".parse().unwrap());
    options.shards = shards;
    options
}

async fn client(url: &str, id: &str, expiry: u32) -> Client {
    let mut options =
        ClientOptions::new().client_id(id).tls(ClientTls::pinned(&fingerprint_hex(&cert().fingerprint)).unwrap());
    options.session.session_expiry = expiry;
    options.session.clean_start = expiry == 0;
    timeout(Duration::from_secs(10), Client::connect(url, options)).await.expect("connect timed out").unwrap()
}

fn urls(s: &Server) -> [String; 3] {
    let a = s.addresses();
    [
        format!("quic://localhost:{}", a.quic.unwrap().port()),
        format!("mqtt://localhost:{}", a.tcp.unwrap().port()),
        format!("mqtts://localhost:{}", a.tls.unwrap().port()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_client_hears_every_publisher_in_order_across_shards() {
    let s = Server::start(options(4)).await.unwrap();
    let urls = urls(&s);
    let mut subscribers = Vec::new();
    for i in 0..9 {
        let c = client(&urls[i % 3], &format!("sub-{i}"), 0).await;
        let messages = c.messages().unwrap();
        c.subscribe(TopicFilter::new("feed/#").unwrap(), QoS::AtLeastOnce).await.unwrap();
        subscribers.push((c, messages));
    }
    let mut publishers = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        publishers.push(client(url, &format!("pub-{i}"), 0).await);
    }
    const N: usize = 50;
    for n in 0..N {
        for (i, p) in publishers.iter().enumerate() {
            let m = Publish::new(TopicName::new(format!("feed/{i}")).unwrap(), format!("{n}"));
            p.publish(m.with_qos(QoS::AtLeastOnce)).await.unwrap();
        }
    }
    assert_eq!(s.metrics().await.unwrap().connections, 12, "every shard's clients, added up");
    for (c, messages) in &mut subscribers {
        let mut next = [0usize; 3];
        for _ in 0..3 * N {
            let m = timeout(Duration::from_secs(10), messages.recv()).await.expect("a message is missing").unwrap();
            let from: usize = m.topic.as_str()["feed/".len()..].parse().unwrap();
            let n: usize = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
            assert_eq!(n, next[from], "publisher {from}'s messages in order");
            next[from] += 1;
        }
        c.disconnect().await.unwrap();
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kept_sessions_survive_a_restart_and_another_number_of_shards_is_refused() {
    let dir = std::env::temp_dir().join(format!("mqttq-sharded-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let durable = |shards| {
        let mut o = options(shards);
        o.broker.persistence = Persistence::Sync;
        o.data_dir = Some(dir.clone());
        o
    };
    let s = Server::start(durable(4)).await.unwrap();
    let first = urls(&s);
    // Sessions homed on different shards, reached through whichever shard takes them.
    let ids: Vec<String> = (0..6).map(|i| format!("keeper-{i}")).collect();
    for id in &ids {
        let c = client(&first[1], id, 3600).await;
        c.subscribe(TopicFilter::new("jobs/#").unwrap(), QoS::AtLeastOnce).await.unwrap();
        c.disconnect().await.unwrap();
    }
    let p = client(&first[0], "dispatcher", 0).await;
    for n in 0..20 {
        // Acknowledged means kept, on every shard that holds a subscriber.
        let m = Publish::new(TopicName::new("jobs/x").unwrap(), format!("{n}")).with_qos(QoS::AtLeastOnce);
        p.publish(m).await.unwrap();
    }
    p.disconnect().await.unwrap();
    s.shutdown().await;

    let wrong = Server::start(durable(2)).await.err().expect("a store of 4 shards opened with 2");
    assert!(matches!(&wrong, ServerError::Store(m) if m.contains("--shards 4")), "{wrong}");

    let s = Server::start(durable(4)).await.unwrap();
    let again = urls(&s);
    for id in &ids {
        let c = client(&again[0], id, 3600).await;
        let mut messages = c.messages().unwrap();
        for n in 0..20 {
            let m =
                timeout(Duration::from_secs(10), messages.recv()).await.expect("a kept message is missing").unwrap();
            assert_eq!(&m.payload[..], n.to_string().as_bytes());
        }
        c.disconnect().await.unwrap();
    }
    s.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
