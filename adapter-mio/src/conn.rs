//! A non-blocking connection with an output buffer: TCP, or one end of a socket pair whose
//! other end carries the application's own connection (see
//! [`MioClient::connect_with`](crate::client::MioClient::connect_with)).

use bytes::{Buf, BytesMut};
use mio::event::Source;
use mio::net::{TcpStream, UnixStream};
use mio::{Interest, Registry, Token};
use std::io::{self, Read, Write};

/// The socket under a [`Conn`].
pub(crate) enum Stream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// Our end of a socket pair; threads move bytes between the other end and the
    /// application's connection.
    Piped(UnixStream),
}

impl Stream {
    /// A pending connect's error, if it failed.
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        match self {
            Stream::Tcp(s) => s.take_error(),
            Stream::Piped(s) => s.take_error(),
        }
    }

    /// Whether a TCP connect has completed (`Err(NotConnected)` while it has not); a socket
    /// pair is connected from the start.
    pub fn connected(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.peer_addr().map(drop),
            Stream::Piped(_) => Ok(()),
        }
    }

    fn shutdown_write(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            Stream::Piped(s) => s.shutdown(std::net::Shutdown::Write),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Piped(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Piped(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Source for Stream {
    fn register(&mut self, registry: &Registry, token: Token, interests: Interest) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.register(registry, token, interests),
            Stream::Piped(s) => s.register(registry, token, interests),
        }
    }

    fn reregister(&mut self, registry: &Registry, token: Token, interests: Interest) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.reregister(registry, token, interests),
            Stream::Piped(s) => s.reregister(registry, token, interests),
        }
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.deregister(registry),
            Stream::Piped(s) => s.deregister(registry),
        }
    }
}

pub(crate) struct Conn {
    pub stream: Stream,
    out: BytesMut,
    /// Close once `out` is written.
    pub closing: bool,
}

/// What reading found.
pub(crate) enum ReadOutcome {
    /// Still open.
    Open,
    /// The peer closed, or the connection failed.
    Closed,
}

impl Conn {
    pub fn new(stream: TcpStream) -> Conn {
        let _ = stream.set_nodelay(true);
        Conn::over(Stream::Tcp(stream))
    }

    /// A connection over any [`Stream`].
    pub fn over(stream: Stream) -> Conn {
        Conn { stream, out: BytesMut::new(), closing: false }
    }

    /// Reads everything available, handing each chunk to `f`.
    pub fn read_all(&mut self, buf: &mut [u8], mut f: impl FnMut(&[u8])) -> ReadOutcome {
        loop {
            match self.stream.read(buf) {
                Ok(0) => return ReadOutcome::Closed,
                Ok(n) => f(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::Open,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return ReadOutcome::Closed,
            }
        }
    }

    /// Queues bytes and writes what the socket takes; returns the bytes written, or `None` if
    /// the connection failed.
    pub fn write(&mut self, data: &[u8]) -> Option<usize> {
        self.out.extend_from_slice(data);
        self.flush()
    }

    /// Writes what is queued while the socket takes it; the bytes written, or `None` on failure.
    pub fn flush(&mut self) -> Option<usize> {
        let mut written = 0;
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(0) => return None,
                Ok(n) => {
                    self.out.advance(n);
                    written += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return None,
            }
        }
        if self.out.is_empty() && self.closing {
            self.stream.shutdown_write();
        }
        Some(written)
    }

    /// Whether everything queued has been written.
    pub fn is_drained(&self) -> bool {
        self.out.is_empty()
    }
}
