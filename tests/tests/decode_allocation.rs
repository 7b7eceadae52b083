//! Decoding never allocates more than the packet it decodes, however the packet is built: lists
//! of tiny entries (user properties, subscription identifiers, topic filters, reason codes) are
//! the classic way to make a decoder allocate many times the input.
//!
//! This test binary counts every allocation (stats_alloc as the global allocator), so it holds a
//! single test: parallel tests would count each other's allocations.

use bytes::Bytes;
use mqtt_proto::{varint, Decoder, Packet, Protocol};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use std::alloc::System;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// About 1 MiB of list entries per packet.
const TARGET: usize = 1 << 20;

fn frame(first: u8, body: &[u8]) -> Bytes {
    let mut out = vec![first];
    varint::encode(body.len() as u32, &mut out);
    out.extend_from_slice(body);
    Bytes::from(out)
}

fn properties(entry: &[u8]) -> Vec<u8> {
    let block: Vec<u8> = entry.iter().copied().cycle().take(TARGET / entry.len() * entry.len()).collect();
    let mut out = Vec::new();
    varint::encode(block.len() as u32, &mut out);
    out.extend_from_slice(&block);
    out
}

fn repeat(entry: &[u8]) -> Vec<u8> {
    entry.iter().copied().cycle().take(TARGET / entry.len() * entry.len()).collect()
}

fn cases() -> Vec<(&'static str, Protocol, Bytes)> {
    let user = [0x26, 0, 0, 0, 0]; // empty name and value: 5 bytes per entry
    let mixed = [0x26, 0, 0, 0, 0, 0x0B, 0x01]; // interleaved: forces the gathered copy
    let publish = |props: Vec<u8>| {
        let mut body = vec![0, 1, b't'];
        body.extend(props);
        frame(0x30, &body)
    };
    let mut subscribe = vec![0, 1, 0];
    subscribe.extend(repeat(&[0, 1, b'a', 0]));
    let mut unsubscribe = vec![0, 1];
    unsubscribe.extend(repeat(&[0, 1, b'a']));
    let mut suback = vec![0, 1, 0];
    suback.extend(repeat(&[0x01]));
    let mut connect = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60];
    connect.extend(properties(&user));
    connect.extend([0, 1, b'c']);
    vec![
        ("PUBLISH user properties", Protocol::V5, publish(properties(&user))),
        ("PUBLISH interleaved properties", Protocol::V5, publish(properties(&mixed))),
        ("SUBSCRIBE filters", Protocol::V5, frame(0x82, &subscribe)),
        ("UNSUBSCRIBE filters", Protocol::V3_1_1, frame(0xA2, &unsubscribe)),
        ("SUBACK codes", Protocol::V5, frame(0x90, &suback)),
        ("CONNECT user properties", Protocol::V5, frame(0x10, &connect)),
    ]
}

#[test]
fn decoding_allocates_at_most_the_packet_size() {
    for (name, protocol, wire) in cases() {
        let size = wire.len();
        let mut decoder = Decoder::new(protocol).with_max_packet_size(4 << 20);
        let mut input = wire.clone();
        let region = Region::new(GLOBAL);
        let packet = decoder.decode_bytes(&mut input).unwrap_or_else(|e| panic!("{name}: {e}")).unwrap();
        let allocated = region.change().bytes_allocated;
        assert!(input.is_empty(), "{name}: not fully consumed");
        let entries = match &packet {
            Packet::Publish(p) => p.properties.user_properties.len() + p.properties.subscription_identifiers.len(),
            Packet::Subscribe(s) => s.subscriptions.len(),
            Packet::Unsubscribe(u) => u.filters.len(),
            Packet::SubAck(a) => a.reason_codes.len(),
            Packet::Connect(c) => c.properties.user_properties.len(),
            other => panic!("{name}: unexpected {other:?}"),
        };
        assert!(entries > 100_000, "{name}: only {entries} entries decoded");
        // A fixed allowance covers the boxed property struct and the shared-buffer header.
        assert!(
            allocated <= size + 4096,
            "{name}: decoding a {size}-byte packet with {entries} entries allocated {allocated} bytes"
        );
        eprintln!("{name}: {size} bytes, {entries} entries, {allocated} bytes allocated");
    }
}
