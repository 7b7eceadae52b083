//! Damaged files: truncated, torn by a crash mid-commit, garbage, flipped bytes. Opening and
//! loading one must never panic, and must give either the state of some complete commit or an
//! error whose one-line message names the file; never an empty store in place of data.

mod common;

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

use common::{apply, as_model, delete, delete_prefix, put, Model, Rng, TempDir};
use mqtt_quic_core::persist::{StoreBatch, Table};
use mqtt_store::{Store, StoreError, FILE_NAME};

/// The outcome of opening and loading the store in `dir`, failing the test on a panic.
fn open_and_load(dir: &Path) -> Result<Model, StoreError> {
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        let store = Store::open(dir)?;
        let records = store.load()?;
        Ok(as_model(&records))
    }));
    match outcome {
        Ok(result) => result,
        Err(_) => panic!("opening or loading {} panicked out of the store", dir.display()),
    }
}

/// Checks an error is one a damaged file should give: one line, naming the file.
fn check_error(error: &StoreError, path: &Path, what: &str) {
    assert!(matches!(error, StoreError::Corrupt { .. } | StoreError::Io { .. }), "{what}: {error:?}");
    let text = error.to_string();
    assert!(!text.contains('\n') && !text.contains('\r'), "{what}: not one line: {text:?}");
    assert!(text.contains(&path.display().to_string()), "{what}: does not name {}: {text}", path.display());
}

/// The commits the damaged files are made from: puts of various sizes in every table,
/// replacements, deletes and prefix deletes, so the file has many pages and freed ones.
fn commits() -> Vec<Vec<StoreBatch>> {
    let mut rng = Rng::new(7);
    let mut seq = 0;
    let mut next = |ops| {
        seq += 1;
        StoreBatch { seq, ops }
    };
    let mut commits = Vec::new();
    for round in 0u8..8 {
        let mut ops = Vec::new();
        for table in Table::ALL {
            for i in 0u8..40 {
                let len = (rng.next() % 600) as usize;
                ops.push(put(table, &[b'k', round % 3, i], &rng.bytes(len)));
            }
        }
        if round % 2 == 1 {
            ops.push(delete_prefix(Table::Messages, &[b'k', 0]));
            ops.push(delete(Table::Sessions, &[b'k', 1, 3]));
        }
        // Two batches per commit, as group commit makes them.
        let second = ops.split_off(ops.len() / 2);
        commits.push(vec![next(ops), next(second)]);
    }
    // A big one, then one that removes most of it (pages freed and reused).
    let big: Vec<_> = (0u16..300).map(|i| put(Table::Retained, &i.to_be_bytes(), &[i as u8; 700])).collect();
    commits.push(vec![next(big)]);
    commits.push(vec![next(vec![delete_prefix(Table::Retained, &[0])])]);
    commits
}

/// A store in `dir` with every commit of [`commits`] made durably, and the model after each
/// (the first entry: empty, before any commit). `snapshot(i, file)` is called after commit
/// `i` (1-based; 0 for the empty store) while the store is still open, as a crash would find
/// the file. The store is closed cleanly at the end.
fn build(dir: &Path, mut snapshot: impl FnMut(usize, &Path)) -> Vec<Model> {
    let mut store = Store::open(dir).unwrap();
    let mut models = vec![Model::new()];
    snapshot(0, store.path());
    for (i, batches) in commits().iter().enumerate() {
        store.commit(batches, true).unwrap();
        let mut model = models.last().unwrap().clone();
        apply(&mut model, batches);
        assert_eq!(as_model(&store.load().unwrap()), model);
        models.push(model);
        snapshot(i + 1, store.path());
    }
    models
}

/// Writes `bytes` as the store file of a fresh directory under `scratch`.
fn store_dir(scratch: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = scratch.join(name);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(FILE_NAME), bytes).unwrap();
    dir
}

fn which(models: &[Model], loaded: &Model) -> Option<usize> {
    models.iter().position(|m| m == loaded)
}

