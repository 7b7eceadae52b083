//! Connection ids that a QUIC-LB-aware load balancer can route (draft-ietf-quic-load-balancers,
//! the plaintext algorithm): every connection id the broker issues carries its server id, so a
//! balancer in front of several brokers sends a client's packets to the broker that holds its
//! connection, also after the client migrates or rebinds and switches to a new connection id.
//!
//! Layout, as the draft's plaintext algorithm has it:
//!
//! ```text
//! first octet: config rotation (3 bits) | connection id length - 1 (5 bits)
//! server id:   1 to 15 bytes, as configured
//! nonce:       4 to 18 bytes, from a keyed generator (different for every id)
//! ```
//!
//! The ids still change on every new connection id (the nonce), so an observer without the
//! configuration cannot link them to each other beyond the server id they share, which is the
//! point of the plaintext mode: the balancer and anyone on the path see which server a
//! connection is on, nothing more.

use crate::config::ConfigError;
use crate::rng::SplitMix64;
use quinn_proto::{ConnectionId, ConnectionIdGenerator};
use std::time::Duration;

/// The largest connection id QUIC allows.
const MAX_CID_LEN: usize = 20;

/// A QUIC-LB configuration (plaintext algorithm) for one server of a balanced fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicLb {
    /// Config rotation codepoint, 0 to 6 (7 means "not routable" and is refused): lets a
    /// balancer run two configurations at once while the fleet changes over.
    pub config_rotation: u8,
    /// This server's id, 1 to 15 bytes, unique in the fleet.
    pub server_id: Vec<u8>,
    /// Bytes of nonce after the server id, 4 to 18 (the draft's minimum is 4; more makes ids
    /// harder to guess). The connection id is `1 + server_id + nonce` bytes, at most 20.
    pub nonce_len: usize,
}

impl QuicLb {
    /// A configuration with an 8-byte nonce and config rotation 0.
    pub fn new(server_id: Vec<u8>) -> QuicLb {
        QuicLb { config_rotation: 0, server_id, nonce_len: 8 }
    }

    /// Checks the ranges the draft sets.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |what: String| Err(ConfigError::Invalid(what));
        if self.config_rotation > 6 {
            return invalid(format!("QUIC-LB config rotation {} is not 0 to 6", self.config_rotation));
        }
        if !(1..=15).contains(&self.server_id.len()) {
            return invalid(format!("QUIC-LB server id of {} bytes is not 1 to 15", self.server_id.len()));
        }
        if !(4..=18).contains(&self.nonce_len) {
            return invalid(format!("QUIC-LB nonce length {} is not 4 to 18", self.nonce_len));
        }
        if self.cid_len() > MAX_CID_LEN {
            return invalid(format!(
                "QUIC-LB server id ({} bytes) and nonce ({}) make a {}-byte connection id; at most 20",
                self.server_id.len(),
                self.nonce_len,
                self.cid_len()
            ));
        }
        Ok(())
    }

    /// Bytes of every connection id.
    pub fn cid_len(&self) -> usize {
        1 + self.server_id.len() + self.nonce_len
    }

    /// The server id a connection id of this configuration carries, or `None` when it is not
    /// one of this configuration's (another config rotation or length): what a balancer does.
    pub fn server_id_of<'a>(&self, cid: &'a [u8]) -> Option<&'a [u8]> {
        let first = *cid.first()?;
        if first >> 5 != self.config_rotation || usize::from(first & 0x1F) + 1 != cid.len() {
            return None;
        }
        cid.get(1..1 + self.server_id.len())
    }
}

/// quinn-proto's connection id generator for a [`QuicLb`] configuration. Its nonces come from
/// a generator keyed by the server's key material (see `quic::derive_key`), so runs with a
/// fixed seed replay.
pub(crate) struct QuicLbGenerator {
    config: QuicLb,
    rng: SplitMix64,
    /// A sharded broker's shard: the first nonce byte.
    shard: Option<u8>,
}

impl QuicLbGenerator {
    pub(crate) fn new(config: QuicLb, key: [u8; 32], shard: Option<u8>) -> QuicLbGenerator {
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&key[..8]);
        QuicLbGenerator { config, rng: SplitMix64::new(u64::from_le_bytes(seed)), shard }
    }
}

impl ConnectionIdGenerator for QuicLbGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        let len = self.config.cid_len();
        let mut cid = [0u8; MAX_CID_LEN];
        cid[0] = (self.config.config_rotation << 5) | ((len - 1) as u8 & 0x1F);
        let sid = self.config.server_id.len();
        cid[1..1 + sid].copy_from_slice(&self.config.server_id);
        for chunk in cid[1 + sid..len].chunks_mut(8) {
            let bytes = self.rng.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        if let Some(shard) = self.shard {
            cid[1 + sid] = shard;
        }
        ConnectionId::new(&cid[..len])
    }

    fn cid_len(&self) -> usize {
        self.config.cid_len()
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// Length of a tagged connection id (see [`tagged_marker`]).
pub const TAGGED_CID_LEN: usize = 16;

/// The tag of a nonce: what marks a tagged connection id.
fn tag(nonce: [u8; 8]) -> [u8; 8] {
    // A fixed mix, not a secret: the ids are on the wire anyway. What matters is that a
    // server's random or QUIC-LB ids (and the encrypted bytes after them) match it with
    // probability 2^-64.
    let mut z = u64::from_le_bytes(nonce) ^ 0x6D71_7474_7162_7267;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)).to_le_bytes()
}

