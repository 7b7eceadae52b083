//! `adapter-mio`: the MQTT-over-QUIC core in a `mio::Poll` loop you own.
//!
//! Embedding is the reason the core is sans-IO: [`client::MioClient`] and
//! [`broker::MioBroker`] register their sockets with your `Registry` under tokens you choose,
//! take the events you poll, and tell you how long `Poll::poll` may sleep. Everything they do
//! besides socket calls is the core's ([`mqtt_quic_core::driver::ClientDriver`], the
//! [`Broker`](mqtt_quic_core::broker::machine::Broker) machine).
//!
//! ```no_run
//! use adapter_mio::client::MioClient;
//! use mqtt_quic_core::driver::ClientOptions;
//! use mqtt_quic_core::tls::ClientTls;
//! use mio::{Events, Poll, Token};
//!
//! let mut poll = Poll::new()?;
//! let options = ClientOptions::new().client_id("embedded").tls(ClientTls::insecure());
//! let mut mqtt = MioClient::connect("quic://127.0.0.1:14567", options, poll.registry(), Token(7))?;
//! let mut events = Events::with_capacity(64);
//! loop {
//!     poll.poll(&mut events, mqtt.timeout())?;
//!     for event in events.iter() {
//!         if !mqtt.handle_event(poll.registry(), event) {
//!             // one of your own sockets
//!         }
//!     }
//!     mqtt.handle_timeout(poll.registry());
//!     while let Some(message) = mqtt.poll_message() {
//!         println!("{}: {:?}", message.topic, message.payload);
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`client::Client`] and [`server::Server`] run a `MioClient` and a `MioBroker` on threads of
//! their own, with the methods of the tokio and async-std adapters' `Client` and `Server` (the
//! same names and result types, blocking instead of async). [`blocking::Client`] wraps a
//! `MioClient` in a private loop on the caller's thread, and [`broker::spawn`] is
//! `Server::start` by its earlier name.

pub mod blocking;
pub mod broker;
pub mod client;
mod conn;
pub mod server;
mod threaded;
mod udp;

use std::time::Instant;

/// The wall clock, read here and only here: the machines are handed its readings.
fn now() -> Instant {
    #[allow(clippy::disallowed_methods)]
    Instant::now()
}

/// 32 bytes from the operating system's random source: the key material of every QUIC
/// endpoint this adapter builds and of the broker's assigned client ids (see
/// `ServerConfig::secret`).
fn os_secret() -> [u8; 32] {
    // ring reads getrandom(2) or /dev/urandom; neither fails on a working system.
    ring::rand::generate(&ring::rand::SystemRandom::new()).expect("the OS random source").expose()
}

/// Logs a broker lifecycle line (see [`mqtt_quic_core::broker::lifecycle`]) through the `log`
/// facade, at its level, so that the application's logger shows the same lines as the tokio
/// adapter's.
fn log_line(line: &mqtt_quic_core::broker::lifecycle::LogLine) {
    use mqtt_quic_core::broker::lifecycle::Level;
    match line.level {
        Level::Warn => log::warn!("{}", line.text),
        _ => log::info!("{}", line.text),
    }
}
