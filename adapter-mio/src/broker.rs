//! A broker that lives in your `mio::Poll` loop ([`MioBroker`]), or on a thread of its own
//! ([`spawn`]).

use crate::conn::{Conn, ReadOutcome};
use crate::now;
use crate::udp::Udp;
use mio::event::Event;
use mio::net::TcpListener;
use mio::{Interest, Registry, Token, Waker};
use mqtt_proto::Publish;
use mqtt_quic_core::broker::auth::{AuthId, AuthRequest, AuthVerdict};
use mqtt_quic_core::broker::lifecycle::Handling;
use mqtt_quic_core::broker::local::{LocalCommand, LocalSink, LocalSinks, DEFAULT_WINDOW};
use mqtt_quic_core::broker::machine::{Broker, LocalSubscription, StreamId};
use mqtt_quic_core::broker::stream_table::{Delivery, StreamTable, StreamWriter};
use mqtt_quic_core::broker::Dial;
use mqtt_quic_core::driver::{ServerAddresses, ServerError, ServerOptions};
use mqtt_quic_core::Datagram;
use mqtt_store::{BrokerStore, StoreError};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Duration;

/// How long a connection the broker closed reads (and discards) what its client still sends
/// once the broker's last bytes are written, so that the client gets the DISCONNECT rather than a
/// reset.
const DRAIN: Duration = Duration::from_secs(2);

/// Whether a connection the broker closed has written everything (and shut its write side).
fn closing_written(conn: &Conn) -> bool {
    conn.closing && conn.is_drained()
}

/// A TCP connection in the [`StreamTable`]: its token among the broker's [`Sockets`].
struct ConnToken(Token);

/// The broker's TCP connections, as writing to them needs them.
struct Sockets<'a> {
    registry: &'a Registry,
    conns: &'a mut HashMap<Token, (StreamId, Conn)>,
    closing: &'a mut HashMap<Token, std::time::Instant>,
    write_timeout: Duration,
}

impl Sockets<'_> {
    /// Deregisters and forgets a connection; its stream, if it was one.
    fn drop_conn(
        conns: &mut HashMap<Token, (StreamId, Conn)>,
        closing: &mut HashMap<Token, std::time::Instant>,
        registry: &Registry,
        token: Token,
    ) -> Option<StreamId> {
        closing.remove(&token);
        let (id, mut conn) = conns.remove(&token)?;
        let _ = registry.deregister(&mut conn.stream);
        Some(id)
    }
}

impl StreamWriter<Sockets<'_>> for ConnToken {
    fn data(&mut self, io: &mut Sockets<'_>, bytes: bytes::Bytes) -> Delivery {
        let Some((_, conn)) = io.conns.get_mut(&self.0) else { return Delivery::Gone };
        match conn.write(&bytes) {
            Some(n) => Delivery::Written(n),
            None => {
                Sockets::drop_conn(io.conns, io.closing, io.registry, self.0);
                Delivery::Failed
            }
        }
    }

    fn close(self, io: &mut Sockets<'_>) {
        let Some((_, conn)) = io.conns.get_mut(&self.0) else { return };
        conn.closing = true;
        if conn.flush().is_none() {
            Sockets::drop_conn(io.conns, io.closing, io.registry, self.0);
        } else if conn.is_drained() {
            // Written and shut down: drain the client's input for a moment (see
            // `handle_event`), then drop it.
            io.closing.insert(self.0, now() + DRAIN);
        } else {
            // Its last bytes get the write timeout to go out; a client that takes none is
            // dropped with them (see `handle_timeout`).
            io.closing.insert(self.0, now() + io.write_timeout);
        }
    }

    fn abort(self, io: &mut Sockets<'_>) {
        Sockets::drop_conn(io.conns, io.closing, io.registry, self.0);
    }
}

/// How often the loop looks for password verdicts and store reports while some are
/// outstanding, when no [`MioBroker::set_waker`] waker tells it.
const AUTH_POLL: Duration = Duration::from_millis(2);

/// The `Waker` of the caller's `Poll`, once given ([`MioBroker::set_waker`]), shared with the
/// threads that work for the broker off its loop (password checks, the store's commits).
#[derive(Clone, Default)]
struct LoopWaker(Arc<OnceLock<Arc<Waker>>>);

