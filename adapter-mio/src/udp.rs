//! A non-blocking UDP socket that keeps the one datagram the kernel would not take.

use mio::net::UdpSocket;
use mqtt_quic_core::quic::Transmit;
use std::io;
use std::net::SocketAddr;

/// Largest datagram we read.
const MAX_DATAGRAM: usize = 65_536;

pub(crate) struct Udp {
    pub socket: UdpSocket,
    recv_buf: Box<[u8]>,
    /// A datagram that met a full send buffer: sent first when the socket is writable again.
    stalled: Option<(SocketAddr, Vec<u8>)>,
}

impl Udp {
    pub fn bind(addr: SocketAddr) -> io::Result<Udp> {
        Ok(Udp { socket: UdpSocket::bind(addr)?, recv_buf: vec![0; MAX_DATAGRAM].into_boxed_slice(), stalled: None })
    }

    /// Reads every datagram waiting, handing each to `f`.
    pub fn recv_all(&mut self, mut f: impl FnMut(SocketAddr, &[u8])) {
        loop {
            match self.socket.recv_from(&mut self.recv_buf) {
                Ok((n, from)) => f(from, &self.recv_buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // ICMP errors of earlier sends and the like: one peer's trouble, not ours.
                Err(_) => continue,
            }
        }
    }

    /// Whether a datagram waits for the socket to become writable.
    pub fn is_stalled(&self) -> bool {
        self.stalled.is_some()
    }

    /// Sends the stalled datagram, if any; false if the socket is still full.
    pub fn retry(&mut self) -> bool {
        let Some((to, data)) = self.stalled.take() else { return true };
        match self.socket.send_to(&data, to) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.stalled = Some((to, data));
                false
            }
            _ => true,
        }
    }

    /// Sends a transmit datagram by datagram; false if the socket filled up (the rest of the
    /// datagrams of this transmit are kept only up to the first that did not fit: QUIC resends
    /// what is lost).
    pub fn send(&mut self, t: &Transmit, buf: &[u8]) -> bool {
        for d in t.datagrams(buf) {
            match self.socket.send_to(d, t.destination) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.stalled = Some((t.destination, d.to_vec()));
                    return false;
                }
                _ => {}
            }
        }
        true
    }
}
