//! Relayed connections: a connection accepted by one shard whose session lives on another (the
//! home of its client id). The accepting shard reads the connection's bytes until its CONNECT
//! names the client, then hands the bytes to the home shard, which serves the session on a
//! stream of its own (as if the client had connected there over a byte stream) and sends the
//! session's output back to be written to the connection, framed as its transport needs (QUIC
//! stream, TCP, WebSocket).
//!
//! Back-pressure crosses too: the home shard counts what it sent in the stream's write
//! backlog (its QoS 0 budget, its write timeout), and the accepting shard reports bytes as its
//! transport takes them (`RelayWritten`, checked every few milliseconds), so a slow client is
//! treated on a relayed connection as on a direct one.

use super::{home_of, ShardMessage};
use crate::broker::links::{Peer, StreamId, StreamOutput};
use crate::broker::machine::Broker;
use crate::quic::Lane;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How often the accepting shard reports what relayed connections' transports took.
const WRITTEN_EVERY: Duration = Duration::from_millis(5);

/// Most bytes read from a connection before its CONNECT is complete, beyond which it is
/// served where it arrived (its session will refuse an oversized or broken CONNECT there).
const MAX_PEEK: usize = 64 * 1024;

/// A connection relayed to its session's home, on the shard that accepted it.
struct Outgoing {
    /// Its number in the messages.
    relay: u64,
    /// The shard its session lives on.
    home: u16,
    /// Bytes the home sent for it that its transport has not taken (as far as reported).
    unreported: usize,
}

/// Both sides of relayed connections.
#[derive(Default)]
pub(in crate::broker) struct Relays {
    /// Connections waiting for their CONNECT's client id, with their bytes so far.
    pending: BTreeMap<Peer, Vec<u8>>,
    /// Connections accepted here and relayed.
    out: BTreeMap<Peer, Outgoing>,
    by_number: BTreeMap<u64, Peer>,
    next: u64,
    /// Relayed connections with output their transport has not yet taken.
    unreported: BTreeSet<Peer>,
    /// When they are checked next.
    next_report: Option<Instant>,
    /// Connections relayed here: the shard that accepted each and its number, both ways.
    hosted: BTreeMap<(u16, u64), StreamId>,
    hosted_by_stream: BTreeMap<StreamId, (u16, u64, &'static str)>,
}

impl Relays {
    /// Whether a connection accepted here is relayed.
    pub(in crate::broker) fn is_relayed(&self, peer: Peer) -> bool {
        self.out.contains_key(&peer)
    }

    /// Whether connections accepted here are relayed to other shards.
    pub(in crate::broker) fn relaying(&self) -> bool {
        !self.out.is_empty()
    }

    /// When relayed connections' progress is checked next.
    pub(in crate::broker) fn deadline(&self) -> Option<Instant> {
        self.next_report.filter(|_| !self.unreported.is_empty())
    }
}

/// What the first bytes of a connection say about its client.
#[derive(Debug, PartialEq, Eq)]
enum Peek {
    /// The CONNECT is not complete yet.
    More,
    /// A CONNECT with this client id (possibly empty).
    ClientId(String),
    /// Not a well-formed CONNECT: the session where it arrived answers it.
    Other,
}

/// Reads the client id of a CONNECT at the start of `b` (MQTT 3.1, 3.1.1 or 5), without
/// decoding the rest: only the lengths it must skip are checked, with the bounds of `b`.
fn peek_client_id(b: &[u8]) -> Peek {
    let Some(&first) = b.first() else { return Peek::More };
    if first != 0x10 {
        return Peek::Other;
    }
    let mut len = 0usize;
    let mut at = 1;
    for shift in [0, 7, 14, 21] {
        let Some(&byte) = b.get(at) else { return Peek::More };
        at += 1;
        len |= usize::from(byte & 0x7F) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        if shift == 21 {
            return Peek::Other;
        }
    }
    // The client id comes before the will, the user name and the password: the start of the
    // packet is enough, however long the rest (a will's payload may be large).
    let body = &b[at.min(b.len())..b.len().min(at + len)];
    let complete = b.len() >= at + len;
    let mut r = Reader(body);
    let parsed = (|| {
        let name = r.u16()?;
        r.skip(usize::from(name))?;
        let level = r.u8()?;
        r.skip(3)?; // flags, keep alive
        if level == 5 {
            let props = r.varint()?;
            r.skip(props)?;
        }
        let id = r.u16()?;
        let id = r.take(usize::from(id))?;
        String::from_utf8(id.to_vec()).ok()
    })();
    match parsed {
        Some(id) => Peek::ClientId(id),
        // Cut short by the end of what arrived: more may complete it.
        None if !complete && body.len() <= MAX_PEEK => Peek::More,
        None => Peek::Other,
    }
}

/// A bounds-checked cursor.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn varint(&mut self) -> Option<usize> {
        let mut v = 0usize;
        for shift in [0, 7, 14, 21] {
            let byte = self.u8()?;
            v |= usize::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
}

impl Broker {
    /// Whether a connection's bytes go to a session here without further ado (in a broker of
    /// one shard, always).
    pub(in crate::broker) fn is_placed(&self, peer: Peer) -> bool {
        self.shard.is_none() || self.conns.get(&peer).is_some_and(|l| l.placed || l.internal)
    }

