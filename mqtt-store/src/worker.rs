//! Group commit: a thread that owns the store and commits whatever has piled up, together.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use mqtt_quic_core::persist::StoreBatch;

use crate::error::{self, StoreError};
use crate::store::Store;

/// When the worker syncs to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Every commit is synced before it is reported (the broker's `Persistence::Sync`).
    Sync,
    /// Commits are reported once written, without a sync; a sync follows once this long has
    /// passed since the last one, whether or not more batches come (the broker's
    /// `Persistence::Periodic`). A crash loses at most the last interval.
    Periodic(Duration),
}

enum Message {
    Batch(StoreBatch),
    Close,
}

/// A thread owning a [`Store`]: it waits for batches, takes all that are waiting, commits
/// them in one transaction and reports the highest `seq` committed.
///
/// Dropping it without [`close`](StoreWorker::close) also commits what is waiting, durably, and
/// waits for the thread to finish.
#[derive(Debug)]
pub struct StoreWorker {
    sender: Option<Sender<Message>>,
    thread: Option<JoinHandle<Result<(), StoreError>>>,
    path: PathBuf,
}

impl StoreWorker {
    /// Starts the thread. After each commit it calls `notify(Ok(seq))` with the highest `seq`
    /// in it (for the broker's `handle_stored`);
    /// in [`SyncMode::Periodic`] a sync with no new batches is not reported. On an error it
    /// calls `notify(Err(error))` once and stops: what is submitted after that is dropped.
    pub fn spawn(
        store: Store,
        mode: SyncMode,
        notify: impl FnMut(Result<u64, StoreError>) + Send + 'static,
    ) -> StoreWorker {
        let path = store.path().to_path_buf();
        let (sender, receiver) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("mqtt-store".to_string())
            .spawn(move || run(store, mode, receiver, notify))
            .expect("spawning the store thread");
        StoreWorker { sender: Some(sender), thread: Some(thread), path }
    }

    /// Queues `batch` for the next commit. Batches are committed in the order submitted.
    /// Ignored once the worker has stopped on an error.
    pub fn submit(&self, batch: StoreBatch) {
        if let Some(sender) = &self.sender {
            // The thread is gone only after an error it has already reported.
            let _ = sender.send(Message::Batch(batch));
        }
    }

    /// Commits what is waiting, durably, and stops the thread.
    ///
    /// # Errors
    ///
    /// The error that stopped the worker, if one did (the same one `notify` was given), or the
    /// final commit's.
    pub fn close(mut self) -> Result<(), StoreError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), StoreError> {
        if let Some(sender) = self.sender.take() {
            let _ = sender.send(Message::Close);
        }
        match self.thread.take() {
            Some(thread) => match thread.join() {
                Ok(result) => result,
                Err(payload) => Err(error::commit_failed(
                    &self.path,
                    format!("the store thread panicked ({})", error::panic_text(payload.as_ref())),
                )),
            },
            None => Ok(()),
        }
    }
}

impl Drop for StoreWorker {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// The thread: commits groups until closed or an error.
#[allow(clippy::disallowed_methods)] // the store is the I/O side: it reads the clock
fn run(
    mut store: Store,
    mode: SyncMode,
    receiver: Receiver<Message>,
    mut notify: impl FnMut(Result<u64, StoreError>),
) -> Result<(), StoreError> {
    let mut last_sync = Instant::now();
    // Whether a commit since the last sync was not synced (only in Periodic mode).
    let mut unsynced = false;
    let mut batches = Vec::new();
    loop {
        let first = match (mode, unsynced) {
            (SyncMode::Periodic(interval), true) => {
                match receiver.recv_timeout((last_sync + interval).saturating_duration_since(Instant::now())) {
                    Ok(message) => message,
                    Err(RecvTimeoutError::Timeout) => {
                        // Idle, and the interval is up: sync what was written.
                        if let Err(e) = store.commit(&[], true) {
                            notify(Err(e.clone()));
                            return Err(e);
                        }
                        last_sync = Instant::now();
                        unsynced = false;
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => Message::Close,
                }
            }
            _ => receiver.recv().unwrap_or(Message::Close),
        };
        let mut closing = false;
        match first {
            Message::Batch(batch) => batches.push(batch),
            Message::Close => closing = true,
        }
        while !closing {
            match receiver.try_recv() {
                Ok(Message::Batch(batch)) => batches.push(batch),
                Ok(Message::Close) | Err(TryRecvError::Disconnected) => closing = true,
                Err(TryRecvError::Empty) => break,
            }
        }
        let durable = match mode {
            SyncMode::Sync => true,
            SyncMode::Periodic(interval) => closing || last_sync.elapsed() >= interval,
        };
        if batches.is_empty() && !(closing && unsynced) {
            if closing {
                return Ok(());
            }
            continue;
        }
        if let Err(e) = store.commit(&batches, durable) {
            notify(Err(e.clone()));
            return Err(e);
        }
        if durable {
            last_sync = Instant::now();
            unsynced = false;
        } else {
            unsynced = true;
        }
        if let Some(seq) = batches.iter().map(|batch| batch.seq).max() {
            notify(Ok(seq));
        }
        batches.clear();
        if closing {
            return Ok(());
        }
    }
}