impl LoopWaker {
    /// Wakes the loop, if a waker was given.
    fn wake(&self) {
        if let Some(waker) = self.0.get() {
            let _ = waker.wake();
        }
    }

    /// Whether a waker was given (then nothing needs to be looked for on a short timeout).
    fn is_set(&self) -> bool {
        self.0.get().is_some()
    }
}

/// A broker registered with a caller's `Registry`. It uses the tokens from `base` upwards:
/// `base` for UDP, `base + 1` for the TCP listener, `base + 2` for the WebSocket listener, and
/// one per TCP connection after that, so keep your own tokens below `base`.
///
/// # Driving it
///
/// After every `Poll::poll`, hand it each event ([`MioBroker::handle_event`]), then call
/// [`MioBroker::handle_timeout`] (whether or not a timer is due: it also picks up the work
/// done off the loop), and sleep at most [`MioBroker::timeout`] in the next poll.
///
/// # Persistence
///
/// With `options.broker.persistence` on, [`MioBroker::bind`] reads the store in
/// `options.data_dir` back into the broker before it opens any listener, and a thread of its
/// own commits the broker's changes (see [`mqtt_quic_core::persist`]). Its reports reach the
/// broker in `handle_event` and `handle_timeout`, with nothing new for the loop to do: while a
/// commit is outstanding, [`MioBroker::timeout`] stays short (a couple of milliseconds), as it
/// does for password checks; give the broker your `Poll`'s `Waker` with
/// [`MioBroker::set_waker`] to be woken instead. If the store fails, the broker logs the error
/// and stops (it drops its sockets and [`MioBroker::is_done`] turns true: nothing more could be
/// acknowledged). At the end, [`MioBroker::close`] makes the last commit durably and returns
/// the store's error, if any; dropping the broker commits too, but nobody learns of an error.
pub struct MioBroker {
    broker: Broker,
    udp: Option<Udp>,
    listener: Option<TcpListener>,
    /// MQTT over WebSocket (`ServerOptions::ws`): the broker speaks WebSocket on its
    /// connections.
    ws_listener: Option<TcpListener>,
    conns: HashMap<Token, (StreamId, Conn)>,
    /// Which connection each of the broker's streams is, and its transport (see
    /// [`StreamTable`]).
    streams: StreamTable<ConnToken>,
    base: usize,
    next: usize,
    max_connections: usize,
    grace: Duration,
    buf: Vec<u8>,
    read_buf: Box<[u8]>,
    /// Connections the broker closed whose last bytes are still being written, with the moment
    /// they are dropped anyway.
    closing: HashMap<Token, std::time::Instant>,
    write_timeout: Duration,
    /// Set by a shutdown: when it ends whatever is still closing.
    shutdown_until: Option<std::time::Instant>,
    /// Password checks run on worker threads (see [`AuthWorkers`]), so the loop never spends
    /// milliseconds of PBKDF2 on one client while others wait.
    auth: AuthWorkers,
    /// Messages of in-process subscriptions made on the machine directly (see
    /// [`MioBroker::poll_message`]).
    local: VecDeque<(LocalSubscription, Publish)>,
    /// In-process subscriptions with a sink and a window (see [`MioBroker::handle_local`]).
    sinks: LocalSinks<Box<dyn LocalSink + Send>>,
    /// The store (nothing at all with persistence off) and its commit thread's reports.
    store: BrokerStore,
    reports: mpsc::Receiver<Result<u64, StoreError>>,
    /// Whether the store failed: the broker has stopped.
    failed: bool,
    /// Wakes the caller's loop when a verdict or a report comes, once given.
    waker: LoopWaker,
    /// Outcomes of the bridges' dials, from their threads, and how many are out.
    dials: (mpsc::Sender<DialOutcome>, mpsc::Receiver<DialOutcome>),
    dials_out: usize,
}

/// What a dialling thread did (see `MioBroker::dial`).
enum DialOutcome {
    Opened(mqtt_quic_core::broker::machine::StreamId, Result<std::net::TcpStream, String>),
    Resolved(mqtt_quic_core::broker::BridgeId, mqtt_quic_core::url::BrokerUrl, Result<SocketAddr, String>),
}

