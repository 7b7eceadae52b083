//! The broker's own periodic work and what it tells about itself: the counters published as
//! retained `$SYS/broker/` messages (as mosquitto does), and the clocks that start with the
//! first input (uptime, the next `$SYS` publication, the purge of expired retained messages).
//! A sans-IO machine has no clock of its own, so these run from whatever input comes first
//! after they are due (see `Broker::tick`).

use super::machine::Broker;
use mqtt_proto::Publish;
use std::time::{Duration, Instant};

/// How often expired retained messages are purged.
const HOUSEKEEPING: Duration = Duration::from_secs(60);

/// Counters published under `$SYS/broker/`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// PUBLISH packets received from clients.
    pub messages_received: u64,
    /// PUBLISH packets handed to client sessions.
    pub messages_sent: u64,
    /// Bytes of MQTT stream received.
    pub bytes_received: u64,
    /// Bytes of MQTT stream sent.
    pub bytes_sent: u64,
    /// Messages dropped: QoS 0 ones for clients that were not keeping up, QoS 1 and 2 ones for
    /// offline clients beyond their queue or the offline byte budget.
    pub messages_dropped: u64,
    /// Deliveries held back because the receiver may not read the topic (any more).
    pub messages_denied: u64,
    /// CONNECTs refused for wrong credentials.
    pub auth_failures: u64,
    /// Clients disconnected because their connection took nothing for the write timeout, or
    /// fell four times its backlog limit behind.
    pub stalled_clients: u64,
    /// QUIC datagrams received from clients.
    pub datagrams_received: u64,
    /// QoS 0 messages sent as QUIC datagrams.
    pub datagrams_sent: u64,
    /// Datagrams dropped: received ones that were not a QoS 0 PUBLISH the client could send,
    /// and messages the datagram send buffer had no room for.
    pub datagrams_dropped: u64,
    /// Clients let in (CONNACK accepted), counting reconnects.
    pub connects: u64,
}

impl Stats {
    /// Adds another shard's counters (see `broker::shard`).
    pub(super) fn add(&mut self, other: &Stats) {
        let Stats {
            messages_received,
            messages_sent,
            bytes_received,
            bytes_sent,
            messages_dropped,
            messages_denied,
            auth_failures,
            stalled_clients,
            datagrams_received,
            datagrams_sent,
            datagrams_dropped,
            connects,
        } = other;
        self.messages_received += messages_received;
        self.messages_sent += messages_sent;
        self.bytes_received += bytes_received;
        self.bytes_sent += bytes_sent;
        self.messages_dropped += messages_dropped;
        self.messages_denied += messages_denied;
        self.auth_failures += auth_failures;
        self.stalled_clients += stalled_clients;
        self.datagrams_received += datagrams_received;
        self.datagrams_sent += datagrams_sent;
        self.datagrams_dropped += datagrams_dropped;
        self.connects += connects;
    }

    /// The counters with load averages, in the order of `LOAD_NAMES`.
    fn load_counters(&self) -> [u64; LOADS] {
        [self.messages_received, self.messages_sent, self.bytes_received, self.bytes_sent, self.connects]
    }
}

/// Everything a metrics endpoint reports, at one moment (see [`Broker::metrics`]).
#[derive(Debug, Clone, Default)]
pub struct BrokerMetrics {
    /// The `$SYS` counters.
    pub stats: Stats,
    /// Clients connected now.
    pub connections: usize,
    /// Sessions kept, connected or not.
    pub sessions: usize,
    /// Subscriptions.
    pub subscriptions: usize,
    /// Retained messages.
    pub retained: usize,
    /// Since the broker's first input.
    pub uptime: Duration,
    /// MQTT packets received and sent on clients' control streams, by type.
    pub packets: crate::session::packet_counts::PacketCounts,
    /// The QUIC endpoint: handshakes, 0-RTT, migrations, losses, round-trip times and
    /// congestion windows.
    pub quic: crate::quic::QuicMetrics,
}

impl BrokerMetrics {
    /// Adds another shard's figures (see [`crate::broker::shard`]): counts add up, retained
    /// messages (which every shard keeps) and uptime are the largest, the open connections'
    /// round-trip times and windows are all listed.
    pub fn merge(&mut self, other: BrokerMetrics) {
        self.stats.add(&other.stats);
        self.connections += other.connections;
        self.sessions += other.sessions;
        self.subscriptions += other.subscriptions;
        self.retained = self.retained.max(other.retained);
        self.uptime = self.uptime.max(other.uptime);
        self.packets.add(&other.packets);
        let (q, o) = (&mut self.quic, other.quic);
        q.counters.handshakes += o.counters.handshakes;
        q.counters.zero_rtt_accepted += o.counters.zero_rtt_accepted;
        q.counters.migrations += o.counters.migrations;
        q.counters.lost_packets_closed += o.counters.lost_packets_closed;
        q.counters.sent_packets_closed += o.counters.sent_packets_closed;
        q.lost_packets += o.lost_packets;
        q.sent_packets += o.sent_packets;
        q.rtts.extend(o.rtts);
        q.cwnds.extend(o.cwnds);
    }
}

/// mosquitto's `$SYS/broker/load/...`: rates per minute averaged over 1, 5 and 15 minutes.
#[derive(Debug, Default)]
pub(super) struct Loads {
    /// When the counters were last read, and their values then.
    last: Option<(Instant, [u64; LOADS])>,
    /// Per counter, the 1, 5 and 15 minute averages.
    averages: [[f64; 3]; LOADS],
}

