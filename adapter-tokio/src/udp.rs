//! A UDP socket for QUIC: batched receive (recvmmsg, GRO) and ECN through quinn-udp.

use mqtt_quic_core::quic::Transmit;
use mqtt_quic_core::{Datagram, EcnCodepoint};
use quinn_udp::{RecvMeta, UdpSocketState, BATCH_SIZE};
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use tokio::io::Interest;

/// Room for one receive: a GRO batch is at most 64 KiB.
const SLOT: usize = 64 * 1024;

/// A bound UDP socket with quinn-udp's state and reusable receive buffers.
pub(crate) struct Udp {
    socket: tokio::net::UdpSocket,
    state: UdpSocketState,
    buf: Box<[u8]>,
    meta: Box<[RecvMeta; BATCH_SIZE]>,
    received: usize,
}

impl Udp {
    /// Binds `addr` (port 0 picks one).
    pub fn bind(addr: SocketAddr) -> io::Result<Udp> {
        Udp::open(std::net::UdpSocket::bind(addr)?)
    }

    /// Binds `addr` with `SO_REUSEPORT`, so that several sockets (one per shard) share it and
    /// the kernel spreads the flows over them (each flow, a sender's address and port, to one
    /// socket). Where the platform has no `SO_REUSEPORT`, an error.
    pub fn bind_shared(addr: SocketAddr) -> io::Result<Udp> {
        let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, None)?;
        #[cfg(unix)]
        socket.set_reuse_port(true)?;
        #[cfg(not(unix))]
        return Err(io::Error::new(io::ErrorKind::Unsupported, "SO_REUSEPORT, which several shards need"));
        #[cfg(unix)]
        {
            socket.bind(&addr.into())?;
            Udp::open(socket.into())
        }
    }

    fn open(std: std::net::UdpSocket) -> io::Result<Udp> {
        std.set_nonblocking(true)?;
        let state = UdpSocketState::new((&std).into())?;
        // Bigger kernel buffers ride out bursts; failure only costs drops under load.
        let _ = state.set_recv_buffer_size((&std).into(), 4 << 20);
        let _ = state.set_send_buffer_size((&std).into(), 4 << 20);
        Ok(Udp {
            socket: tokio::net::UdpSocket::from_std(std)?,
            state,
            buf: vec![0; SLOT * BATCH_SIZE].into_boxed_slice(),
            meta: Box::new([RecvMeta::default(); BATCH_SIZE]),
            received: 0,
        })
    }

    /// Most datagrams one send may carry (GSO); 1 where the platform has no GSO.
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Waits for datagrams and reads a batch; [`Udp::datagrams`] then walks it.
    pub async fn recv(&mut self) -> io::Result<()> {
        loop {
            self.socket.readable().await?;
            let mut chunks = self.buf.chunks_mut(SLOT);
            let mut slices: [IoSliceMut<'_>; BATCH_SIZE] =
                std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
            let (socket, state, meta) = (&self.socket, &self.state, &mut *self.meta);
            match socket.try_io(Interest::READABLE, || state.recv(socket.into(), &mut slices, meta)) {
                Ok(n) => {
                    self.received = n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                // An ICMP error for an earlier send (e.g. port unreachable) surfaces here on some
                // platforms; it concerns one peer, not the socket.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The datagrams of the last [`Udp::recv`], GRO batches split into their segments, borrowed
    /// from the socket's buffers.
    pub fn datagrams(&self) -> impl Iterator<Item = Datagram<'_>> {
        self.meta[..self.received].iter().zip(self.buf.chunks(SLOT)).flat_map(|(meta, slot)| {
            let ecn = meta.ecn.and_then(|e| EcnCodepoint::from_bits(e as u8));
            let stride = meta.stride.max(1);
            slot[..meta.len].chunks(stride).map(move |data| Datagram {
                remote: meta.addr,
                local_ip: meta.dst_ip,
                ecn,
                data,
            })
        })
    }

    /// Sends one datagram, waiting while the socket buffer is full.
    pub async fn send(&self, transmit: &Transmit, data: &[u8]) -> io::Result<()> {
        let t = quinn_udp::Transmit {
            destination: transmit.destination,
            ecn: transmit.ecn.and_then(|e| quinn_udp::EcnCodepoint::from_bits(e as u8)),
            contents: data,
            segment_size: transmit.segment_size,
            src_ip: transmit.src_ip,
        };
        loop {
            self.socket.writable().await?;
            match self.socket.try_io(Interest::WRITABLE, || self.state.send((&self.socket).into(), &t)) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}
