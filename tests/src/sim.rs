//! A deterministic, sans-IO network for driving real machines without sockets.
//!
//! Time is virtual: the clock jumps straight to the next deadline (a datagram's arrival or a
//! machine's timer), so a 30-second idle timeout costs microseconds. Every random choice (loss,
//! jitter, duplication, reordering) comes from one seeded generator, so the same seed gives the
//! same run. Modelled on quinn-proto's test `Pair` and str0m's `netem`.

use mqtt_quic_core::rng::SplitMix64;
use mqtt_quic_core::Datagram;
use mqtt_quic_core::Machine;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The simulator's seeded generator: decides which packets to lose, delay or duplicate.
#[derive(Debug, Clone)]
pub struct Rng(SplitMix64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(SplitMix64::new(seed))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        self.0.next_f64()
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.next_f64() < p
    }

    /// Uniform in [0, max].
    pub fn duration(&mut self, max: Duration) -> Duration {
        max.mul_f64(self.next_f64())
    }
}

/// How a link treats datagrams (applied per direction, per datagram).
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    /// One-way delay.
    pub latency: Duration,
    /// Extra delay, uniform in [0, jitter] (reorders datagrams when larger than their spacing).
    pub jitter: Duration,
    /// Probability a datagram is lost (outside bursts).
    pub loss: f64,
    /// Bursty loss (Gilbert-Elliott): probability of entering the bad state per datagram, and of
    /// leaving it. In the bad state every datagram is lost.
    pub burst: Option<(f64, f64)>,
    /// Probability a datagram is delivered twice.
    pub duplicate: f64,
    /// Probability a datagram is held back by an extra `latency` (reordering).
    pub reorder: f64,
    /// Datagrams larger than this are dropped.
    pub mtu: usize,
}

impl Default for Link {
    fn default() -> Self {
        Link {
            latency: Duration::from_millis(10),
            jitter: Duration::ZERO,
            loss: 0.0,
            burst: None,
            duplicate: 0.0,
            reorder: 0.0,
            mtu: 1500,
        }
    }
}

/// A datagram in flight.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: Instant,
    seq: u64,
    from: SocketAddr,
    to: SocketAddr,
    data: Vec<u8>,
}

/// Counters, for assertions and reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams handed to the network.
    pub sent: u64,
    /// Datagrams delivered to a host.
    pub delivered: u64,
    /// Datagrams lost (random, burst, MTU, or no host at the address).
    pub lost: u64,
    /// Extra copies delivered.
    pub duplicated: u64,
}

/// A host: a machine at an address.
pub struct Host<M> {
    /// Current address (changes with [`Sim::set_address`]).
    pub addr: SocketAddr,
    /// The machine.
    pub machine: M,
}

/// The simulated network.
pub struct Sim<M> {
    start: Instant,
    now: Instant,
    /// The hosts, by index.
    pub hosts: Vec<Host<M>>,
    link: Link,
    rng: Rng,
    bad_state: bool,
    queue: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    buf: Vec<u8>,
    /// Counters.
    pub stats: Stats,
}

impl<M: Machine> Sim<M> {
    /// An empty network with `link` in both directions between every pair of hosts.
    pub fn new(seed: u64, link: Link) -> Sim<M> {
        // The one real clock reading: the virtual epoch. Nothing depends on its value.
        #[allow(clippy::disallowed_methods)]
        let start = Instant::now();
        Sim {
            start,
            now: start,
            hosts: Vec::new(),
            link,
            rng: Rng::new(seed),
            bad_state: false,
            queue: BinaryHeap::new(),
            seq: 0,
            buf: Vec::with_capacity(65536),
            stats: Stats::default(),
        }
    }

    /// Adds a host; returns its index.
    pub fn add_host(&mut self, addr: SocketAddr, machine: M) -> usize {
        self.hosts.push(Host { addr, machine });
        self.hosts.len() - 1
    }

    /// The virtual time now.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Changes the link for datagrams sent from now on.
    pub fn set_link(&mut self, link: Link) {
        self.link = link;
    }

    /// Moves a host to a new address (NAT rebinding, network switch). Datagrams in flight to the
    /// old address are lost.
    pub fn set_address(&mut self, host: usize, addr: SocketAddr) {
        self.hosts[host].addr = addr;
    }

    /// The machine of a host.
    pub fn machine(&mut self, host: usize) -> &mut M {
        &mut self.hosts[host].machine
    }

