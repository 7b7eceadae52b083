//! `adapter-tokio`: the MQTT-over-QUIC core driven by tokio.
//!
//! - [`server::Server`] runs the broker: MQTT over QUIC on UDP, plain MQTT on TCP and MQTT over
//!   TLS on TCP, all into one [`Broker`](mqtt_quic_core::broker::machine::Broker) machine, so a
//!   TCP publisher reaches a QUIC subscriber and the other way.
//! - [`client::Client`] is the async client for `quic://`, `mqtt://` and `mqtts://` brokers.
//! - The `mqttq` binary (broker, pub, sub, shell) is built on both.
//!
//! This crate does only input/output and timekeeping: every protocol decision (keep-alive,
//! retries, backoff, routing) is the core's. Each machine lives on one task that feeds it
//! socket input and `now`, drains its outputs, and sleeps until the next deadline it names.
//!
//! ```no_run
//! use adapter_tokio::server::{Server, ServerOptions};
//! use mqtt_quic_core::tls::{SelfSigned, ServerTls};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let cert = SelfSigned::generate(&["localhost"])?;
//! let server = Server::start(ServerOptions::new(ServerTls::from_self_signed(&cert)?)).await?;
//! println!("QUIC on {:?}, TCP on {:?}", server.quic_addr(), server.tcp_addr());
//! server.shutdown().await;
//! # Ok(())
//! # }
//! ```

pub mod bench;
pub mod client;
pub mod files;
pub mod server;
mod udp;
pub use mqtt_quic_core::url;

use std::hash::{BuildHasher, Hasher};

use std::time::{Duration, Instant};

/// A sleep long enough to mean "no deadline".
const NEVER: Duration = Duration::from_secs(24 * 3600);

/// The driver's clock. tokio's, so tests can pause and advance it; the machines only ever see
/// the `Instant`s handed to them.
fn clock() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// 32 bytes from the operating system's random source: the key material of every QUIC
/// endpoint this adapter builds (stateless-reset and token keys, connection ids) and of the
/// broker's assigned client ids. Should the OS source fail (it does not, on any supported
/// system), the standard library's per-process random hash keys, themselves drawn from the OS,
/// stand in.
fn os_secret() -> [u8; 32] {
    use ring::rand::SecureRandom;
    let mut out = [0u8; 32];
    if ring::rand::SystemRandom::new().fill(&mut out).is_err() {
        for (i, chunk) in out.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(i);
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    out
}
