//! `adapter-async-std`: the MQTT-over-QUIC core driven by async-std, with no tokio anywhere in
//! its dependency tree.
//!
//! - [`client::Client`]: an async client for `quic://` and `mqtt://` brokers.
//! - [`server::Server`]: a broker serving MQTT over QUIC (UDP) and plain MQTT (TCP).
//!
//! Like the other adapters it only moves bytes and time: the core's
//! [`ClientDriver`](mqtt_quic_core::driver::ClientDriver) and
//! [`Broker`](mqtt_quic_core::broker::machine::Broker) make every protocol decision.
//!
//! ```no_run
//! use adapter_async_std::client::Client;
//! use mqtt_proto::{Publish, QoS, TopicFilter, TopicName};
//! use mqtt_quic_core::driver::ClientOptions;
//! use mqtt_quic_core::tls::ClientTls;
//!
//! async_std::task::block_on(async {
//!     let options = ClientOptions::new().client_id("demo").tls(ClientTls::insecure());
//!     let client = Client::connect("quic://127.0.0.1:14567", options).await?;
//!     let mut messages = client.messages().expect("taken once");
//!     client.subscribe(TopicFilter::new("sensors/#")?, QoS::AtLeastOnce).await?;
//!     client.publish(Publish::new(TopicName::new("sensors/1")?, "21.5").with_qos(QoS::AtLeastOnce)).await?;
//!     if let Some(m) = messages.recv().await {
//!         println!("{}: {:?}", m.topic, m.payload);
//!     }
//!     client.disconnect().await?;
//!     Ok::<(), Box<dyn std::error::Error>>(())
//! })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod client;
pub mod server;

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

/// The wall clock, read here and only here: the machines are handed its readings.
fn now() -> Instant {
    #[allow(clippy::disallowed_methods)]
    Instant::now()
}

/// Sleeps until `deadline` (or a day, when there is none).
async fn sleep_until(deadline: Option<Instant>) {
    let wait = deadline.map_or(Duration::from_secs(24 * 3600), |d| d.saturating_duration_since(now()));
    async_std::task::sleep(wait).await;
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
