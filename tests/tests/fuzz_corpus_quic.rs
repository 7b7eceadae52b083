//! Replays the committed corpora of the mqtt-quic-core fuzz targets through their checks, and regenerates the seeds
//! (`cargo test -p mqtt-tests --test fuzz_corpus_quic -- --ignored write_seeds`) from a real
//! client's handshake, so the fuzzer starts from datagrams the server accepts.

#[path = "../../fuzz/src/quic_checks.rs"]
mod quic_checks;
#[path = "../../fuzz/src/session_checks.rs"]
mod session_checks;
#[path = "../../fuzz/src/store_checks.rs"]
mod store_checks;

use bytes::Bytes;
use mqtt_quic_core::config::ClientConfig;
use mqtt_quic_core::quic::QuicEndpoint;
use mqtt_quic_core::tls::ClientTls;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/quic_server")
}

fn replay(dir: &str, check: fn(&[u8])) {
    let mut n = 0;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(dir);
    for entry in fs::read_dir(&dir).expect("corpus directory") {
        let path = entry.unwrap().path();
        let data = fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| check(&data));
        assert!(result.is_ok(), "{} fails its check", path.display());
        n += 1;
    }
    assert!(n > 0, "empty corpus {}", dir.display());
}

#[test]
fn replay_quic_corpus() {
    replay("quic_server", quic_checks::quic_server);
}

#[test]
fn replay_sessions_corpus() {
    replay("sessions", quic_checks::sessions);
}

#[test]
fn replay_broker_corpus() {
    replay("broker", quic_checks::broker);
}

#[test]
fn replay_broker_shards_corpus() {
    replay("broker_shards", quic_checks::broker_shards);
}

#[test]
fn replay_broker_store_corpus() {
    replay("broker_store", store_checks::broker_store);
}

#[test]
fn replay_server_session_corpus() {
    replay("server_session", session_checks::server_session);
}

#[test]
fn replay_client_session_corpus() {
    replay("client_session", session_checks::client_session);
}

#[test]
fn replay_broker_quic_corpus() {
    replay("broker_quic", quic_checks::broker_quic);
}

/// Runs one input through its target's check, to study a crash:
/// `FUZZ_TARGET=server_session FUZZ_INPUT=path FUZZ_TRACE=1 cargo test -p mqtt-tests --test
/// fuzz_corpus_quic -- --ignored replay_one --nocapture`.
#[test]
#[ignore = "run by hand with FUZZ_TARGET and FUZZ_INPUT"]
fn replay_one() {
    let target = std::env::var("FUZZ_TARGET").expect("FUZZ_TARGET");
    let data = fs::read(std::env::var("FUZZ_INPUT").expect("FUZZ_INPUT")).expect("readable input");
    match target.as_str() {
        "server_session" => session_checks::server_session(&data),
        "client_session" => session_checks::client_session(&data),
        "broker_quic" => quic_checks::broker_quic(&data),
        "sessions" => quic_checks::sessions(&data),
        "broker" => quic_checks::broker(&data),
        "broker_shards" => quic_checks::broker_shards(&data),
        "broker_store" => store_checks::broker_store(&data),
        "quic_server" => quic_checks::quic_server(&data),
        other => panic!("unknown target {other}"),
    }
}

#[test]
#[ignore = "writes the seed corpus; run by hand"]
fn write_seeds() {
    fs::create_dir_all(corpus()).unwrap();
    for seed in 0..8u64 {
        let mut config = ClientConfig::new(ClientTls::insecure());
        config.seed = seed;
        let mut client = QuicEndpoint::client(&config).unwrap();
        #[allow(clippy::disallowed_methods)]
        let mut now = Instant::now();
        let conn = client.connect(now, "10.0.0.1:14567".parse().unwrap(), "fuzz").unwrap();
        client.send(now, conn, Bytes::from_static(b"\x10\x0c\x00\x04MQTT\x05\x02\x00\x3c\x00")).unwrap();
        let mut out = Vec::new();
        let mut buf = Vec::new();
        // The client's first flight, then its retransmissions as time passes.
        for step in 0..3 {
            while let Some(t) = client.poll_transmit(now, &mut buf) {
                out.extend_from_slice(&[if step == 0 { 0 } else { 200 }, seed as u8]);
                out.extend_from_slice(&(t.size as u16).to_be_bytes());
                out.extend_from_slice(&buf[..t.size]);
            }
            now += Duration::from_millis(400);
            client.handle_timeout(now);
        }
        fs::write(corpus().join(format!("seed-{seed:02}")), out).unwrap();
    }
    // Session seeds: valid packet streams in each direction, cut into pieces.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/sessions");
    fs::create_dir_all(&dir).unwrap();
    let to_server: &[u8] = b"\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x03dev\x32\x08\x00\x01t\x00\x07\x00hi\x82\x07\x00\x02\x00\x00\x01a\x01\xc0\x00\xe0\x00";
    let to_client: &[u8] = b"\x20\x03\x00\x00\x00\x34\x08\x00\x01t\x00\x07\x00hi\x62\x02\x00\x07\xd0\x00";
    for (i, (mode, stream)) in [(0u8, to_server), (2, to_client), (3, to_client)].into_iter().enumerate() {
        let mut out = vec![mode];
        for piece in stream.chunks(5) {
            out.extend_from_slice(&[1, piece.len() as u8]);
            out.extend_from_slice(piece);
        }
        fs::write(dir.join(format!("seed-{i:02}")), out).unwrap();
    }
    // Broker seeds: two clients connect, subscribe, publish (retained, QoS 1/2), one with a will
    // and the same id as the other (takeover), then disconnects.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/broker");
    fs::create_dir_all(&dir).unwrap();
    let connect_a: &[u8] = b"\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x03dev";
    let subscribe: &[u8] = b"\x82\x07\x00\x02\x00\x00\x01a\x01\x82\x07\x00\x03\x00\x00\x01#\x02";
    let publish: &[u8] = b"\x33\x08\x00\x01a\x00\x07\x00hi\x35\x08\x00\x01a\x00\x08\x00yo\x62\x02\x00\x08";
    let connect_will: &[u8] = b"\x10\x1c\x00\x04MQTT\x05\x06\x00\x3c\x00\x00\x03dev\x00\x00\x03w/x\x00\x04gone";
    let records: [&[(u8, u8, &[u8])]; 2] = [
        &[(0, 0, connect_a), (1, 0, subscribe), (1, 1, connect_a), (1, 1, publish), (2, 0, b"\xe0\x00")],
        &[(0, 0, connect_will), (1, 1, connect_a), (1, 1, subscribe), (3, 252, b""), (100, 1, publish)],
    ];
    for (i, script) in records.iter().enumerate() {
        let mut out = Vec::new();
        for (delay, which, bytes) in script.iter() {
            out.extend_from_slice(&[*delay, *which, bytes.len() as u8]);
            out.extend_from_slice(bytes);
        }
        fs::write(dir.join(format!("seed-{i:02}")), out).unwrap();
    }
}
