//! The store: round trips across reopen, deletes, op order, ages, format version.

mod common;

use std::time::Duration;

use common::{apply, as_model, delete, delete_prefix, put, Model, TempDir};
use mqtt_quic_core::persist::{StoreBatch, Table, FORMAT_VERSION};
use mqtt_store::{Store, StoreError, FILE_NAME};
use redb::{Database, TableDefinition};

fn batch(seq: u64, ops: Vec<mqtt_quic_core::persist::StoreOp>) -> StoreBatch {
    StoreBatch { seq, ops }
}

#[test]
fn a_new_store_is_created_with_its_directory_and_is_empty() {
    let tmp = TempDir::new("new");
    let dir = tmp.path().join("a").join("b");
    let store = Store::open(&dir).unwrap();
    assert_eq!(store.path(), dir.join(FILE_NAME));
    assert!(store.path().is_file());
    assert!(!dir.join("mqttq.redb.tmp").exists());
    assert!(store.load().unwrap().is_empty());
    drop(store);
    // Reopening an empty store is fine too.
    assert!(Store::open(&dir).unwrap().load().unwrap().is_empty());
}

#[test]
fn records_of_every_table_survive_a_reopen() {
    let tmp = TempDir::new("roundtrip");
    let mut model = Model::new();
    {
        let mut store = Store::open(tmp.path()).unwrap();
        let mut ops = Vec::new();
        for table in Table::ALL {
            for i in 0u8..20 {
                ops.push(put(table, &[table.name().as_bytes(), &[i]].concat(), &vec![i; usize::from(i) * 10]));
            }
        }
        // Empty keys and values are records too.
        ops.push(put(Table::Wills, b"", b""));
        let batches = [batch(1, ops)];
        store.commit(&batches, true).unwrap();
        apply(&mut model, &batches);
        assert_eq!(as_model(&store.load().unwrap()), model);
    }
    let store = Store::open(tmp.path()).unwrap();
    assert_eq!(as_model(&store.load().unwrap()), model);
    assert_eq!(model.len(), 81);
}

#[test]
fn non_durable_commits_are_read_back_and_kept_by_a_clean_close() {
    let tmp = TempDir::new("nondurable");
    let mut model = Model::new();
    {
        let mut store = Store::open(tmp.path()).unwrap();
        for seq in 1..=5u64 {
            let batches = [batch(seq, vec![put(Table::Messages, &seq.to_be_bytes(), b"m")])];
            store.commit(&batches, false).unwrap();
            apply(&mut model, &batches);
        }
        assert_eq!(as_model(&store.load().unwrap()), model);
        // A durable commit of nothing syncs what came before.
        store.commit(&[], true).unwrap();
    }
    assert_eq!(as_model(&Store::open(tmp.path()).unwrap().load().unwrap()), model);
}

#[test]
fn delete_and_delete_prefix() {
    let tmp = TempDir::new("delete");
    let mut store = Store::open(tmp.path()).unwrap();
    let mut model = Model::new();
    let keys: Vec<Vec<u8>> = vec![
        b"a".to_vec(),
        b"a/1".to_vec(),
        b"a/2".to_vec(),
        b"ab".to_vec(),
        b"b".to_vec(),
        vec![0x01, 0xFF],
        vec![0x01, 0xFF, 0x00],
        vec![0x02],
        vec![0xFF],
        vec![0xFF, 0xFF],
        vec![0xFF, 0xFF, 0x07],
        vec![0xFE, 0xFF],
    ];
    let fill: Vec<_> = Table::ALL.iter().flat_map(|&t| keys.iter().map(move |k| put(t, k, k))).collect();
    let steps = [
        vec![delete(Table::Sessions, b"a/1"), delete(Table::Sessions, b"missing")],
        vec![delete_prefix(Table::Messages, b"a/")],
        vec![delete_prefix(Table::Messages, &[0x01, 0xFF])],
        // Prefixes at the end of the key space: no key is greater than all of theirs.
        vec![delete_prefix(Table::Retained, &[0xFF, 0xFF])],
        vec![delete_prefix(Table::Retained, &[0xFF])],
        vec![delete_prefix(Table::Wills, b"nothing-here")],
        // The empty prefix empties the table.
        vec![delete_prefix(Table::Wills, b"")],
    ];
    let first = [batch(1, fill)];
    store.commit(&first, true).unwrap();
    apply(&mut model, &first);
    for (i, ops) in steps.into_iter().enumerate() {
        let batches = [batch(i as u64 + 2, ops)];
        store.commit(&batches, true).unwrap();
        apply(&mut model, &batches);
        assert_eq!(as_model(&store.load().unwrap()), model, "after step {i}");
    }
    // Spot checks of the model itself, so the comparison above means what it should.
    let present = |t: Table, k: &[u8]| model.contains_key(&(t, k.to_vec()));
    assert!(!present(Table::Sessions, b"a/1") && present(Table::Sessions, b"a/2"));
    assert!(present(Table::Messages, b"a") && !present(Table::Messages, b"a/2") && present(Table::Messages, b"ab"));
    assert!(!present(Table::Messages, &[0x01, 0xFF, 0x00]) && present(Table::Messages, &[0x02]));
    assert!(present(Table::Retained, &[0xFE, 0xFF]) && !present(Table::Retained, &[0xFF]));
    assert!(!model.keys().any(|(t, _)| *t == Table::Wills));
    drop(store);
    assert_eq!(as_model(&Store::open(tmp.path()).unwrap().load().unwrap()), model);
}

