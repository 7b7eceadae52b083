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
