//! `mqtt-quic-core`: the sans-IO heart of MQTT over QUIC.
//!
//! The machines here take received datagrams, timestamps and commands, and hand back datagrams
//! to send, events and the next deadline. They own the QUIC engine (quinn-proto with rustls),
//! and nothing in them touches a socket, a thread, an async runtime or a clock: time is always
//! an argument, and randomness comes from the key material in the configuration, which adapters
//! fill from the operating system's random source and simulations from a fixed seed (TLS key
//! generation and TLS handshake secrets excepted, which rustls draws from the OS itself).
//!
//! # Driving a machine
//!
//! Every machine has the same shape ([`quic::QuicEndpoint`] today):
//!
//! - inputs are `handle_*` calls (`handle_datagram(now, remote, local_ip, ecn, data)`,
//!   `handle_timeout(now)`) and commands (`connect`, `send`, `finish`, `close`, ...);
//! - outputs are polled until they return `None`.
//!
//! After **every** input or command, drain in this order:
//!
//! 1. `poll_transmit(now, &mut buf)` until `None`, sending each datagram;
//! 2. `poll_timeout()`: the one instant at which to call `handle_timeout` next (absolute, not a
//!    duration). Calling `handle_timeout` early is a no-op;
//! 3. `poll_event()` until `None`, acting on each event (which may issue more commands, after
//!    which the rule applies again).
//!
//! ```
//! use mqtt_quic_core::config::{ClientConfig, ServerConfig};
//! use mqtt_quic_core::quic::{Event, QuicEndpoint};
//! use mqtt_quic_core::tls::{ClientTls, SelfSigned, ServerTls};
//! use std::time::Instant;
//!
//! let cert = SelfSigned::generate(&["localhost"])?;
//! let mut server = QuicEndpoint::server(&ServerConfig::new(ServerTls::from_self_signed(&cert)?))?;
//! let mut client = QuicEndpoint::client(&ClientConfig::new(ClientTls::insecure()))?;
//! let (server_addr, client_addr) = ("127.0.0.1:14567".parse()?, "127.0.0.1:50000".parse()?);
//!
//! let mut now = Instant::now(); // the driver's clock; the machines never read one
//! let conn = client.connect(now, server_addr, "localhost")?;
//! client.send(now, conn, "hello".into())?;
//! let mut buf = Vec::new();
//! let mut got = Vec::new();
//! // Pass datagrams in memory, a millisecond apart, until the server has the bytes.
//! for _ in 0..50 {
//!     now += std::time::Duration::from_millis(1);
//!     client.handle_timeout(now);
//!     server.handle_timeout(now);
//!     while let Some(t) = client.poll_transmit(now, &mut buf) {
//!         server.handle_datagram(now, client_addr, None, None, &buf[..t.size]);
//!     }
//!     while let Some(t) = server.poll_transmit(now, &mut buf) {
//!         client.handle_datagram(now, server_addr, None, None, &buf[..t.size]);
//!     }
//!     while let Some(e) = server.poll_event() {
//!         if let Event::Received { data, .. } = e {
//!             got.extend_from_slice(&data);
//!         }
//!     }
//! }
//! assert_eq!(got, b"hello");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The broker has one more output: [`broker::machine::Broker::poll_auth`] hands out password
//! checks (PBKDF2 takes milliseconds), which the adapter runs on another thread and answers
//! with `handle_auth_result`; drain it with the events.
//!
//! # 0-RTT and replay
//!
//! A client that resumes a session sends its first MQTT bytes (normally CONNECT) in 0-RTT, one
//! round trip earlier. 0-RTT data can be replayed by an attacker who captured it, and TLS alone
//! cannot tell a replay from the original. What the server does about it: session tickets are
//! single-use (rustls's in-memory session store hands a ticket out once and forgets it), so a
//! server process accepts a given 0-RTT flight at most once; a replay, or a resumption after a
//! restart, falls back to a full handshake and its early data is discarded. The remaining risk
//! is across server processes sharing no state, which this design does not have. Servers accept
//! 0-RTT only when configured to (`ServerConfig::zero_rtt`), and the MQTT layer above puts only
//! CONNECT in early data: a replayed CONNECT at worst repeats a session takeover, where a
//! replayed PUBLISH would deliver a message twice.
//!
//! # Bounded before authentication
//!
//! Before a handshake completes the server holds at most `max_connections` connections and at
//! most `max_handshakes_per_ip` from any one address; beyond that it refuses (CONNECTION_REFUSED)
//! without keeping state. `stateless_retry` additionally proves a client's address before any
//! state is kept.

pub mod backoff;
pub mod bbr;
pub mod broker;
pub mod client;
pub mod config;
pub mod driver;
pub mod machine;
pub mod pool;
pub mod quic;
pub mod rng;
pub mod session;
pub mod timers;
pub mod tls;
pub mod url;

pub use machine::Machine;
pub use quinn_proto::EcnCodepoint;
