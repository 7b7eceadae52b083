//! The driving interface every machine shares, so an adapter or a simulator writes its loop once.

use crate::quic::Transmit;
use crate::EcnCodepoint;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

/// One received UDP datagram, as every machine takes it: who sent it, the bytes, and what the
/// socket could tell about it. One value rather than four arguments, so that every machine's
/// `handle_datagram` reads the same and a new field (a receive timestamp, say) is one change.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    /// The sender.
    pub remote: SocketAddr,
    /// The local address it arrived at, when the socket reports it (replies then leave from
    /// it, which matters on hosts with several addresses).
    pub local_ip: Option<IpAddr>,
    /// Its ECN marking, when the socket reports it.
    pub ecn: Option<EcnCodepoint>,
    /// Its payload.
    pub data: &'a [u8],
}

impl<'a> Datagram<'a> {
    /// A datagram from `remote`, without local address or ECN marking.
    pub fn new(remote: SocketAddr, data: &'a [u8]) -> Datagram<'a> {
        Datagram { remote, local_ip: None, ecn: None, data }
    }
}

/// Datagram in, datagrams and deadlines out. Events are machine-specific and polled on the
/// concrete type. See the crate docs for the order in which to drain outputs.
pub trait Machine {
    /// Feeds one received UDP datagram.
    fn handle_datagram(&mut self, now: Instant, datagram: Datagram<'_>);
    /// Advances timers; early calls do nothing.
    fn handle_timeout(&mut self, now: Instant);
    /// The next datagram to send, written into `buf`.
    #[must_use]
    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit>;
    /// Up to `max_datagrams` datagrams to one destination at once, for sockets with GSO (see
    /// [`Transmit::segment_size`]). Machines that cannot batch send one.
    #[must_use]
    fn poll_transmit_batch(&mut self, now: Instant, max_datagrams: usize, buf: &mut Vec<u8>) -> Option<Transmit> {
        let _ = max_datagrams;
        self.poll_transmit(now, buf)
    }
    /// When to call `handle_timeout` next.
    #[must_use]
    fn poll_timeout(&mut self) -> Option<Instant>;
}

/// Implements [`Machine`] for a type by forwarding every method to the type's inherent method
/// of the same name and signature, so that the trait and the inherent API cannot drift apart.
macro_rules! forward_machine {
    (impl<$($generic:ident),*> for $ty:ty) => {
        impl<$($generic),*> $crate::machine::Machine for $ty {
            fn handle_datagram(&mut self, now: ::std::time::Instant, datagram: $crate::machine::Datagram<'_>) {
                <$ty>::handle_datagram(self, now, datagram)
            }
            fn handle_timeout(&mut self, now: ::std::time::Instant) {
                <$ty>::handle_timeout(self, now)
            }
            fn poll_transmit(
                &mut self,
                now: ::std::time::Instant,
                buf: &mut Vec<u8>,
            ) -> ::std::option::Option<$crate::quic::Transmit> {
                <$ty>::poll_transmit(self, now, buf)
            }
            fn poll_transmit_batch(
                &mut self,
                now: ::std::time::Instant,
                max_datagrams: usize,
                buf: &mut Vec<u8>,
            ) -> ::std::option::Option<$crate::quic::Transmit> {
                <$ty>::poll_transmit_batch(self, now, max_datagrams, buf)
            }
            fn poll_timeout(&mut self) -> ::std::option::Option<::std::time::Instant> {
                <$ty>::poll_timeout(self)
            }
        }
    };
    ($ty:ty) => {
        $crate::machine::forward_machine!(impl<> for $ty);
    };
}
pub(crate) use forward_machine;

forward_machine!(crate::quic::QuicEndpoint);
