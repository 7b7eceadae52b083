//! MQTT over WebSocket (MQTT 5 §6, RFC 6455), sans-IO: one [`WsConn`] per connection turns
//! the bytes the adapter reads into MQTT bytes and MQTT bytes into frames, and says what to
//! write besides (the handshake, Pongs, the closing frame).
//!
//! The broker runs one for each connection accepted on a WebSocket listener (see
//! [`crate::broker::machine::Broker::handle_stream_open_ws`]), and a client machine for a
//! `ws://` or `wss://` broker URL, so the adapters only carry bytes (TLS below it for `wss`).
//!
//! What MQTT asks of the transport, and what happens otherwise:
//! - the client offers the subprotocol `mqtt` and the server answers with it
//!   [MQTT-6.0.0-3], [MQTT-6.0.0-4]: a request that does not offer it is refused (HTTP 400);
//! - packets travel in binary frames, which may hold several packets or part of one
//!   [MQTT-6.0.0-2]; a text frame closes the connection [MQTT-6.0.0-1] (status 1003);
//! - anything RFC 6455 forbids (an unmasked client frame, reserved bits, a fragmented or
//!   oversized control frame) closes it with status 1002.
//!
//! Nothing is buffered beyond a handshake ([`MAX_HTTP`] bytes) or a control frame (125
//! bytes): data frames pass through as they arrive, and the MQTT decoder behind them bounds
//! packets as on every other transport.
//!
//! ```
//! use mqtt_quic_core::ws::WsConn;
//! let mut client = WsConn::client("broker.example:8083", "/mqtt", 7);
//! let mut server = WsConn::server("/mqtt");
//! let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
//! // The client's upgrade request, the server's 101.
//! server.receive(&client.poll_output().unwrap(), &mut to_server).unwrap();
//! client.receive(&server.poll_output().unwrap(), &mut to_client).unwrap();
//! assert!(client.is_open() && server.is_open());
//! // MQTT bytes, framed (and masked) by the client, come out of the server as they went in.
//! let frame = client.frame(&[0xC0, 0x00]); // PINGREQ
//! server.receive(&frame, &mut to_server).unwrap();
//! assert_eq!(to_server, [0xC0, 0x00]);
//! ```

mod frames;
mod handshake;

pub use handshake::MAX_HTTP;

use bytes::Bytes;
use frames::{ControlIn, Deframer};
use std::collections::VecDeque;
use thiserror::Error;

/// The path EMQX serves MQTT over WebSocket on, and the one clients ask for when their URL
/// names none.
pub const DEFAULT_PATH: &str = "/mqtt";
/// EMQX's port for MQTT over WebSocket (`ws://`).
pub const WS_PORT: u16 = 8083;
/// EMQX's port for MQTT over secure WebSocket (`wss://`).
pub const WSS_PORT: u16 = 8084;

/// Why a WebSocket connection ended.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum WsError {
    /// The opening handshake failed (what the HTTP answer says, or what was wrong with it).
    #[error("WebSocket upgrade failed: {0}")]
    Upgrade(String),
    /// A frame broke RFC 6455.
    #[error("WebSocket protocol error: {0}")]
    Frame(String),
    /// A text frame: MQTT travels in binary frames only [MQTT-6.0.0-1].
    #[error("WebSocket text frame: MQTT must be sent in binary frames")]
    Text,
}

/// RFC 6455 status codes used in the closing frame.
mod status {
    pub(super) const NORMAL: u16 = 1000;
    pub(super) const PROTOCOL_ERROR: u16 = 1002;
    pub(super) const UNSUPPORTED_DATA: u16 = 1003;
}

/// Which end of the connection this is.
#[derive(Debug)]
enum Role {
    /// Serves MQTT on this path.
    Server { path: String },
    /// Sent this key; masks its frames with these bytes.
    Client { key: String, masks: MaskStream },
}

