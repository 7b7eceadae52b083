//! The broker server: one task owns the core's [`Broker`] machine and feeds it UDP datagrams
//! (QUIC), bytes of accepted TCP and TLS connections, and timeouts; other tasks only move bytes
//! between sockets and that task. With several shards ([`ServerOptions::shards`]), one such
//! task per shard, each with its own UDP socket on the QUIC port (`SO_REUSEPORT`: the kernel
//! spreads the flows) and its share of the TCP connections (round robin); the tasks carry the
//! shards' batches to each other over channels (see [`mqtt_quic_core::broker::shard`]).

use crate::udp::Udp;
use crate::{clock, NEVER};
use bytes::{Bytes, BytesMut};
use mqtt_proto::{Publish, QoS, TopicFilter};
use mqtt_quic_core::broker::auth::Auth;
use mqtt_quic_core::broker::auth::{AuthId, AuthVerdict};
use mqtt_quic_core::broker::lifecycle::{Handling, Level};
use mqtt_quic_core::broker::local::{LocalSink, LocalSinks, LocalSubscription, DEFAULT_WINDOW};
use mqtt_quic_core::broker::machine::{Broker, BrokerMetrics, StreamId, StreamOutput};
use mqtt_quic_core::broker::shard::ShardBatch;
use mqtt_quic_core::broker::stream_table::{Delivery, StreamTable, StreamWriter};
use mqtt_quic_core::broker::{BridgeId, Dial};
use mqtt_quic_core::config::Secret;
use mqtt_quic_core::tls::ServerTls;
use mqtt_quic_core::url::{BrokerUrl, Transport};
use mqtt_store::{BrokerStore, StoreError};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

pub use mqtt_quic_core::driver::{ServerAddresses, ServerError, ServerOptions};

/// A running broker. Dropping it does not stop it: call [`Server::shutdown`].
pub struct Server {
    quic: Option<SocketAddr>,
    tcp: Option<SocketAddr>,
    tls: Option<SocketAddr>,
    ws: Option<SocketAddr>,
    wss: Option<SocketAddr>,
    /// One per shard.
    stop: Vec<oneshot::Sender<()>>,
    driver: JoinHandle<Option<String>>,
    acceptors: Vec<JoinHandle<()>>,
    /// The TLS and wss listeners' TLS, swapped by [`Server::reload_tls`], with the ALPN each
    /// offers.
    tls_acceptors: Vec<(SharedAcceptor, Transport)>,
    /// Held while a certificate reload runs.
    reloading: tokio::sync::Mutex<()>,
    /// Every byte-stream listener's address, extra ones included.
    listening_on: Vec<(Transport, SocketAddr)>,
    /// Reloads, to every shard's broker task.
    reloads: Vec<mpsc::UnboundedSender<ReloadRequest>>,
    /// Closes when every connection task has ended (each holds a sender).
    alive: mpsc::Receiver<()>,
    grace: Duration,
    /// In-process subscriptions and publishes, to the broker task.
    local: mpsc::UnboundedSender<LocalCommand>,
}

/// A TLS listener's acceptor, replaced on a reload; each connection takes the one in force.
type SharedAcceptor = Arc<std::sync::RwLock<tokio_rustls::TlsAcceptor>>;

/// What a reload replaces (see [`Server::reload_auth`], [`Server::reload_tls`]), or a
/// metrics snapshot asked for (see [`Server::metrics`]).
enum Reload {
    Auth(Option<Arc<dyn Auth>>),
    Tls(ServerTls),
    Metrics(oneshot::Sender<BrokerMetrics>),
}

/// Asks a running broker for its metrics (see [`Server::metrics_source`]).
#[derive(Clone)]
pub struct MetricsSource(Vec<mpsc::UnboundedSender<ReloadRequest>>);

impl MetricsSource {
    /// The broker's metrics now (every shard's, added up).
    pub async fn metrics(&self) -> Result<BrokerMetrics, ServerError> {
        let mut total: Option<BrokerMetrics> = None;
        for shard in &self.0 {
            let (tx, rx) = oneshot::channel();
            let (reply, done) = oneshot::channel();
            shard.send((Reload::Metrics(tx), reply)).map_err(|_| ServerError::NotRunning)?;
            done.await.map_err(|_| ServerError::NotRunning)??;
            let metrics = rx.await.map_err(|_| ServerError::NotRunning)?;
            match &mut total {
                Some(t) => t.merge(metrics),
                None => total = Some(metrics),
            }
        }
        total.ok_or(ServerError::NotRunning)
    }
}

/// A reload on its way to the broker task, with where its outcome goes.
type ReloadRequest = (Reload, oneshot::Sender<Result<(), ServerError>>);

/// Sends a reload to one shard's broker task and waits for its outcome.
async fn reload(shard: &mpsc::UnboundedSender<ReloadRequest>, reload: Reload) -> Result<(), ServerError> {
    let (reply, done) = oneshot::channel();
    shard.send((reload, reply)).map_err(|_| ServerError::NotRunning)?;
    done.await.map_err(|_| ServerError::NotRunning)?
}

/// A shard's inbox, from the senders' side: the channel and how many messages wait in it.
#[derive(Clone)]
struct Inbox {
    tx: mpsc::UnboundedSender<(u16, ShardBatch)>,
    waiting: Arc<std::sync::atomic::AtomicUsize>,
}

/// Messages waiting in another shard's inbox beyond which a shard stops taking network input
/// (until that shard catches up): the channels between shards never block a sender (two
/// shards waiting for each other would deadlock), so this is what bounds them.
const INBOX_LIMIT: usize = 100_000;

/// A shard's way to the others: their inboxes (by shard) and its own.
struct ShardLink {
    index: u16,
    peers: Vec<Inbox>,
    inbox: mpsc::UnboundedReceiver<(u16, ShardBatch)>,
}

