//! The data flow header of the MQTT-over-QUIC draft ("MQoQ", section 4.5.2), as some brokers
//! (the `mqtt5` crate's) write it at the start of every stream they open: a QUIC variable-length
//! type (0x13 for a server's data flow), a flow id and an expiry interval, both QUIC variable-length
//! integers, and one byte of flags. No MQTT packet a server sends starts with 0x11 to 0x14
//! (those would be CONNECT), so a stream that starts with one of them carries a header.
//!
//! The client skips a server data flow's header and reads MQTT after it; any other flow type
//! (a control flow, a client's, a user-defined one) on a stream the server opened is refused.

/// What the start of a stream the server opened holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowHeader {
    /// No header: MQTT from the first byte.
    None,
    /// A server data flow header of this many bytes: MQTT follows it.
    ServerData(usize),
    /// Not enough bytes yet to tell.
    Incomplete,
    /// A header of another flow type, or a malformed one: refuse the stream.
    Refused,
}

/// QUIC variable-length integer at the start of `buf`: its length in bytes, if complete.
fn varint_len(buf: &[u8]) -> Option<usize> {
    let first = *buf.first()?;
    let len = 1usize << (first >> 6);
    (buf.len() >= len).then_some(len)
}

/// Reads the start of a stream the server opened (see the module docs).
pub fn parse(buf: &[u8]) -> FlowHeader {
    let Some(&first) = buf.first() else { return FlowHeader::Incomplete };
    match first {
        0x13 => {
            let mut at = 1;
            for _ in 0..2 {
                match varint_len(&buf[at..]) {
                    Some(n) => at += n,
                    None => return FlowHeader::Incomplete,
                }
            }
            // The flags byte.
            if buf.len() > at {
                FlowHeader::ServerData(at + 1)
            } else {
                FlowHeader::Incomplete
            }
        }
        0x11 | 0x12 | 0x14 => FlowHeader::Refused,
        _ => FlowHeader::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_data_flow_header_is_measured_and_others_refused() {
        // Flow id 3, expiry 300 (two-byte varint 0x41 0x2C), no flags, then a PUBLISH.
        let stream = [0x13, 0x03, 0x41, 0x2C, 0x00, 0x30, 0x03];
        assert_eq!(parse(&stream), FlowHeader::ServerData(5));
        for cut in 0..5 {
            assert_eq!(parse(&stream[..cut]), FlowHeader::Incomplete, "cut at {cut}");
        }
        assert_eq!(parse(&[0x30, 0x03]), FlowHeader::None);
        assert_eq!(parse(&[0x11, 0x00]), FlowHeader::Refused);
        assert_eq!(parse(&[0x14]), FlowHeader::Refused);
        // An eight-byte flow id.
        let long = [0x13, 0xC0, 0, 0, 0, 0, 0, 0, 9, 0x05, 0x01];
        assert_eq!(parse(&long), FlowHeader::ServerData(11));
    }
}