#[test]
fn ops_apply_in_order_within_and_across_batches() {
    let tmp = TempDir::new("order");
    let mut store = Store::open(tmp.path()).unwrap();
    let t = Table::Sessions;
    let batches = [
        // Within a batch: put then delete -> absent; delete then put -> present.
        batch(1, vec![put(t, b"x", b"1"), delete(t, b"x"), delete(t, b"y"), put(t, b"y", b"2")]),
        // Replacing, then a prefix delete, then a put under the prefix.
        batch(2, vec![put(t, b"z", b"old"), put(t, b"z", b"new"), put(t, b"p/1", b"a"), delete_prefix(t, b"p/")]),
        batch(3, vec![put(t, b"p/2", b"b")]),
        // Across batches in one commit: put in one, delete in the next, and the reverse.
        batch(4, vec![put(t, b"w", b"3")]),
        batch(5, vec![delete(t, b"w"), delete(t, b"v")]),
        batch(6, vec![put(t, b"v", b"4")]),
    ];
    store.commit(&batches, true).unwrap();
    let mut expected = Model::new();
    for (k, v) in [(&b"y"[..], &b"2"[..]), (b"z", b"new"), (b"p/2", b"b"), (b"v", b"4")] {
        expected.insert((t, k.to_vec()), v.to_vec());
    }
    let mut model = Model::new();
    apply(&mut model, &batches);
    assert_eq!(model, expected);
    assert_eq!(as_model(&store.load().unwrap()), expected);
}

#[test]
fn a_record_loaded_right_away_is_young() {
    let tmp = TempDir::new("age");
    let mut store = Store::open(tmp.path()).unwrap();
    store.commit(&[batch(1, vec![put(Table::Retained, b"t", b"v")])], true).unwrap();
    let records = store.load().unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].value, b"v");
    assert!(records[0].age < Duration::from_secs(5), "{:?}", records[0].age);
}

const META: TableDefinition<'static, &'static str, u32> = TableDefinition::new("meta");

#[test]
fn a_store_from_a_newer_version_is_refused() {
    let tmp = TempDir::new("toonew");
    drop(Store::open(tmp.path()).unwrap());
    let path = tmp.path().join(FILE_NAME);
    {
        let db = Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META).unwrap().insert("format_version", FORMAT_VERSION + 1).unwrap();
        txn.commit().unwrap();
    }
    let error = Store::open(tmp.path()).unwrap_err();
    assert!(
        matches!(error, StoreError::TooNew { found, supported, .. } if found == FORMAT_VERSION + 1 && supported == FORMAT_VERSION),
        "{error:?}"
    );
    let text = error.to_string();
    assert!(text.contains(&format!("format {}", FORMAT_VERSION + 1)), "{text}");
    assert!(text.contains(&format!("format {FORMAT_VERSION}")), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(!text.contains('\n'));
}

#[test]
fn a_store_without_a_format_version_is_corrupt() {
    let tmp = TempDir::new("nometa");
    let path = tmp.path().join(FILE_NAME);
    {
        // A redb file with data but no meta table.
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        let sessions: TableDefinition<'static, &[u8], &[u8]> = TableDefinition::new("sessions");
        txn.open_table(sessions).unwrap().insert(&b"k"[..], &[0u8; 9][..]).unwrap();
        txn.commit().unwrap();
    }
    let error = Store::open(tmp.path()).unwrap_err();
    assert!(matches!(error, StoreError::Corrupt { .. }), "{error:?}");
    assert!(error.to_string().contains(&path.display().to_string()));
    // And with a meta table but no version in it.
    {
        let db = Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META).unwrap();
        txn.commit().unwrap();
    }
    assert!(matches!(Store::open(tmp.path()), Err(StoreError::Corrupt { .. })));
}

#[test]
fn a_value_too_short_for_its_stamp_is_corrupt() {
    let tmp = TempDir::new("short");
    drop(Store::open(tmp.path()).unwrap());
    let path = tmp.path().join(FILE_NAME);
    {
        let db = Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        let wills: TableDefinition<'static, &[u8], &[u8]> = TableDefinition::new("wills");
        txn.open_table(wills).unwrap().insert(&b"k"[..], &[1u8; 7][..]).unwrap();
        txn.commit().unwrap();
    }
    let store = Store::open(tmp.path()).unwrap();
    let error = store.load().unwrap_err();
    assert!(matches!(&error, StoreError::Corrupt { detail, .. } if detail.contains("wills")), "{error:?}");
    assert!(error.to_string().contains(&path.display().to_string()));
}

#[test]
fn an_empty_file_is_refused_not_started_empty() {
    let tmp = TempDir::new("zero");
    let path = tmp.path().join(FILE_NAME);
    std::fs::write(&path, b"").unwrap();
    let error = Store::open(tmp.path()).unwrap_err();
    assert!(matches!(error, StoreError::Corrupt { .. }), "{error:?}");
    // Refused, and left as it was.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
}

#[test]
fn a_file_held_by_another_store_is_in_use() {
    let tmp = TempDir::new("inuse");
    let _first = Store::open(tmp.path()).unwrap();
    let error = Store::open(tmp.path()).unwrap_err();
    assert!(matches!(error, StoreError::InUse { .. }), "{error:?}");
    assert!(error.to_string().contains(FILE_NAME));
}

#[test]
fn a_leftover_temporary_file_does_not_stop_creation() {
    let tmp = TempDir::new("leftover");
    std::fs::write(tmp.path().join("mqttq.redb.tmp"), b"half made").unwrap();
    let store = Store::open(tmp.path()).unwrap();
    assert!(store.load().unwrap().is_empty());
    assert!(!tmp.path().join("mqttq.redb.tmp").exists());
}
