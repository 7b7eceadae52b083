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
    /// Clients disconnected because their connection took nothing for the write timeout.
    pub stalled_clients: u64,
    /// QUIC datagrams received from clients.
    pub datagrams_received: u64,
    /// QoS 0 messages sent as QUIC datagrams.
    pub datagrams_sent: u64,
    /// Datagrams dropped: received ones that were not a QoS 0 PUBLISH the client could send,
    /// and messages the datagram send buffer had no room for.
    pub datagrams_dropped: u64,
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
            self.start_bridges(now);
        }
        let schedule = &mut self.schedule;
        if schedule.next_housekeeping.is_some_and(|at| at <= now) {
            schedule.next_housekeeping = Some(now + HOUSEKEEPING);
            self.retained.purge_expired(now);
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
        let uptime = self.schedule.started.map_or(0, |s| now.saturating_duration_since(s).as_secs());
        let values = [
            ("clients/connected", self.connected().to_string()),
            ("clients/total", self.sessions().to_string()),
            ("messages/received", self.stats.messages_received.to_string()),
            ("messages/sent", self.stats.messages_sent.to_string()),
            ("messages/dropped", self.stats.messages_dropped.to_string()),
            ("bytes/received", self.stats.bytes_received.to_string()),
            ("bytes/sent", self.stats.bytes_sent.to_string()),
            ("subscriptions/count", self.router.len().to_string()),
            ("retained messages/count", self.retained.len().to_string()),
            ("messages/denied", self.stats.messages_denied.to_string()),
            ("clients/auth failures", self.stats.auth_failures.to_string()),
            ("clients/stalled", self.stats.stalled_clients.to_string()),
            ("datagrams/received", self.stats.datagrams_received.to_string()),
            ("datagrams/sent", self.stats.datagrams_sent.to_string()),
            ("datagrams/dropped", self.stats.datagrams_dropped.to_string()),
            ("uptime", format!("{uptime} seconds")),
        ];
        let values = values.into_iter().map(|(n, v)| (n.to_string(), v)).chain(self.bridge_sys_values());
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
}