    /// Takes every datagram the hosts want to send and puts it on the wire.
    fn collect(&mut self) {
        for i in 0..self.hosts.len() {
            let now = self.now;
            while let Some(t) = self.hosts[i].machine.poll_transmit(now, &mut self.buf) {
                let data = self.buf[..t.size].to_vec();
                let from = self.hosts[i].addr;
                self.send(from, t.destination, data);
            }
        }
    }

    /// Puts one datagram on the wire, through the link's impairments.
    pub fn send(&mut self, from: SocketAddr, to: SocketAddr, data: Vec<u8>) {
        self.stats.sent += 1;
        if let Some((enter, leave)) = self.link.burst {
            self.bad_state = if self.bad_state { !self.rng.chance(leave) } else { self.rng.chance(enter) };
        }
        if data.len() > self.link.mtu || self.bad_state || self.rng.chance(self.link.loss) {
            self.stats.lost += 1;
            return;
        }
        let copies = if self.rng.chance(self.link.duplicate) { 2 } else { 1 };
        for copy in 0..copies {
            let mut delay = self.link.latency + self.rng.duration(self.link.jitter);
            if self.rng.chance(self.link.reorder) {
                delay += self.link.latency;
            }
            if copy == 1 {
                self.stats.duplicated += 1;
            }
            self.seq += 1;
            self.queue.push(Reverse(InFlight { at: self.now + delay, seq: self.seq, from, to, data: data.clone() }));
        }
    }

    /// The instant of the next arrival or timer, after sending what the hosts have.
    pub fn next_event(&mut self) -> Option<Instant> {
        self.collect();
        let next_arrival = self.queue.peek().map(|Reverse(d)| d.at);
        let next_timer = self.hosts.iter_mut().filter_map(|h| h.machine.poll_timeout()).min();
        [next_arrival, next_timer].into_iter().flatten().min()
    }

    /// Runs everything that happens up to `until` and leaves the clock there (it never jumps
    /// past `until`, unlike stepping).
    pub fn drive_to(&mut self, until: Instant) {
        while self.next_event().is_some_and(|t| t <= until) {
            self.step();
        }
        self.now = self.now.max(until);
    }

    /// One step: send what the hosts have, jump to the next arrival or timer, and handle
    /// everything due then. Returns false when nothing is left to happen.
    pub fn step(&mut self) -> bool {
        self.collect();
        let next_arrival = self.queue.peek().map(|Reverse(d)| d.at);
        let next_timer = self.hosts.iter_mut().filter_map(|h| h.machine.poll_timeout()).min();
        let Some(next) = [next_arrival, next_timer].into_iter().flatten().min() else {
            return false;
        };
        self.now = self.now.max(next);
        while self.queue.peek().is_some_and(|Reverse(d)| d.at <= self.now) {
            let Some(Reverse(d)) = self.queue.pop() else { break };
            match self.hosts.iter_mut().find(|h| h.addr == d.to) {
                Some(h) => {
                    self.stats.delivered += 1;
                    h.machine.handle_datagram(
                        self.now,
                        Datagram { remote: d.from, local_ip: Some(d.to.ip()), ecn: None, data: &d.data },
                    );
                }
                None => self.stats.lost += 1,
            }
        }
        for h in &mut self.hosts {
            if h.machine.poll_timeout().is_some_and(|t| t <= self.now) {
                h.machine.handle_timeout(self.now);
            }
        }
        self.collect();
        true
    }

    /// Steps until `done` returns true (checked after every step), at most `max_steps` times.
    /// Returns whether `done` became true.
    pub fn drive_until(&mut self, max_steps: usize, mut done: impl FnMut(&mut Sim<M>) -> bool) -> bool {
        for _ in 0..max_steps {
            if done(self) {
                return true;
            }
            if !self.step() {
                return done(self);
            }
        }
        done(self)
    }

    /// Steps until nothing is left to happen, at most `max_steps` times; returns the steps used.
    pub fn drive(&mut self, max_steps: usize) -> usize {
        (0..max_steps).take_while(|_| self.step()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_roughly_uniform() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let xs: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        let mut r = Rng::new(1);
        let hits = (0..100_000).filter(|_| r.chance(0.2)).count();
        assert!((19_000..21_000).contains(&hits), "{hits}");
    }
}
