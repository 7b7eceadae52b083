//! A non-blocking TCP connection with an output buffer.

use bytes::{Buf, BytesMut};
use mio::net::TcpStream;
use std::io::{self, Read, Write};

pub(crate) struct Conn {
    pub stream: TcpStream,
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
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Some(written)
    }

    /// Whether everything queued has been written.
    pub fn is_drained(&self) -> bool {
        self.out.is_empty()
    }
}
