//! [`Server`]: a [`MioBroker`] on a thread of its own, behind a handle with the tokio and
//! async-std servers' methods (`start`, `addresses`, `shutdown`; blocking instead of async).
//!
//! ```no_run
//! use adapter_mio::server::{Server, ServerOptions};
//! use mqtt_quic_core::tls::{SelfSigned, ServerTls};
//!
//! let cert = SelfSigned::generate(&["localhost"])?;
//! let server = Server::start(ServerOptions::new(ServerTls::from_self_signed(&cert)?))?;
//! println!("listening on {:?}", server.addresses());
//! server.shutdown();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::broker::MioBroker;
use mio::{Events, Poll, Token, Waker};
pub use mqtt_quic_core::driver::{ServerAddresses, ServerError, ServerOptions};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A broker running on its own thread with its own `Poll`, until [`Server::shutdown`].
/// Dropping it does not stop it.
pub struct Server {
    addresses: ServerAddresses,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Opens the listeners (QUIC and plain TCP: a TLS listener is refused with
    /// [`ServerError::Unsupported`]), then serves on a new thread.
    pub fn start(options: ServerOptions) -> Result<Server, ServerError> {
        const WAKE: Token = Token(0);
        let mut poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let mut broker = MioBroker::bind(options, poll.registry(), Token(1))?;
        let addresses = broker.addresses();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new().name("mqtt-broker".into()).spawn(move || {
            let mut events = Events::with_capacity(1024);
            let mut shutting = false;
            loop {
                if stopping.load(Ordering::SeqCst) && !shutting {
                    shutting = true;
                    broker.shutdown(poll.registry());
                }
                if shutting && broker.is_done() {
                    break;
                }
                let timeout = broker.timeout();
                if let Err(e) = poll.poll(&mut events, timeout) {
                    if e.kind() != io::ErrorKind::Interrupted {
                        break;
                    }
                }
                for event in events.iter() {
                    broker.handle_event(poll.registry(), event);
                }
                broker.handle_timeout(poll.registry());
            }
        })?;
        Ok(Server { addresses, stop, waker, thread: Some(thread) })
    }

    /// The QUIC listener's address.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.addresses.quic
    }

    /// The TCP listener's address.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.addresses.tcp
    }

    /// Every listener's address (the same type from every adapter's server).
    pub fn addresses(&self) -> ServerAddresses {
        self.addresses
    }

    /// Stops accepting, tells every client the server is shutting down (DISCONNECT 0x8B for
    /// MQTT 5), waits up to the shutdown grace for them to go, and returns once the broker's
    /// thread has ended.
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