    /// The transport of a connection relayed here (`quic`, `ws` or `tcp`), for the log; `None`
    /// for any other.
    pub fn relayed_transport(&self, peer: &Peer) -> Option<&'static str> {
        let Peer::Stream(id) = peer else { return None };
        self.shard.as_ref()?.relays.hosted_by_stream.get(id).map(|h| h.2)
    }

    /// Whether a connection accepted here is relayed to its session's home.
    pub(in crate::broker) fn is_relayed(&self, peer: Peer) -> bool {
        self.shard.as_ref().is_some_and(|s| s.relays.is_relayed(peer))
    }

    /// Bytes of a connection not yet placed, or relayed: returns the bytes for a session here
    /// once its CONNECT says it lives here; relays them (the first ones with the CONNECT) if it
    /// lives on another shard; keeps them while the CONNECT is incomplete.
    pub(in crate::broker) fn place(&mut self, now: Instant, peer: Peer, data: &[u8]) -> Option<Vec<u8>> {
        let shard = self.shard.as_mut()?;
        if let Some(out) = shard.relays.out.get(&peer) {
            let message = ShardMessage::RelayData { relay: out.relay, data: Bytes::copy_from_slice(data) };
            let home = out.home;
            shard.send(home, message);
            return None;
        }
        let buf = shard.relays.pending.entry(peer).or_default();
        buf.extend_from_slice(data);
        let home = match peek_client_id(buf) {
            Peek::More if buf.len() <= MAX_PEEK => return None,
            Peek::ClientId(id) if !id.is_empty() => home_of(&id, shard.count),
            // No client id (one is assigned here, leading back here), or not a CONNECT.
            _ => shard.index,
        };
        let buf = shard.relays.pending.remove(&peer).unwrap_or_default();
        if home == shard.index {
            self.live(now, peer).placed = true;
            return Some(buf);
        }
        let relay = shard.relays.next;
        shard.relays.next += 1;
        shard.relays.out.insert(peer, Outgoing { relay, home, unreported: 0 });
        shard.relays.by_number.insert(relay, peer);
        let (remote, identity) = (self.links.remote_addr(peer), self.links.identity(peer));
        let transport = match peer {
            Peer::Quic(_) => "quic",
            Peer::Stream(id) if self.links.is_websocket(id) => "ws",
            Peer::Stream(_) => "tcp",
        };
        let message =
            ShardMessage::RelayOpen { relay, remote, identity, transport: transport.into(), data: buf.into() };
        shard.send(home, message);
        // The session here never saw a byte: it goes without a trace (and data streams opened
        // meanwhile are refused: they need the session on the connection's shard).
        self.drop_lanes(now, peer);
        self.conns.remove(&peer);
        self.dirty.remove(&peer);
        self.rearm(peer);
        None
    }

    /// A connection accepted here ended (closed, lost, dropped): if relayed, its home hears
    /// of it. Returns whether it was relayed (or still waiting to be placed).
    pub(in crate::broker) fn relay_lost(&mut self, peer: Peer, detail: &str) -> bool {
        let Some(shard) = self.shard.as_mut() else { return false };
        if shard.relays.pending.remove(&peer).is_some() {
            return false;
        }
        let Some(out) = shard.relays.out.remove(&peer) else { return false };
        shard.relays.by_number.remove(&out.relay);
        shard.relays.unreported.remove(&peer);
        shard.send(out.home, ShardMessage::RelayClosed { relay: out.relay, detail: detail.to_string() });
        true
    }