/// A client's key and frame masks: SHA-256 of the seed and a counter, so that neither the
/// masks nor the key sent in clear tell anything about the seed (which also drives other
/// choices of the client machine), nor the next mask.
#[derive(Debug)]
struct MaskStream {
    seed: u64,
    counter: u64,
    block: [u8; 32],
    used: usize,
}

impl MaskStream {
    fn new(seed: u64) -> MaskStream {
        MaskStream { seed, counter: 0, block: [0; 32], used: 32 }
    }

    fn fill(&mut self, out: &mut [u8]) {
        for byte in out {
            if self.used == self.block.len() {
                let mut input = [0u8; 24];
                input[..8].copy_from_slice(b"mqtt-ws\0");
                input[8..16].copy_from_slice(&self.seed.to_le_bytes());
                input[16..].copy_from_slice(&self.counter.to_le_bytes());
                self.counter += 1;
                self.block.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &input).as_ref());
                self.used = 0;
            }
            *byte = self.block[self.used];
            self.used += 1;
        }
    }
}

/// Where the connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The handshake has not completed.
    Opening,
    /// Frames flow.
    Open,
    /// A closing frame was sent (or the handshake refused): nothing more flows.
    Closed,
}

/// One WebSocket connection carrying MQTT, either end. See the module docs.
#[derive(Debug)]
pub struct WsConn {
    role: Role,
    state: State,
    /// Handshake bytes received so far.
    http: Vec<u8>,
    deframer: Deframer,
    /// Bytes to write besides framed MQTT, in order, before any frame made after them.
    out: VecDeque<Bytes>,
    control: Vec<ControlIn>,
    /// Whether Pings get Pongs (see [`WsConn::set_answer_pings`]).
    answer_pings: bool,
}

impl WsConn {
    /// The broker's end of an accepted connection, serving MQTT at `path` (requests for
    /// another path are answered 404).
    pub fn server(path: impl Into<String>) -> WsConn {
        WsConn::new(Role::Server { path: path.into() })
    }

    /// A client's end of a connection to `authority` (`host:port`, the Host header) asking for
    /// `path`: its upgrade request is the first output. `seed` draws the key and the frame
    /// masks (from the OS random source in adapters, fixed in simulations).
    pub fn client(authority: &str, path: &str, seed: u64) -> WsConn {
        let mut masks = MaskStream::new(seed);
        let mut key = [0u8; 16];
        masks.fill(&mut key);
        let key = data_encoding::BASE64.encode(&key);
        let path = if path.is_empty() { DEFAULT_PATH } else { path };
        let request = handshake::request(authority, path, &key);
        let mut conn = WsConn::new(Role::Client { key, masks });
        conn.out.push_back(request);
        conn
    }

    fn new(role: Role) -> WsConn {
        let masked = matches!(role, Role::Server { .. });
        WsConn {
            role,
            state: State::Opening,
            http: Vec::new(),
            deframer: Deframer::new(masked),
            out: VecDeque::new(),
            control: Vec::new(),
            answer_pings: true,
        }
    }

    /// Whether Pings are answered (yes by default). The broker turns it off while a client
    /// does not read what is sent to it, so that a Ping flood cannot pile up Pongs; RFC 6455
    /// §5.5.3 allows answering only the latest Ping of several, which is what happens anyway
    /// to the Pings of one read.
    pub fn set_answer_pings(&mut self, answer: bool) {
        self.answer_pings = answer;
    }

    /// Takes bytes read from the connection; the MQTT bytes they carry are appended to `mqtt`.
    /// Write what [`WsConn::poll_output`] has after every call, before any frame made later.
    /// An error ends the connection: write the output (the HTTP refusal or the closing frame),
    /// then close. So does [`WsConn::is_closed`] turning true (the peer closed).
    pub fn receive(&mut self, data: &[u8], mqtt: &mut Vec<u8>) -> Result<(), WsError> {
        let result = self.receive_inner(data, mqtt);
        if let Err(e) = &result {
            if self.state == State::Open {
                let code = match e {
                    WsError::Text => status::UNSUPPORTED_DATA,
                    _ => status::PROTOCOL_ERROR,
                };
                let mask = self.mask();
                self.out.push_back(frames::close(code, mask));
            }
            self.state = State::Closed;
        }
        result
    }