/// How long a bridge's TCP connect may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Threads that verify passwords. The loop hands them requests and collects verdicts when it
/// wakes; while any is out, [`MioBroker::timeout`] is kept short so that a verdict is picked up
/// within a couple of milliseconds without a second `Waker` on the caller's `Poll` (mio allows
/// one per `Poll`, and the caller may have its own), unless the caller shares its own
/// ([`MioBroker::set_waker`]).
struct AuthWorkers {
    requests: Option<mpsc::Sender<AuthRequest>>,
    verdicts: mpsc::Receiver<(AuthId, AuthVerdict)>,
    out: usize,
}

impl AuthWorkers {
    /// Starts the threads (none without authentication); they end when the broker is dropped.
    fn start(needed: bool, waker: &LoopWaker) -> AuthWorkers {
        let (done, verdicts) = mpsc::channel();
        if !needed {
            return AuthWorkers { requests: None, verdicts, out: 0 };
        }
        let (requests, jobs) = mpsc::channel::<AuthRequest>();
        let jobs = Arc::new(std::sync::Mutex::new(jobs));
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1));
        for _ in 0..workers {
            let (jobs, done, waker) = (jobs.clone(), done.clone(), waker.clone());
            let spawned = std::thread::Builder::new().name("mqtt-auth".into()).spawn(move || loop {
                let job = jobs.lock().map_err(drop).and_then(|j| j.recv().map_err(drop));
                let Ok(request) = job else { break };
                if done.send((request.id(), request.verify())).is_err() {
                    break;
                }
                waker.wake();
            });
            // Without a thread the requests wait, and their clients time out at CONNECT.
            drop(spawned);
        }
        AuthWorkers { requests: Some(requests), verdicts, out: 0 }
    }
}