    /// Output for a connection accepted here, from its session's home.
    pub(super) fn relay_out(&mut self, now: Instant, relay: u64, output: StreamOutput) {
        let Some(shard) = self.shard.as_mut() else { return };
        let Some(&peer) = shard.relays.by_number.get(&relay) else { return };
        match output {
            StreamOutput::Data(bytes) => {
                let n = bytes.len();
                if self.links.send(now, peer, Lane::CONTROL, bytes) {
                    return self.drop_slow(now, peer);
                }
                let Some(shard) = self.shard.as_mut() else { return };
                if let Some(out) = shard.relays.out.get_mut(&peer) {
                    out.unreported += n;
                    shard.relays.unreported.insert(peer);
                    shard.relays.next_report.get_or_insert(now + WRITTEN_EVERY);
                }
            }
            StreamOutput::Close | StreamOutput::Abort => {
                if let Some(out) = shard.relays.out.remove(&peer) {
                    shard.relays.by_number.remove(&out.relay);
                    shard.relays.unreported.remove(&peer);
                }
                match output {
                    StreamOutput::Close => self.links.finish(now, peer),
                    _ => self.links.abort(now, peer),
                }
            }
        }
    }

    /// Tells the homes of relayed connections what their transports took since the last
    /// report (when due).
    pub(super) fn report_relayed(&mut self, now: Instant) {
        let links = &self.links;
        let Some(shard) = self.shard.as_mut() else { return };
        let Relays { out, unreported, next_report, .. } = &mut shard.relays;
        if next_report.is_none_or(|t| t > now) {
            return;
        }
        let mut reports = Vec::new();
        unreported.retain(|peer| {
            let Some(o) = out.get_mut(peer) else { return false };
            let taken = o.unreported.saturating_sub(links.backlog(*peer));
            if taken > 0 {
                o.unreported -= taken;
                reports.push((o.home, ShardMessage::RelayWritten { relay: o.relay, bytes: taken }));
            }
            o.unreported > 0
        });
        *next_report = (!unreported.is_empty()).then_some(now + WRITTEN_EVERY);
        for (home, message) in reports {
            shard.send(home, message);
        }
    }

    /// A connection another shard accepted, whose session lives here.
    pub(super) fn relay_opened(
        &mut self,
        now: Instant,
        from: u16,
        relay: u64,
        (remote, identity, transport): (Option<SocketAddr>, Option<String>, String),
        data: &[u8],
    ) {
        let id = self.links.open_relayed();
        let transport = match transport.as_str() {
            "quic" => "quic",
            "ws" => "ws",
            _ => "tcp",
        };
        if let Some(remote) = remote {
            self.links.set_remote(id, remote);
        }
        if let Some(identity) = identity {
            self.links.set_identity(id, identity);
        }
        if let Some(shard) = self.shard.as_mut() {
            shard.relays.hosted.insert((from, relay), id);
            shard.relays.hosted_by_stream.insert(id, (from, relay, transport));
        }
        self.live(now, Peer::Stream(id)).placed = true;
        self.rearm(Peer::Stream(id));
        self.received(now, Peer::Stream(id), data);
    }

    /// More bytes of a connection relayed here.
    pub(super) fn relay_data(&mut self, now: Instant, from: u16, relay: u64, data: &[u8]) {
        let Some(&id) = self.shard.as_ref().and_then(|s| s.relays.hosted.get(&(from, relay))) else { return };
        if self.conns.contains_key(&Peer::Stream(id)) {
            self.received(now, Peer::Stream(id), data);
        }
    }

    /// A connection relayed here ended where it was accepted.
    pub(super) fn relay_closed(&mut self, now: Instant, from: u16, relay: u64, detail: String) {
        let Some(shard) = self.shard.as_mut() else { return };
        let Some(id) = shard.relays.hosted.remove(&(from, relay)) else { return };
        shard.relays.hosted_by_stream.remove(&id);
        self.links.forget_relayed(id);
        if let Some(live) = self.conns.get_mut(&Peer::Stream(id)) {
            live.detail.get_or_insert(detail);
        }
        self.stream_closed(now, id);
    }

