//! The broker server for async-std: one task owns the core's [`Broker`] and the UDP socket;
//! each TCP connection has a task that carries its bytes to and from that task.

use crate::{now, sleep_until};
use async_channel::{Receiver, Sender};
use async_std::io::{ReadExt, WriteExt};
use async_std::net::{TcpListener, TcpStream, UdpSocket};
use async_std::task::JoinHandle;
use bytes::Bytes;
use futures_lite::future;
use mqtt_proto::{Publish, QoS, TopicFilter};
use mqtt_quic_core::broker::auth::{AuthId, AuthRequest, AuthVerdict};
use mqtt_quic_core::broker::lifecycle::Handling;
use mqtt_quic_core::broker::local::{LocalSink, LocalSinks, LocalSubscription, DEFAULT_WINDOW};
use mqtt_quic_core::broker::machine::{Broker, StreamId, StreamOutput};
use mqtt_quic_core::broker::stream_table::{Delivery, StreamTable, StreamWriter};
use mqtt_quic_core::broker::{BridgeId, Dial};
use mqtt_quic_core::config::Secret;
use mqtt_quic_core::url::BrokerUrl;
use mqtt_quic_core::Datagram;
use mqtt_store::{BrokerStore, StoreError};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use mqtt_quic_core::driver::{ServerAddresses, ServerError, ServerOptions};

/// From connection tasks to the broker task.
enum FromConn {
    /// A connection: its writer's queue, its abort signal, where to send its id, its peer, its
    /// transport (`tcp`, or `ws` for MQTT over WebSocket).
    Opened(Sender<StreamOutput>, Sender<()>, Sender<StreamId>, SocketAddr, &'static str),
    /// A connection dialled for a bridge is up (with its writer's queue and abort signal), or
    /// failed.
    Dialed(StreamId, Result<(Sender<StreamOutput>, Sender<()>), String>),
    /// A name resolved for a bridge.
    Resolved(BridgeId, BrokerUrl, Result<SocketAddr, String>),
    Bytes(StreamId, Bytes),
    Wrote(StreamId, usize),
    Gone(StreamId),
}

/// A connection task's channels, as the broker task's [`StreamTable`] routes to them: its
/// writer's queue and its abort signal.
struct Writer {
    queue: Sender<StreamOutput>,
    abort: Sender<()>,
}

impl StreamWriter<()> for Writer {
    fn data(&mut self, _: &mut (), bytes: Bytes) -> Delivery {
        match self.queue.try_send(StreamOutput::Data(bytes)) {
            Ok(()) => Delivery::Queued,
            Err(_) => Delivery::Gone,
        }
    }

    fn close(self, _: &mut ()) {
        let _ = self.queue.try_send(StreamOutput::Close);
    }

