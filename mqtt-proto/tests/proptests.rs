//! Property tests: roundtrip, split-anywhere decoding, and arbitrary input, for both versions.

mod common;

use bytes::{Bytes, BytesMut};
use common::{packet, protocol};
use mqtt_proto::{Decoder, Packet, Protocol};
use proptest::collection::vec;
use proptest::prelude::*;

/// The protocol a packet is framed with: CONNECT names its own.
fn wire_protocol(p: &Packet, protocol: Protocol) -> Protocol {
    match p {
        Packet::Connect(c) => c.protocol,
        _ => protocol,
    }
}

fn encode_all(protocol: Protocol, packets: &[Packet]) -> BytesMut {
    let mut out = BytesMut::new();
    for p in packets {
        let before = out.len();
        p.encode(protocol, &mut out).unwrap();
        assert_eq!(out.len() - before, p.encoded_len(protocol).unwrap());
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn roundtrip((protocol, p) in protocol().prop_flat_map(|v| (Just(v), packet(v)))) {
        let mut wire = encode_all(protocol, std::slice::from_ref(&p));
        let mut decoder = Decoder::new(wire_protocol(&p, protocol)).with_max_packet_size(u32::MAX);
        let decoded = decoder.decode(&mut wire).unwrap().unwrap();
        prop_assert_eq!(decoded, p);
        prop_assert!(wire.is_empty());
    }

    #[test]
    fn split_anywhere(
        (protocol, packets) in protocol().prop_flat_map(|v| (Just(v), vec(packet(v), 1..8))),
        cuts in vec(any::<prop::sample::Index>(), 0..12),
    ) {
        // A stream after CONNECT: keep CONNECTs of the stream's own protocol only.
        let packets: Vec<Packet> = packets
            .into_iter()
            .filter(|p| !matches!(p, Packet::Connect(c) if c.protocol != protocol))
            .collect();
        let wire = encode_all(protocol, &packets).freeze();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        points.push(wire.len());
        points.sort_unstable();
        let mut decoder = Decoder::new(protocol).with_max_packet_size(u32::MAX);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut at = 0;
        for point in points {
            buf.extend_from_slice(&wire[at..point]);
            at = point;
            while let Some(p) = decoder.decode(&mut buf).unwrap() {
                out.push(p);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(out, packets);
    }

    #[test]
    fn borrowed_decoding_matches_owned(
        (protocol, packets) in protocol().prop_flat_map(|v| (Just(v), vec(packet(v), 1..8))),
    ) {
        let packets: Vec<Packet> = packets
            .into_iter()
            .filter(|p| !matches!(p, Packet::Connect(c) if c.protocol != protocol))
            .collect();
        let wire = encode_all(protocol, &packets);
        let decoder = Decoder::new(protocol).with_max_packet_size(u32::MAX);
        let mut at = 0;
        let mut out = Vec::new();
        while let Some((p, used)) = decoder.decode_ref(&wire[at..]).unwrap() {
            out.push(p.to_owned());
            at += used;
        }
        prop_assert_eq!(at, wire.len());
        prop_assert_eq!(out, packets);
    }

    #[test]
    fn arbitrary_bytes_never_panic(v5 in any::<bool>(), data in vec(any::<u8>(), 0..512)) {
        let protocol = if v5 { Protocol::V5 } else { Protocol::V3_1_1 };
        let mut decoder = Decoder::new(protocol).with_max_packet_size(256);
        let mut buf = Bytes::from(data);
        loop {
            let before = buf.len();
            match decoder.decode_bytes(&mut buf) {
                Ok(Some(_)) => prop_assert!(buf.len() < before),
                Ok(None) => { prop_assert_eq!(buf.len(), before); break; }
                Err(e) => { prop_assert!(e.reason_code().is_error()); break; }
            }
        }
    }

    #[test]
    fn mutated_packets_never_panic(
        (protocol, p) in protocol().prop_flat_map(|v| (Just(v), packet(v))),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        // Valid packets with a few bytes changed reach much deeper than random bytes.
        let mut wire = encode_all(protocol, std::slice::from_ref(&p)).to_vec();
        for (i, b) in flips {
            let at = i.index(wire.len());
            wire[at] = b;
        }
        let mut decoder = Decoder::new(wire_protocol(&p, protocol));
        let mut buf = BytesMut::from(&wire[..]);
        let _ = decoder.decode(&mut buf);
    }
}