/// Connection ids that mark packets as a client endpoint's when it shares a UDP socket with a
/// server endpoint (a broker's bridges use the broker's socket): 8 bytes of nonce, the first
/// of which is the endpoint's marker (which bridge), and 8 of their tag. [`tagged_marker`]
/// tells such a packet from the server's, and whose it is.
pub(crate) struct TaggedCidGenerator {
    rng: SplitMix64,
    marker: u8,
}

impl TaggedCidGenerator {
    pub(crate) fn new(key: [u8; 32], marker: u8) -> TaggedCidGenerator {
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&key[..8]);
        TaggedCidGenerator { rng: SplitMix64::new(u64::from_le_bytes(seed)), marker }
    }
}

impl ConnectionIdGenerator for TaggedCidGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut nonce = self.rng.next_u64().to_le_bytes();
        nonce[0] = self.marker;
        let mut cid = [0u8; TAGGED_CID_LEN];
        cid[..8].copy_from_slice(&nonce);
        cid[8..].copy_from_slice(&tag(nonce));
        ConnectionId::new(&cid)
    }

    fn cid_len(&self) -> usize {
        TAGGED_CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The marker of the tagged connection id a received QUIC datagram is addressed to, if it is
/// addressed to one (8 bytes of nonce whose first is the marker, 8 of their tag): the
/// destination id of its first packet, from a long header's length byte or, in a short
/// header, the fixed length.
pub fn tagged_marker(datagram: &[u8]) -> Option<u8> {
    let first = *datagram.first()?;
    let dcid = if first & 0x80 != 0 {
        match datagram.get(5) {
            Some(&len) if usize::from(len) == TAGGED_CID_LEN => datagram.get(6..6 + TAGGED_CID_LEN),
            _ => None,
        }
    } else {
        datagram.get(1..1 + TAGGED_CID_LEN)
    };
    let dcid = dcid?;
    let mut nonce = [0u8; 8];
    nonce.copy_from_slice(&dcid[..8]);
    (tag(nonce) == dcid[8..]).then_some(nonce[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tagged_ids_are_told_from_others() {
        let mut g = TaggedCidGenerator::new([3; 32], 7);
        let cid = g.generate_cid();
        let mut short = vec![0x40];
        short.extend_from_slice(&cid);
        short.extend_from_slice(&[0xAA; 30]);
        assert_eq!(tagged_marker(&short), Some(7));
        let mut long = vec![0xC0, 0, 0, 0, 1, TAGGED_CID_LEN as u8];
        long.extend_from_slice(&cid);
        long.extend_from_slice(&[0; 30]);
        assert_eq!(tagged_marker(&long), Some(7));
        short[3] ^= 1;
        assert_eq!(tagged_marker(&short), None);
        let mut rng = SplitMix64::new(9);
        let random: Vec<u8> = (0..64).map(|_| rng.next_u64() as u8).collect();
        for d in [&random[..], &[], &[0x40, 1, 2]] {
            assert_eq!(tagged_marker(d), None);
        }
    }

    #[test]
    fn ids_carry_the_server_id_and_differ() {
        let config = QuicLb { config_rotation: 2, server_id: vec![0xAB, 0xCD], nonce_len: 6 };
        config.validate().unwrap();
        let mut g = QuicLbGenerator::new(config.clone(), [7; 32], None);
        let a = g.generate_cid();
        let b = g.generate_cid();
        assert_eq!(a.len(), 9);
        assert_eq!(a[0], (2 << 5) | 8, "config rotation and self-described length");
        assert_eq!(config.server_id_of(&a), Some(&[0xAB, 0xCD][..]));
        assert_eq!(config.server_id_of(&b), Some(&[0xAB, 0xCD][..]));
        assert_ne!(a, b, "the nonce differs");
        assert_eq!(config.server_id_of(&[0xE8, 1, 2, 3, 4, 5, 6, 7, 8]), None, "another rotation");
    }

    #[test]
    fn out_of_range_configurations_are_refused() {
        let bad = [
            QuicLb { config_rotation: 7, ..QuicLb::new(vec![1]) },
            QuicLb::new(vec![]),
            QuicLb::new(vec![1; 16]),
            QuicLb { nonce_len: 3, ..QuicLb::new(vec![1]) },
            QuicLb { nonce_len: 18, ..QuicLb::new(vec![1; 15]) },
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?}");
        }
        assert!(QuicLb { nonce_len: 4, ..QuicLb::new(vec![1; 15]) }.validate().is_ok());
    }
}