    fn abort(self, _: &mut ()) {
        let _ = self.abort.try_send(());
    }
}

/// A running broker. Dropping it does not stop it: call [`Server::shutdown`].
pub struct Server {
    quic: Option<SocketAddr>,
    tcp: Option<SocketAddr>,
    ws: Option<SocketAddr>,
    stop: Sender<()>,
    /// The broker task; `None` once [`Server::wait`] has seen it end.
    broker: Option<JoinHandle<Result<(), StoreError>>>,
    acceptors: Vec<JoinHandle<()>>,
    /// In-process subscriptions and publishes, to the broker task.
    local: Sender<LocalCommand>,
}

/// What the application asks of the broker in-process (see [`Server::subscribe`]).
type LocalCommand = mqtt_quic_core::broker::local::LocalCommand<LocalTx>;

/// An in-process subscription's queue, from the broker task's side: unbounded, because the
/// broker's window bounds what is in it (see [`mqtt_quic_core::broker::local`]).
struct LocalTx(Sender<Publish>);

impl LocalSink for LocalTx {
    fn deliver(&mut self, publish: Publish) -> bool {
        self.0.try_send(publish).is_ok()
    }
}

/// The messages of an in-process subscription ([`Server::subscribe`]), in order. Each one
/// taken makes room for the next in the broker's window: one not taken holds the rest back in
/// the broker (bounded there like a slow client's), never the broker itself. Dropping it ends
/// the subscription.
pub struct LocalMessages {
    rx: Receiver<Publish>,
    subscription: LocalSubscription,
    broker: Sender<LocalCommand>,
}

impl LocalMessages {
    /// The next message; `None` once the broker has stopped.
    pub async fn recv(&mut self) -> Option<Publish> {
        let publish = self.rx.recv().await.ok()?;
        let _ = self.broker.try_send(LocalCommand::Taken(self.subscription, 1));
        Some(publish)
    }
}

impl Drop for LocalMessages {
    fn drop(&mut self) {
        let _ = self.broker.try_send(LocalCommand::Unsubscribe(self.subscription));
    }
}

impl Server {
    /// Subscribes the application in-process: messages matching `filter`, at up to `qos`,
    /// from every transport, arrive in the returned stream (the retained ones first). No
    /// connection is involved: no client id, no authentication.
    pub async fn subscribe(&self, filter: TopicFilter, qos: QoS) -> Result<LocalMessages, ServerError> {
        let (tx, rx) = async_channel::unbounded();
        let (reply, subscription) = async_channel::bounded(1);
        let reply = Box::new(move |s| reply.try_send(s).is_ok());
        let command = LocalCommand::Subscribe { filter, qos, sink: LocalTx(tx), reply };
        self.local.send(command).await.map_err(|_| ServerError::NotRunning)?;
        let subscription = subscription.recv().await.map_err(|_| ServerError::NotRunning)?;
        Ok(LocalMessages { rx, subscription, broker: self.local.clone() })
    }

    /// Subscribes `handler` in-process: it runs, on a task of its own, for each message
    /// matching `filter` (see [`Server::subscribe`]), until the broker stops.
    pub async fn on_message(
        &self,
        filter: TopicFilter,
        qos: QoS,
        mut handler: impl FnMut(Publish) + Send + 'static,
    ) -> Result<(), ServerError> {
        let mut messages = self.subscribe(filter, qos).await?;
        async_std::task::spawn(async move {
            while let Some(m) = messages.recv().await {
                handler(m);
            }
        });
        Ok(())
    }

    /// Publishes from the application in-process, as a client would (retained if asked), to
    /// subscribers on every transport; resolves once the broker has routed it, or with the
    /// reason it refused it ([`ServerError::Refused`]).
    pub async fn publish(&self, publish: Publish) -> Result<(), ServerError> {
        let (reply, verdict) = async_channel::bounded(1);
        let reply = Box::new(move |v| {
            let _ = reply.try_send(v);
        });
        self.local.send(LocalCommand::Publish { publish, reply }).await.map_err(|_| ServerError::NotRunning)?;
        verdict.recv().await.map_err(|_| ServerError::NotRunning)?.map_err(ServerError::Refused)
    }