impl MioBroker {
    /// Reads the store back (with `options.broker.persistence` on: from `options.data_dir`),
    /// then opens the listeners and registers them. Fails before opening any listener if the
    /// store cannot be opened or read ([`ServerError::Store`]).
    pub fn bind(mut options: ServerOptions, registry: &Registry, base: Token) -> Result<MioBroker, ServerError> {
        if !options.extra_listeners.is_empty() {
            return Err(ServerError::Unsupported("several listeners of a kind (this adapter opens one of each)"));
        }
        if options.shards > 1 {
            return Err(ServerError::Unsupported("several shards (this adapter runs the broker on one machine)"));
        }
        if options.tls.is_some() || options.wss.is_some() {
            return Err(ServerError::Unsupported("a TLS or wss listener (this adapter serves QUIC, plain TCP and ws)"));
        }
        options.check_bridges()?;
        let write_timeout = options.broker.write_timeout;
        // QUIC keys and assigned client ids from the OS random source, unless given.
        options.broker.quic.secret.get_or_insert_with(|| mqtt_quic_core::config::Secret::new(crate::os_secret()));
        let mut broker = Broker::new(options.broker.clone())?;
        // The store is read back before any listener opens: no client sees a broker that has
        // not yet remembered its sessions. Reports come back through a channel, picked up
        // whenever the loop hands the broker something (see "Persistence" above).
        let waker = LoopWaker::default();
        let (reported, reports) = mpsc::channel();
        let wake = waker.clone();
        let mut store = BrokerStore::open(&options, &mut broker, now(), move |r| {
            let _ = reported.send(r);
            wake.wake();
        })?;
        if let Some(line) = store.summary() {
            log::info!("{line}");
        }
        // What restoring changed (records dropped as expired) goes to the store at once.
        store.submit(&mut broker, now());
        let auth = AuthWorkers::start(options.broker.auth.is_some(), &waker);
        let mut udp = match options.quic {
            Some(addr) => {
                Some(Udp::bind(addr).map_err(|source| ServerError::Bind { what: "QUIC (UDP)", addr, source })?)
            }
            None => None,
        };
        let bind = |what: &'static str, addr: Option<SocketAddr>| match addr {
            Some(addr) => TcpListener::bind(addr).map(Some).map_err(|source| ServerError::Bind { what, addr, source }),
            None => Ok(None),
        };
        let mut listener = bind("TCP", options.tcp)?;
        let mut ws_listener = bind("WebSocket (TCP)", options.ws)?;
        if let Some(u) = &mut udp {
            registry.register(&mut u.socket, base, Interest::READABLE | Interest::WRITABLE)?;
        }
        if let Some(l) = &mut listener {
            registry.register(l, Token(base.0 + 1), Interest::READABLE)?;
        }
        if let Some(l) = &mut ws_listener {
            registry.register(l, Token(base.0 + 2), Interest::READABLE)?;
        }
        Ok(MioBroker {
            broker,
            udp,
            listener,
            ws_listener,
            conns: HashMap::new(),
            streams: StreamTable::new(),
            base: base.0,
            next: base.0 + 3,
            max_connections: options.tcp_max_connections,
            grace: options.shutdown_grace,
            buf: Vec::with_capacity(2048),
            read_buf: vec![0; 64 * 1024].into_boxed_slice(),
            closing: HashMap::new(),
            write_timeout,
            shutdown_until: None,
            auth,
            local: VecDeque::new(),
            sinks: LocalSinks::default(),
            store,
            reports,
            failed: false,
            waker,
            dials: mpsc::channel(),
            dials_out: 0,
        })
        .map(|mut b| {
            // Bridges start connecting upstream.
            b.broker.start(now());
            b
        })
    }

    /// Gives the broker your `Poll`'s `Waker` (mio allows one per `Poll`; share yours): the
    /// broker's threads (the store's commits, password checks) then wake your loop when they
    /// have something for it, instead of [`MioBroker::timeout`] staying short while they work.
    /// When it wakes your `Poll`, call [`MioBroker::handle_timeout`] as after every poll. Only
    /// the first call counts.
    pub fn set_waker(&mut self, waker: Arc<Waker>) {
        let _ = self.waker.0.set(waker);
    }

    /// Closes the store: commits what is left, durably, and stops its thread. Call it once
    /// [`MioBroker::is_done`] (after [`MioBroker::shutdown`], or when the store failed). With
    /// persistence off it does nothing.
    ///
    /// # Errors
    ///
    /// [`ServerError::Store`] if the store failed while the broker ran (the error it stopped
    /// for) or the last commit failed (then it is also logged).
    pub fn close(mut self) -> Result<(), ServerError> {
        let failed = self.failed;
        // (A store that failed ignores what it is handed and reports its error.)
        self.store.close(&mut self.broker, now()).map_err(|e| {
            if !failed {
                log::error!("{e}");
            }
            ServerError::Store(e.to_string())
        })
    }

    /// The QUIC listener's address.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.udp.as_ref().and_then(|u| u.socket.local_addr().ok())
    }

    /// The TCP listener's address.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Every listener's address (the same type from every adapter's server; never a TLS one
    /// here).
    pub fn addresses(&self) -> ServerAddresses {
        let ws = self.ws_listener.as_ref().and_then(|l| l.local_addr().ok());
        ServerAddresses { quic: self.quic_addr(), tcp: self.tcp_addr(), tls: None, ws, wss: None }
    }

    /// The broker machine (in-process subscriptions and publishes, statistics). The messages
    /// of its in-process subscriptions ([`Broker::subscribe_local`]) come out of
    /// [`MioBroker::poll_message`]: they wait there until taken, so a caller that subscribes
    /// polls them after every event.
    pub fn broker(&mut self) -> &mut Broker {
        &mut self.broker
    }

    /// What the application asks in-process (the threaded [`Server`](crate::server::Server)'s
    /// `subscribe` and `publish` come here): subscriptions with a sink get a window of
    /// [`DEFAULT_WINDOW`] messages, refilled by [`LocalCommand::Taken`] (see
    /// [`mqtt_quic_core::broker::local`]). Their messages go to the sink, not to
    /// [`MioBroker::poll_message`].
    pub fn handle_local(&mut self, registry: &Registry, command: LocalCommand<Box<dyn LocalSink + Send>>) {
        self.sinks.handle(&mut self.broker, now(), DEFAULT_WINDOW, command);
        self.flush(registry);
    }

    /// The next message for an in-process subscription made on the machine directly
    /// ([`MioBroker::broker`]), with the subscription it matched. Take them after every turn
    /// of the loop: they wait here until taken.
    pub fn poll_message(&mut self) -> Option<(LocalSubscription, Publish)> {
        self.local.pop_front()
    }

    /// Feeds a readiness event; false if it is not one of the broker's tokens.
    pub fn handle_event(&mut self, registry: &Registry, event: &Event) -> bool {
        let token = event.token();
        if token.0 < self.base {
            return false;
        }
        if self.failed {
            // Stopped: its sockets are gone; an event polled before that is stale.
            return token.0 < self.next;
        }
        let t = now();
        self.collect_verdicts();
        self.collect_dials(registry);
        if !self.collect_reports(registry) {
            return true;
        }
        if token.0 == self.base {
            if let Some(udp) = &mut self.udp {
                if event.is_writable() {
                    udp.retry();
                }
                let broker = &mut self.broker;
                if event.is_readable() {
                    udp.recv_all(|from, data| broker.handle_datagram(t, Datagram::new(from, data)));
                }
            }
        } else if token.0 == self.base + 1 {
            self.accept(registry, false);
        } else if token.0 == self.base + 2 {
            self.accept(registry, true);
        } else if let Some((id, conn)) = self.conns.get_mut(&token) {
            let id = *id;
            let mut closed = false;
            if event.is_writable() {
                match conn.flush() {
                    Some(n) => self.broker.handle_stream_written(id, n),
                    None => closed = true,
                }
            }
            if !closed && event.is_readable() {
                let broker = &mut self.broker;
                closed = matches!(
                    conn.read_all(&mut self.read_buf, |d| broker.handle_stream_data(t, id, d)),
                    ReadOutcome::Closed
                );
            }
            if closing_written(conn) && self.closing.get(&token).is_none_or(|at| *at > t + DRAIN) {
                // Its last bytes are out: read and discard what the client still sends (so it
                // reads the DISCONNECT instead of a reset) until it closes, for a short while.
                self.closing.insert(token, t + DRAIN);
            }
            if closed {
                self.drop_conn(registry, token);
                self.streams.closed(&mut self.broker, t, id);
            }
        } else {
            return false;
        }
        self.flush(registry);
        true
    }

    /// Hands the broker the store's reports; false if the store failed (the broker then
    /// stops: see [`MioBroker::stop`]).
    fn collect_reports(&mut self, registry: &Registry) -> bool {
        while let Ok(report) = self.reports.try_recv() {
            match report {
                Ok(seq) => {
                    self.store.stored(&mut self.broker, now(), seq);
                }
                Err(e) => {
                    // Nothing more can be acknowledged: stop rather than hold every client
                    // forever. `close` returns the error.
                    log::error!("{e}; stopping the broker");
                    self.stop(registry);
                    return false;
                }
            }
        }
        true
    }

    /// The store failed: drops every socket (clients see their connections end) and serves
    /// no more.
    fn stop(&mut self, registry: &Registry) {
        self.failed = true;
        for mut l in [self.listener.take(), self.ws_listener.take()].into_iter().flatten() {
            let _ = registry.deregister(&mut l);
        }
        if let Some(mut udp) = self.udp.take() {
            let _ = registry.deregister(&mut udp.socket);
        }
        for (_, (_, mut conn)) in self.conns.drain() {
            let _ = registry.deregister(&mut conn.stream);
        }
        self.closing.clear();
    }

    /// Hands the broker the verdicts the password threads have reached.
    fn collect_verdicts(&mut self) {
        while let Ok((id, verdict)) = self.auth.verdicts.try_recv() {
            self.auth.out = self.auth.out.saturating_sub(1);
            self.broker.handle_auth_result(now(), id, verdict);
        }
    }

    /// Takes the connections waiting on the TCP listener, or on the WebSocket one.
    fn accept(&mut self, registry: &Registry, websocket: bool) {
        let (listener, transport) = match websocket {
            false => (&self.listener, "tcp"),
            true => (&self.ws_listener, "ws"),
        };
        let Some(listener) = listener else { return };
        loop {
            match listener.accept() {
                Ok((mut stream, remote)) => {
                    if self.conns.len() >= self.max_connections {
                        continue; // dropped: closed at once
                    }
                    let token = Token(self.next);
                    self.next += 1;
                    if registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE).is_err() {
                        continue;
                    }
                    let id = self.streams.open(&mut self.broker, now(), remote, transport, ConnToken(token));
                    self.conns.insert(token, (id, Conn::new(stream)));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // Out of descriptors and the like: try again on the next readiness.
                Err(_) => break,
            }
        }
    }

    /// Does what the broker asks for its bridges on a thread of its own (a name lookup or a TCP
    /// connect can take seconds; the loop goes on meanwhile): a TCP connection (then carried
    /// like an accepted one) or a name. Outcomes come back in `collect_dials`. This adapter has
    /// no TLS over TCP.
    fn dial(&mut self, dial: Dial) {
        let lookup = |url: &mqtt_quic_core::url::BrokerUrl| {
            use std::net::ToSocketAddrs;
            mqtt_quic_core::driver::pick_address(url, url.authority().to_socket_addrs()).map_err(|e| e.to_string())
        };
        let (tx, wake) = (self.dials.0.clone(), self.waker.clone());
        let job: Box<dyn FnOnce() -> DialOutcome + Send> = match dial {
            Dial::Open { id, tls: Some(_), .. } => {
                let refused = Err("mqtts:// (this adapter has no TLS over TCP)".to_string());
                return self.broker.handle_dialed(now(), id, refused);
            }
            Dial::Open { id, url, tls: None } => Box::new(move || {
                let opened = lookup(&url).and_then(|addr| {
                    std::net::TcpStream::connect_timeout(&addr, DIAL_TIMEOUT).map_err(|e| e.to_string())
                });
                DialOutcome::Opened(id, opened)
            }),
            Dial::Resolve { bridge, url } => Box::new(move || {
                let result = lookup(&url);
                DialOutcome::Resolved(bridge, url, result)
            }),
            _ => return,
        };
        self.dials_out += 1;
        let spawned = std::thread::Builder::new().name("mqtt-dial".into()).spawn(move || {
            let _ = tx.send(job());
            wake.wake();
        });
        if spawned.is_err() {
            // No thread: the bridge's attempt times out and is made again.
            self.dials_out -= 1;
        }
    }

    /// Hands the broker what the dialling threads have done.
    fn collect_dials(&mut self, registry: &Registry) {
        while let Ok(outcome) = self.dials.1.try_recv() {
            self.dials_out = self.dials_out.saturating_sub(1);
            match outcome {
                DialOutcome::Opened(id, Ok(stream)) => {
                    let token = Token(self.next);
                    let registered = stream.set_nonblocking(true).map_err(|e| e.to_string()).and_then(|()| {
                        let mut stream = mio::net::TcpStream::from_std(stream);
                        let _ = stream.set_nodelay(true);
                        registry
                            .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                            .map(|()| stream)
                            .map_err(|e| e.to_string())
                    });
                    match registered {
                        Ok(stream) => {
                            self.next += 1;
                            self.conns.insert(token, (id, Conn::new(stream)));
                            self.streams.dialed(id, "bridge", ConnToken(token));
                            self.broker.handle_dialed(now(), id, Ok(()));
                        }
                        Err(e) => self.broker.handle_dialed(now(), id, Err(e)),
                    }
                }
                DialOutcome::Opened(id, Err(e)) => self.broker.handle_dialed(now(), id, Err(e)),
                DialOutcome::Resolved(bridge, url, result) => {
                    // For the broker's UDP socket, which the bridge's QUIC connection leaves from.
                    let local = self.udp.as_ref().and_then(|u| u.socket.local_addr().ok());
                    let result = result.map(|a| mqtt_quic_core::driver::for_socket(a, local));
                    self.broker.handle_resolved(now(), bridge, &url, result)
                }
            }
        }
    }

    fn drop_conn(&mut self, registry: &Registry, token: Token) {
        if let Some(id) = Sockets::drop_conn(&mut self.conns, &mut self.closing, registry, token) {
            self.streams.remove(id);
        }
    }

    /// Sends what the broker has: datagrams, and bytes for each TCP connection; hands what
    /// changed durably to the store.
    fn flush(&mut self, registry: &Registry) {
        if self.failed {
            return;
        }
        while let Some(dial) = self.broker.poll_dial() {
            self.dial(dial);
        }
        if let Some(udp) = &mut self.udp {
            if !udp.is_stalled() || udp.retry() {
                while let Some(t) = self.broker.poll_transmit(now(), &mut self.buf) {
                    if !udp.send(&t, &self.buf) {
                        break;
                    }
                }
            }
        }
        let mut sockets =
            Sockets { registry, conns: &mut self.conns, closing: &mut self.closing, write_timeout: self.write_timeout };
        self.streams.route(&mut self.broker, now(), &mut sockets);
        // Lifecycle lines go to the log; in-process messages wait for the application (they
        // were once discarded here with the other events).
        while let Some(handling) = self.streams.poll_event(&mut self.broker) {
            match handling {
                Handling::Log(line) => crate::log_line(&line),
                Handling::Message { subscription, publish } => {
                    if let Some(theirs) = self.sinks.deliver(&mut self.broker, subscription, publish) {
                        self.local.push_back(theirs);
                    }
                }
                _ => {}
            }
        }
        while let Some(request) = self.broker.poll_auth() {
            if let Some(requests) = &self.auth.requests {
                if requests.send(request).is_ok() {
                    self.auth.out += 1;
                }
            }
        }
        // The store thread commits in groups and reports (see `collect_reports`).
        self.store.submit(&mut self.broker, now());
    }

    /// How long `Poll::poll` may sleep before [`MioBroker::handle_timeout`] is due (`None`:
    /// until an event; always `None` once the store failed).
    pub fn timeout(&mut self) -> Option<Duration> {
        if self.failed {
            return None;
        }
        let next = self.broker.poll_timeout().into_iter().chain(self.closing.values().copied()).min();
        let due = next.map(|t| t.saturating_duration_since(now()));
        let awaited = self.auth.out > 0 || self.store.is_committing() || self.dials_out > 0;
        if awaited && !self.waker.is_set() {
            // A verdict or a store report may arrive at any moment: look again soon.
            return Some(due.map_or(AUTH_POLL, |d| d.min(AUTH_POLL)));
        }
        due
    }

    /// Fires due timers, takes what the broker's threads have for it (password verdicts, store
    /// reports) and sends what they produced.
    pub fn handle_timeout(&mut self, registry: &Registry) {
        if self.failed {
            return;
        }
        self.collect_verdicts();
        self.collect_dials(registry);
        if !self.collect_reports(registry) {
            return;
        }
        let t = now();
        let overdue: Vec<Token> = self.closing.iter().filter(|(_, at)| **at <= t).map(|(token, _)| *token).collect();
        for token in overdue {
            self.drop_conn(registry, token);
        }
        self.broker.handle_timeout(now());
        self.flush(registry);
    }

    /// Starts a graceful shutdown (see [`Broker::shutdown`]); keep driving until
    /// [`MioBroker::is_done`], then [`MioBroker::close`] the store.
    pub fn shutdown(&mut self, registry: &Registry) {
        if self.failed {
            return;
        }
        for mut l in [self.listener.take(), self.ws_listener.take()].into_iter().flatten() {
            let _ = registry.deregister(&mut l);
        }
        self.shutdown_until = Some(now() + self.grace);
        self.broker.shutdown(now(), self.grace);
        self.flush(registry);
    }

    /// Whether a shutdown has finished: the broker is done and the TCP connections it closed
    /// have written their last bytes (DISCONNECT 0x8B) and drained, or the grace is over. Also
    /// true once the store failed (the broker stopped; [`MioBroker::close`] returns why).
    pub fn is_done(&self) -> bool {
        if self.failed {
            return true;
        }
        let t = now();
        self.broker.is_done(t) && (self.closing.is_empty() || self.shutdown_until.is_some_and(|until| t >= until))
    }
}

/// A broker running on its own thread: the [`Server`](crate::server::Server) facade, under
/// its earlier name.
pub type BrokerHandle = crate::server::Server;

/// Runs a broker on a thread with its own `Poll` until [`BrokerHandle::shutdown`] (the same as
/// [`Server::start`](crate::server::Server::start)).
pub fn spawn(options: ServerOptions) -> Result<BrokerHandle, ServerError> {
    crate::server::Server::start(options)
}