impl ShardLink {
    /// Hands the broker's batches for the other shards to their tasks.
    fn forward(&self, broker: &mut Broker) {
        use std::sync::atomic::Ordering::Relaxed;
        while let Some((to, batch)) = broker.poll_forward() {
            if let Some(peer) = self.peers.get(usize::from(to)) {
                let n = batch.len();
                peer.waiting.fetch_add(n, Relaxed);
                // A shard that has stopped (at shutdown) takes nothing more.
                if peer.tx.send((self.index, batch)).is_err() {
                    peer.waiting.fetch_sub(n, Relaxed);
                }
            }
        }
    }

    /// A batch was taken from this shard's inbox.
    fn taken(&self, batch: &ShardBatch) {
        if let Some(me) = self.peers.get(usize::from(self.index)) {
            me.waiting.fetch_sub(batch.len(), std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Whether another shard is so far behind on what this one sent it that this one should
    /// stop taking clients' input for now (its clients then wait: TCP reads stop, QUIC
    /// datagrams wait in the socket).
    fn congested(&self) -> bool {
        self.peers.iter().any(|p| p.waiting.load(std::sync::atomic::Ordering::Relaxed) > INBOX_LIMIT)
    }
}

/// What the application asks of the broker in-process (see [`Server::subscribe`]).
type LocalCommand = mqtt_quic_core::broker::local::LocalCommand<LocalTx>;

/// An in-process subscription's queue, from the broker task's side: unbounded, because the
/// broker's window bounds what is in it (see [`mqtt_quic_core::broker::local`]).
struct LocalTx(mpsc::UnboundedSender<Publish>);

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
    rx: mpsc::UnboundedReceiver<Publish>,
    subscription: LocalSubscription,
    broker: mpsc::UnboundedSender<LocalCommand>,
}

impl LocalMessages {
    /// The next message; `None` once the broker has stopped.
    pub async fn recv(&mut self) -> Option<Publish> {
        let publish = self.rx.recv().await?;
        let _ = self.broker.send(LocalCommand::Taken(self.subscription, 1));
        Some(publish)
    }
}

impl Drop for LocalMessages {
    fn drop(&mut self) {
        let _ = self.broker.send(LocalCommand::Unsubscribe(self.subscription));
    }
}

/// What connection tasks tell the broker task.
enum StreamIn {
    Open {
        out: OutboxSender,
        reply: oneshot::Sender<StreamId>,
        remote: SocketAddr,
        /// "tcp", "tls", "ws" or "wss", for the log (and the broker speaks WebSocket on the
        /// last two).
        transport: &'static str,
        /// The common name of the client's certificate, when it presented one (TLS).
        identity: Option<String>,
    },
    /// A connection dialled for a bridge ([`Dial::Open`]) is up (with its outbox) or failed.
    Dialed(StreamId, Result<OutboxSender, String>),
    /// A name resolved for a bridge ([`Dial::Resolve`]).
    Resolved(BridgeId, BrokerUrl, Result<SocketAddr, String>),
    Data(StreamId, Bytes),
    /// The writer put this many bytes on the socket.
    Written(StreamId, usize),
    Closed(StreamId),
}

/// A connection task's way to its shard's broker task: what it reads (and its opening and
/// closing) on one bounded channel, which the broker task stops reading while another shard is
/// behind (so the client waits), and its write progress on another, always read (that progress
/// is what lets backlogs shrink).
#[derive(Clone)]
struct ToBroker {
    input: mpsc::Sender<StreamIn>,
    progress: mpsc::UnboundedSender<(StreamId, usize)>,
}

/// The broker task has ended.
struct BrokerGone;

/// A broker task's inputs besides the network: its connections' input and write progress, the
/// way its bridges' dialled connections come back, in-process commands, reloads.
type Inputs = (
    mpsc::Receiver<StreamIn>,
    mpsc::UnboundedReceiver<(StreamId, usize)>,
    ToBroker,
    mpsc::UnboundedReceiver<LocalCommand>,
    mpsc::UnboundedReceiver<ReloadRequest>,
);

impl ToBroker {
    async fn send(&self, message: StreamIn) -> Result<(), BrokerGone> {
        match message {
            StreamIn::Written(id, n) => self.progress.send((id, n)).map_err(|_| BrokerGone),
            other => self.input.send(other).await.map_err(|_| BrokerGone),
        }
    }
}

/// What the broker task has for one byte-stream connection's writer: a queue that allocates
/// nothing until used (so an idle connection keeps none) and a wake-up. Unbounded, because the
/// broker bounds what it sends to a client that does not keep up (see
/// `BrokerConfig::max_queued_bytes`), counting on the `Written` reports.
#[derive(Clone, Default)]
struct Outbox(Arc<OutboxInner>);

#[derive(Default)]
struct OutboxInner {
    /// The queue, and whether either side has closed it.
    queue: std::sync::Mutex<(std::collections::VecDeque<StreamOutput>, bool)>,
    ready: tokio::sync::Notify,
    /// Signalled (once) when the broker drops the connection outright.
    abort: tokio::sync::Notify,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, (std::collections::VecDeque<StreamOutput>, bool)> {
        self.0.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an output; false if the writer is gone.
    fn push(&self, out: StreamOutput) -> bool {
        let mut q = self.lock();
        if q.1 {
            return false;
        }
        q.0.push_back(out);
        drop(q);
        self.0.ready.notify_one();
        true
    }

    /// The next output; `None` once closed and drained.
    async fn pop(&self) -> Option<StreamOutput> {
        loop {
            {
                let mut q = self.lock();
                if let Some(out) = q.0.pop_front() {
                    return Some(out);
                }
                if q.1 {
                    return None;
                }
            }
            self.0.ready.notified().await;
        }
    }

    /// The broker dropped the connection (`StreamOutput::Abort`): stop writing at once.
    fn abort(&self) {
        // A stored permit if the writer is not waiting yet: it sees it when it does.
        self.0.abort.notify_one();
    }

    /// Resolves once [`Outbox::abort`] was called.
    async fn aborted(&self) {
        self.0.abort.notified().await;
    }

    /// No more outputs either way.
    fn close(&self) {
        self.lock().1 = true;
        self.0.ready.notify_one();
    }
}

/// The broker task's handle on an [`Outbox`]: dropping it (the broker is done with the
/// connection, or the broker task ended) closes the queue, so the writer finishes.
struct OutboxSender(Outbox);

impl Drop for OutboxSender {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The broker task's routing goes through the core's [`StreamTable`]: each connection's
/// output is queued for its task.
impl StreamWriter<()> for OutboxSender {
    fn data(&mut self, _: &mut (), bytes: Bytes) -> Delivery {
        if self.0.push(StreamOutput::Data(bytes)) {
            Delivery::Queued
        } else {
            Delivery::Gone
        }
    }

    fn close(self, _: &mut ()) {
        // Written after what came before; dropping `self` then closes the queue.
        self.0.push(StreamOutput::Close);
    }

    fn abort(self, _: &mut ()) {
        self.0.abort();
    }
}

impl Server {
    /// Subscribes the application in-process (mqttd's `@app.subscribe`): messages matching
    /// `filter`, at up to `qos`, from every transport, arrive in the returned stream (the
    /// retained ones first). No connection is involved: no client id, no authentication.
    ///
    /// ```no_run
    /// # async fn run(server: adapter_tokio::server::Server) -> Result<(), Box<dyn std::error::Error>> {
    /// use mqtt_proto::{QoS, TopicFilter};
    /// let mut readings = server.subscribe(TopicFilter::new("sensors/#")?, QoS::AtLeastOnce).await?;
    /// while let Some(m) = readings.recv().await {
    ///     println!("{}: {:?}", m.topic, m.payload);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn subscribe(&self, filter: TopicFilter, qos: QoS) -> Result<LocalMessages, ServerError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (reply, subscription) = oneshot::channel();
        let reply = Box::new(move |s| reply.send(s).is_ok());
        let command = LocalCommand::Subscribe { filter, qos, sink: LocalTx(tx), reply };
        self.local.send(command).map_err(|_| ServerError::NotRunning)?;
        let subscription = subscription.await.map_err(|_| ServerError::NotRunning)?;
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
        drop(tokio::spawn(async move {
            while let Some(m) = messages.recv().await {
                handler(m);
            }
        }));
        Ok(())
    }

    /// Publishes from the application in-process, as a client would (retained if asked), to
    /// subscribers on every transport; resolves once the broker has routed it, or with the
    /// reason it refused it ([`ServerError::Refused`]).
    pub async fn publish(&self, publish: Publish) -> Result<(), ServerError> {
        let (reply, verdict) = oneshot::channel();
        let reply = Box::new(move |verdict| {
            let _ = reply.send(verdict);
        });
        self.local.send(LocalCommand::Publish { publish, reply }).map_err(|_| ServerError::NotRunning)?;
        verdict.await.map_err(|_| ServerError::NotRunning)?.map_err(ServerError::Refused)
    }

    /// Replaces authentication and authorization (a re-read password file or ACL) without
    /// dropping anyone: new logins and every delivery from now on are checked against `auth`.
    pub async fn reload_auth(&self, auth: Option<Arc<dyn Auth>>) -> Result<(), ServerError> {
        for shard in &self.reloads {
            reload(shard, Reload::Auth(auth.clone())).await?;
        }
        Ok(())
    }

    /// Replaces the certificate of the QUIC, TLS and wss listeners (a renewed certificate)
    /// without dropping anyone: new connections get `tls`, open ones keep theirs. On error
    /// (a certificate rustls or QUIC cannot use) nothing changes.
    pub async fn reload_tls(&self, tls: ServerTls) -> Result<(), ServerError> {
        // One reload at a time: two at once could leave QUIC on one certificate and the TLS
        // listeners on the other.
        let _one = self.reloading.lock().await;
        // Checked for every listener before anything changes.
        let acceptors = self
            .tls_acceptors
            .iter()
            .map(|(_, transport)| tls_acceptor(&tls, *transport))
            .collect::<Result<Vec<_>, _>>()?;
        for shard in &self.reloads {
            reload(shard, Reload::Tls(tls.clone())).await?;
        }
        for ((shared, _), acceptor) in self.tls_acceptors.iter().zip(acceptors) {
            *shared.write().unwrap_or_else(|e| e.into_inner()) = acceptor;
        }
        Ok(())
    }

    /// The broker's metrics now (render them for Prometheus with
    /// [`crate::metrics::render`]).
    pub async fn metrics(&self) -> Result<BrokerMetrics, ServerError> {
        self.metrics_source().metrics().await
    }

    /// A handle that asks for the broker's metrics, for a task of its own (a metrics
    /// endpoint) while the [`Server`] stays with whoever shuts it down.
    pub fn metrics_source(&self) -> MetricsSource {
        MetricsSource(self.reloads.clone())
    }

    /// Opens every listener, then starts serving. Fails before serving anyone if a listener
    /// cannot be opened.
    pub async fn start(mut options: ServerOptions) -> Result<Server, ServerError> {
        // The QUIC keys and the assigned client ids come from the OS random source, unless the
        // application gave its own key material.
        options.broker.quic.secret.get_or_insert_with(|| Secret::new(crate::os_secret()));
        options.check_bridges()?;
        // The store is read back before any listener opens: no client sees a broker that has
        // not yet remembered its sessions. Each shard reads its own.
        let count = options.shards.max(1);
        let mut brokers = Vec::new();
        for index in 0..count {
            let mut broker = Broker::new(options.broker.for_shard(index, count))?;
            let (stored_tx, stored_rx) = mpsc::unbounded_channel();
            let notify = move |r| drop(stored_tx.send(r));
            let shard = broker.shard();
            let store = BrokerStore::open_shard(&options, &mut broker, clock(), shard, notify)?;
            if let Some(line) = store.summary() {
                info!("{line}");
            }
            brokers.push((broker, (store, stored_rx)));
        }
        // One UDP socket per shard on the same port: the first picks the port (when asked
        // for 0), the others share it.
        let mut udps = Vec::new();
        if let Some(addr) = options.quic {
            let bind_err = |addr, source| ServerError::Bind { what: "QUIC (UDP)", addr, source };
            if count == 1 {
                udps.push(Udp::bind(addr).map_err(|e| bind_err(addr, e))?);
            } else {
                let first = Udp::bind_shared(addr).map_err(|e| bind_err(addr, e))?;
                let shared = first.local_addr().map_err(|e| bind_err(addr, e))?;
                udps.push(first);
                for _ in 1..count {
                    udps.push(Udp::bind_shared(shared).map_err(|e| bind_err(shared, e))?);
                }
            }
        }
        let tcp = match options.tcp {
            Some(addr) => {
                Some(TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { what: "TCP", addr, source })?)
            }
            None => None,
        };
        let tls = match options.tls {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|source| ServerError::Bind {
                what: "TLS (TCP)",
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
        let ws = bind("WebSocket (TCP)", options.ws).await?;
        let wss = bind("secure WebSocket (TCP)", options.wss).await?;
        let mut extra = Vec::new();
        for (transport, addr) in &options.extra_listeners {
            let what = match transport {
                Transport::Tcp => "TCP",
                Transport::Tls => "TLS (TCP)",
                Transport::Ws => "WebSocket (TCP)",
                Transport::Wss => "secure WebSocket (TCP)",
                Transport::Quic => {
                    return Err(ServerError::Unsupported("several QUIC listeners (one UDP socket serves QUIC)"))
                }
            };
            extra.push((*transport, bind(what, Some(*addr)).await?.ok_or(ServerError::Stopped("no listener"))?));
        }
        // The TLS listener offers ALPN `mqtt`; wss `http/1.1`, as browsers expect.
        let tls_config = &options.broker.quic.tls;
        let acceptor = |listener: Option<&TcpListener>, transport: Transport| match listener {
            Some(_) => {
                Ok::<_, ServerError>(Some(Arc::new(std::sync::RwLock::new(tls_acceptor(tls_config, transport)?))))
            }
            None => Ok(None),
        };
        let more_tls = extra.iter().find(|(t, _)| *t == Transport::Tls).map(|(_, l)| l);
        let more_wss = extra.iter().find(|(t, _)| *t == Transport::Wss).map(|(_, l)| l);
        let (acceptor, ws_acceptor) = (
            acceptor(tls.as_ref().or(more_tls), Transport::Tls)?,
            acceptor(wss.as_ref().or(more_wss), Transport::Wss)?,
        );
        let tls_acceptors: Vec<(SharedAcceptor, Transport)> =
            [(acceptor.clone(), Transport::Tls), (ws_acceptor.clone(), Transport::Wss)]
                .into_iter()
                .filter_map(|(a, t)| a.map(|a| (a, t)))
                .collect();
        let quic_addr = udps.first().map(|u| u.local_addr()).transpose().ok().flatten();
        let tcp_addr = tcp.as_ref().and_then(|l| l.local_addr().ok());
        let tls_addr = tls.as_ref().and_then(|l| l.local_addr().ok());
        let ws_addr = ws.as_ref().and_then(|l| l.local_addr().ok());
        let wss_addr = wss.as_ref().and_then(|l| l.local_addr().ok());
        let mut listening_on: Vec<(Transport, SocketAddr)> = [
            (Transport::Tcp, tcp_addr),
            (Transport::Tls, tls_addr),
            (Transport::Ws, ws_addr),
            (Transport::Wss, wss_addr),
        ]
        .into_iter()
        .filter_map(|(t, a)| a.map(|a| (t, a)))
        .collect();
        listening_on.extend(extra.iter().filter_map(|(t, l)| l.local_addr().ok().map(|a| (*t, a))));

        let (streams_txs, streams_rxs): (Vec<_>, Vec<_>) = (0..count)
            .map(|_| {
                let ((input, input_rx), (progress, progress_rx)) = (mpsc::channel(1024), mpsc::unbounded_channel());
                (ToBroker { input, progress }, (input_rx, progress_rx))
            })
            .unzip();
        let streams_txs: Arc<[ToBroker]> = streams_txs.into();
        let (alive_tx, alive) = mpsc::channel(1);
        let mut acceptors = Vec::new();
        // WebSocket listeners share the limit of their kind (plain or TLS).
        let tcp_limit = Arc::new(Semaphore::new(options.tcp_max_connections));
        let tls_limit = Arc::new(Semaphore::new(options.tls_max_connections));
        let mut listeners = vec![
            (tcp, "tcp", None, &tcp_limit),
            (tls, "tls", acceptor.clone(), &tls_limit),
            (ws, "ws", None, &tcp_limit),
            (wss, "wss", ws_acceptor.clone(), &tls_limit),
        ];
        for (transport, listener) in extra {
            listeners.push(match transport {
                Transport::Tls => (Some(listener), "tls", acceptor.clone(), &tls_limit),
                Transport::Ws => (Some(listener), "ws", None, &tcp_limit),
                Transport::Wss => (Some(listener), "wss", ws_acceptor.clone(), &tls_limit),
                _ => (Some(listener), "tcp", None, &tcp_limit),
            });
        }
        for (listener, transport, acceptor, limit) in listeners {
            if let Some(listener) = listener {
                let to = Tasks { brokers: streams_txs.clone(), next: Default::default(), alive: alive_tx.clone() };
                let listening = Listening { transport, acceptor, limit: limit.clone() };
                acceptors.push(tokio::spawn(accept(listener, listening, to, options.clone())));
            }
        }
        let grace = options.shutdown_grace;
        // In-process subscriptions and bridges live on shard 0.
        let (local, local_rx) = mpsc::unbounded_channel();
        let mut local_rx = Some(local_rx);
        // The shards' batches for each other.
        let (forward_txs, forward_rxs): (Vec<_>, Vec<_>) = (0..count)
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                (Inbox { tx, waiting: Default::default() }, rx)
            })
            .unzip();
        let mut udps = udps.into_iter();
        let (mut stop, mut reloads, mut drivers) = (Vec::new(), Vec::new(), Vec::new());
        let shards = brokers.into_iter().zip(streams_rxs).zip(forward_rxs).enumerate();
        for (index, (((broker, store), (streams_rx, progress_rx)), forward_rx)) in shards {
            let (stop_tx, stop_rx) = oneshot::channel();
            let (reloads_tx, reloads_rx) = mpsc::unbounded_channel();
            // Connections dialled for bridges come in the same way as accepted ones.
            let dial_tx = streams_txs[index].clone();
            let local_rx = local_rx.take().unwrap_or_else(|| mpsc::unbounded_channel().1);
            let link =
                (count > 1).then(|| ShardLink { index: index as u16, peers: forward_txs.clone(), inbox: forward_rx });
            let streams = (streams_rx, progress_rx, dial_tx, local_rx, reloads_rx);
            let task = drive(broker, udps.next(), streams, stop_rx, store, link, options.clone());
            drivers.push(task);
            stop.push(stop_tx);
            reloads.push(reloads_tx);
        }
        drop((streams_txs, alive_tx, forward_txs));
        let driver = tokio::spawn(async move {
            // A broker task that panics takes the broker down with it: say so where
            // `Server::wait` (and so a supervisor watching the process) can see it.
            let mut drivers: tokio::task::JoinSet<_> = drivers.into_iter().collect();
            while let Some(ended) = drivers.join_next().await {
                match ended {
                    Ok(Ok(())) => {}
                    // A store failed: that shard stopped (or its last commit at shutdown
                    // failed), and with it the broker.
                    Ok(Err(e)) => {
                        // The other shards cannot go on without it (what they relay to it,
                        // acknowledgements waiting for its store): they stop too.
                        drivers.shutdown().await;
                        return Some(e.to_string());
                    }
                    Err(e) if e.is_panic() => {
                        tracing::error!("the broker task panicked: {e}");
                        std::panic::resume_unwind(e.into_panic());
                    }
                    Err(_) => {}
                }
            }
            None
        });
        if count > 1 {
            info!("{count} shards, each on a broker task of its own");
        }
        let listening = [
            ("QUIC", quic_addr),
            ("TCP", tcp_addr),
            ("TLS", tls_addr),
            ("WebSocket", ws_addr),
            ("secure WebSocket", wss_addr),
        ];
        for (what, addr) in listening {
            if let Some(addr) = addr {
                info!("listening for MQTT over {what} on {addr}");
            }
        }
        Ok(Server {
            quic: quic_addr,
            tcp: tcp_addr,
            tls: tls_addr,
            ws: ws_addr,
            wss: wss_addr,
            stop,
            driver,
            acceptors,
            alive,
            grace,
            local,
            tls_acceptors,
            reloads,
            listening_on,
            reloading: tokio::sync::Mutex::new(()),
        })
    }

    /// The QUIC listener's address.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic
    }

    /// The TCP listener's address.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// The TLS listener's address.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls
    }

