//! The checks behind every fuzz target. Each takes the raw fuzzer input, so that the normal test
//! run (`mqtt-proto/tests/corpus.rs` includes this file) replays the committed corpora through
//! exactly the code the fuzzers run.

use arbitrary::{Arbitrary, Unstructured};
use bytes::{Bytes, BytesMut};
use mqtt_proto::{Decoder, Packet, Protocol};

/// A fuzz target's check: takes the raw fuzzer input.
pub type Check = fn(&[u8]);

/// The fuzz targets, by corpus directory name, with the check each runs.
pub const TARGETS: &[(&str, Check)] = &[
    ("decode_v3", decode_v3),
    ("decode_v5", decode_v5),
    ("decode_fragmented", fragmented),
    ("roundtrip", roundtrip_input),
];

/// Target `decode_v3`: raw bytes as an MQTT 3.1.1 stream.
pub fn decode_v3(data: &[u8]) {
    decode_stream(Protocol::V3_1_1, data);
}

/// Target `decode_v5`: raw bytes as an MQTT 5 stream.
pub fn decode_v5(data: &[u8]) {
    decode_stream(Protocol::V5, data);
}

/// Target `decode_fragmented`: the first byte picks the version, the next eight the cut sizes,
/// the rest is the stream.
pub fn fragmented(data: &[u8]) {
    if data.len() < 9 {
        return;
    }
    let protocol = if data[0] & 1 == 1 { Protocol::V5 } else { Protocol::V3_1_1 };
    decode_fragmented(protocol, &data[1..9], &data[9..]);
}

/// Target `roundtrip`: an `Arbitrary` (protocol, packet) pair.
pub fn roundtrip_input(data: &[u8]) {
    let mut u = Unstructured::new(data);
    if let Ok((protocol, packet)) = <(Protocol, Packet)>::arbitrary(&mut u) {
        roundtrip(protocol, &packet);
    }
}

/// Decodes `data` as a stream of packets until it ends or an error occurs, checking the
/// invariants every decoded packet must satisfy: it re-encodes to exactly the bytes it came from
/// when the encoding is canonical, and re-encoding is stable.
pub fn decode_stream(protocol: Protocol, data: &[u8]) {
    let mut decoder = Decoder::new(protocol).with_max_packet_size(64 * 1024);
    let mut buf = Bytes::copy_from_slice(data);
    loop {
        let before = buf.len();
        // The borrowed decoder must agree with the owning one on every input.
        let borrowed = decoder.decode_ref(&buf).map(|o| o.map(|(p, used)| (p.to_owned(), used)));
        let owned = decoder.decode_bytes(&mut buf);
        match (&owned, &borrowed) {
            (Ok(Some(a)), Ok(Some((b, used)))) => {
                assert_eq!(a, b, "decode_ref disagrees");
                assert_eq!(before - buf.len(), *used, "decode_ref consumed a different length");
            }
            (Ok(None), Ok(None)) => {}
            (Err(a), Err(b)) => assert_eq!(a, b, "decode_ref fails differently"),
            _ => panic!("decode_ref gave {borrowed:?}, decode gave {owned:?}"),
        }
        match owned {
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

fn collect(
    protocol: Protocol,
    input: &mut dyn Iterator<Item = &[u8]>,
) -> (Vec<Packet>, Option<mqtt_proto::DecodeError>) {
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
        assert_eq!(decoded, normalized(packet), "MQTT 5 carries every field");
    }
}

/// What the encoder is documented to normalise: DUP is not sent on QoS 0, a refusing CONNACK
/// never says a session is present, and MQTT 5 has no bridge flag.
fn normalized(packet: &Packet) -> Packet {
    let mut p = packet.clone();
    match &mut p {
        Packet::Publish(publish) if publish.qos() == mqtt_proto::QoS::AtMostOnce => publish.dup = false,
        Packet::ConnAck(ack) if ack.reason_code != mqtt_proto::ReasonCode::Success => ack.session_present = false,
        Packet::Connect(c) if c.protocol.is_v5() => c.bridge = false,
        _ => {}
    }
    p
}
