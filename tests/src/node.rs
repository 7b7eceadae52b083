//! A simulator host that is either the broker machine or a client machine, so tests can put
//! both on one simulated network. Client events are collected as they happen, for the test to
//! read with [`Node::events`].

use mqtt_quic_core::broker::machine::Broker;
use mqtt_quic_core::broker::shard::ShardSet;
use mqtt_quic_core::client::ClientMachine;
use mqtt_quic_core::quic::{self, QuicEndpoint, Transmit};
use mqtt_quic_core::session::client::ClientEvent;
use mqtt_quic_core::{Datagram, Machine};
use std::time::Instant;

/// A broker or a client on the simulated network.
pub enum Node {
    /// The broker.
    Broker(Box<Broker>),
    /// A sharded broker: its shards, driven together.
    Shards(Box<ShardSet>),
    /// A client and the events it has reported so far.
    Client(Box<ClientMachine>, Vec<ClientEvent>),
    /// A bare QUIC endpoint (a client driven packet by packet) and its events so far.
    Quic(Box<QuicEndpoint>, Vec<quic::Event>),
}

impl Node {
    /// A client host.
    pub fn client(client: ClientMachine) -> Node {
        Node::Client(Box::new(client), Vec::new())
    }

    /// The broker machine; panics on a client host (a test bug).
    pub fn as_broker(&mut self) -> &mut Broker {
        match self {
            Node::Broker(b) => b,
            _ => panic!("not the broker"),
        }
    }

    /// The sharded broker; panics on another host (a test bug).
    pub fn as_shards(&mut self) -> &mut ShardSet {
        match self {
            Node::Shards(s) => s,
            _ => panic!("not a sharded broker"),
        }
    }

    /// The client machine; panics on the broker host (a test bug).
    pub fn as_client(&mut self) -> &mut ClientMachine {
        match self {
            Node::Client(c, _) => c,
            _ => panic!("not a client"),
        }
    }

    /// The bare QUIC endpoint and its events; panics on another host (a test bug).
    pub fn as_quic(&mut self) -> (&mut QuicEndpoint, &mut Vec<quic::Event>) {
        match self {
            Node::Quic(q, e) => (q, e),
            _ => panic!("not a bare QUIC host"),
        }
    }

    /// The client's events so far; panics on the broker host (a test bug).
    pub fn events(&mut self) -> &mut Vec<ClientEvent> {
        match self {
            Node::Client(_, e) => e,
            _ => panic!("not a client"),
        }
    }

    fn machine(&mut self) -> &mut dyn Machine {
        match self {
            Node::Broker(b) => b.as_mut(),
            Node::Shards(s) => s.as_mut(),
            Node::Client(c, _) => c.as_mut(),
            Node::Quic(q, _) => q.as_mut(),
        }
    }

    /// Gathers client events; on the broker, answers password checks and store batches at once
    /// (the simulated host has no other thread, and the answers are deterministic).
    fn collect(&mut self, now: Instant) {
        match self {
            Node::Client(c, events) => events.extend(std::iter::from_fn(|| c.poll_event())),
            Node::Quic(q, events) => events.extend(std::iter::from_fn(|| q.poll_event())),
            Node::Broker(b) => {
                answer(b, now);
            }
            Node::Shards(set) => loop {
                // An answer may move work to another shard, which may ask in turn.
                let mut answered = false;
                for b in set.shards() {
                    answered |= answer(b, now);
                }
                set.exchange(now);
                if !answered {
                    break;
                }
            },
        }
    }
}

/// Answers a broker's password checks and store batches at once; returns whether there were
/// any.
fn answer(b: &mut Broker, now: Instant) -> bool {
    let mut answered = false;
    // A store that keeps everything at once (when persistence is on).
    while let Some(batch) = b.poll_store(now) {
        b.handle_stored(now, batch.seq);
        answered = true;
    }
    while let Some(request) = b.poll_auth() {
        let verdict = request.verify();
        b.handle_auth_result(now, request.id(), verdict);
        answered = true;
    }
    answered
}

impl Machine for Node {
    fn handle_datagram(&mut self, now: Instant, datagram: Datagram<'_>) {
        self.machine().handle_datagram(now, datagram);
        self.collect(now);
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.machine().handle_timeout(now);
        self.collect(now);
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        let t = self.machine().poll_transmit(now, buf);
        self.collect(now);
        t
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        self.machine().poll_timeout()
    }
}
