//! `mqtt-quic-core`: the sans-IO heart of MQTT over QUIC.
//!
//! The machines here take received datagrams, timestamps and commands, and hand back datagrams
//! to send, events and the next deadline. They own the QUIC engine (quinn-proto with rustls),
//! and nothing in them touches a socket, a thread, an async runtime or a clock: time is always
//! an argument, and randomness comes from the key material in the configuration, which adapters
//! fill from the operating system's random source and simulations from a fixed seed (TLS key
//! generation and TLS handshake secrets excepted, which rustls draws from the OS itself).
//!
//! # How a message flows
//!
//! ```text
//!  UDP datagram ──► QuicEndpoint ──► bytes of the client's first stream ─┐
//!  TCP / TLS bytes (the adapter's socket) ───────────────────────────────┤
//!                                                                        ▼
//!                       ServerSession: decodes, enforces the protocol ──► ServerEvent::Publish
//!                                                                        │
//!                       Broker: policy (ACL, limits) ──► Router: the subscribers, retained store
//!                                                                        │ one per subscriber
//!                                                                        ▼
//!                       ServerSession::publish: QoS window, aliases, size cap ──► bytes
//!                                                                        │
//!        Transmit (UDP, from poll_transmit) ◄── QuicEndpoint::send ◄─────┤
//!        StreamOutput (TCP / TLS, from Broker::poll_stream) ◄────────────┘
//! ```
//!
//! A client is the same picture with one session: [`client::ClientMachine`] owns a
//! [`session::client::ClientSession`] and either a [`quic::QuicEndpoint`] or a byte stream the
//! adapter carries.
//! Over QUIC it can also put traffic on data streams of its own (EMQX's multi-stream mode:
//! [`client::ClientMachine::open_stream`], one [`session::client::ClientSession::data_stream`]
//! session per stream; see "Data streams" in [`client`]), so that one slow topic does not hold
//! up the others; over a byte stream those handles fall back to the one stream.
//!
//! # Which type do I drive?
//!
//! | you want | drive | it gives you |
//! |---|---|---|
//! | a broker | [`broker::machine::Broker`] | datagrams, stream output, [`broker::machine::BrokerEvent`]s, password checks |
//! | one MQTT client that reconnects by itself, over QUIC or a stream you carry | [`client::ClientMachine`] | datagrams or [`client::StreamCommand`]s, [`session::client::ClientEvent`]s |
//! | the same, with each request's result routed to whoever waits for it (what the adapters use) | [`driver::ClientDriver`] | completions tagged with your tokens, messages, state changes |
//! | many clients on one UDP socket (load generation, gateways) | [`pool::ClientPool`] | datagrams, events tagged with the client |
//! | raw QUIC connections carrying bytes | [`quic::QuicEndpoint`] | datagrams, [`quic::Event`]s |
//! | the MQTT protocol alone, over a transport of your own | [`session::client::ClientSession`], [`session::server::ServerSession`] | bytes to write, events |
//!
//! The "client" layers, from the bottom: `ClientSession` speaks MQTT on one connection;
//! `ClientMachine` gives it a transport and a reconnect policy; `ClientDriver` answers callers;
//! an adapter's `Client` is the handle an application holds.
//!
//! # Driving a machine
//!
//! Every machine has the same shape: the datagram machines implement [`Machine`] (whose methods
//! forward to inherent ones of the same names), and every poll is `#[must_use]`.
//!
//! - inputs are `handle_*` calls: `handle_datagram(now, Datagram)`, `handle_timeout(now)`, and
//!   for byte streams (TCP, TLS) one vocabulary on every machine that carries them:
//!   `handle_stream_open`, `handle_stream_data`, `handle_stream_written` (the broker counts
//!   what is still unwritten against a client), `handle_stream_closed`;
//! - commands to QUIC endpoints, sessions, client machines and pools (`connect`, `send`,
//!   `publish`, `subscribe`, ...) return `Result<_, `[`error::CommandError`]`>`, the one command
//!   error of the crate; the broker's in-process `publish_local` answers with the MQTT reason
//!   code a client would get for the same message;
//! - outputs are polled until they return `None`: `poll_transmit` (datagrams), `poll_timeout`,
//!   `poll_event`, and `poll_stream` (byte-stream output);
//! - `is_done` says a machine has finished for good and may be dropped: a server session that
//!   ended, a client machine that stopped, a driver whose disconnect completed or lingered long
//!   enough (`is_done(now)`), a broker after shutdown (`is_done(now)`).
//!
//! After **every** input or command, drain in this order:
//!
//! 1. `poll_transmit(now, &mut buf)` (or `poll_transmit_batch`) until `None`, sending each
//!    datagram. Polling transmits is not passive: it runs the QUIC engine, which may take in
//!    acknowledgements, finish streams and close connections, and so queue events and stream
//!    output that were not there before. That is why events come after transmits;
//! 2. `poll_timeout()`: the one instant at which to call `handle_timeout` next (absolute, not a
//!    duration). Calling `handle_timeout` early is a no-op;
//! 3. `poll_event()` until `None` (and the machine's other outputs: `poll_stream` for byte
//!    streams, `poll_auth` and `poll_store` for the broker), acting on each (which may issue
//!    more commands, after which the rule applies again from step 1).
//!
//! ```
//! use mqtt_quic_core::config::{ClientConfig, ServerConfig};
//! use mqtt_quic_core::quic::{Event, QuicEndpoint};
//! use mqtt_quic_core::Datagram;
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
//!         server.handle_datagram(now, Datagram::new(client_addr, &buf[..t.size]));
//!     }
//!     while let Some(t) = server.poll_transmit(now, &mut buf) {
//!         client.handle_datagram(now, Datagram::new(server_addr, &buf[..t.size]));
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
//! The broker's [`broker::machine::Broker::poll_auth`] hands out password checks (PBKDF2 takes
//! milliseconds), which the adapter runs on another thread and answers with
//! `handle_auth_result`. Its [`broker::machine::Broker::poll_store`] hands out the changes to
//! durable state as storage batches, which the adapter commits (one sync for many) and
//! answers with `handle_stored`; acknowledgements that promise durability wait for that
//! answer (see [`persist`]).
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
pub mod bridge;
pub mod broker;
pub mod cid;
pub mod client;
pub mod config;
pub mod driver;
pub mod error;
pub mod fallback;
pub mod flow_header;
pub mod machine;
pub mod persist;
pub mod pool;
pub mod quic;
pub mod rng;
pub mod session;
pub mod timers;
pub mod tls;
pub mod url;
pub mod ws;

pub use machine::{Datagram, Machine};
pub use quinn_proto::EcnCodepoint;