    /// Every byte-stream listener (TCP, TLS, ws, wss) with its address, the extra ones of
    /// [`ServerOptions::extra_listeners`] included (see [`Server::addresses`] for the first of
    /// each kind and QUIC).
    pub fn stream_listeners(&self) -> &[(Transport, SocketAddr)] {
        &self.listening_on
    }

    /// Every listener's address (the same type from every adapter's server).
    pub fn addresses(&self) -> ServerAddresses {
        ServerAddresses { quic: self.quic, tcp: self.tcp, tls: self.tls, ws: self.ws, wss: self.wss }
    }

    /// Stops accepting, tells every client the server is shutting down (DISCONNECT 0x8B for
    /// MQTT 5), waits up to the shutdown grace for them to go, and returns.
    pub async fn shutdown(mut self) {
        for a in &self.acceptors {
            a.abort();
        }
        for stop in self.stop.drain(..) {
            let _ = stop.send(());
        }
        if !self.driver.is_finished() {
            if let Ok(Some(e)) = (&mut self.driver).await {
                error!("{e}");
            }
        }
        // Let connection tasks write out what the broker gave them last (DISCONNECT).
        let _ = tokio::time::timeout(self.grace, self.alive.recv()).await;
    }

    /// Waits until the broker task ends, which it does only through [`Server::shutdown`]; if
    /// it ends otherwise (a panic: a bug), the error says so, and a process that serves
    /// nothing any more should exit with a failure status so that its supervisor restarts it.
    pub async fn wait(&mut self) -> Result<(), ServerError> {
        match (&mut self.driver).await {
            Ok(Some(e)) => Err(ServerError::Store(e)),
            Ok(None) if self.stop.is_empty() => Ok(()),
            Ok(None) => Err(ServerError::Stopped("the broker task ended")),
            Err(e) if e.is_panic() => Err(ServerError::Stopped("the broker task panicked")),
            Err(_) => Err(ServerError::Stopped("the broker task was cancelled")),
        }
    }
}