/// The counters with load averages, and their `$SYS` names.
const LOADS: usize = 5;
const LOAD_NAMES: [&str; LOADS] = ["messages/received", "messages/sent", "bytes/received", "bytes/sent", "connections"];
const LOAD_WINDOWS: [(f64, &str); 3] = [(60.0, "1min"), (300.0, "5min"), (900.0, "15min")];

impl Loads {
    /// Takes the counters at `now` into the averages.
    fn update(&mut self, now: Instant, values: [u64; LOADS]) {
        if let Some((at, before)) = self.last {
            let secs = now.saturating_duration_since(at).as_secs_f64();
            if secs > 0.0 {
                for (i, averages) in self.averages.iter_mut().enumerate() {
                    let per_minute = values[i].saturating_sub(before[i]) as f64 * 60.0 / secs;
                    for (avg, (window, _)) in averages.iter_mut().zip(LOAD_WINDOWS) {
                        let keep = (-secs / window).exp();
                        *avg = *avg * keep + per_minute * (1.0 - keep);
                    }
                }
            }
        }
        self.last = Some((now, values));
    }
}

/// The clocks of the periodic work.
#[derive(Default)]
pub(super) struct Schedule {
    started: Option<Instant>,
    next_sys: Option<Instant>,
    next_housekeeping: Option<Instant>,
}

impl Schedule {
    /// The next periodic deadline.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        [self.next_sys, self.next_housekeeping].into_iter().flatten().min()
    }
}

impl Broker {
    /// Starts the clocks that need a first `now` (uptime, `$SYS` publishing), and does the
    /// periodic work that is due.
    pub(super) fn tick(&mut self, now: Instant) {
        self.journal.tick(now);
        let schedule = &mut self.schedule;
        if schedule.started.is_none() {
            schedule.started = Some(now);
            schedule.next_sys = self.config.sys_interval.map(|i| now + i);
            schedule.next_housekeeping = Some(now + HOUSEKEEPING);
            // The load averages count from here.
            self.loads.update(now, self.stats.load_counters());
            self.start_bridges(now);
        }
        let schedule = &mut self.schedule;
        if schedule.next_housekeeping.is_some_and(|at| at <= now) {
            schedule.next_housekeeping = Some(now + HOUSEKEEPING);
            self.retained.purge_expired(now);
            self.prune_versions(now);
        }
        if let (Some(at), Some(interval)) = (self.schedule.next_sys, self.config.sys_interval) {
            if at <= now {
                self.schedule.next_sys = Some(now + interval);
                self.publish_sys(now);
            }
        }
    }

    /// Publishes the statistics as retained messages under `$SYS/broker/`.
    fn publish_sys(&mut self, now: Instant) {
        // In a sharded broker shard 0 publishes for all: the others report to it.
        if self.shard.as_ref().is_some_and(|s| s.index != 0) {
            let report = self.own_report();
            if let Some(shard) = self.shard.as_mut() {
                shard.send(0, super::shard::ShardMessage::Report(report));
            }
            return;
        }
        let total = self.broker_report();
        let stats = total.stats;
        let uptime = self.schedule.started.map_or(0, |s| now.saturating_duration_since(s).as_secs());
        let values = [
            ("clients/connected", total.connected.to_string()),
            ("clients/total", total.sessions.to_string()),
            ("messages/received", stats.messages_received.to_string()),
            ("messages/sent", stats.messages_sent.to_string()),
            ("messages/dropped", stats.messages_dropped.to_string()),
            ("bytes/received", stats.bytes_received.to_string()),
            ("bytes/sent", stats.bytes_sent.to_string()),
            ("subscriptions/count", total.subscriptions.to_string()),
            ("retained messages/count", self.retained.len().to_string()),
            ("messages/denied", stats.messages_denied.to_string()),
            ("clients/auth failures", stats.auth_failures.to_string()),
            ("clients/stalled", stats.stalled_clients.to_string()),
            ("datagrams/received", stats.datagrams_received.to_string()),
            ("datagrams/sent", stats.datagrams_sent.to_string()),
            ("datagrams/dropped", stats.datagrams_dropped.to_string()),
            ("uptime", format!("{uptime} seconds")),
        ];
        self.loads.update(now, stats.load_counters());
        let mut loads = Vec::new();
        for (name, averages) in LOAD_NAMES.iter().zip(self.loads.averages) {
            for ((_, window), avg) in LOAD_WINDOWS.iter().zip(averages) {
                loads.push((format!("load/{name}/{window}"), format!("{avg:.2}")));
            }
        }
        let version = ("version".to_string(), format!("mqtt-quic version {}", env!("CARGO_PKG_VERSION")));
        let values = values
            .into_iter()
            .map(|(n, v)| (n.to_string(), v))
            .chain([version])
            .chain(loads)
            .chain(self.bridge_sys_values());
        for (name, value) in values {
            let Ok(topic) = mqtt_proto::TopicName::new(format!("$SYS/broker/{name}")) else { continue };
            let mut p = Publish::new(topic, value.into_bytes());
            p.retain = true;
            self.publish(now, p, None);
        }
    }

    /// The counters behind `$SYS/broker/`.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Everything a metrics endpoint (Prometheus) reports, now.
    pub fn metrics(&self, now: Instant) -> BrokerMetrics {
        BrokerMetrics {
            stats: self.stats,
            connections: self.connected(),
            sessions: self.sessions(),
            subscriptions: self.subscriptions(),
            retained: self.retained.len(),
            uptime: self.schedule.started.map_or(Duration::ZERO, |s| now.saturating_duration_since(s)),
            packets: self.packets,
            quic: self.links.quic.metrics(),
        }
    }
}
