//! The check behind the `broker_store` fuzz target: the broker with persistence on, four
//! byte-stream clients sending fuzzer-chosen bytes, an in-memory disk that commits the broker's
//! batches when the fuzzer says, crashes (everything not committed is lost, the broker is
//! rebuilt from the disk), and damage to the disk's bytes. It never panics: journaling,
//! held acknowledgements and restoring hold for any history, and a damaged store is an error
//! from `Broker::restore`, never a panic.

use crate::quic_checks::{advance, drain, fuzz_broker_config, next_record};
use mqtt_quic_core::broker::machine::Broker;
use mqtt_quic_core::persist::{Persistence, StoreBatch, StoreOp, StoredRecord, Table};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The disk: committed records, by table and key.
type Disk = BTreeMap<(Table, Vec<u8>), Vec<u8>>;

fn apply(disk: &mut Disk, batch: &StoreBatch) {
    for op in &batch.ops {
        match op {
            StoreOp::Put { table, key, value } => drop(disk.insert((*table, key.clone()), value.clone())),
            StoreOp::Delete { table, key } => drop(disk.remove(&(*table, key.clone()))),
            StoreOp::DeletePrefix { table, prefix } => disk.retain(|(t, k), _| t != table || !k.starts_with(prefix)),
        }
    }
}

fn records(disk: &Disk, age: Duration) -> Vec<StoredRecord> {
    disk.iter()
        .map(|((table, key), value)| StoredRecord { table: *table, key: key.clone(), value: value.clone(), age })
        .collect()
}

fn new_broker() -> Broker {
    let mut config = fuzz_broker_config();
    config.persistence = Persistence::Sync;
    Broker::new(config).expect("valid config")
}

/// Input: records of `[delay: u8][which: u8][len: u8][len bytes]`. `which` 0..=239 sends the
/// bytes on client `which % 4` (opening it if needed); 240..=243 closes that client; 244
/// commits every batch polled so far and reports them stored; 245 commits the first half;
/// 246 crashes (uncommitted batches are lost) and restores from the disk, the bytes' first one
/// saying how long the broker was down (minutes); 247 XORs the bytes into one record on the
/// disk (damage) before the next restore; others only let time pass.
pub fn broker_store(data: &[u8]) {
    let mut broker = new_broker();
    let mut disk = Disk::new();
    let mut pending: Vec<StoreBatch> = Vec::new();
    #[allow(clippy::disallowed_methods)] // the harness owns the clock
    let mut now = Instant::now();
    let mut streams = [None; 4];
    let mut rest = data;
    while let Some((delay, which, piece)) = next_record(&mut rest) {
        now += Duration::from_millis(u64::from(delay) * 50);
        advance(&mut broker, now);
        let slot = usize::from(which % 4);
        match which {
            0..=239 => {
                let id = *streams[slot].get_or_insert_with(|| broker.handle_stream_open(now, None));
                broker.handle_stream_data(now, id, piece);
            }
            240..=243 => {
                if let Some(id) = streams[slot].take() {
                    broker.handle_stream_closed(now, id);
                }
            }
            244 | 245 => {
                let keep = if which == 244 { 0 } else { pending.len() / 2 };
                let done: Vec<StoreBatch> = pending.drain(..pending.len() - keep).collect();
                for batch in &done {
                    apply(&mut disk, batch);
                }
                if let Some(last) = done.last() {
                    broker.handle_stored(now, last.seq);
                }
            }
            246 => {
                pending.clear();
                streams = [None; 4];
                let down = Duration::from_secs(60 * u64::from(piece.first().copied().unwrap_or(0)));
                broker = new_broker();
                now += down;
                if broker.restore(now, records(&disk, down)).is_err() {
                    // A damaged disk is refused; the operator would move it aside.
                    disk.clear();
                    broker = new_broker();
                }
            }
            247 => {
                let pick = piece.first().map_or(0, |b| usize::from(*b));
                let len = disk.len();
                if let Some(value) = disk.values_mut().nth(pick % len.max(1)) {
                    for (i, b) in piece.iter().skip(1).enumerate() {
                        if let Some(v) = value.get_mut(i) {
                            *v ^= b;
                        } else {
                            value.push(*b);
                        }
                    }
                    if piece.len() == 1 {
                        value.truncate(value.len() / 2);
                    }
                }
            }
            _ => {}
        }
        drain(&mut broker, &mut streams);
        pending.extend(std::iter::from_fn(|| broker.poll_store(now)));
        // Nothing grows without bound while the disk keeps up.
        assert!(pending.len() <= data.len() + 1, "batches pile up: {}", pending.len());
    }
}