/// How long a connection the broker closed reads (and discards) what its client still sends,
/// so that the client gets the DISCONNECT rather than a reset.
const DRAIN: Duration = Duration::from_secs(2);

/// How much of an output a connection writes before it reports progress to the broker.
const WRITE_PIECE: usize = 64 * 1024;

/// The broker task.
async fn drive(
    mut broker: Broker,
    mut udp: Option<Udp>,
    (mut streams, mut progress, dial_tx, mut local, mut reloads): Inputs,
    mut stop: oneshot::Receiver<()>,
    (mut store, mut stored): (BrokerStore, mpsc::UnboundedReceiver<Result<u64, StoreError>>),
    mut shard: Option<ShardLink>,
    options: ServerOptions,
) -> Result<(), StoreError> {
    enum Input {
        Stored(Option<Result<u64, StoreError>>),
        Forward(Option<(u16, ShardBatch)>),
        Written(StreamId, usize),
        /// Another shard was behind: time to look again.
        Congested,
        Udp(io::Result<()>),
        Stream(Option<StreamIn>),
        Auth(Option<(AuthId, AuthVerdict)>),
        Local(Option<LocalCommand>),
        Reload(Option<ReloadRequest>),
        Timer,
        Stop,
    }
    // Password checks run on the blocking pool, a few at a time so that they leave the broker
    // task a core; verdicts come back through this channel.
    let (auth_tx, mut auth_rx) = mpsc::unbounded_channel();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1));
    let verifying = Arc::new(Semaphore::new(workers));
    let mut udp_errors = 0u32;
    let mut udp_paused_until: Option<tokio::time::Instant> = None;
    // Each byte stream's outbox and the listener it came from (for the log).
    let mut table: StreamTable<OutboxSender> = StreamTable::new();
    let mut buf = Vec::with_capacity(2048);
    let mut stopping = false;
    let mut streams_open = true;
    // With persistence off (or once the commit thread has ended) nobody holds the sender, and
    // a closed channel is always ready: selecting on it would spin and starve every other
    // input.
    let mut stored_open = true;
    // In-process subscriptions' queues; the channel stays open while the server handle lives.
    let mut sinks: LocalSinks<LocalTx> = LocalSinks::default();
    let mut local_open = true;
    let mut reloads_open = true;
    // Bridges start connecting upstream.
    broker.start(clock());
    let mut inbox_open = shard.is_some();
    loop {
        // Drain outputs: batches for the other shards first (a subscription's interest
        // reaches them before its SUBACK leaves), then datagrams, stream bytes, events.
        if let Some(link) = &shard {
            link.forward(&mut broker);
        }
        let batch = udp.as_ref().map_or(1, |u| u.max_gso_segments());
        while let Some(t) = broker.poll_transmit_batch(clock(), batch, &mut buf) {
            if let Some(udp) = &udp {
                if let Err(e) = udp.send(&t, &buf[..t.size]).await {
                    debug!("UDP send to {} failed: {e}", t.destination);
                }
            }
        }
        table.route(&mut broker, clock(), &mut ());
        // One line per client event, at info (a refusal for wrong credentials at warn):
        // greppable by `client connected`, `client refused`, `client migrated` and
        // `client disconnected`. In-process messages go to their subscriptions' queues.
        while let Some(handling) = table.poll_event(&mut broker) {
            match handling {
                Handling::Log(line) => match line.level {
                    Level::Warn => warn!("{}", line.text),
                    _ => info!("{}", line.text),
                },
                Handling::Message { subscription, publish } => {
                    let _ = sinks.deliver(&mut broker, subscription, publish);
                }
                _ => {}
            }
        }
        while let Some(request) = broker.poll_auth() {
            let (tx, verifying) = (auth_tx.clone(), verifying.clone());
            drop(tokio::spawn(async move {
                let Ok(_permit) = verifying.acquire_owned().await else { return };
                let id = request.id();
                if let Ok(verdict) = tokio::task::spawn_blocking(move || request.verify()).await {
                    let _ = tx.send((id, verdict));
                }
            }));
        }
        while let Some(dial) = broker.poll_dial() {
            let udp_local = udp.as_ref().and_then(|u| u.local_addr().ok());
            drop(tokio::spawn(dial_out(dial, dial_tx.clone(), options.clone(), udp_local)));
        }
        // What changed durably goes to the store thread, which commits in groups and reports.
        store.submit(&mut broker, clock());
        if let Some(link) = &shard {
            link.forward(&mut broker);
        }
        if broker.is_done(clock()) {
            break;
        }
        let deadline = broker.poll_timeout().map(tokio::time::Instant::from_std);
        // A paused QUIC listener resumes at the end of its pause: wake for it too.
        let wake_at = [deadline, udp_paused_until].into_iter().flatten().min();
        let wake_at = wake_at.unwrap_or_else(|| tokio::time::Instant::now() + NEVER);
        let congested = shard.as_ref().is_some_and(ShardLink::congested);
        let input = tokio::select! {
            biased;
            r = stored.recv(), if stored_open => Input::Stored(r),
            // Batches from the other shards before network input that came after them.
            b = inbox(&mut shard), if inbox_open => Input::Forward(b),
            r = recv(&mut udp), if !congested && udp_paused_until.is_none_or(|t| tokio::time::Instant::now() >= t) => Input::Udp(r),
            s = streams.recv(), if streams_open && !congested => Input::Stream(s),
            Some((id, n)) = progress.recv() => Input::Written(id, n),
            _ = tokio::time::sleep(Duration::from_millis(1)), if congested => Input::Congested,
            a = auth_rx.recv() => Input::Auth(a),
            l = local.recv(), if local_open => Input::Local(l),
            r = reloads.recv(), if reloads_open => Input::Reload(r),
            _ = tokio::time::sleep_until(wake_at) => Input::Timer,
            _ = &mut stop, if !stopping => Input::Stop,
        };
        let now = clock();
        match input {
            Input::Stored(Some(Ok(seq))) => store.stored(&mut broker, now, seq),
            Input::Stored(Some(Err(e))) => {
                // Nothing more can be acknowledged: stop rather than hold every client forever.
                error!("{e}; stopping the broker");
                return Err(e);
            }
            Input::Stored(None) => stored_open = false,
            Input::Forward(Some((from, batch))) => {
                // What else waits in the inbox is taken too: one turn of this loop (and one
                // round of output) for all of it, not one per batch.
                let mut next = Some((from, batch));
                let mut taken = 0;
                while let Some((from, batch)) = next.take() {
                    if let Some(link) = &shard {
                        link.taken(&batch);
                    }
                    broker.handle_forward(now, from, batch);
                    taken += 1;
                    if taken < 256 {
                        next = shard.as_mut().and_then(|l| l.inbox.try_recv().ok());
                    }
                }
            }
            Input::Congested => {}
            Input::Forward(None) => inbox_open = false,
            Input::Udp(Ok(())) => {
                udp_errors = 0;
                if let Some(udp) = &udp {
                    for d in udp.datagrams() {
                        broker.handle_datagram(now, d);
                    }
                }
            }
            Input::Udp(Err(e)) => {
                // A receive error (an ICMP error for an earlier send, a transient failure)
                // concerns one datagram, not the listener: keep serving. Only a socket that
                // fails every time is given a pause, so it cannot spin the task.
                udp_errors += 1;
                debug!("UDP receive failed: {e}");
                if udp_errors >= 100 {
                    // Only the QUIC listener pauses; TCP, timers and verdicts go on.
                    warn!("UDP receive keeps failing ({e}); pausing the QUIC listener for 100 ms");
                    udp_paused_until = Some(tokio::time::Instant::now() + Duration::from_millis(100));
                    udp_errors = 0;
                }
            }
            Input::Auth(Some((id, verdict))) => broker.handle_auth_result(now, id, verdict),
            Input::Auth(None) => {}
            Input::Local(None) => local_open = false,
            Input::Reload(None) => reloads_open = false,
            Input::Reload(Some((reload, reply))) => {
                let result = match reload {
                    Reload::Auth(auth) => {
                        broker.set_auth(auth);
                        Ok(())
                    }
                    Reload::Tls(tls) => broker.set_server_tls(tls).map_err(ServerError::from),
                    Reload::Metrics(reply) => {
                        let _ = reply.send(broker.metrics(now));
                        Ok(())
                    }
                };
                let _ = reply.send(result);
            }
            Input::Local(Some(command)) => sinks.handle(&mut broker, now, DEFAULT_WINDOW, command),
            Input::Stream(Some(StreamIn::Open { out, reply, remote, transport, identity })) => {
                let id = table.open(&mut broker, now, remote, transport, out);
                if let Some(identity) = identity {
                    broker.set_stream_identity(id, identity);
                }
                if reply.send(id).is_err() {
                    table.closed(&mut broker, now, id);
                }
            }
            Input::Stream(Some(StreamIn::Dialed(id, result))) => {
                let result = result.map(|out| table.dialed(id, "bridge", out));
                broker.handle_dialed(now, id, result);
            }
            Input::Stream(Some(StreamIn::Resolved(bridge, url, result))) => {
                broker.handle_resolved(now, bridge, &url, result)
            }
            Input::Stream(Some(StreamIn::Data(id, data))) => broker.handle_stream_data(now, id, &data),
            Input::Stream(Some(StreamIn::Written(id, n))) | Input::Written(id, n) => {
                broker.handle_stream_written(id, n)
            }
            Input::Stream(Some(StreamIn::Closed(id))) => table.closed(&mut broker, now, id),
            // Only listeners hold senders: without them no stream input can come again.
            Input::Stream(None) => streams_open = false,
            Input::Timer => {
                if udp_paused_until.is_some_and(|t| tokio::time::Instant::now() >= t) {
                    udp_paused_until = None;
                }
                broker.handle_timeout(now);
            }
            Input::Stop => {
                info!("shutting down: disconnecting {} clients", broker.connections());
                broker.shutdown(now, options.shutdown_grace);
                stopping = true;
            }
        }
    }
    info!("broker stopped");
    store.close(&mut broker, clock())
}

