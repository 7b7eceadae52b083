//! Writes a store holding N retained messages and N/10 kept sessions (each subscribed to one
//! filter, with one queued QoS 1 message), through the broker itself, for measuring how long a
//! broker takes to start on it: `cargo run --release -p mqtt-store --example fill -- DIR 100000`,
//! then time `mqttq broker --data-dir DIR` until it prints `ready`.

use bytes::BytesMut;
use mqtt_proto::{
    Connect, MqttString, Packet, PacketId, Protocol, Publish, QoS, QosPid, Subscribe, Subscription, TopicFilter,
    TopicName,
};
use mqtt_quic_core::broker::machine::Broker;
use mqtt_quic_core::broker::machine::BrokerConfig;
use mqtt_quic_core::config::{Secret, ServerConfig};
use mqtt_quic_core::persist::Persistence;
use mqtt_quic_core::tls::{SelfSigned, ServerTls};
use mqtt_store::Store;
use std::time::Instant;

// A measuring tool run by hand: it reads the clock.
#[allow(clippy::disallowed_methods)]
fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(dir), n) = (args.next(), args.next().and_then(|n| n.parse::<usize>().ok()).unwrap_or(100_000)) else {
        eprintln!("usage: fill DIR [RETAINED]");
        std::process::exit(2);
    };
    let tls =
        SelfSigned::generate(&["localhost"]).and_then(|c| ServerTls::from_self_signed(&c)).expect("a certificate");
    let mut config = BrokerConfig::new(ServerConfig::new(tls));
    config.quic.secret = Some(Secret::new([7; 32]));
    config.persistence = Persistence::Sync;
    config.max_retained = n.max(1);
    config.max_sessions = n.max(10);
    config.sys_interval = None;
    let mut broker = Broker::new(config).expect("a broker");
    let mut store = Store::open(std::path::Path::new(&dir)).expect("the store");
    let now = Instant::now();
    let started = Instant::now();
    let mut commit = |broker: &mut Broker| {
        let batches: Vec<_> = std::iter::from_fn(|| broker.poll_store(now)).collect();
        if let Some(last) = batches.last().map(|b| b.seq) {
            store.commit(&batches, true).expect("commit");
            broker.handle_stored(now, last);
        }
        while broker.poll_stream().is_some() {}
    };
    for i in 0..n {
        let mut p =
            Publish::new(TopicName::new(format!("fill/retained/{i}")).unwrap(), format!("value {i}").into_bytes());
        p.retain = true;
        p.qos_pid = QosPid::AtLeastOnce(PacketId::MIN);
        broker.publish_local(now, p).expect("retained");
        if i % 10_000 == 9_999 {
            commit(&mut broker);
        }
    }
    commit(&mut broker);
    for s in 0..n / 10 {
        let id = broker.handle_stream_open(now, None);
        let mut c = Connect::new(Protocol::V5, MqttString::try_from(format!("fill-{s}")).unwrap());
        c.clean_start = true;
        c.properties.session_expiry_interval = Some(86_400);
        let sub = Subscribe {
            packet_id: PacketId::MIN,
            properties: Default::default(),
            subscriptions: vec![Subscription::new(
                TopicFilter::new(format!("fill/session/{s}")).unwrap(),
                QoS::AtLeastOnce,
            )]
            .into(),
        };
        let mut bytes = BytesMut::new();
        Packet::from(c).encode(Protocol::V5, &mut bytes).unwrap();
        Packet::from(sub).encode(Protocol::V5, &mut bytes).unwrap();
        broker.handle_stream_data(now, id, &bytes);
        commit(&mut broker);
        broker.handle_stream_closed(now, id);
        let mut p = Publish::new(TopicName::new(format!("fill/session/{s}")).unwrap(), &b"queued"[..]);
        p.qos_pid = QosPid::AtLeastOnce(PacketId::MIN);
        broker.publish_local(now, p).expect("queued");
        if s % 1000 == 999 {
            commit(&mut broker);
        }
    }
    commit(&mut broker);
    println!(
        "{}: {} retained, {} sessions written in {:.2} s",
        dir,
        broker.retained(),
        broker.sessions(),
        started.elapsed().as_secs_f64()
    );
}