    /// Reads the store back (with `options.broker.persistence` on: from `options.data_dir`),
    /// opens the listeners, then serves. Fails before serving anyone if the store cannot be
    /// opened or read ([`ServerError::Store`]) or a listener cannot be opened.
    pub async fn start(mut options: ServerOptions) -> Result<Server, ServerError> {
        // QUIC keys and assigned client ids from the OS random source, unless given.
        options.broker.quic.secret.get_or_insert_with(|| Secret::new(crate::os_secret()));
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
        // The store is read back before any listener opens: no client sees a broker that has
        // not yet remembered its sessions. The commit thread's reports come back through a
        // channel the broker task waits on with its other inputs.
        let mut machine = Broker::new(options.broker.clone())?;
        let (stored_tx, stored_rx) = async_channel::unbounded();
        let store = BrokerStore::open(&options, &mut machine, now(), move |r| drop(stored_tx.try_send(r)))?;
        if let Some(line) = store.summary() {
            log::info!("{line}");
        }
        let udp = match options.quic {
            Some(addr) => Some(UdpSocket::bind(addr).await.map_err(|source| ServerError::Bind {
                what: "QUIC (UDP)",
                addr,
                source,
            })?),
            None => None,
        };
        let bind = |what: &'static str, addr: Option<SocketAddr>| async move {
            match addr {
                Some(addr) => {
                    TcpListener::bind(addr).await.map(Some).map_err(|source| ServerError::Bind { what, addr, source })
                }
                None => Ok(None),
            }
        };
        let listener = bind("TCP", options.tcp).await?;
        let ws_listener = bind("WebSocket (TCP)", options.ws).await?;
        let quic = udp.as_ref().and_then(|u| u.local_addr().ok());
        let tcp = listener.as_ref().and_then(|l| l.local_addr().ok());
        let ws = ws_listener.as_ref().and_then(|l| l.local_addr().ok());
        let (to_broker, from_conns) = async_channel::bounded(1024);
        let write_timeout = options.broker.write_timeout;
        // Connections dialled for bridges come in the same way as accepted ones.
        let dial = (to_broker.clone(), write_timeout);
        // Both listeners count against one limit.
        let live = Arc::new(AtomicUsize::new(0));
        let mut acceptors = Vec::new();
        for (listener, transport) in [(listener, "tcp"), (ws_listener, "ws")] {
            if let Some(l) = listener {
                let limit = (live.clone(), options.tcp_max_connections);
                acceptors.push(async_std::task::spawn(accept(l, transport, to_broker.clone(), limit, write_timeout)));
            }
        }
        drop(to_broker);
        let (stop, stopped) = async_channel::bounded(1);
        let store = (store, stored_rx);
        let (local, local_rx) = async_channel::unbounded();
        let inputs = (from_conns, dial, local_rx);
        let broker = async_std::task::spawn(serve(machine, udp, inputs, stopped, store, options.shutdown_grace));
        Ok(Server { quic, tcp, ws, stop, broker: Some(broker), acceptors, local })
    }

    /// The QUIC listener's address.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic
    }

    /// The TCP listener's address.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// Every listener's address (the same type from every adapter's server; never a TLS one
    /// here).
    pub fn addresses(&self) -> ServerAddresses {
        ServerAddresses { quic: self.quic, tcp: self.tcp, tls: None, ws: self.ws, wss: None }
    }

    /// Stops accepting, disconnects everyone gracefully (DISCONNECT 0x8B for MQTT 5), waits,
    /// and closes the store (a last durable commit). A store error is logged, as every one is
    /// (see [`Server::wait`] to get it as a value).
    pub async fn shutdown(self) {
        for a in self.acceptors {
            a.cancel().await;
        }
        let _ = self.stop.try_send(());
        if let Some(broker) = self.broker {
            // Logged by the broker task already.
            let _ = broker.await;
        }
    }

    /// Waits until the broker task ends, which it does only through [`Server::shutdown`] or
    /// when the store fails: then the error is [`ServerError::Store`] (the broker stopped
    /// serving, since nothing more could be acknowledged), and a process that serves nothing
    /// any more should exit with a failure status so that its supervisor restarts it.
    pub async fn wait(&mut self) -> Result<(), ServerError> {
        let Some(broker) = self.broker.as_mut() else {
            return Err(ServerError::Stopped("the broker task ended"));
        };
        let ended = broker.await;
        self.broker = None;
        match ended {
            Err(e) => Err(ServerError::Store(e.to_string())),
            Ok(()) => Err(ServerError::Stopped("the broker task ended")),
        }
    }
}

/// What woke the broker task.
enum Wake {
    /// A report from the store's commit thread (`None`: it has ended, or there is none).
    Stored(Option<Result<u64, StoreError>>),
    Datagram(io::Result<(usize, SocketAddr)>),
    Conn(Option<FromConn>),
    Auth(Option<(AuthId, AuthVerdict)>),
    Local(Option<LocalCommand>),
    Stop,
    Timer,
}

