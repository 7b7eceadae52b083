//! What the simulation tests do with the client machines of a [`Sim<Node>`]: subscribe, publish
//! and read what arrived, by host.

use crate::node::Node;
use crate::sim::Sim;
use bytes::Bytes;
use mqtt_proto::{PacketId, Publish, QoS, QosPid, Subscription, SubscriptionOptions, TopicFilter, TopicName};
use mqtt_quic_core::session::client::ClientEvent;
use std::time::Duration;

/// Most steps a wait takes before it gives up.
const STEPS: usize = 200_000;

/// Lets 300 ms of virtual time pass (without jumping to far-away deadlines such as a session
/// expiry).
pub fn settle(sim: &mut Sim<Node>) {
    let until = sim.now() + Duration::from_millis(300);
    sim.drive_to(until);
}

/// Subscribes host `host`'s client to `filter` and waits for the SUBACK. Its events are
/// cleared first: what arrives from then on (retained messages included) is the test's to see.
pub fn subscribe(sim: &mut Sim<Node>, host: usize, filter: &str, qos: QoS) {
    sim.machine(host).events().clear();
    let now = sim.now();
    let sub = Subscription {
        filter: TopicFilter::new(filter).expect("a valid filter"),
        options: SubscriptionOptions { qos, ..Default::default() },
    };
    sim.machine(host).as_client().subscribe(now, vec![sub], None).expect("subscribe");
    let subscribed =
        |sim: &mut Sim<Node>| sim.machine(host).events().iter().any(|e| matches!(e, ClientEvent::Subscribed { .. }));
    assert!(sim.drive_until(STEPS, subscribed), "no SUBACK for host {host}");
}

/// Has host `host`'s client publish `payload` to `topic`.
pub fn publish(sim: &mut Sim<Node>, host: usize, topic: &str, payload: &str, qos: QoS, retain: bool) {
    let now = sim.now();
    let mut p = Publish::new(TopicName::new(topic).expect("a valid topic"), Bytes::copy_from_slice(payload.as_bytes()));
    p.qos_pid = QosPid::from_parts(qos, PacketId::MIN);
    p.retain = retain;
    sim.machine(host).as_client().publish(now, p).expect("publish");
}

/// The messages host `host`'s client received so far: topic, payload, retain flag.
pub fn messages(sim: &mut Sim<Node>, host: usize) -> Vec<(String, String, bool)> {
    sim.machine(host)
        .events()
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Message(p) => {
                Some((p.topic.to_string(), String::from_utf8_lossy(&p.payload).into_owned(), p.retain))
            }
            _ => None,
        })
        .collect()
}
