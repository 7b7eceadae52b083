//! The group-commit worker: order of notifications, everything on disk after close, periodic
//! syncs.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::{apply, as_model, delete, put, Model, TempDir};
use mqtt_quic_core::persist::{StoreBatch, Table};
use mqtt_store::{Store, StoreError, StoreWorker, SyncMode, FILE_NAME};

/// Batch `seq`: a put of its own record, and a delete of the previous batch's scratch key.
fn batch(seq: u64) -> StoreBatch {
    let table = Table::ALL[(seq % 4) as usize];
    StoreBatch {
        seq,
        ops: vec![
            put(table, &seq.to_be_bytes(), format!("value {seq}").as_bytes()),
            delete(Table::Wills, b"scratch"),
            put(Table::Wills, b"scratch", &seq.to_be_bytes()),
        ],
    }
}

/// Spawns a worker whose notifications arrive on the returned channel.
fn spawn(store: Store, mode: SyncMode) -> (StoreWorker, mpsc::Receiver<Result<u64, StoreError>>) {
    let (sender, receiver) = mpsc::channel();
    let worker = StoreWorker::spawn(store, mode, move |stored| {
        let _ = sender.send(stored);
    });
    (worker, receiver)
}

/// Submits batches 1..=n from this thread, closes, and returns the notified seqs.
fn run(dir: &std::path::Path, mode: SyncMode, n: u64) -> Vec<u64> {
    let (worker, notified) = spawn(Store::open(dir).unwrap(), mode);
    for seq in 1..=n {
        worker.submit(batch(seq));
    }
    worker.close().unwrap();
    notified.try_iter().map(|stored| stored.unwrap()).collect()
}

fn expected(n: u64) -> Model {
    let mut model = Model::new();
    apply(&mut model, &(1..=n).map(batch).collect::<Vec<_>>());
    model
}

#[test]
fn sync_mode_reports_increasing_seqs_up_to_the_last_and_stores_everything() {
    let tmp = TempDir::new("worker-sync");
    let seqs = run(tmp.path(), SyncMode::Sync, 1000);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(seqs.last(), Some(&1000));
    eprintln!("1000 batches in {} commits", seqs.len());
    let loaded = as_model(&Store::open(tmp.path()).unwrap().load().unwrap());
    assert_eq!(loaded, expected(1000));
    assert_eq!(loaded.len(), 1001);
}

#[test]
fn periodic_mode_stores_everything_by_close() {
    let tmp = TempDir::new("worker-periodic");
    // An interval longer than the test: only close makes the commits durable.
    let seqs = run(tmp.path(), SyncMode::Periodic(Duration::from_secs(3600)), 1000);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(seqs.last(), Some(&1000));
    assert_eq!(as_model(&Store::open(tmp.path()).unwrap().load().unwrap()), expected(1000));
}

#[test]
fn dropping_the_worker_stores_what_was_submitted() {
    let tmp = TempDir::new("worker-drop");
    for mode in [SyncMode::Sync, SyncMode::Periodic(Duration::from_secs(3600))] {
        let (worker, _notified) = spawn(Store::open(tmp.path()).unwrap(), mode);
        for seq in 1..=50 {
            worker.submit(batch(seq));
        }
        drop(worker);
        assert_eq!(as_model(&Store::open(tmp.path()).unwrap().load().unwrap()), expected(50), "{mode:?}");
    }
}

#[test]
fn closing_an_idle_worker_is_fine() {
    let tmp = TempDir::new("worker-idle");
    let (worker, notified) = spawn(Store::open(tmp.path()).unwrap(), SyncMode::Sync);
    worker.close().unwrap();
    assert!(notified.try_iter().next().is_none());
    // The thread let go of the file.
    assert!(Store::open(tmp.path()).unwrap().load().unwrap().is_empty());
}

/// What a crash would find now: the store file copied and opened elsewhere.
fn crash_copy(dir: &std::path::Path, scratch: &std::path::Path) -> Model {
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch).unwrap();
    std::fs::copy(dir.join(FILE_NAME), scratch.join(FILE_NAME)).unwrap();
    as_model(&Store::open(scratch).unwrap().load().unwrap())
}

#[test]
fn periodic_mode_syncs_when_the_interval_is_up_even_when_idle() {
    let tmp = TempDir::new("worker-interval");
    let dir = tmp.path().join("store");
    let scratch = tmp.path().join("crash");
    // First a long interval: the commit is reported, but not synced, so a crash loses it.
    {
        let (worker, notified) = spawn(Store::open(&dir).unwrap(), SyncMode::Periodic(Duration::from_secs(3600)));
        worker.submit(batch(1));
        assert_eq!(notified.recv_timeout(Duration::from_secs(10)).unwrap().unwrap(), 1);
        assert_eq!(crash_copy(&dir, &scratch), Model::new());
        worker.close().unwrap();
        assert_eq!(crash_copy(&dir, &scratch), expected(1));
    }
    // Then a short one: the first commit comes within the interval, so it is not synced; with
    // nothing more submitted, the worker syncs it once the interval is up.
    // (5 s: room for a loaded machine between the report and the copy below.)
    let (worker, notified) = spawn(Store::open(&dir).unwrap(), SyncMode::Periodic(Duration::from_secs(5)));
    worker.submit(batch(2));
    assert_eq!(notified.recv_timeout(Duration::from_secs(10)).unwrap().unwrap(), 2);
    assert_eq!(crash_copy(&dir, &scratch), expected(1));
    // Up to about 20 s.
    let mut tries = 0;
    while crash_copy(&dir, &scratch) != expected(2) {
        tries += 1;
        assert!(tries < 1000, "batch 2 never synced");
        std::thread::sleep(Duration::from_millis(20));
    }
    worker.close().unwrap();
    // No notification for a sync without new batches.
    assert!(notified.try_iter().next().is_none());
}

#[test]
fn a_worker_whose_notify_panics_reports_it_on_close() {
    let tmp = TempDir::new("worker-panic");
    let worker = StoreWorker::spawn(Store::open(tmp.path()).unwrap(), SyncMode::Sync, |_| panic!("notify failed"));
    worker.submit(batch(1));
    // Ignored or not (the thread may be gone already), it must not block or panic.
    worker.submit(batch(2));
    let error = worker.close().unwrap_err();
    assert!(matches!(&error, StoreError::Commit { detail, .. } if detail.contains("notify failed")), "{error:?}");
    assert!(error.to_string().contains(FILE_NAME));
}
