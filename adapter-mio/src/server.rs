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
    /// The broker's thread, with the store's error if it failed.
    thread: Option<JoinHandle<Result<(), ServerError>>>,
}

impl Server {
    /// Reads the store back (with `options.broker.persistence` on: from `options.data_dir`;
    /// [`ServerError::Store`] if it cannot be opened or read), opens the listeners (QUIC and
    /// plain TCP: a TLS listener is refused with [`ServerError::Unsupported`]), then serves on
    /// a new thread.
    pub fn start(options: ServerOptions) -> Result<Server, ServerError> {
        const WAKE: Token = Token(0);
        let mut poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let mut broker = MioBroker::bind(options, poll.registry(), Token(1))?;
        // Store reports and password verdicts wake the loop at once.
        broker.set_waker(waker.clone());
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
                // Done after a shutdown, or at once if the store failed.
                if broker.is_done() {
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
            log::info!("broker stopped");
            // The last commit, durable; an error is logged (by the broker) and kept for `wait`.
            broker.close()
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
    /// MQTT 5), waits up to the shutdown grace for them to go, closes the store (a last durable
    /// commit) and returns once the broker's thread has ended. A store error is logged, as
    /// every one is (see [`Server::wait`] to get it as a value).
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            // Logged on the thread already.
            let _ = t.join();
        }
    }

    /// Blocks until the broker's thread ends, which it does by itself only when the store
    /// fails (for a process that serves until it is killed): then the error is
    /// [`ServerError::Store`] (the broker stopped serving, since nothing more could be
    /// acknowledged), and a process that serves nothing any more should exit with a failure
    /// status so that its supervisor restarts it. Any other end is [`ServerError::Stopped`] (a
    /// bug). After it returns, [`Server::shutdown`] has nothing left to wait for.
    pub fn wait(&mut self) -> Result<(), ServerError> {
        let Some(thread) = self.thread.take() else {
            return Err(ServerError::Stopped("the broker thread ended"));
        };
        match thread.join() {
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => Err(ServerError::Stopped("the broker thread ended")),
            Err(_) => Err(ServerError::Stopped("the broker thread panicked")),
        }
    }
}
