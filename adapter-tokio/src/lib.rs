//! `adapter-tokio`: the MQTT-over-QUIC core driven by tokio.
//!
//! - [`server::Server`] runs the broker: MQTT over QUIC on UDP, plain MQTT on TCP and MQTT over
//!   TLS on TCP, all into one [`Broker`](mqtt_quic_core::broker::machine::Broker) machine, so a
//!   TCP publisher reaches a QUIC subscriber and the other way.
//! - [`client::Client`] is the async client for `quic://`, `mqtt://` and `mqtts://` brokers.
//! - The `mqttq` binary (broker, pub, sub, shell, and the `bench` load generator) is built on
//!   both.
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

pub mod client;
pub mod files;
pub mod metrics;
pub mod server;
mod udp;
pub use mqtt_quic_core::url;

use std::time::{Duration, Instant};

/// A sleep long enough to mean "no deadline".
const NEVER: Duration = Duration::from_secs(24 * 3600);

/// The driver's clock. tokio's, so tests can pause and advance it; the machines only ever see
/// the `Instant`s handed to them.
fn clock() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// 32 bytes from the operating system's random source: the key material of every QUIC
/// endpoint this adapter builds and of the broker's assigned client ids (see
/// `ServerConfig::secret`).
fn os_secret() -> [u8; 32] {
    // ring reads getrandom(2) or /dev/urandom; neither fails on a working system.
    ring::rand::generate(&ring::rand::SystemRandom::new()).expect("the OS random source").expose()
}
