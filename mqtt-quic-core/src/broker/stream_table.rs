//! The byte-stream connections of a broker adapter, by [`StreamId`], and the routing of the
//! broker's output to them: the part of every broker adapter that is not socket calls.
//!
//! An adapter keeps one [`StreamTable`], with one writer per connection: whatever gets bytes to
//! that connection's socket (a queue to the connection's task, the socket itself). It opens
//! connections with [`StreamTable::open`], reports their end with [`StreamTable::closed`], and
//! after every input calls [`StreamTable::route`], which drains [`Broker::poll_stream`] into the
//! writers, then takes the broker's events with [`StreamTable::poll_event`] (lifecycle lines
//! named with each connection's transport, in-process messages; see
//! the `lifecycle` module).

use crate::broker::lifecycle::{self, Handling};
use crate::broker::machine::{Broker, Peer, StreamId, StreamOutput};
use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

/// What became of bytes handed to a [`StreamWriter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Delivery {
    /// Queued for the connection's writer, which reports what it writes itself (see
    /// [`Broker::handle_stream_written`]).
    Queued,
    /// This many bytes went to the socket now (the rest waits in the writer): the table reports
    /// them to the broker.
    Written(usize),
    /// The connection's writer is gone; the connection reports its end itself (the adapter
    /// calls [`StreamTable::closed`] when it does).
    Gone,
    /// The write failed: the connection is over now. The table forgets it and tells the broker.
    Failed,
}

/// One connection's way to its socket, as a broker adapter has it. `Io` is what writing needs
/// besides the writer itself (a registry, the adapter's connections), `()` if nothing.
pub trait StreamWriter<Io: ?Sized> {
    /// Bytes for the connection, in order.
    fn data(&mut self, io: &mut Io, bytes: Bytes) -> Delivery;
    /// The broker ended the session: close the connection once what came before is written.
    /// The table forgets the writer.
    fn close(self, io: &mut Io);
    /// The broker dropped the connection (a client that does not read): stop writing and close
    /// it now, discarding what waits. The table forgets the writer.
    fn abort(self, io: &mut Io);
}

/// The writers of a broker's byte-stream connections, by the broker's [`StreamId`], with the
/// transport each came in over (for the log). See the module docs.
#[derive(Debug)]
pub struct StreamTable<W> {
    writers: HashMap<StreamId, W>,
    transports: HashMap<StreamId, &'static str>,
    /// Connections that ended since the events were last drained: their transport is kept
    /// until their last events (`client disconnected`) are logged.
    ended: Vec<StreamId>,
}

impl<W> Default for StreamTable<W> {
    fn default() -> Self {
        StreamTable { writers: HashMap::new(), transports: HashMap::new(), ended: Vec::new() }
    }
}

impl<W> StreamTable<W> {
    /// An empty table.
    pub fn new() -> StreamTable<W> {
        StreamTable::default()
    }

    /// A connection was accepted from `remote` over `transport` (`"tcp"`, `"tls"`, or `"ws"`
    /// and `"wss"` for MQTT over WebSocket, which the broker then speaks on it, see
    /// [`Broker::handle_stream_open_ws`]): the broker numbers it, and its output goes to
    /// `writer`.
    pub fn open(
        &mut self,
        broker: &mut Broker,
        now: Instant,
        remote: SocketAddr,
        transport: &'static str,
        writer: W,
    ) -> StreamId {
        let id = match transport {
            "ws" | "wss" => broker.handle_stream_open_ws(now, Some(remote)),
            _ => broker.handle_stream_open(now, Some(remote)),
        };
        self.writers.insert(id, writer);
        self.transports.insert(id, transport);
        id
    }

    /// A connection the adapter dialled for the broker ([`crate::broker::Dial::Open`]) is up
    /// under the broker's `id`: from now on it is routed like an accepted one. Report it to
    /// the broker with [`Broker::handle_dialed`].
    pub fn dialed(&mut self, id: StreamId, transport: &'static str, writer: W) {
        self.writers.insert(id, writer);
        self.transports.insert(id, transport);
    }

    /// The connection ended (closed by the client, failed, or its task finished): the table
    /// forgets its writer and the broker learns (ending the session if it was live).
    pub fn closed(&mut self, broker: &mut Broker, now: Instant, id: StreamId) {
        self.writers.remove(&id);
        broker.handle_stream_closed(now, id);
        self.ended.push(id);
    }

