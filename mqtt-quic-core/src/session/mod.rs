//! MQTT sessions: the client's and the broker's side of one connection, transport-agnostic.
//!
//! A session consumes the bytes of the MQTT stream (QUIC) or the TCP byte stream and time, and
//! produces bytes to write, events and deadlines, under the same polling contract as the QUIC
//! machine: after every `handle_*` call or command, drain `poll_transmit`, read `poll_timeout`,
//! drain `poll_event`.

pub mod client;
pub mod packet_id;
pub mod server;
