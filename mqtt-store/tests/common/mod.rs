//! Helpers shared by the store's tests: temporary directories and a model of the tables.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use mqtt_quic_core::persist::{StoreBatch, StoreOp, StoredRecord, Table};

/// A directory under the system's temporary directory, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("mqtt-store-test-{}-{label}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the store should hold: (table, key) -> value.
pub type Model = BTreeMap<(Table, Vec<u8>), Vec<u8>>;

/// Applies `batches` to `model` the way the store should.
pub fn apply(model: &mut Model, batches: &[StoreBatch]) {
    for op in batches.iter().flat_map(|b| &b.ops) {
        match op {
            StoreOp::Put { table, key, value } => {
                model.insert((*table, key.clone()), value.clone());
            }
            StoreOp::Delete { table, key } => {
                model.remove(&(*table, key.clone()));
            }
            StoreOp::DeletePrefix { table, prefix } => {
                model.retain(|(t, k), _| !(t == table && k.starts_with(prefix)));
            }
        }
    }
}

/// The loaded records as a model (ages dropped), checking no (table, key) comes twice.
pub fn as_model(records: &[StoredRecord]) -> Model {
    let mut model = Model::new();
    for record in records {
        let old = model.insert((record.table, record.key.clone()), record.value.clone());
        assert!(old.is_none(), "loaded twice: {:?} {:?}", record.table, record.key);
    }
    model
}

pub fn put(table: Table, key: &[u8], value: &[u8]) -> StoreOp {
    StoreOp::Put { table, key: key.to_vec(), value: value.to_vec() }
}

pub fn delete(table: Table, key: &[u8]) -> StoreOp {
    StoreOp::Delete { table, key: key.to_vec() }
}

pub fn delete_prefix(table: Table, prefix: &[u8]) -> StoreOp {
    StoreOp::DeletePrefix { table, prefix: prefix.to_vec() }
}

/// A deterministic pseudo-random generator (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}
