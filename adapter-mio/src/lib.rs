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
//! [`blocking::Client`] wraps a `MioClient` in a private loop for plain blocking code, and
//! [`broker::spawn`] runs a broker on a thread of its own.

pub mod blocking;
pub mod broker;
pub mod client;
mod conn;
mod udp;

use std::hash::{BuildHasher, Hasher};
use std::time::Instant;

/// The wall clock, read here and only here: the machines are handed its readings.
fn now() -> Instant {
    #[allow(clippy::disallowed_methods)]
    Instant::now()
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