/// The next batch from another shard (never without shards).
async fn inbox(shard: &mut Option<ShardLink>) -> Option<(u16, ShardBatch)> {
    match shard {
        Some(link) => link.inbox.recv().await,
        None => std::future::pending().await,
    }
}

/// Receives on the QUIC socket, if there is one (else never).
async fn recv(udp: &mut Option<Udp>) -> io::Result<()> {
    match udp {
        Some(udp) => udp.recv().await,
        None => std::future::pending().await,
    }
}

/// What a connection task holds: the way to the broker task, and a token whose drop says the
/// task has ended.
#[derive(Clone)]
struct Tasks {
    /// Every shard's broker task: connections are dealt out round robin.
    brokers: Arc<[ToBroker]>,
    next: Arc<std::sync::atomic::AtomicUsize>,
    alive: mpsc::Sender<()>,
}

impl Tasks {
    /// The broker task the next connection goes to.
    fn pick(&self) -> ToBroker {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.brokers[n % self.brokers.len()].clone()
    }
}

/// What a TCP listener serves: its transport's name (`tcp`, `tls`, `ws`, `wss`), TLS when
/// `acceptor` is set, and the connection limit it counts against.
struct Listening {
    transport: &'static str,
    acceptor: Option<SharedAcceptor>,
    limit: Arc<Semaphore>,
}