    /// The relaying shard's transport took `bytes` of what was sent to a connection relayed
    /// here.
    pub(super) fn relay_written(&mut self, from: u16, relay: u64, bytes: usize) {
        if let Some(&id) = self.shard.as_ref().and_then(|s| s.relays.hosted.get(&(from, relay))) {
            self.links.stream_written(id, bytes);
        }
    }

    /// Sends the output of sessions here for relayed connections back to where they were
    /// accepted. Returns whether there was any.
    pub(super) fn relayed_output(&mut self) -> bool {
        let mut moved = false;
        // Bytes for one connection in a row go as one message.
        let mut held: Option<(StreamId, Vec<Bytes>)> = None;
        while let Some((id, output)) = self.links.poll_relayed() {
            moved = true;
            match output {
                StreamOutput::Data(bytes) => match &mut held {
                    Some((h, chunks)) if *h == id => chunks.push(bytes),
                    _ => {
                        if let Some((h, chunks)) = held.replace((id, vec![bytes])) {
                            self.relay_back(h, StreamOutput::Data(joined(chunks)));
                        }
                    }
                },
                output => {
                    // What was held goes first.
                    if let Some((h, chunks)) = held.take() {
                        self.relay_back(h, StreamOutput::Data(joined(chunks)));
                    }
                    self.relay_back(id, output);
                }
            }
        }
        if let Some((h, chunks)) = held {
            self.relay_back(h, StreamOutput::Data(joined(chunks)));
        }
        moved
    }

    /// One output of a session here for the shard that relays its connection.
    fn relay_back(&mut self, id: StreamId, output: StreamOutput) {
        let Some(shard) = self.shard.as_mut() else { return };
        let Some(&(from, relay, _)) = shard.relays.hosted_by_stream.get(&id) else { return };
        let end = !matches!(output, StreamOutput::Data(_));
        shard.send(from, ShardMessage::RelayOut { relay, output });
        if end {
            shard.relays.hosted.remove(&(from, relay));
            shard.relays.hosted_by_stream.remove(&id);
            self.links.forget_relayed(id);
            self.links.forget_stream(id);
        }
    }
}

/// Chunks as one (copied only when there are several).
fn joined(mut chunks: Vec<Bytes>) -> Bytes {
    if chunks.len() == 1 {
        return chunks.pop().unwrap_or_default();
    }
    let mut all = bytes::BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
    for chunk in chunks {
        all.extend_from_slice(&chunk);
    }
    all.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_v5(client_id: &str) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 3, 0x21, 0, 10];
        body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
        body.extend_from_slice(client_id.as_bytes());
        let mut packet = vec![0x10, body.len() as u8];
        packet.extend_from_slice(&body);
        packet
    }

    #[test]
    fn client_ids_are_read_from_whole_connects_only() {
        let packet = connect_v5("sensor-1");
        assert_eq!(peek_client_id(&packet), Peek::ClientId("sensor-1".into()));
        for cut in 0..packet.len() {
            assert_eq!(peek_client_id(&packet[..cut]), Peek::More, "{cut}");
        }
        let mut v311 = vec![0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 4];
        v311.extend_from_slice(b"abcd");
        assert_eq!(peek_client_id(&v311), Peek::ClientId("abcd".into()));
        assert_eq!(peek_client_id(&[0x30, 0]), Peek::Other, "not a CONNECT");
        assert_eq!(peek_client_id(&[0x10, 0xFF, 0xFF, 0xFF, 0xFF]), Peek::Other, "a length of five bytes");
        assert_eq!(peek_client_id(&[0x10, 2, 0, 9]), Peek::Other, "a name longer than the packet");
        // A CONNECT longer than the broker reads ahead (a large will): its start names the
        // client.
        let mut long = connect_v5("with-a-will");
        long[1] = 0x80;
        long.insert(2, 0x80);
        long.insert(3, 0x01); // remaining length 16384
        assert_eq!(peek_client_id(&long), Peek::ClientId("with-a-will".into()));
        // Properties longer than the broker reads ahead before the client id: given up on
        // (served where it arrived, whose session refuses it).
        let mut junk = vec![0x10, 0xFF, 0xFF, 0x7F, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 0xFF, 0xFF, 0xFF, 0x7F];
        junk.resize(1000, 0);
        assert_eq!(peek_client_id(&junk), Peek::More);
        junk.resize(MAX_PEEK + 100, 0);
        assert_eq!(peek_client_id(&junk), Peek::Other);
    }
}
