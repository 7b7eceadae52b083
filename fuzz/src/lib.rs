//! Shared checks for the fuzz targets. They live in a library so that the targets stay one-liners
//! and so that the normal test run can replay the committed corpora through the very same code.

use bytes::{Bytes, BytesMut};
use mqtt_proto::{Decoder, Packet, Protocol};

/// Decodes `data` as a stream of packets until it ends or an error occurs, checking the
/// invariants every decoded packet must satisfy: it re-encodes to exactly the bytes it came from
/// when the encoding is canonical, and re-encoding is stable.
pub fn decode_stream(protocol: Protocol, data: &[u8]) {
    let mut decoder = Decoder::new(protocol).with_max_packet_size(64 * 1024);
    let mut buf = Bytes::copy_from_slice(data);
    loop {
        let before = buf.len();
        match decoder.decode_bytes(&mut buf) {
            Ok(Some(packet)) => {
                assert!(buf.len() < before, "a decoded packet must consume input");
                check_reencode(&packet, decoder.protocol());
                if let Packet::Connect(c) = &packet {
                    decoder.set_protocol(c.protocol);
                }
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "need-more must not consume");
                break;
            }
            Err(e) => {
                // Every error maps to a reason code in the failure range.
                assert!(e.reason_code().is_error());
                break;
            }
        }
    }
}

/// A decoded packet must encode, and decoding that encoding must give the same packet back.
fn check_reencode(packet: &Packet, protocol: Protocol) {
    let protocol = match packet {
        Packet::Connect(c) => c.protocol,
        _ => protocol,
    };
    let mut out = BytesMut::new();
    packet.encode(protocol, &mut out).expect("a decoded packet must encode");
    assert_eq!(out.len(), packet.encoded_len(protocol).expect("sized"));
    let mut decoder = Decoder::new(protocol).with_max_packet_size(u32::MAX);
    let again = decoder.decode(&mut out).expect("own encoding decodes").expect("complete");
    assert_eq!(&again, packet);
    assert!(out.is_empty());
}

/// Feeds `data` to a decoder in pieces whose sizes come from `cuts`, and checks that the packets
/// (or the error) are the same as when `data` arrives in one piece.
pub fn decode_fragmented(protocol: Protocol, cuts: &[u8], data: &[u8]) {
    let whole = collect(protocol, &mut std::iter::once(data));
    let mut pieces = Vec::new();
    let mut rest = data;
    for &c in cuts.iter().cycle().take(data.len()) {
        if rest.is_empty() {
            break;
        }
        let n = (usize::from(c) % 17 + 1).min(rest.len());
        pieces.push(&rest[..n]);
        rest = &rest[n..];
    }
    if !rest.is_empty() {
        pieces.push(rest);
    }
    let split = collect(protocol, &mut pieces.into_iter());
    assert_eq!(whole, split);
}

fn collect<'a>(protocol: Protocol, input: &mut dyn Iterator<Item = &'a [u8]>) -> (Vec<Packet>, Option<mqtt_proto::DecodeError>) {
    let mut decoder = Decoder::new(protocol).with_max_packet_size(64 * 1024);
    let mut buf = BytesMut::new();
    let mut packets = Vec::new();
    for piece in input {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(p)) => packets.push(p),
                Ok(None) => break,
                Err(e) => return (packets, Some(e)),
            }
        }
    }
    (packets, None)
}

/// Encodes an arbitrary packet; if the encoder accepts it, the bytes must decode, and encoding the
/// decoded packet must give the same bytes (what the encoder drops for 3.1.1 is dropped once).
pub fn roundtrip(protocol: Protocol, packet: &Packet) {
    let mut first = BytesMut::new();
    if packet.encode(protocol, &mut first).is_err() {
        return;
    }
    let wire_protocol = match packet {
        Packet::Connect(c) => c.protocol,
        _ => protocol,
    };
    assert_eq!(first.len(), packet.encoded_len(protocol).expect("sized"));
    let mut decoder = Decoder::new(wire_protocol).with_max_packet_size(u32::MAX);
    let mut input = first.clone();
    let decoded = match decoder.decode(&mut input) {
        Ok(Some(p)) => p,
        other => panic!("own encoding of {packet:?} did not decode: {other:?}"),
    };
    assert!(input.is_empty());
    let mut second = BytesMut::new();
    decoded.encode(wire_protocol, &mut second).expect("decoded packet encodes");
    assert_eq!(first, second);
    if wire_protocol.is_v5() && protocol.is_v5() {
        assert_eq!(&decoded, packet, "MQTT 5 carries every field");
    }
}
