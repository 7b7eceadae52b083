//! WebSocket framing (RFC 6455 §5) as MQTT needs it: the payloads of binary frames are one
//! byte stream (MQTT packets may span frames, and a frame may hold several, [MQTT-6.0.0-2]),
//! control frames are answered, anything else ends the connection.
//!
//! Frame headers are read and written by tungstenite's frame codec; the payload is passed
//! through as it arrives, unmasked in place of a copy, so that a frame that says it is 2^63
//! bytes long costs nothing until its bytes come (and the MQTT decoder behind bounds packets).

use super::WsError;
use bytes::{BufMut, Bytes, BytesMut};
use std::io::Cursor;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Longest frame header: 2 bytes, an 8-byte length and a 4-byte mask.
const MAX_HEADER: usize = 14;
/// Longest control frame payload (RFC 6455 §5.5).
const MAX_CONTROL: usize = 125;

/// A control frame received, for the connection to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ControlIn {
    /// Ping: answer with a Pong carrying the same bytes.
    Ping(Vec<u8>),
    /// The peer closes, with its status code if it gave one.
    Close(Option<u16>),
}

/// What the reader is in the middle of.
#[derive(Debug)]
enum Reading {
    /// A header, of which these bytes came so far.
    Header { buf: [u8; MAX_HEADER], len: usize },
    /// A data frame's payload: `left` bytes to come, unmasked with `mask` from byte `at`.
    Payload { left: u64, mask: Option<[u8; 4]>, at: usize },
    /// A control frame's payload, collected whole (at most 125 bytes).
    Control { op: Control, left: usize, mask: Option<[u8; 4]>, body: Vec<u8> },
}

/// Reads frames from one side of a connection.
#[derive(Debug)]
pub(crate) struct Deframer {
    /// Whether frames must be masked (a server reads a client's: they must, §5.1) or must not.
    masked: bool,
    reading: Reading,
    /// A fragmented binary message is open: continuation frames belong to it.
    in_message: bool,
    /// The peer's closing frame came: nothing after it is read.
    closed: bool,
}

impl Deframer {
    pub(crate) fn new(masked: bool) -> Deframer {
        Deframer { masked, reading: Reading::Header { buf: [0; MAX_HEADER], len: 0 }, in_message: false, closed: false }
    }

