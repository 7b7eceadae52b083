//! Which embedded store for the broker's persistence (issue 20): redb and fjall on the broker's
//! workload, on this machine's disk. Run: `cargo run --release -- DIR` (DIR on the disk the
//! broker's data directory would use). Prints one line per engine and scenario.

// A benchmark measures wall-clock time: the repository's ban on reading the clock is for the
// sans-IO core.
#![allow(clippy::disallowed_methods)]

use redb::{ReadableDatabase, ReadableTable};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const VALUE: usize = 128;

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "/tmp/store-choice".into()));
    let n: u64 = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(20_000);
    println!("engine | scenario | result");
    for engine in [Engine::Redb, Engine::Fjall] {
        for batch in [1u64, 16, 64, 256] {
            let d = fresh(&dir, engine, "commit");
            let (t, commits) = queue(engine, &d, n.min(batch * 2_000), batch, false);
            let msgs = n.min(batch * 2_000);
            println!(
                "{engine:?} | queue puts, {batch} per durable commit | {:.0} msg/s, {:.0} commits/s",
                msgs as f64 / t.as_secs_f64(),
                commits as f64 / t.as_secs_f64()
            );
        }
        let d = fresh(&dir, engine, "churn");
        let (t, _) = queue(engine, &d, n, 64, true);
        println!("{engine:?} | queue put + delete, 64 per durable commit | {:.0} msg/s", n as f64 / t.as_secs_f64());
        let d = fresh(&dir, engine, "restart");
        let (write, open, bytes) = restart(engine, &d);
        println!(
            "{engine:?} | 100k retained + 10k sessions | written in {:.2} s, reopened and read in {:.3} s, {:.1} MB on disk",
            write.as_secs_f64(),
            open.as_secs_f64(),
            bytes as f64 / 1e6
        );
    }
}

#[derive(Debug, Clone, Copy)]
enum Engine {
    Redb,
    Fjall,
}

fn fresh(dir: &Path, engine: Engine, what: &str) -> PathBuf {
    let d = dir.join(format!("{engine:?}-{what}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        total += if m.is_dir() { disk_usage(&e.path()) } else { m.len() };
    }
    total
}

const QUEUE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("queue");
const RETAINED: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("retained");
const SESSIONS: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("sessions");

/// `n` queued messages, `batch` per durable commit; with `churn`, each commit also removes the
/// batch before (a queue in steady state: delivered and acknowledged). Returns the time and the
/// commits.
fn queue(engine: Engine, dir: &Path, n: u64, batch: u64, churn: bool) -> (Duration, u64) {
    let value = vec![7u8; VALUE];
    let behind = |seq: u64| (churn && seq >= batch).then(|| seq - batch);
    let start = Instant::now();
    let mut commits = 0;
    let mut seq: u64 = 0;
    match engine {
        Engine::Redb => {
            let db = redb::Database::create(dir.join("db")).unwrap();
            while seq < n {
                let tx = db.begin_write().unwrap();
                {
                    let mut t = tx.open_table(QUEUE).unwrap();
                    for _ in 0..batch {
                        t.insert(seq, value.as_slice()).unwrap();
                        if let Some(old) = behind(seq) {
                            t.remove(old).unwrap();
                        }
                        seq += 1;
                    }
                }
                tx.commit().unwrap();
                commits += 1;
            }
        }
        Engine::Fjall => {
            let ks = fjall::Database::builder(dir).manual_journal_persist(true).open().unwrap();
            let queue = ks.keyspace("queue", fjall::KeyspaceCreateOptions::default).unwrap();
            while seq < n {
                let mut b = ks.batch();
                for _ in 0..batch {
                    b.insert(&queue, seq.to_be_bytes(), value.as_slice());
                    if let Some(old) = behind(seq) {
                        b.remove(&queue, old.to_be_bytes());
                    }
                    seq += 1;
                }
                b.commit().unwrap();
                ks.persist(fjall::PersistMode::SyncAll).unwrap();
                commits += 1;
            }
        }
    }
    (start.elapsed(), commits)
}

fn retained(i: u32) -> (Vec<u8>, Vec<u8>) {
    (format!("site/{:03}/device/{:06}/telemetry", i % 997, i).into_bytes(), vec![1u8; 200])
}

fn session(i: u32) -> (Vec<u8>, Vec<u8>) {
    (format!("client-{i:08}").into_bytes(), vec![2u8; 300])
}

/// Writes 100k retained messages and 10k sessions (1,000 per commit), closes the store, and
/// times opening it again and reading everything (what a broker does at start).
fn restart(engine: Engine, dir: &Path) -> (Duration, Duration, u64) {
    let start = Instant::now();
    match engine {
        Engine::Redb => {
            let db = redb::Database::create(dir.join("db")).unwrap();
            for chunk in 0..110u32 {
                let tx = db.begin_write().unwrap();
                {
                    let mut r = tx.open_table(RETAINED).unwrap();
                    let mut s = tx.open_table(SESSIONS).unwrap();
                    for i in chunk * 1000..(chunk + 1) * 1000 {
                        if i < 100_000 {
                            let (k, v) = retained(i);
                            r.insert(k.as_slice(), v.as_slice()).unwrap();
                        } else {
                            let (k, v) = session(i - 100_000);
                            s.insert(k.as_slice(), v.as_slice()).unwrap();
                        }
                    }
                }
                tx.commit().unwrap();
            }
        }
        Engine::Fjall => {
            let ks = fjall::Database::builder(dir).manual_journal_persist(true).open().unwrap();
            let r = ks.keyspace("retained", fjall::KeyspaceCreateOptions::default).unwrap();
            let s = ks.keyspace("sessions", fjall::KeyspaceCreateOptions::default).unwrap();
            for chunk in 0..110u32 {
                let mut b = ks.batch();
                for i in chunk * 1000..(chunk + 1) * 1000 {
                    if i < 100_000 {
                        let (k, v) = retained(i);
                        b.insert(&r, k, v);
                    } else {
                        let (k, v) = session(i - 100_000);
                        b.insert(&s, k, v);
                    }
                }
                b.commit().unwrap();
                ks.persist(fjall::PersistMode::SyncAll).unwrap();
            }
        }
    }
    let write = start.elapsed();
    let start = Instant::now();
    let mut read = 0usize;
    match engine {
        Engine::Redb => {
            let db = redb::Database::create(dir.join("db")).unwrap();
            let tx = db.begin_read().unwrap();
            for def in [RETAINED, SESSIONS] {
                let t = tx.open_table(def).unwrap();
                for e in t.iter().unwrap() {
                    let (k, v) = e.unwrap();
                    read += k.value().len() + v.value().len();
                }
            }
        }
        Engine::Fjall => {
            let ks = fjall::Database::builder(dir).open().unwrap();
            for name in ["retained", "sessions"] {
                let p = ks.keyspace(name, fjall::KeyspaceCreateOptions::default).unwrap();
                for e in p.iter() {
                    let (k, v) = e.into_inner().unwrap();
                    read += k.len() + v.len();
                }
            }
        }
    }
    assert_eq!(
        read,
        100_000 * 200 + 10_000 * 300 + (0..100_000).map(|i| retained(i).0.len()).sum::<usize>() + 10_000 * 15
    );
    (write, start.elapsed(), disk_usage(dir))
}
