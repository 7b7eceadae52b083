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
use mqtt_proto::{Publish, QoS, TopicFilter};
use mqtt_quic_core::broker::local::{LocalSink, LocalSubscription};
pub use mqtt_quic_core::driver::{ServerAddresses, ServerError, ServerOptions};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A broker running on its own thread with its own `Poll`, until [`Server::shutdown`].
/// Dropping it does not stop it.
pub struct Server {
    addresses: ServerAddresses,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    /// The broker's thread, with the store's error if it failed.
    thread: Option<JoinHandle<Result<(), ServerError>>>,
    /// In-process subscriptions and publishes, to the broker's thread (woken by `waker`).
    local: Local,
}

/// What the application asks of the broker in-process (see [`Server::subscribe`]).
type LocalCommand = mqtt_quic_core::broker::local::LocalCommand<Box<dyn LocalSink + Send>>;

/// The way to the broker's thread for in-process calls: a queue and its wake-up.
#[derive(Clone)]
struct Local {
    commands: Sender<LocalCommand>,
    waker: Arc<Waker>,
}

impl Local {
    fn send(&self, command: LocalCommand) -> Result<(), ServerError> {
        self.commands.send(command).map_err(|_| ServerError::NotRunning)?;
        let _ = self.waker.wake();
        Ok(())
    }
}

/// An in-process subscription's queue, from the broker's side: unbounded, because the
/// broker's window bounds what is in it (see [`mqtt_quic_core::broker::local`]).
struct LocalTx(Sender<Publish>);

impl LocalSink for LocalTx {
    fn deliver(&mut self, publish: Publish) -> bool {
        self.0.send(publish).is_ok()
    }
}

/// The messages of an in-process subscription ([`Server::subscribe`]), in order. Each one
/// taken makes room for the next in the broker's window: one not taken holds the rest back in
/// the broker (bounded there like a slow client's), never the broker itself. Dropping it ends
/// the subscription.
pub struct LocalMessages {
    rx: Receiver<Publish>,
    subscription: LocalSubscription,
    broker: Local,
}

impl LocalMessages {
    /// The next message, waiting for it; `None` once the broker has stopped.
    pub fn recv(&mut self) -> Option<Publish> {
        let publish = self.rx.recv().ok()?;
        self.taken();
        Some(publish)
    }

    /// The next message, waiting at most `timeout`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Option<Publish> {
        let publish = self.rx.recv_timeout(timeout).ok()?;
        self.taken();
        Some(publish)
    }

    fn taken(&self) {
        let _ = self.broker.send(LocalCommand::Taken(self.subscription, 1));
    }
}

impl Drop for LocalMessages {
    fn drop(&mut self) {
        let _ = self.broker.send(LocalCommand::Unsubscribe(self.subscription));
    }
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
        let (commands, local) = mpsc::channel::<LocalCommand>();
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
                while let Ok(command) = local.try_recv() {
                    broker.handle_local(poll.registry(), command);
                }
                broker.handle_timeout(poll.registry());
            }
            log::info!("broker stopped");
            // The last commit, durable; an error is logged (by the broker) and kept for `wait`.
            broker.close()
        })?;
        let local = Local { commands, waker: waker.clone() };
        Ok(Server { addresses, stop, waker, thread: Some(thread), local })
    }

    /// Subscribes the application in-process: messages matching `filter`, at up to `qos`,
    /// from every transport, arrive in the returned queue (the retained ones first). No
    /// connection is involved: no client id, no authentication.
    pub fn subscribe(&self, filter: TopicFilter, qos: QoS) -> Result<LocalMessages, ServerError> {
        let (tx, rx) = mpsc::channel();
        let (reply, subscription) = mpsc::sync_channel(1);
        let reply = Box::new(move |s| reply.send(s).is_ok());
        let sink: Box<dyn LocalSink + Send> = Box::new(LocalTx(tx));
        self.local.send(LocalCommand::Subscribe { filter, qos, sink, reply })?;
        let subscription = subscription.recv().map_err(|_| ServerError::NotRunning)?;
        Ok(LocalMessages { rx, subscription, broker: self.local.clone() })
    }

    /// Subscribes `handler` in-process: it runs, on a thread of its own, for each message
    /// matching `filter` (see [`Server::subscribe`]), until the broker stops.
    pub fn on_message(
        &self,
        filter: TopicFilter,
        qos: QoS,
        mut handler: impl FnMut(Publish) + Send + 'static,
    ) -> Result<(), ServerError> {
        let mut messages = self.subscribe(filter, qos)?;
        std::thread::Builder::new().name("mqtt-handler".into()).spawn(move || {
            while let Some(m) = messages.recv() {
                handler(m);
            }
        })?;
        Ok(())
    }

    /// Publishes from the application in-process, as a client would (retained if asked), to
    /// subscribers on every transport; returns once the broker has routed it, or with the
    /// reason it refused it ([`ServerError::Refused`]).
    pub fn publish(&self, publish: Publish) -> Result<(), ServerError> {
        let (reply, verdict) = mpsc::sync_channel(1);
        let reply = Box::new(move |v| {
            let _ = reply.send(v);
        });
        self.local.send(LocalCommand::Publish { publish, reply })?;
        verdict.recv().map_err(|_| ServerError::NotRunning)?.map_err(ServerError::Refused)
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