/// A TLS acceptor with `tls`'s certificate, offering `transport`'s ALPN protocol (`mqtt` for
/// the TLS listener, `http/1.1` for wss, as browsers expect).
fn tls_acceptor(tls: &ServerTls, transport: Transport) -> Result<tokio_rustls::TlsAcceptor, ServerError> {
    let mut config = tls.rustls_stream_config()?;
    config.alpn_protocols = vec![transport.alpn().to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Accepts connections on a TCP listener.
async fn accept(listener: TcpListener, listening: Listening, tasks: Tasks, options: ServerOptions) {
    let Listening { transport, acceptor, limit } = listening;
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait a little instead of spinning.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            warn!("connection from {peer} refused: listener at its connection limit");
            continue;
        };
        let _ = socket.set_nodelay(true);
        let (broker, alive) = (tasks.pick(), tasks.alive.clone());
        // The acceptor in force now (a reload may have replaced it).
        let acceptor = acceptor.as_ref().map(|a| a.read().unwrap_or_else(|e| e.into_inner()).clone());
        let handshake = options.tls_handshake_timeout;
        let write_timeout = options.broker.write_timeout;
        // Two kinds of task, so that a plain TCP connection's task is not sized for TLS state.
        match acceptor {
            None => drop(tokio::spawn(async move {
                let _held = (permit, alive);
                connection(socket, peer, (transport, None), broker, write_timeout).await
            })),
            Some(acceptor) => drop(tokio::spawn(async move {
                let _held = (permit, alive);
                match tokio::time::timeout(handshake, acceptor.accept(socket)).await {
                    Ok(Ok(tls)) => {
                        // The client's certificate, verified against the client CA when one
                        // is required: its common name is its identity.
                        let identity = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .and_then(|cert| mqtt_quic_core::tls::certificate_common_name(cert));
                        connection(tls, peer, (transport, identity), broker, write_timeout).await
                    }
                    Ok(Err(e)) => debug!("TLS handshake with {peer} failed: {e}"),
                    Err(_) => debug!("TLS handshake with {peer} timed out"),
                }
            })),
        }
    }
}