#[test]
fn a_truncated_file_gives_a_complete_commit_or_a_clean_error() {
    let tmp = TempDir::new("truncate");
    let models = build(&tmp.path().join("source"), |_, _| {});
    let full = fs::read(tmp.path().join("source").join(FILE_NAME)).unwrap();
    // The whole file loads the last commit.
    let dir = store_dir(tmp.path(), "whole", &full);
    assert_eq!(which(&models, &open_and_load(&dir).unwrap()), Some(models.len() - 1));

    let mut lengths: Vec<usize> = (0..37).map(|i| full.len() * i / 37).collect();
    lengths.extend([1, 8, 9, 10, 64, 191, 320, 4095, 4096, 4097, 8192, full.len() - 1]);
    lengths.sort_unstable();
    lengths.dedup();
    let mut log = Vec::new();
    for len in lengths {
        let dir = store_dir(tmp.path(), &format!("len-{len}"), &full[..len]);
        let path = dir.join(FILE_NAME);
        match open_and_load(&dir) {
            Ok(loaded) => {
                let commit = which(&models, &loaded);
                assert!(commit.is_some(), "truncated to {len}: loaded a state no commit made");
                log.push(format!("{len}: Ok(commit {})", commit.unwrap()));
            }
            Err(error) => {
                check_error(&error, &path, &format!("truncated to {len}"));
                log.push(format!("{len}: Err({error})"));
            }
        }
        fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!("file of {} bytes truncated:\n{}", full.len(), log.join("\n"));
}

/// A crash in the middle of a commit leaves some of its page writes on disk and not others.
/// Mixing, page by page, the file as it was after commit `k` and after commit `k + 1` (both
/// taken while the store was open, as a crash finds them) makes such files: each must load
/// commit `k` or `k + 1`.
#[test]
fn a_commit_torn_by_a_crash_loads_the_commit_before_or_after() {
    let tmp = TempDir::new("torn");
    let mut snapshots = Vec::new();
    let models = build(&tmp.path().join("source"), |_, file| snapshots.push(fs::read(file).unwrap()));
    const PAGE: usize = 4096;
    let mut rng = Rng::new(11);
    let mut log = Vec::new();
    for k in 0..snapshots.len() - 1 {
        let (old, new) = (&snapshots[k], &snapshots[k + 1]);
        let pages = new.len().div_ceil(PAGE);
        let changed: Vec<usize> = (0..pages)
            .filter(|&p| {
                old.get(p * PAGE..((p + 1) * PAGE).min(new.len()))
                    != Some(&new[p * PAGE..((p + 1) * PAGE).min(new.len())])
            })
            .collect();
        // Which changed pages made it to disk: all (the commit completed), none but the
        // header, all but the header, and random subsets.
        let mut masks: Vec<Vec<bool>> = vec![
            changed.iter().map(|_| true).collect(),
            changed.iter().map(|&p| p == 0).collect(),
            changed.iter().map(|&p| p != 0).collect(),
        ];
        for _ in 0..12 {
            masks.push(changed.iter().map(|_| rng.next() % 2 == 0).collect());
        }
        let mut outcomes = Vec::new();
        for (m, mask) in masks.iter().enumerate() {
            let mut bytes = new.clone();
            for (&page, &landed) in changed.iter().zip(mask) {
                if !landed {
                    let range = page * PAGE..((page + 1) * PAGE).min(new.len());
                    match old.get(range.clone()) {
                        Some(before) => bytes[range].copy_from_slice(before),
                        // The file grew: the page was not there before.
                        None => bytes[range].fill(0),
                    }
                }
            }
            let dir = store_dir(tmp.path(), &format!("torn-{k}-{m}"), &bytes);
            match open_and_load(&dir) {
                Ok(loaded) => {
                    let commit = which(&models, &loaded);
                    if m == 0 {
                        assert_eq!(commit, Some(k + 1), "commit {} completed", k + 1);
                    }
                    assert!(
                        commit == Some(k) || commit == Some(k + 1),
                        "commit {} torn (mask {m}): loaded {commit:?}",
                        k + 1
                    );
                    outcomes.push(format!("{}", commit.unwrap()));
                }
                Err(error) => {
                    check_error(&error, &dir.join(FILE_NAME), &format!("commit {} torn (mask {m})", k + 1));
                    outcomes.push("Err".to_string());
                }
            }
            fs::remove_dir_all(&dir).unwrap();
        }
        log.push(format!("commit {} ({} pages changed): {}", k + 1, changed.len(), outcomes.join(" ")));
    }
    eprintln!("{}", log.join("\n"));
}

#[test]
fn a_file_of_garbage_is_refused() {
    let tmp = TempDir::new("garbage");
    let mut rng = Rng::new(3);
    let garbage = rng.bytes(100_000);
    let dir = store_dir(tmp.path(), "random", &garbage);
    let error = open_and_load(&dir).unwrap_err();
    check_error(&error, &dir.join(FILE_NAME), "random bytes");
    eprintln!("random bytes: {error}");
    // Garbage behind redb's magic number.
    let mut fake = b"redb\x1A\x0A\xA9\x0D\x0A".to_vec();
    fake.extend(rng.bytes(100_000));
    let dir = store_dir(tmp.path(), "magic", &fake);
    let error = open_and_load(&dir).unwrap_err();
    check_error(&error, &dir.join(FILE_NAME), "random bytes after the magic number");
    eprintln!("random bytes after the magic number: {error}");
    // A text file.
    let dir = store_dir(tmp.path(), "text", b"this is not a store\n");
    check_error(&open_and_load(&dir).unwrap_err(), &dir.join(FILE_NAME), "text");
}

#[test]
fn flipped_bytes_never_panic() {
    let tmp = TempDir::new("flip");
    let models = build(&tmp.path().join("source"), |_, _| {});
    let full = fs::read(tmp.path().join("source").join(FILE_NAME)).unwrap();
    let mut log = Vec::new();
    for i in 1..24 {
        let at = full.len() * i / 24;
        let mut bytes = full.clone();
        for b in &mut bytes[at..(at + 16).min(full.len())] {
            *b ^= 0xFF;
        }
        let dir = store_dir(tmp.path(), &format!("flip-{at}"), &bytes);
        match open_and_load(&dir) {
            Ok(loaded) => {
                // Every page is checksummed and checked on open: a change in a page in use is
                // found, so what loads is a state some commit made (here the last).
                let commit = which(&models, &loaded);
                assert!(commit.is_some(), "flipped at {at}: loaded a state no commit made");
                log.push(format!("{at}: Ok(commit {})", commit.unwrap()));
            }
            Err(error) => {
                check_error(&error, &dir.join(FILE_NAME), &format!("flipped at {at}"));
                log.push(format!("{at}: Err({error})"));
            }
        }
        fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!("file of {} bytes, 16 bytes flipped at:\n{}", full.len(), log.join("\n"));
}
