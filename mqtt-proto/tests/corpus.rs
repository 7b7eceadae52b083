//! Replays every committed fuzz corpus file (`fuzz/corpus/<target>/*`) through the same check its
//! fuzz target runs, so CI covers the corpora on the stable toolchain without cargo-fuzz.
//!
//! `cargo test -p mqtt-proto --test corpus -- --ignored write_seeds` regenerates the seed files
//! from the proptest strategies (fixed seed, so the same files every time).

#[path = "../../fuzz/src/checks.rs"]
#[allow(dead_code)]
mod checks;
mod common;

use bytes::BytesMut;
use mqtt_proto::{Packet, Protocol};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, TestRng, TestRunner};
use std::fs;
use std::path::PathBuf;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

#[test]
fn replay_corpora() {
    let mut total = 0;
    for (target, check) in checks::TARGETS {
        let dir = corpus_dir().join(target);
        let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()));
        let mut n = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            let data = fs::read(&path).unwrap();
            // A panic names the file, so a failing corpus entry is easy to reproduce with
            // `cargo fuzz run <target> <file>`.
            let result = std::panic::catch_unwind(|| check(&data));
            assert!(result.is_ok(), "{target}: {} fails its check", path.display());
            n += 1;
        }
        assert!(n > 0, "corpus {target} is empty");
        total += n;
    }
    eprintln!("replayed {total} corpus files");
}

#[test]
#[ignore = "writes the seed corpus; run by hand"]
fn write_seeds() {
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha),
    );
    for (protocol, target) in [(Protocol::V3_1_1, "decode_v3"), (Protocol::V5, "decode_v5")] {
        let dir = corpus_dir().join(target);
        fs::create_dir_all(&dir).unwrap();
        let strategy = common::packet(protocol);
        for i in 0..48 {
            let packet = strategy.new_tree(&mut runner).unwrap().current();
            let mut out = BytesMut::new();
            let wire = match &packet {
                Packet::Connect(c) => c.protocol,
                _ => protocol,
            };
            packet.encode(wire, &mut out).unwrap();
            fs::write(dir.join(format!("seed-{i:02}")), &out).unwrap();
            if target == "decode_v5" && i < 24 {
                // Fragmented-decoding seeds: version byte, eight cut sizes, then the stream.
                let frag = corpus_dir().join("decode_fragmented");
                fs::create_dir_all(&frag).unwrap();
                let mut data = vec![1u8, 1, 2, 3, 5, 8, 13, 1, 1];
                data.extend_from_slice(&out);
                data.extend_from_slice(&out);
                fs::write(frag.join(format!("seed-{i:02}")), data).unwrap();
            }
        }
    }
    let dir = corpus_dir().join("roundtrip");
    fs::create_dir_all(&dir).unwrap();
    let bytes = proptest::collection::vec(proptest::num::u8::ANY, 16..256);
    for i in 0..32 {
        fs::write(dir.join(format!("seed-{i:02}")), bytes.new_tree(&mut runner).unwrap().current()).unwrap();
    }
}