    /// Takes bytes from the peer: the payload of data frames is appended to `payload`, control
    /// frames to `control`. After an error the connection is over (what it says goes in the
    /// Close frame).
    pub(crate) fn feed(
        &mut self,
        mut data: &[u8],
        payload: &mut Vec<u8>,
        control: &mut Vec<ControlIn>,
    ) -> Result<(), WsError> {
        while !data.is_empty() && !self.closed {
            match &mut self.reading {
                Reading::Header { buf, len } => {
                    let take = (MAX_HEADER - *len).min(data.len());
                    buf[*len..*len + take].copy_from_slice(&data[..take]);
                    let have = *len + take;
                    let mut cursor = Cursor::new(&buf[..have]);
                    match FrameHeader::parse(&mut cursor).map_err(|e| WsError::Frame(e.to_string()))? {
                        None => {
                            *len = have;
                            data = &data[take..];
                        }
                        Some((header, length)) => {
                            // What of `data` the header used (the rest of `buf` was copied
                            // from it and belongs to the payload).
                            let used = cursor.position() as usize - *len;
                            data = &data[used..];
                            self.reading = self.start(header, length, control)?;
                        }
                    }
                }
                Reading::Payload { left, mask, at } => {
                    let take = (*left).min(data.len() as u64) as usize;
                    let start = payload.len();
                    payload.extend_from_slice(&data[..take]);
                    if let Some(mask) = mask {
                        unmask(&mut payload[start..], *mask, *at);
                    }
                    *at += take;
                    *left -= take as u64;
                    data = &data[take..];
                    if *left == 0 {
                        self.reading = Reading::Header { buf: [0; MAX_HEADER], len: 0 };
                    }
                }
                Reading::Control { op, left, mask, body } => {
                    let take = (*left).min(data.len());
                    body.extend_from_slice(&data[..take]);
                    *left -= take;
                    data = &data[take..];
                    if *left == 0 {
                        if let Some(mask) = mask {
                            unmask(body, *mask, 0);
                        }
                        let body = std::mem::take(body);
                        match op {
                            Control::Ping => control.push(ControlIn::Ping(body)),
                            Control::Close => {
                                // A body is a 2-byte status and a reason; 1 byte is neither.
                                if body.len() == 1 {
                                    return Err(WsError::Frame("a closing frame with a 1-byte body".into()));
                                }
                                let code = (body.len() >= 2).then(|| u16::from_be_bytes([body[0], body[1]]));
                                control.push(ControlIn::Close(code));
                                // Nothing after the peer's closing frame counts (§5.5.1).
                                self.closed = true;
                                self.reading = Reading::Header { buf: [0; MAX_HEADER], len: 0 };
                                return Ok(());
                            }
                            // Pongs answer nothing we asked: ignored, as §5.5.3 allows.
                            _ => {}
                        }
                        self.reading = Reading::Header { buf: [0; MAX_HEADER], len: 0 };
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks a frame header and says what reading its payload means.
    /// A frame with an empty payload is complete at its header: the next header follows.
    fn start(&mut self, header: FrameHeader, length: u64, control: &mut Vec<ControlIn>) -> Result<Reading, WsError> {
        const NEXT: Reading = Reading::Header { buf: [0; MAX_HEADER], len: 0 };
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(WsError::Frame("reserved bits set without an extension".into()));
        }
        match (self.masked, header.mask.is_some()) {
            (true, false) => return Err(WsError::Frame("a client's frame is not masked".into())),
            (false, true) => return Err(WsError::Frame("a server's frame is masked".into())),
            _ => {}
        }
        match header.opcode {
            OpCode::Data(Data::Binary) if !self.in_message => {}
            OpCode::Data(Data::Continue) if self.in_message => {}
            OpCode::Data(Data::Binary | Data::Continue) => {
                return Err(WsError::Frame("a data frame out of its message's order".into()))
            }
            // MQTT packets travel in binary frames only [MQTT-6.0.0-1].
            OpCode::Data(Data::Text) => return Err(WsError::Text),
            OpCode::Data(Data::Reserved(op)) | OpCode::Control(Control::Reserved(op)) => {
                return Err(WsError::Frame(format!("unknown opcode {op}")))
            }
            OpCode::Control(op) => {
                if !header.is_final || length > MAX_CONTROL as u64 {
                    return Err(WsError::Frame("a control frame fragmented or over 125 bytes".into()));
                }
                if length == 0 {
                    match op {
                        Control::Ping => control.push(ControlIn::Ping(Vec::new())),
                        Control::Close => {
                            control.push(ControlIn::Close(None));
                            self.closed = true;
                        }
                        _ => {}
                    }
                    return Ok(NEXT);
                }
                return Ok(Reading::Control { op, left: length as usize, mask: header.mask, body: Vec::new() });
            }
        }
        self.in_message = !header.is_final;
        if length == 0 {
            return Ok(NEXT);
        }
        Ok(Reading::Payload { left: length, mask: header.mask, at: 0 })
    }
}

/// XORs `bytes` with the mask, `offset` bytes into the frame's payload.
fn unmask(bytes: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, b) in bytes.iter_mut().enumerate() {
        *b ^= mask[(offset + i) % 4];
    }
}

/// One frame, whole: its header (masked with `mask` when given, as a client's must be) and
/// its payload.
pub(crate) fn frame(op: OpCode, payload: &[u8], mask: Option<[u8; 4]>) -> Bytes {
    let header = FrameHeader { is_final: true, rsv1: false, rsv2: false, rsv3: false, opcode: op, mask };
    let mut out = BytesMut::with_capacity(header.len(payload.len() as u64) + payload.len());
    let mut w = (&mut out).writer();
    // Writing to memory cannot fail.
    let _ = header.format(payload.len() as u64, &mut w);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(mask) = mask {
        unmask(&mut out[start..], mask, 0);
    }
    out.freeze()
}

/// A binary frame.
pub(crate) fn binary(payload: &[u8], mask: Option<[u8; 4]>) -> Bytes {
    frame(OpCode::Data(Data::Binary), payload, mask)
}

/// A Close frame with a status code (RFC 6455 §7.4).
pub(crate) fn close(code: u16, mask: Option<[u8; 4]>) -> Bytes {
    frame(OpCode::Control(Control::Close), &code.to_be_bytes(), mask)
}

/// A Pong answering a Ping's bytes.
pub(crate) fn pong(body: &[u8], mask: Option<[u8; 4]>) -> Bytes {
    frame(OpCode::Control(Control::Pong), body, mask)
}