/// The broker task.
async fn serve(
    mut broker: Broker,
    udp: Option<UdpSocket>,
    (from_conns, (dial_tx, write_timeout), local): (
        Receiver<FromConn>,
        (Sender<FromConn>, Duration),
        Receiver<LocalCommand>,
    ),
    stop: Receiver<()>,
    (mut store, stored): (BrokerStore, Receiver<Result<u64, StoreError>>),
    grace: Duration,
) -> Result<(), StoreError> {
    let mut streams: StreamTable<Writer> = StreamTable::new();
    let (mut out, mut inbuf) = (Vec::new(), vec![0u8; 65_536]);
    let mut stopping = false;
    let mut listening = true;
    let mut udp_errors = 0u32;
    let mut udp_paused_until: Option<std::time::Instant> = None;
    let mut auth_open = true;
    // With persistence off nobody holds the report channel's sender: a closed channel is
    // always ready, and racing it would spin.
    let mut stored_open = true;
    // In-process subscriptions' queues; the channel stays open while the server handle lives.
    let mut sinks: LocalSinks<LocalTx> = LocalSinks::default();
    let mut local_open = true;
    // Password checks (PBKDF2, milliseconds each) run on threads of their own, a few at a time,
    // so they never hold up this task; verdicts come back through a channel.
    let (requests, verdicts) = auth_workers();
    // Bridges start connecting upstream.
    broker.start(now());
    loop {
        while let Some(t) = broker.poll_transmit(now(), &mut out) {
            if let Some(udp) = &udp {
                for d in t.datagrams(&out) {
                    let _ = udp.send_to(d, t.destination).await;
                }
            }
        }
        streams.route(&mut broker, now(), &mut ());
        // The same lifecycle lines as the other adapters, through the `log` facade;
        // in-process messages go to their subscriptions' queues.
        while let Some(handling) = streams.poll_event(&mut broker) {
            match handling {
                Handling::Log(line) => crate::log_line(&line),
                Handling::Message { subscription, publish } => {
                    let _ = sinks.deliver(&mut broker, subscription, publish);
                }
                _ => {}
            }
        }
        while let Some(request) = broker.poll_auth() {
            let _ = requests.try_send(request);
        }
        while let Some(dial) = broker.poll_dial() {
            let udp_local = udp.as_ref().and_then(|u| u.local_addr().ok());
            async_std::task::spawn(dial_out(dial, dial_tx.clone(), write_timeout, udp_local));
        }
        // What changed durably goes to the store thread, which commits in groups and reports.
        store.submit(&mut broker, now());
        if broker.is_done(now()) {
            break;
        }
        let deadline = broker.poll_timeout();
        let udp_paused = udp_paused_until.is_some_and(|until| now() < until);
        let datagram = async {
            match &udp {
                Some(u) if !udp_paused => Wake::Datagram(u.recv_from(&mut inbuf).await),
                _ => future::pending().await,
            }
        };
        let conn = async {
            if !listening {
                future::pending::<()>().await;
            }
            Wake::Conn(from_conns.recv().await.ok())
        };
        let stop_or_timer = async {
            if stopping {
                future::pending::<()>().await;
            }
            let _ = stop.recv().await;
            Wake::Stop
        };
        // A paused QUIC listener resumes at the end of its pause: wake for it too.
        let wake_at = [deadline, udp_paused_until.filter(|_| udp_paused)].into_iter().flatten().min();
        let timer = async {
            sleep_until(wake_at).await;
            Wake::Timer
        };
        let auth = async {
            if !auth_open {
                future::pending::<()>().await;
            }
            Wake::Auth(verdicts.recv().await.ok())
        };
        let reported = async {
            if !stored_open {
                future::pending::<()>().await;
            }
            Wake::Stored(stored.recv().await.ok())
        };
        let local = async {
            if !local_open {
                future::pending::<()>().await;
            }
            Wake::Local(local.recv().await.ok())
        };
        // `or` polls its first future first: reports before new input.
        let inputs = future::or(future::or(datagram, auth), future::or(conn, local));
        let wake = future::or(future::or(reported, inputs), future::or(stop_or_timer, timer)).await;
        let t = now();
        match wake {
            Wake::Stored(Some(Ok(seq))) => store.stored(&mut broker, t, seq),
            Wake::Stored(Some(Err(e))) => {
                // Nothing more can be acknowledged: stop rather than hold every client forever.
                log::error!("{e}; stopping the broker");
                return Err(e);
            }
            Wake::Stored(None) => stored_open = false,
            Wake::Datagram(Ok((n, from))) => {
                udp_errors = 0;
                broker.handle_datagram(t, Datagram::new(from, &inbuf[..n]));
            }
            // A receive error (an ICMP error for an earlier send, say) concerns one datagram,
            // not the listener; only a socket failing every time is paused, so it cannot spin.
            Wake::Datagram(Err(_)) => {
                udp_errors += 1;
                if udp_errors >= 100 {
                    // Only the QUIC listener pauses; TCP, timers and verdicts go on.
                    udp_paused_until = Some(t + Duration::from_millis(100));
                    udp_errors = 0;
                }
            }
            Wake::Auth(Some((id, verdict))) => broker.handle_auth_result(t, id, verdict),
            // No password thread is left (none could be started): no verdict can come again,
            // and polling a closed channel would spin.
            Wake::Auth(None) => auth_open = false,
            Wake::Local(Some(command)) => sinks.handle(&mut broker, t, DEFAULT_WINDOW, command),
            Wake::Local(None) => local_open = false,
            Wake::Conn(Some(FromConn::Opened(queue, abort, reply, remote, transport))) => {
                let id = streams.open(&mut broker, t, remote, transport, Writer { queue, abort });
                if reply.try_send(id).is_err() {
                    streams.closed(&mut broker, t, id);
                }
            }
            Wake::Conn(Some(FromConn::Dialed(id, result))) => {
                let result = result.map(|(queue, abort)| streams.dialed(id, "bridge", Writer { queue, abort }));
                broker.handle_dialed(t, id, result);
            }
            Wake::Conn(Some(FromConn::Resolved(bridge, url, result))) => {
                broker.handle_resolved(t, bridge, &url, result)
            }
            Wake::Conn(Some(FromConn::Bytes(id, data))) => broker.handle_stream_data(t, id, &data),
            Wake::Conn(Some(FromConn::Wrote(id, n))) => broker.handle_stream_written(id, n),
            Wake::Conn(Some(FromConn::Gone(id))) => streams.closed(&mut broker, t, id),
            // No listener and no connection left: only QUIC and timers remain.
            Wake::Conn(None) => listening = false,
            Wake::Stop => {
                stopping = true;
                broker.shutdown(t, grace);
            }
            Wake::Timer => broker.handle_timeout(t),
        }
    }
    log::info!("broker stopped");
    // The last commit, durable.
    store.close(&mut broker, now()).inspect_err(|e| log::error!("{e}"))
}

