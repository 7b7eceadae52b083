//! A deterministic load for profiling the QUIC path of the broker: a publisher and a subscriber
//! client machine and the broker machine, joined in memory (no sockets, virtual time), route
//! `N` QoS 1 messages of 64 bytes. Run it under `valgrind --tool=callgrind` twice with
//! different `N`; the difference in instructions divided by the difference in messages is the
//! cost of one routed message end to end (publisher, broker and subscriber, QUIC and TLS
//! included), free of the machine's noise:
//!
//! ```sh
//! cargo build --release -p mqtt-quic-core --example quic_route
//! valgrind --tool=callgrind target/release/examples/quic_route 2000
//! valgrind --tool=callgrind target/release/examples/quic_route 12000
//! ```

use mqtt_proto::{Publish, QoS, Subscription, TopicFilter, TopicName};
use mqtt_quic_core::broker::machine::{Broker, BrokerConfig};
use mqtt_quic_core::client::{ClientMachine, ClientMachineConfig};
use mqtt_quic_core::config::{ClientConfig, ServerConfig};
use mqtt_quic_core::session::client::{ClientEvent, ClientSessionConfig};
use mqtt_quic_core::tls::{ClientTls, SelfSigned, ServerTls};
use mqtt_quic_core::Datagram;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Messages the publisher keeps unacknowledged (its Receive Maximum window).
const WINDOW: usize = 64;

struct Net {
    broker: Broker,
    clients: Vec<ClientMachine>,
    addrs: Vec<SocketAddr>,
    broker_addr: SocketAddr,
    now: Instant,
    buf: Vec<u8>,
    received: usize,
    published: usize,
}

impl Net {
    /// Moves every datagram until nobody has anything to send; returns how many moved.
    fn exchange(&mut self) -> usize {
        let mut moved = 0;
        loop {
            let mut any = false;
            for i in 0..self.clients.len() {
                while let Some(t) = self.clients[i].poll_transmit_batch(self.now, 10, &mut self.buf) {
                    for d in t.datagrams(&self.buf) {
                        self.broker.handle_datagram(self.now, Datagram::new(self.addrs[i], d));
                        moved += 1;
                    }
                    any = true;
                }
            }
            while let Some(t) = self.broker.poll_transmit_batch(self.now, 10, &mut self.buf) {
                let i = self.addrs.iter().position(|a| *a == t.destination).expect("a known client");
                for d in t.datagrams(&self.buf) {
                    self.clients[i].handle_datagram(self.now, Datagram::new(self.broker_addr, d));
                    moved += 1;
                }
                any = true;
            }
            while self.broker.poll_event().is_some() {}
            for (i, client) in self.clients.iter_mut().enumerate() {
                while let Some(e) = client.poll_event() {
                    match e {
                        ClientEvent::Message(_) if i == 1 => self.received += 1,
                        ClientEvent::Published { .. } if i == 0 => self.published += 1,
                        _ => {}
                    }
                }
            }
            if !any {
                return moved;
            }
        }
    }

    /// Advances the clock by 50 µs and fires what is due.
    fn tick(&mut self) {
        self.now += Duration::from_micros(50);
        self.broker.handle_timeout(self.now);
        for c in self.clients.iter_mut() {
            c.handle_timeout(self.now);
        }
    }
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let cert = SelfSigned::generate(&["broker.test"]).expect("certificate");
    let mut quic = ServerConfig::new(ServerTls::from_self_signed(&cert).expect("TLS"));
    quic.seed = 1;
    let broker = Broker::new(BrokerConfig::new(quic)).expect("broker");
    let broker_addr: SocketAddr = "10.0.0.1:14567".parse().expect("address");
    #[allow(clippy::disallowed_methods)] // the example is the driver: it owns the clock
    let now = Instant::now();
    let addrs: Vec<SocketAddr> = vec!["10.0.1.1:50001".parse().expect("a"), "10.0.1.2:50002".parse().expect("b")];
    let clients = ["publisher", "subscriber"]
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut qc = ClientConfig::new(ClientTls::insecure());
            qc.seed = i as u64 + 1;
            let session = ClientSessionConfig { client_id: (*id).into(), ..Default::default() };
            let config = ClientMachineConfig {
                quic: qc,
                session,
                server: broker_addr,
                server_name: "broker.test".into(),
                reconnect: None,
            };
            let mut c = ClientMachine::new(config).expect("client");
            c.start(now).expect("start");
            c
        })
        .collect();
    let mut net = Net { broker, clients, addrs, broker_addr, now, buf: Vec::new(), received: 0, published: 0 };
    while !net.clients.iter().all(ClientMachine::is_connected) {
        net.exchange();
        net.tick();
    }
    let filter = TopicFilter::new("sensors/#").expect("filter");
    net.clients[1].subscribe(net.now, vec![Subscription::new(filter, QoS::AtLeastOnce)], None).expect("subscribe");
    for _ in 0..20 {
        net.exchange();
        net.tick();
    }
    let topic = TopicName::new("sensors/device-0042/temperature").expect("topic");
    let payload = bytes::Bytes::from(vec![0x5a; 64]);
    let mut sent = 0;
    while net.received < n {
        while sent < n && sent - net.published < WINDOW {
            let p = Publish::new(topic.clone(), payload.clone()).with_qos(QoS::AtLeastOnce);
            net.clients[0].publish(net.now, p).expect("publish");
            sent += 1;
        }
        net.exchange();
        net.tick();
    }
    println!("routed {} QoS 1 messages", net.received);
}
