//! Real-socket fixtures for the client-store tests of every adapter: a temporary directory
//! that cleans up after itself, and a "broker" that never acknowledges anything.

use bytes::BytesMut;
use mqtt_proto::{Decoder, Packet, Protocol, Publish};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// A temporary directory removed when dropped (kept, and printed, when the test failed).
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory path for test `name` (removed first if a previous run left it).
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("mqttq-client-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept for inspection: {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A "broker" on loopback TCP that accepts one connection, answers CONNECT with a CONNACK
/// (no session present), and then only reads: every PUBLISH it gets goes on the channel, none
/// is ever acknowledged.
pub fn silent_broker() -> (SocketAddr, mpsc::Receiver<Publish>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else { return };
        let mut decoder = Decoder::new(Protocol::V5);
        let mut buf = BytesMut::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            while let Ok(Some(packet)) = decoder.decode(&mut buf) {
                match packet {
                    Packet::Connect(_) => {
                        let mut out = BytesMut::new();
                        Packet::ConnAck(Box::default()).encode(Protocol::V5, &mut out).unwrap();
                        stream.write_all(&out).unwrap();
                    }
                    Packet::Publish(p) => drop(tx.send(p)),
                    _ => {}
                }
            }
        }
    });
    (addr, rx)
}