/// Starts the password-checking threads: requests go in through the first channel (unbounded:
/// the broker bounds the requests in flight), verdicts come out of the second. The threads end
/// when the broker task drops its sender.
fn auth_workers() -> (Sender<AuthRequest>, Receiver<(AuthId, AuthVerdict)>) {
    let (requests, jobs) = async_channel::unbounded::<AuthRequest>();
    let (done, verdicts) = async_channel::unbounded();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1));
    for _ in 0..workers {
        let (jobs, done) = (jobs.clone(), done.clone());
        let spawned = std::thread::Builder::new().name("mqtt-auth".into()).spawn(move || {
            while let Ok(request) = jobs.recv_blocking() {
                if done.send_blocking((request.id(), request.verify())).is_err() {
                    break;
                }
            }
        });
        // Without a thread the requests wait, and their clients time out at CONNECT.
        drop(spawned);
    }
    (requests, verdicts)
}

/// Accepts TCP connections (carrying `transport`: `tcp` or `ws`), each served by a task of its
/// own, while fewer than `max` connections counted in `live` are open.
async fn accept(
    listener: TcpListener,
    transport: &'static str,
    to_broker: Sender<FromConn>,
    (live, max): (Arc<AtomicUsize>, usize),
    write_timeout: Duration,
) {
    loop {
        let Ok((stream, remote)) = listener.accept().await else {
            async_std::task::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if live.load(Ordering::Relaxed) >= max {
            continue;
        }
        live.fetch_add(1, Ordering::Relaxed);
        let (to_broker, live) = (to_broker.clone(), live.clone());
        async_std::task::spawn(async move {
            carry(stream, None, (remote, transport), to_broker, write_timeout).await;
            live.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Does what the broker asks for its bridges: opens a TCP connection (then carried like an
/// accepted one) or resolves a name, and reports back. This adapter has no TLS over TCP.
async fn dial_out(dial: Dial, to_broker: Sender<FromConn>, write_timeout: Duration, udp: Option<SocketAddr>) {
    let lookup = |url: BrokerUrl| async move {
        let resolved = async_std::net::ToSocketAddrs::to_socket_addrs(&url.authority()).await;
        mqtt_quic_core::driver::pick_address(&url, resolved).map_err(|e| e.to_string())
    };
    match dial {
        Dial::Open { id, tls: Some(_), .. } => {
            let refused = Err("mqtts:// (this adapter has no TLS over TCP)".to_string());
            let _ = to_broker.send(FromConn::Dialed(id, refused)).await;
        }
        Dial::Open { id, url, tls: None } => {
            let opened = async {
                let addr = lookup(url).await.map_err(io::Error::other)?;
                Ok((TcpStream::connect(addr).await?, addr))
            };
            match async_std::io::timeout(Duration::from_secs(10), opened).await {
                Ok((stream, addr)) => carry(stream, Some(id), (addr, "bridge"), to_broker, write_timeout).await,
                Err(e) => drop(to_broker.send(FromConn::Dialed(id, Err(e.to_string()))).await),
            }
        }
        Dial::Resolve { bridge, url } => {
            // For the broker's UDP socket, which the bridge's QUIC connection leaves from.
            let result = lookup(url.clone()).await.map(|a| mqtt_quic_core::driver::for_socket(a, udp));
            let _ = to_broker.send(FromConn::Resolved(bridge, url, result)).await;
        }
        _ => {}
    }
}

/// Moves one connection's bytes until either side ends it: an accepted one (`dialed` `None`:
/// the broker numbers it now), or one dialled for a bridge under the broker's number.
async fn carry(
    stream: TcpStream,
    dialed: Option<StreamId>,
    (remote, transport): (SocketAddr, &'static str),
    to_broker: Sender<FromConn>,
    write_timeout: Duration,
) {
    let _ = stream.set_nodelay(true);
    let (writer, outputs) = async_channel::unbounded();
    let (abort, aborted) = async_channel::bounded(1);
    let id = match dialed {
        Some(id) => {
            if to_broker.send(FromConn::Dialed(id, Ok((writer, abort)))).await.is_err() {
                return;
            }
            id
        }
        None => {
            let (reply, id) = async_channel::bounded(1);
            if to_broker.send(FromConn::Opened(writer, abort, reply, remote, transport)).await.is_err() {
                return;
            }
            let Ok(id) = id.recv().await else { return };
            id
        }
    };
    let (mut reading, mut writing) = (stream.clone(), stream.clone());
    let inbound = async {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = reading.read(&mut buf).await {
            if n == 0 || to_broker.send(FromConn::Bytes(id, Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                break;
            }
        }
        false
    };
    let outbound = async {
        // Whether the broker closed the session (rather than the socket failing).
        let mut closed_by_broker = true;
        'out: while let Ok(StreamOutput::Data(bytes)) = outputs.recv().await {
            // In pieces, each reported, so the broker sees a slow reader's progress. The broker
            // aborts a connection that takes nothing for its write timeout; the timeout here is
            // the backstop for the last bytes of a closing one, which it no longer watches.
            for piece in bytes.chunks(64 * 1024) {
                let wrote = async_std::io::timeout(write_timeout * 4, writing.write_all(piece)).await;
                if wrote.is_err() || to_broker.send(FromConn::Wrote(id, piece.len())).await.is_err() {
                    closed_by_broker = false;
                    break 'out;
                }
            }
        }
        let _ = writing.flush().await;
        let _ = stream.shutdown(std::net::Shutdown::Write);
        closed_by_broker
    };
    // The broker dropped the connection outright: stop at once, even mid-write.
    let abort = async {
        if aborted.recv().await.is_err() {
            future::pending::<()>().await;
        }
        false
    };
    let drain = future::or(future::or(inbound, outbound), abort).await;
    if drain {
        // The broker's last bytes (a DISCONNECT with its reason) are out and our side is shut
        // down; closing with the client's unread bytes in the socket would reset it before it
        // reads them. Read and discard until the client closes too, for a short while.
        let mut scratch = vec![0u8; 4096];
        let _ = async_std::io::timeout(Duration::from_secs(2), async {
            while matches!(reading.read(&mut scratch).await, Ok(n) if n > 0) {}
            Ok(())
        })
        .await;
    }
    let _ = to_broker.send(FromConn::Gone(id)).await;
}