    fn receive_inner(&mut self, mut data: &[u8], mqtt: &mut Vec<u8>) -> Result<(), WsError> {
        match self.state {
            State::Closed => return Ok(()),
            State::Open => {}
            State::Opening => {
                let before = self.http.len();
                let take = data.len().min(MAX_HTTP + 1 - before.min(MAX_HTTP));
                self.http.extend_from_slice(&data[..take]);
                // Parse the first read (garbage is refused at once), then only once the headers
                // can have ended (a blank line among the new bytes and the three before them)
                // or the limit is passed: a request sent a byte at a time is not parsed again
                // for every byte.
                let tail = &self.http[before.saturating_sub(3)..];
                let ended = tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n");
                if before > 0 && !ended && self.http.len() <= MAX_HTTP {
                    return Ok(());
                }
                let used = match &self.role {
                    Role::Server { path } => match handshake::accept(&self.http, path) {
                        Ok(None) => return Ok(()),
                        Ok(Some((response, used))) => {
                            self.out.push_back(response);
                            used
                        }
                        Err(refusal) => {
                            self.out.push_back(refusal.response);
                            return Err(refusal.error);
                        }
                    },
                    Role::Client { key, .. } => match handshake::check_response(&self.http, key)? {
                        None => return Ok(()),
                        Some(used) => used,
                    },
                };
                self.state = State::Open;
                // What followed the handshake in this read is frames.
                data = &data[used - before..];
                self.http = Vec::new();
            }
        }
        let fed = self.deframer.feed(data, mqtt, &mut self.control);
        // One Pong for the latest Ping of this read (RFC 6455 §5.5.3 allows it), then the
        // answer to a closing frame.
        let mut ping = None;
        let mut close = None;
        for control in std::mem::take(&mut self.control) {
            match control {
                ControlIn::Ping(body) => ping = Some(body),
                ControlIn::Close(code) => close = Some(code),
            }
        }
        if let (Some(body), true) = (ping, self.answer_pings) {
            let mask = self.mask();
            self.out.push_back(frames::pong(&body, mask));
        }
        fed?;
        if let Some(code) = close {
            // Echo the peer's status when it is one that may be sent (§7.4), else Normal;
            // then nothing more flows.
            let code = code.filter(|c| matches!(c, 1000..=1003 | 1007..=1014 | 3000..=4999)).unwrap_or(status::NORMAL);
            let mask = self.mask();
            self.out.push_back(frames::close(code, mask));
            self.state = State::Closed;
        }
        Ok(())
    }

    /// Whether the handshake has completed and the connection has not closed: MQTT may flow.
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// Whether the connection is over (the peer closed, or an error): once the output is
    /// written, close it.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The next bytes to write besides framed MQTT: the handshake, Pongs, the closing frame.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Bytes> {
        self.out.pop_front()
    }

    /// MQTT bytes as one binary frame, to write after everything polled before.
    pub fn frame(&mut self, mqtt: &[u8]) -> Bytes {
        let mask = self.mask();
        frames::binary(mqtt, mask)
    }

    /// Closes a connection that is open with a normal closing frame (queued as output);
    /// nothing if it is not open.
    pub fn close(&mut self) {
        if self.state == State::Open {
            let mask = self.mask();
            self.out.push_back(frames::close(status::NORMAL, mask));
        }
        self.state = State::Closed;
    }

    /// A client's next frame mask; a server sends unmasked frames.
    fn mask(&mut self) -> Option<[u8; 4]> {
        match &mut self.role {
            Role::Client { masks, .. } => {
                let mut mask = [0u8; 4];
                masks.fill(&mut mask);
                Some(mask)
            }
            Role::Server { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests;
