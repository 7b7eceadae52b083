//! A store in memory for broker machines under test: what a batch does to a disk, and what a
//! restarted broker reads back.

use mqtt_quic_core::persist::{StoreBatch, StoreOp, StoredRecord, Table};
use std::collections::BTreeMap;
use std::time::Duration;

/// Records by table and key.
pub type Disk = BTreeMap<(Table, Vec<u8>), Vec<u8>>;

/// Applies one batch's operations, in order.
pub fn apply(disk: &mut Disk, batch: StoreBatch) {
    for op in batch.ops {
        match op {
            StoreOp::Put { table, key, value } => drop(disk.insert((table, key), value)),
            StoreOp::Delete { table, key } => drop(disk.remove(&(table, key))),
            StoreOp::DeletePrefix { table, prefix } => disk.retain(|(t, k), _| *t != table || !k.starts_with(&prefix)),
        }
    }
}

/// What a restarted broker reads back (all written just now, in virtual time).
pub fn records(disk: &Disk) -> Vec<StoredRecord> {
    disk.iter()
        .map(|((table, key), value)| StoredRecord {
            table: *table,
            key: key.clone(),
            value: value.clone(),
            age: Duration::ZERO,
        })
        .collect()
}
