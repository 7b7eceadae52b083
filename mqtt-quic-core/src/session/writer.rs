//! The size-capped writer both roles send through: packets are encoded into one buffer that the
//! transport takes with `poll_transmit`, and none exceeds the peer's Maximum Packet Size
//! [MQTT-3.1.2-24] [MQTT-3.2.2-15]. What a role does when a packet does not fit differs (the
//! server answers with a bare 0x95, the client gives up), so the writer only refuses it and, once
//! told to, writes nothing more on this connection.

use bytes::{Bytes, BytesMut};
use mqtt_proto::{Packet, Protocol};

/// Encodes packets for one connection, within the peer's limit.
#[derive(Debug)]
pub(crate) struct Writer {
    out: BytesMut,
    protocol: Protocol,
    /// The peer's Maximum Packet Size.
    max: u32,
    /// Nothing more goes out on this connection.
    cut_off: bool,
}

impl Writer {
    /// A writer for `protocol`, before the peer has announced a limit.
    pub(crate) fn new(protocol: Protocol) -> Writer {
        Writer { out: BytesMut::new(), protocol, max: mqtt_proto::PROTOCOL_MAX_PACKET_SIZE, cut_off: false }
    }

    /// The protocol packets are encoded in.
    pub(crate) fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Encodes in `protocol` from now on.
    pub(crate) fn set_protocol(&mut self, protocol: Protocol) {
        self.protocol = protocol;
    }

    /// The peer's Maximum Packet Size.
    pub(crate) fn max(&self) -> u32 {
        self.max
    }

    /// Sets the peer's Maximum Packet Size.
    pub(crate) fn set_max(&mut self, max: u32) {
        self.max = max;
    }

    /// The encoded size of `packet` if it fits the peer's limit, else `Err` with its size
    /// (`usize::MAX` when it cannot be encoded at all).
    pub(crate) fn fits(&self, packet: &Packet) -> Result<usize, usize> {
        match packet.encoded_len(self.protocol) {
            Ok(size) if size <= self.max as usize => Ok(size),
            Ok(size) => Err(size),
            Err(_) => Err(usize::MAX),
        }
    }

    /// Writes `packet`: `Ok(true)` once written, `Ok(false)` when the connection is cut off (see
    /// [`Writer::cut_off`]), `Err(size)` when it does not fit the peer's limit (nothing written).
    pub(crate) fn write(&mut self, packet: &Packet) -> Result<bool, usize> {
        if self.cut_off {
            return Ok(false);
        }
        self.fits(packet)?;
        Ok(packet.encode(self.protocol, &mut self.out).is_ok())
    }

    /// Writes nothing more on this connection.
    pub(crate) fn cut_off(&mut self) {
        self.cut_off = true;
    }

    /// Bytes written and not yet taken.
    pub(crate) fn buffered(&self) -> usize {
        self.out.len()
    }

    /// What is written so far, to hand to the transport.
    pub(crate) fn take(&mut self) -> Option<Bytes> {
        (!self.out.is_empty()).then(|| self.out.split().freeze())
    }

    /// A new connection: nothing buffered, writing allowed again (the limit stays until the peer
    /// announces another).
    pub(crate) fn reset(&mut self, protocol: Protocol) {
        self.out.clear();
        self.cut_off = false;
        self.protocol = protocol;
    }

    /// Drops what is buffered (the transport is gone).
    pub(crate) fn clear(&mut self) {
        self.out.clear();
    }
}