/// Does what the broker asks for its bridges: opens a connection (then carried by
/// [`carry`] like an accepted one) or resolves a name, and reports back.
async fn dial_out(dial: Dial, broker: ToBroker, options: ServerOptions, udp: Option<SocketAddr>) {
    let lookup = |url: &BrokerUrl| {
        let authority = url.authority();
        let url = url.clone();
        async move {
            mqtt_quic_core::driver::pick_address(&url, tokio::net::lookup_host(authority).await)
                .map_err(|e| e.to_string())
        }
    };
    match dial {
        Dial::Open { id, url, tls } => {
            let timeout = options.tls_handshake_timeout;
            let opened = tokio::time::timeout(timeout, async {
                let addr = lookup(&url).await?;
                let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                let _ = tcp.set_nodelay(true);
                Ok::<_, String>((tcp, addr))
            })
            .await
            .unwrap_or_else(|_| Err("connection timed out".into()));
            let write_timeout = options.broker.write_timeout;
            let (tcp, addr) = match opened {
                Ok(ok) => ok,
                Err(e) => return drop(broker.send(StreamIn::Dialed(id, Err(e))).await),
            };
            match tls {
                None => carry(tcp, Origin::Dialed(id), addr, "bridge", broker, write_timeout).await,
                Some(tls) => {
                    let connector = tokio_rustls::TlsConnector::from(tls.config);
                    match tokio::time::timeout(timeout, connector.connect(tls.server_name, tcp)).await {
                        Ok(Ok(stream)) => {
                            carry(stream, Origin::Dialed(id), addr, "bridge", broker, write_timeout).await
                        }
                        Ok(Err(e)) => drop(broker.send(StreamIn::Dialed(id, Err(format!("TLS: {e}")))).await),
                        Err(_) => drop(broker.send(StreamIn::Dialed(id, Err("TLS handshake timed out".into()))).await),
                    }
                }
            }
        }
        Dial::Resolve { bridge, url } => {
            // For the broker's UDP socket, which the bridge's QUIC connection leaves from.
            let result = lookup(&url).await.map(|a| mqtt_quic_core::driver::for_socket(a, udp));
            let _ = broker.send(StreamIn::Resolved(bridge, url, result)).await;
        }
        _ => {}
    }
}

