//! MQTT packets received and sent, by type: what a broker reports as metrics (EMQX's
//! `packets_*_received` / `_sent`).

use mqtt_proto::PacketType;

/// Packets by type (indexed by the packet type's number, 1 to 15), each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketCounts {
    received: [u64; 16],
    sent: [u64; 16],
}

impl PacketCounts {
    /// Counts a packet received.
    pub fn received(&mut self, kind: PacketType) {
        self.received[kind as usize] += 1;
    }

    /// Counts a packet sent.
    pub fn sent(&mut self, kind: PacketType) {
        self.sent[kind as usize] += 1;
    }

    /// Adds another count to this one.
    pub fn add(&mut self, other: &PacketCounts) {
        for i in 0..16 {
            self.received[i] += other.received[i];
            self.sent[i] += other.sent[i];
        }
    }

    /// Packets of `kind` received.
    pub fn received_of(&self, kind: PacketType) -> u64 {
        self.received[kind as usize]
    }

    /// Packets of `kind` sent.
    pub fn sent_of(&self, kind: PacketType) -> u64 {
        self.sent[kind as usize]
    }

    /// All packets received.
    pub fn total_received(&self) -> u64 {
        self.received.iter().sum()
    }

    /// All packets sent.
    pub fn total_sent(&self) -> u64 {
        self.sent.iter().sum()
    }
}