    /// Forgets a connection without telling the broker (the adapter tells it, or already has:
    /// a connection the broker closed or aborted). Its transport is kept until the events are
    /// next drained, for their log lines.
    pub fn remove(&mut self, id: StreamId) -> Option<W> {
        self.ended.push(id);
        self.writers.remove(&id)
    }

    /// The writer of a connection.
    pub fn get_mut(&mut self, id: StreamId) -> Option<&mut W> {
        self.writers.get_mut(&id)
    }

    /// Connections with a writer.
    pub fn len(&self) -> usize {
        self.writers.len()
    }

    /// Whether no connection has a writer.
    pub fn is_empty(&self) -> bool {
        self.writers.is_empty()
    }

    /// The transport a peer is connected over, for the log: `quic`, or the byte stream's
    /// (`tcp` when unknown).
    pub fn transport(&self, peer: &Peer) -> &'static str {
        match peer {
            Peer::Quic(_) => "quic",
            Peer::Stream(id) => self.transports.get(id).copied().unwrap_or("tcp"),
        }
    }

    /// Drains the broker's byte-stream output into the writers: data in order, then the close
    /// or abort that ends a connection. Output for a connection without a writer (gone
    /// meanwhile) is dropped: nobody can read it.
    pub fn route<Io: ?Sized>(&mut self, broker: &mut Broker, now: Instant, io: &mut Io)
    where
        W: StreamWriter<Io>,
    {
        while let Some((id, out)) = broker.poll_stream() {
            match out {
                StreamOutput::Data(bytes) => {
                    let Some(writer) = self.writers.get_mut(&id) else { continue };
                    match writer.data(io, bytes) {
                        Delivery::Queued => {}
                        Delivery::Written(n) => broker.handle_stream_written(id, n),
                        Delivery::Gone => drop(self.writers.remove(&id)),
                        Delivery::Failed => self.closed(broker, now, id),
                    }
                }
                StreamOutput::Abort => {
                    if let Some(writer) = self.writers.remove(&id) {
                        writer.abort(io);
                    }
                }
                // Close (and whatever ends a session in future versions).
                _ => {
                    if let Some(writer) = self.writers.remove(&id) {
                        writer.close(io);
                    }
                }
            }
        }
    }

    /// The broker's next event, as what to do with it (see [`lifecycle::handle`]): lifecycle
    /// lines name each connection's transport; in-process messages are for the embedding
    /// application. Call until `None` after every [`StreamTable::route`]; once drained, the
    /// transports of connections that ended are forgotten.
    #[must_use]
    pub fn poll_event(&mut self, broker: &mut Broker) -> Option<Handling> {
        loop {
            let Some(event) = broker.poll_event() else {
                for id in self.ended.drain(..) {
                    self.transports.remove(&id);
                }
                return None;
            };
            let transport = |peer: &Peer| broker.relayed_transport(peer).unwrap_or_else(|| self.transport(peer));
            if let Some(handling) = lifecycle::handle(event, transport) {
                return Some(handling);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::machine::BrokerConfig;
    use crate::config::ServerConfig;
    use crate::tls::{SelfSigned, ServerTls};

    /// A connection forgotten without `closed` (the mio broker's path for connections the
    /// broker closed itself) leaves nothing behind once the events are drained: its transport
    /// name went with it (found in review: one entry per such connection used to stay forever).
    #[test]
    fn every_way_out_forgets_the_transport() {
        let cert = SelfSigned::generate(&["localhost"]).unwrap();
        let mut broker =
            Broker::new(BrokerConfig::new(ServerConfig::new(ServerTls::from_self_signed(&cert).unwrap()))).unwrap();
        #[allow(clippy::disallowed_methods)]
        let now = Instant::now();
        let remote: SocketAddr = "192.0.2.1:1883".parse().unwrap();
        let mut table = StreamTable::new();
        let removed = table.open(&mut broker, now, remote, "tcp", ());
        let closed = table.open(&mut broker, now, remote, "tls", ());
        assert_eq!(table.transport(&Peer::Stream(closed)), "tls");
        table.remove(removed);
        table.closed(&mut broker, now, closed);
        while table.poll_event(&mut broker).is_some() {}
        assert!(table.is_empty());
        assert!(table.transports.is_empty(), "{:?}", table.transports);
    }
}