/// Moves one accepted connection's bytes to and from the broker task until either side ends it.
async fn connection<S: AsyncRead + AsyncWrite + Send + 'static>(
    stream: S,
    remote: SocketAddr,
    (transport, identity): (&'static str, Option<String>),
    broker: ToBroker,
    write_timeout: Duration,
) {
    carry(stream, Origin::Accepted(identity), remote, transport, broker, write_timeout).await
}

/// Where a carried connection comes from.
enum Origin {
    /// Accepted on a listener (with its client certificate's name, if it presented one): the
    /// broker numbers it now.
    Accepted(Option<String>),
    /// Dialled for a bridge, under the broker's number.
    Dialed(StreamId),
}

/// Moves one connection's bytes to and from the broker task until either side ends it: an
/// accepted one or one dialled for a bridge (see [`Origin`]).
async fn carry<S: AsyncRead + AsyncWrite + Send + 'static>(
    stream: S,
    origin: Origin,
    remote: SocketAddr,
    transport: &'static str,
    broker: ToBroker,
    write_timeout: Duration,
) {
    let outbox = Outbox::default();
    let id = match origin {
        Origin::Dialed(id) => {
            if broker.send(StreamIn::Dialed(id, Ok(OutboxSender(outbox.clone())))).await.is_err() {
                return;
            }
            id
        }
        Origin::Accepted(identity) => {
            let (reply, id) = oneshot::channel();
            let open = StreamIn::Open { out: OutboxSender(outbox.clone()), reply, remote, transport, identity };
            if broker.send(open).await.is_err() {
                return;
            }
            let Ok(id) = id.await else { return };
            id
        }
    };
    let (mut reader, mut writer) = tokio::io::split(stream);
    let read = async {
        // Small while idle, so that an idle connection costs little; a read that fills the
        // buffer doubles the next one (up to 64 KiB) and short reads shrink it back.
        let mut buf = BytesMut::new();
        let mut want = 512;
        loop {
            buf.reserve(want);
            match reader.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    want = if n >= want { (want * 2).min(64 * 1024) } else { (want / 2).max(512) };
                    if broker.send(StreamIn::Data(id, buf.split().freeze())).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let write = async {
        // Whether the broker closed the session (rather than the socket failing).
        let mut closed_by_broker = true;
        while let Some(out) = outbox.pop().await {
            match out {
                StreamOutput::Data(bytes) => {
                    // In pieces, each reported, so the broker sees a slow reader's progress
                    // (one large output could otherwise look like no progress for its whole
                    // write). The broker aborts a connection that takes nothing for its write
                    // timeout (checked once per timeout: within twice the timeout of the last
                    // progress); the timeout here is the backstop for the last bytes of a
                    // closing one, which the broker no longer watches, long enough not to race
                    // the broker's check.
                    let mut failed = false;
                    for piece in bytes.chunks(WRITE_PIECE) {
                        let wrote = tokio::time::timeout(write_timeout * 4, writer.write_all(piece)).await;
                        if !matches!(wrote, Ok(Ok(())))
                            || broker.send(StreamIn::Written(id, piece.len())).await.is_err()
                        {
                            failed = true;
                            break;
                        }
                    }
                    if failed {
                        closed_by_broker = false;
                        break;
                    }
                }
                _ => break,
            }
        }
        // A TLS close_notify into a socket nobody reads would wait for ever.
        let _ = tokio::time::timeout(write_timeout, writer.shutdown()).await;
        closed_by_broker
    };
    // Whichever ends first ends the connection: a client that closed its side is gone, and a
    // session the broker ended has nothing more to read.
    let drain = tokio::select! {
        _ = read => false,
        graceful = write => graceful,
        _ = outbox.aborted() => false,
    };
    if drain {
        // The broker's last bytes (a DISCONNECT with its reason) are out and our side is shut
        // down. Closing now, with the client's unread bytes in the socket, would make the
        // kernel answer with a reset, and the client could lose the DISCONNECT before reading
        // it: read and discard until the client closes too, for a short while.
        let mut scratch = vec![0u8; 4096];
        let _ =
            tokio::time::timeout(DRAIN, async { while matches!(reader.read(&mut scratch).await, Ok(n) if n > 0) {} })
                .await;
    }
    outbox.close();
    let _ = broker.send(StreamIn::Closed(id)).await;
}
