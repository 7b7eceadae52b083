//! Helpers shared by the hand-written vector tests (`vectors.rs`, `conformance_codec.rs`).

#![allow(dead_code)]

use bytes::BytesMut;
use mqtt_proto::*;

pub const V3: Protocol = Protocol::V3_1_1;
pub const V5: Protocol = Protocol::V5;

/// Decodes with both decoders (owning and borrowing) and checks they agree.
pub fn dec(protocol: Protocol, bytes: &[u8]) -> Result<Packet, DecodeError> {
    let borrowed = Decoder::new(protocol).decode_ref(bytes).map(|o| o.map(|(p, used)| (p.to_owned(), used)));
    let mut buf = BytesMut::from(bytes);
    let owned = Decoder::new(protocol).decode(&mut buf);
    match (&owned, borrowed) {
        (Ok(Some(a)), Ok(Some((b, used)))) => {
            assert_eq!(a, &b, "decode_ref disagrees");
            assert_eq!(used, bytes.len());
        }
        (Err(a), Err(b)) => assert_eq!(a, &b, "decode_ref fails differently"),
        (a, b) => panic!("decode gave {a:?}, decode_ref gave {b:?}"),
    }
    let p = owned?.expect("vector is a whole packet");
    assert!(buf.is_empty(), "vector has bytes after the packet");
    Ok(p)
}

/// Encodes `p`, checking `encoded_len` agrees with what was written.
pub fn enc(protocol: Protocol, p: &Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    p.encode(protocol, &mut out).unwrap();
    assert_eq!(out.len(), p.encoded_len(protocol).unwrap());
    out.to_vec()
}

/// Decodes `bytes`, which must fail with `expected` carrying `reason`.
pub fn err(protocol: Protocol, bytes: &[u8], expected: DecodeError, reason: ReasonCode) {
    let e = dec(protocol, bytes).unwrap_err();
    assert_eq!(e, expected, "{bytes:02X?}");
    assert_eq!(e.reason_code(), reason, "{e}");
}
