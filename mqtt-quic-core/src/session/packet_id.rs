//! Packet identifier allocation that never hands out an identifier still in flight.

use mqtt_proto::PacketId;
use std::collections::BTreeSet;

/// Allocates packet identifiers in increasing order (wrapping from 65535 to 1), skipping those
/// still in use. Memory is proportional to the identifiers in use, which the session caps.
#[derive(Debug, Clone)]
pub struct PacketIds {
    next: PacketId,
    in_use: BTreeSet<u16>,
}

impl Default for PacketIds {
    fn default() -> Self {
        PacketIds { next: PacketId::MIN, in_use: BTreeSet::new() }
    }
}

impl PacketIds {
    /// The next free identifier, marked in use; `None` when all 65 535 are in use.
    pub fn allocate(&mut self) -> Option<PacketId> {
        if self.in_use.len() >= usize::from(u16::MAX) {
            return None;
        }
        let mut id = self.next;
        while self.in_use.contains(&id.get()) {
            id = id.next();
        }
        self.in_use.insert(id.get());
        self.next = id.next();
        Some(id)
    }

    /// Marks an identifier in use (restoring a session).
    pub fn mark(&mut self, id: PacketId) {
        self.in_use.insert(id.get());
    }

    /// Frees an identifier.
    pub fn release(&mut self, id: PacketId) {
        self.in_use.remove(&id.get());
    }

    /// Whether an identifier is in use.
    pub fn is_in_use(&self, id: PacketId) -> bool {
        self.in_use.contains(&id.get())
    }

    /// Identifiers in use.
    pub fn len(&self) -> usize {
        self.in_use.len()
    }

    /// Whether none is in use.
    pub fn is_empty(&self) -> bool {
        self.in_use.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_reuses_an_id_in_flight_and_wraps() {
        let mut ids = PacketIds::default();
        let a = ids.allocate().unwrap();
        let b = ids.allocate().unwrap();
        assert_eq!((a.get(), b.get()), (1, 2));
        // Use up everything but a.
        ids.release(b);
        let mut all = vec![];
        while let Some(id) = ids.allocate() {
            all.push(id.get());
        }
        assert_eq!(all.len(), 65_534);
        assert!(!all.contains(&1), "id 1 is still in flight");
        ids.release(a);
        assert_eq!(ids.allocate().map(PacketId::get), Some(1));
    }
}
