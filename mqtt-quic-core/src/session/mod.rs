//! MQTT sessions: the client's and the broker's side of one connection, transport-agnostic.
//!
//! A session consumes the bytes of the MQTT stream (QUIC) or the TCP byte stream and time, and
//! produces bytes to write, events and deadlines, under the crate's one polling contract (see
//! [the crate docs](crate#driving-a-machine)); its `poll_transmit` returns bytes for the stream
//! rather than datagrams.
//!
//! The two roles share their protocol machinery, each piece in its own file, and keep only what
//! differs between them in theirs:
//!
//! | file | what it holds | used by |
//! |---|---|---|
//! | [`client`] | CONNECT/CONNACK from the client's side, keep-alive pings, requests, resubscribing | client |
//! | [`server`] | CONNECT checks, the limits announced in CONNACK, keep-alive at 1.5x, timed 3.1.1 resends | broker |
//! | `outbound.rs` | our QoS 1/2 window: queue, in flight, resend-after-resume order, packet ids | both |
//! | `inbound.rs` | the peer's QoS 1/2 messages until acknowledged, Receive Maximum, QoS 2 dedup | both |
//! | `alias_in.rs` | topic aliases the peer sets | both |
//! | [`alias_out`] | topic aliases the broker sets towards a client | server |
//! | `writer.rs` | the encoder capped at the peer's Maximum Packet Size | both |
//! | `timer.rs` | a session deadline (connect timeout, keep-alive, PINGRESP) | both |
//! | [`state`] | what a broker keeps of a session between connections | server, broker |
//! | [`packet_id`] | packet identifier allocation | outbound |

mod alias_in;
pub mod alias_out;
pub mod client;
mod inbound;
pub(crate) mod outbound;
pub mod packet_counts;
pub mod packet_id;
pub mod server;
pub mod state;
mod timer;
mod writer;

#[cfg(test)]
mod tests;

/// QoS 1 and 2 messages in flight at once, each way, by default (Receive Maximum and our own
/// cap). At 2000 msg/s over a 30 ms round trip about 60 are in flight on a clean link; a lost
/// packet holds its messages for a retransmission timeout on top, during which a window of 64
/// fills and the publisher stalls (the lossy grid, 10% loss: 881 msg/s delivered with 64 and
/// 1774 with 256 under CUBIC; 1038 and 1989 under BBR; p99 10.4 s and 1.2 s under CUBIC). 256
/// keeps such a link from being window-limited and costs nothing until used.
pub const DEFAULT_WINDOW: u16 = 256;
