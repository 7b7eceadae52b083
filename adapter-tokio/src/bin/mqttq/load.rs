//! The load generator behind `mqttq bench`: many clients against one broker, messages timed
//! from publish to delivery.
//!
//! Over QUIC the clients are multiplexed on a few UDP sockets (one [`ClientPool`] each, every
//! pool driven by one task), so tens of thousands of connections cost no more sockets than
//! that. Over TCP each client is an ordinary [`Client`].
//!
//! Every payload starts with the instant the publish was due (nanoseconds since the run began, as
//! seen by this process; at a fixed `rate` that is the schedule, so time a message waits behind
//! a slow link counts) and a sequence number, so latency is measured end to end in one clock.
//!
//! It lives in the `mqttq` binary, not in the adapter's library: it is a tool built on the
//! adapter (and on the core's [`ClientPool`]), not part of what applications embed.
//!
//! [`Scenario::Connect`] times connection setup instead: fresh connections, and over QUIC the
//! same client reconnecting with the session ticket it was given (CONNECT in 0-RTT).

use crate::udp::Udp;
use adapter_tokio::client::{Client, ClientOptions};
use adapter_tokio::url::{BrokerUrl, Transport};
use bytes::{BufMut, Bytes, BytesMut};
use mqtt_proto::{Publish, QoS, Subscription, TopicFilter, TopicName};
use mqtt_quic_core::config::ClientConfig;
use mqtt_quic_core::driver::{local_bind_address, pick_address, ClientError};
use mqtt_quic_core::pool::ClientPool;
use mqtt_quic_core::session::client::{ClientEvent, ClientSessionConfig};
use mqtt_quic_core::tls::ClientTls;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Barrier;

/// The clock: tokio's, as the adapter's own tasks read it.
pub fn clock() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// 32 bytes from the operating system's random source: the key material of the pools' QUIC
/// endpoints.
fn os_secret() -> [u8; 32] {
    // ring reads getrandom(2) or /dev/urandom; neither fails on a working system.
    ring::rand::generate(&ring::rand::SystemRandom::new()).expect("the OS random source").expose()
}

/// Handshakes all pools together keep in progress at once (brokers bound the handshakes in
/// progress from one address: ours to 64 by default).
const HANDSHAKES: usize = 48;

/// Bytes at the start of each payload: send time (ns) and sequence number.
const STAMP: usize = 16;

/// Who publishes to whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// N publishers, each with its own subscriber on its own topic.
    Pairs,
    /// N publishers on N topics, one subscriber to all of them.
    FanIn,
    /// One publisher, N subscribers to its topic.
    FanOut,
    /// N clients connect and stay idle (connection setup rate and memory per connection).
    Idle,
    /// N times, one after another: a fresh connection (time to CONNACK), closed, then over QUIC
    /// a resumed one (0-RTT when the broker allows) timed the same way.
    Connect,
}

/// Deliveries up to this long after the publishing period ends count as on time: enough for the
/// last messages' round trip on a slow link, short of the backlog of a link that fell behind.
pub const ON_TIME_GRACE: Duration = Duration::from_millis(500);

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The broker.
    pub url: BrokerUrl,
    /// Client options (trust, keep-alive, protocol) applied to every client. TCP and TLS clients
    /// reconnect as `options.reconnect` says; QUIC clients (a [`ClientPool`]) never do: a lost
    /// connection stays lost, and migration is what keeps them up.
    pub options: ClientOptions,
    /// Scenario.
    pub scenario: Scenario,
    /// N (see [`Scenario`]).
    pub clients: usize,
    /// QoS of publishes and subscriptions.
    pub qos: QoS,
    /// Payload size in bytes (at least 16).
    pub payload: usize,
    /// Messages per second per publisher; `None` is flat out.
    pub rate: Option<f64>,
    /// How long publishers publish (or idle clients stay connected).
    pub duration: Duration,
    /// UDP sockets the QUIC clients share.
    pub sockets: usize,
    /// Local addresses for the QUIC sockets, socket `k` on `bind[k % len]` (empty: any). Client
    /// `i` is on socket `i % sockets`; in [`Scenario::Pairs`] the subscribers are the even
    /// clients, so `sockets = 2` with two addresses puts subscribers on the first, publishers on
    /// the second (the rebinding experiment moves only the publishers' address that way).
    pub bind: Vec<std::net::IpAddr>,
    /// Most QoS 1/2 publishes in flight per publisher when flat out.
    pub window: usize,
    /// Running counts, for a live line while the run goes on (and a summary if it is stopped).
    pub live: Arc<Live>,
}

/// Counts of a run so far, updated by every task as it goes (relaxed atomics: a display, not
/// a measurement): what `mqttq bench` prints each second, and its summary when stopped early.
#[derive(Debug, Default)]
pub struct Live {
    sent: AtomicU64,
    received: AtomicU64,
    errors: AtomicU64,
    latencies: LatencyHistogram,
}

impl Live {
    /// A snapshot of the counts.
    pub fn snapshot(&self) -> LiveSnapshot {
        LiveSnapshot {
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            latencies: self.latencies.counts(),
        }
    }
}

/// [`Live`]'s counts at one moment.
#[derive(Debug, Clone, Default)]
pub struct LiveSnapshot {
    pub sent: u64,
    pub received: u64,
    pub errors: u64,
    latencies: Vec<u64>,
}

impl LiveSnapshot {
    /// The latency at quantile `q` of the deliveries since `before` (all of them with a
    /// default `before`), in microseconds, to within an eighth.
    pub fn latency_since(&self, before: &LiveSnapshot, q: f64) -> u64 {
        let counts: Vec<u64> =
            self.latencies.iter().enumerate().map(|(i, c)| c - before.latencies.get(i).copied().unwrap_or(0)).collect();
        LatencyHistogram::quantile(&counts, q)
    }
}

/// Delivery latencies in microseconds, in buckets of an eighth of a power of two (values below
/// 8 exactly), counted with atomics so that tasks add to it without a lock.
#[derive(Debug)]
struct LatencyHistogram([AtomicU64; 256]);

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl LatencyHistogram {
    fn bucket(us: u32) -> usize {
        if us < 8 {
            return us as usize;
        }
        let e = 31 - us.leading_zeros() as usize; // 3 and up
        let sub = ((us >> (e - 3)) & 7) as usize;
        (e - 2) * 8 + sub
    }

    /// The smallest value of bucket `i`.
    fn floor(i: usize) -> u64 {
        if i < 8 {
            return i as u64;
        }
        let (e, sub) = (i / 8 + 2, (i % 8) as u64);
        (8 + sub) << (e - 3)
    }

    fn record(&self, us: u32) {
        self.0[Self::bucket(us).min(255)].fetch_add(1, Ordering::Relaxed);
    }

    fn counts(&self) -> Vec<u64> {
        self.0.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    fn quantile(counts: &[u64], q: f64) -> u64 {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((total - 1) as f64 * q).round() as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen > rank {
                return Self::floor(i);
            }
        }
        0
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Clients that connected.
    pub connected: usize,
    /// Seconds from the first connect to the last CONNACK.
    pub connect_secs: f64,
    /// Messages published.
    pub sent: u64,
    /// Messages delivered to subscribers.
    pub received: u64,
    /// Seconds of publishing.
    pub secs: f64,
    /// Payload bytes delivered.
    pub bytes: u64,
    /// Delivery latencies in microseconds, sorted.
    pub latencies_us: Vec<u32>,
    /// Connection failures and refused publishes.
    pub errors: u64,
    /// Messages delivered by [`ON_TIME_GRACE`] after the publishing period.
    pub on_time: u64,
    /// Longest wait between two consecutive deliveries to one subscriber while publishing.
    pub max_gap: Duration,
    /// [`Scenario::Connect`]: milliseconds to CONNACK of each fresh connection.
    pub connect_fresh_ms: Vec<f64>,
    /// [`Scenario::Connect`]: milliseconds to CONNACK of each resumed QUIC connection.
    pub connect_resumed_ms: Vec<f64>,
    /// What went wrong first, when a client failed to connect or lost its connection.
    pub first_error: Option<String>,
}

impl Report {
    /// Delivered messages per second.
    pub fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.received as f64 / self.secs
        } else {
            0.0
        }
    }

    /// Messages per second delivered on time (see [`ON_TIME_GRACE`]): what a link kept up with.
    pub fn delivered_rate(&self) -> f64 {
        self.on_time as f64 / self.secs.max(1e-9)
    }

    /// Delivered payload megabytes per second.
    pub fn mb_per_sec(&self) -> f64 {
        self.bytes as f64 / self.secs.max(1e-9) / 1e6
    }

    /// The latency at quantile `q` (0..1), in microseconds.
    pub fn latency(&self, q: f64) -> u32 {
        if self.latencies_us.is_empty() {
            return 0;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        self.latencies_us[i.min(self.latencies_us.len() - 1)]
    }

    /// Connections per second during setup.
    pub fn connect_rate(&self) -> f64 {
        if self.connect_secs > 0.0 {
            self.connected as f64 / self.connect_secs
        } else {
            0.0
        }
    }

    /// The report as one JSON object (through serde).
    pub fn json(&self) -> String {
        let json = JsonReport {
            connected: self.connected,
            connect_secs: self.connect_secs,
            connects_per_sec: self.connect_rate(),
            sent: self.sent,
            received: self.received,
            secs: self.secs,
            msgs_per_sec: self.rate(),
            mb_per_sec: self.mb_per_sec(),
            p50_us: self.latency(0.5),
            p99_us: self.latency(0.99),
            p999_us: self.latency(0.999),
            errors: self.errors,
            delivered_per_sec: self.delivered_rate(),
            max_gap_ms: self.max_gap.as_secs_f64() * 1000.0,
            connect_fresh_ms: median(&self.connect_fresh_ms),
            connect_resumed_ms: median(&self.connect_resumed_ms),
            stopped_early: false,
        };
        serde_json::to_string(&json).unwrap_or_default()
    }

    /// The report as a small table.
    pub fn table(&self) -> String {
        format!(
            "connected   {:>10}   ({:.0} connects/s)\nsent        {:>10}\nreceived    {:>10}   {:.0} msg/s, {:.2} MB/s\nlatency us  p50 {}  p99 {}  p999 {}\non time     {:>10.0} msg/s   longest gap {:.1} ms\nconnect ms  fresh {:.2}  resumed {:.2}\nerrors      {:>10}\n",
            self.connected,
            self.connect_rate(),
            self.sent,
            self.received,
            self.rate(),
            self.mb_per_sec(),
            self.latency(0.5),
            self.latency(0.99),
            self.latency(0.999),
            self.delivered_rate(),
            self.max_gap.as_secs_f64() * 1000.0,
            median(&self.connect_fresh_ms),
            median(&self.connect_resumed_ms),
            self.errors
        )
    }
}

/// The JSON form of a [`Report`] (and of the summary of a run stopped early).
#[derive(Debug, serde::Serialize)]
pub struct JsonReport {
    pub connected: usize,
    pub connect_secs: f64,
    pub connects_per_sec: f64,
    pub sent: u64,
    pub received: u64,
    pub secs: f64,
    pub msgs_per_sec: f64,
    pub mb_per_sec: f64,
    pub p50_us: u32,
    pub p99_us: u32,
    pub p999_us: u32,
    pub errors: u64,
    pub delivered_per_sec: f64,
    pub max_gap_ms: f64,
    pub connect_fresh_ms: f64,
    pub connect_resumed_ms: f64,
    /// Stopped (Ctrl-C) before the end: the counts are what had happened by then.
    pub stopped_early: bool,
}

/// The median of `v` (0 when empty).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// A client's part in the run.
#[derive(Debug, Clone)]
struct Role {
    /// Topic it publishes to, if it publishes.
    publishes: Option<TopicName>,
    /// Filter it subscribes to, if it subscribes.
    subscribes: Option<TopicFilter>,
}

fn roles(config: &BenchConfig) -> Vec<Role> {
    let topic = |i: usize| TopicName::new(format!("bench/{i}")).unwrap_or_else(|_| unreachable!("valid topic"));
    let filter = |s: &str| TopicFilter::new(s).unwrap_or_else(|_| unreachable!("valid filter"));
    let n = config.clients.max(1);
    let mut roles = Vec::new();
    match config.scenario {
        Scenario::Pairs => {
            for i in 0..n {
                roles.push(Role { publishes: None, subscribes: Some(filter(&format!("bench/{i}"))) });
                roles.push(Role { publishes: Some(topic(i)), subscribes: None });
            }
        }
        Scenario::FanIn => {
            roles.push(Role { publishes: None, subscribes: Some(filter("bench/#")) });
            roles.extend((0..n).map(|i| Role { publishes: Some(topic(i)), subscribes: None }));
        }
        Scenario::FanOut => {
            roles.extend((0..n).map(|_| Role { publishes: None, subscribes: Some(filter("bench/0")) }));
            roles.push(Role { publishes: Some(topic(0)), subscribes: None });
        }
        Scenario::Idle | Scenario::Connect => roles.extend((0..n).map(|_| Role { publishes: None, subscribes: None })),
    }
    roles
}

/// Measurements of one task, merged at the end (and counted live as they come).
#[derive(Default)]
struct Tally {
    live: Arc<Live>,
    connected: usize,
    last_connack: Option<Instant>,
    sent: u64,
    received: u64,
    bytes: u64,
    latencies: Vec<u32>,
    errors: u64,
    on_time: u64,
    last_arrival: Option<Instant>,
    max_gap: Duration,
    fresh_ms: Vec<f64>,
    resumed_ms: Vec<f64>,
    first_error: Option<String>,
}

impl Tally {
    fn new(config: &BenchConfig) -> Tally {
        Tally { live: config.live.clone(), ..Tally::default() }
    }

    /// Counts a publish.
    fn published(&mut self) {
        self.sent += 1;
        self.live.sent.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `n` failures.
    fn failed(&mut self, n: u64) {
        self.errors += n;
        self.live.errors.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a delivery at `now` of a run whose publishing ends at `end`.
    fn arrived(&mut self, payload: &[u8], start: Instant, now: Instant, end: Instant) {
        self.received += 1;
        self.live.received.fetch_add(1, Ordering::Relaxed);
        self.bytes += payload.len() as u64;
        if let Some(l) = latency_us(payload, start, now) {
            self.latencies.push(l);
            self.live.latencies.record(l);
        }
        if now <= end + ON_TIME_GRACE {
            self.on_time += 1;
        }
        if now <= end {
            if let Some(last) = self.last_arrival {
                self.max_gap = self.max_gap.max(now.saturating_duration_since(last));
            }
            self.last_arrival = Some(now);
        }
    }
}

/// A payload stamped with `due`, the instant its publish was scheduled.
fn payload(size: usize, start: Instant, due: Instant, seq: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(STAMP));
    b.put_u64(due.saturating_duration_since(start).as_nanos() as u64);
    b.put_u64(seq);
    b.resize(size.max(STAMP), 0x2a);
    b.freeze()
}

fn latency_us(payload: &[u8], start: Instant, now: Instant) -> Option<u32> {
    let sent = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
    let now = now.saturating_duration_since(start).as_nanos() as u64;
    Some((now.saturating_sub(sent) / 1000).min(u64::from(u32::MAX)) as u32)
}

/// Runs the benchmark.
pub async fn run(config: BenchConfig) -> Result<Report, ClientError> {
    let roles = roles(&config);
    let start = clock();
    let tallies: Arc<Mutex<Vec<Tally>>> = Arc::new(Mutex::new(Vec::new()));
    let (connect_started, publishing) = match (config.scenario, config.url.transport) {
        (Scenario::Connect, Transport::Quic) => connect_quic(&config, tallies.clone()).await?,
        (Scenario::Connect, _) => connect_stream(&config, tallies.clone()).await,
        (_, Transport::Quic) => run_quic(&config, roles, start, tallies.clone()).await?,
        _ => run_stream(&config, roles, start, tallies.clone()).await?,
    };
    let tallies = std::mem::take(&mut *tallies.lock().unwrap_or_else(|e| e.into_inner()));
    let mut report = Report { secs: publishing.as_secs_f64(), ..Report::default() };
    let mut last = None;
    for t in tallies {
        report.connected += t.connected;
        report.sent += t.sent;
        report.received += t.received;
        report.bytes += t.bytes;
        report.errors += t.errors;
        report.latencies_us.extend(t.latencies);
        report.on_time += t.on_time;
        report.max_gap = report.max_gap.max(t.max_gap);
        report.connect_fresh_ms.extend(t.fresh_ms);
        report.connect_resumed_ms.extend(t.resumed_ms);
        report.first_error = report.first_error.or(t.first_error);
        last = last.max(t.last_connack);
    }
    report.connect_secs = last.map_or(0.0, |l| l.saturating_duration_since(connect_started).as_secs_f64());
    report.latencies_us.sort_unstable();
    Ok(report)
}

/// The broker over QUIC, resolved once for every pool of a run.
struct QuicTarget {
    server: SocketAddr,
    tls: ClientTls,
    name: String,
}

impl QuicTarget {
    async fn resolve(config: &BenchConfig) -> Result<QuicTarget, ClientError> {
        let server = pick_address(&config.url, tokio::net::lookup_host(config.url.authority()).await)?;
        let tls = config
            .options
            .tls
            .clone()
            .ok_or_else(|| ClientError::Trust("the benchmark needs a trust setting".into()))?;
        Ok(QuicTarget { server, tls, name: config.options.server_name(&config.url) })
    }

    /// Pool `k`: its own endpoint (and session-ticket store) on its own UDP socket, bound to
    /// the `k`-th of `config.bind` when addresses are given.
    fn pool(&self, config: &BenchConfig, k: usize) -> Result<(ClientPool, Udp), ClientError> {
        let mut quic = ClientConfig::new(self.tls.clone());
        quic.transport = config.options.transport.clone();
        quic.secret = Some(mqtt_quic_core::config::Secret::new(os_secret()));
        let pool = ClientPool::new(&quic, self.server, &self.name, config.options.session.keep_alive)?;
        let local = match config.bind.as_slice() {
            [] => local_bind_address(self.server),
            ips => SocketAddr::new(ips[k % ips.len()], 0),
        };
        Ok((pool, Udp::bind(local)?))
    }
}

/// The MQTT session settings every QUIC benchmark client shares (each gets its own id).
fn base_session(config: &BenchConfig) -> ClientSessionConfig {
    ClientSessionConfig {
        protocol: config.options.session.protocol,
        keep_alive: config.options.session.keep_alive,
        ..ClientSessionConfig::default()
    }
}

/// QUIC: `sockets` pools, each on its own task and UDP socket.
async fn run_quic(
    config: &BenchConfig,
    roles: Vec<Role>,
    start: Instant,
    tallies: Arc<Mutex<Vec<Tally>>>,
) -> Result<(Instant, Duration), ClientError> {
    let target = QuicTarget::resolve(config).await?;
    let sockets = config.sockets.clamp(1, roles.len().max(1));
    let ready = Arc::new(Barrier::new(sockets + 1));
    let totals = Arc::new(Totals::default());
    let go = Arc::new(Barrier::new(sockets + 1));
    let mut tasks = Vec::new();
    for k in 0..sockets {
        let mine: Vec<(usize, Role)> = roles.iter().cloned().enumerate().filter(|(i, _)| i % sockets == k).collect();
        let (pool, udp) = target.pool(config, k)?;
        let (config, ready, go, tallies, totals) =
            (config.clone(), ready.clone(), go.clone(), tallies.clone(), totals.clone());
        tasks.push(tokio::spawn(async move {
            let tally = pool_task(pool, udp, mine, config, start, (ready, go), totals).await;
            tallies.lock().unwrap_or_else(|e| e.into_inner()).push(tally);
        }));
    }
    let connect_started = clock();
    ready.wait().await;
    let began = clock();
    go.wait().await;
    for t in tasks {
        let _ = t.await;
    }
    Ok((connect_started, config.duration.min(clock().saturating_duration_since(began))))
}

/// One pool: connect its clients, subscribe, then publish on schedule and count deliveries.
async fn pool_task(
    mut pool: ClientPool,
    mut udp: Udp,
    roles: Vec<(usize, Role)>,
    config: BenchConfig,
    start: Instant,
    (ready, go): (Arc<Barrier>, Arc<Barrier>),
    totals: Arc<Totals>,
) -> Tally {
    let mut tally = Tally::new(&config);
    let mut buf = Vec::with_capacity(64 * 1024);
    let base = base_session(&config);
    let mut members = Vec::new();
    // Connect and subscribe, a window of handshakes at a time: brokers bound the handshakes in
    // progress from one address, and a load generator should measure setup, not refusals.
    let mut pending_subs = roles.iter().filter(|(_, r)| r.subscribes.is_some()).count();
    let setup_deadline = clock() + Duration::from_secs(120);
    let mut down = 0;
    let mut subscribed = std::collections::BTreeSet::new();
    let mut to_add = roles.iter();
    while (tally.connected + down < roles.len() || pending_subs > 0) && clock() < setup_deadline {
        while members.len() < tally.connected + down + (HANDSHAKES / config.sockets.max(1)).max(1) {
            let Some((n, role)) = to_add.next() else { break };
            let session =
                ClientSessionConfig { client_id: format!("bench-{}-{n}", std::process::id()), ..base.clone() };
            match pool.add(clock(), session) {
                Ok(i) => members.push((i, role.clone())),
                Err(_) => {
                    tally.failed(1);
                    down += 1;
                }
            }
        }
        drive(&mut pool, &mut udp, &mut buf).await;
        while let Some((i, e)) = pool.poll_event() {
            match e {
                ClientEvent::Connected { .. } => {
                    tally.connected += 1;
                    tally.last_connack = Some(clock());
                    if let Some(f) = members.iter().find(|(m, _)| *m == i).and_then(|(_, r)| r.subscribes.clone()) {
                        let _ = pool.subscribe(clock(), i, vec![Subscription::new(f, config.qos)]);
                    }
                }
                ClientEvent::Subscribed { .. } => {
                    pending_subs = pending_subs.saturating_sub(1);
                    subscribed.insert(i);
                }
                ClientEvent::Disconnected { .. } | ClientEvent::Refused { .. } => {
                    down += 1;
                    tally.failed(1);
                    tally.first_error.get_or_insert_with(|| failure(&pool, i, &e));
                    // A subscriber lost before its SUBACK will never send one: stop waiting.
                    let subscribes = members.iter().any(|(m, r)| *m == i && r.subscribes.is_some());
                    if subscribes && !subscribed.contains(&i) {
                        pending_subs = pending_subs.saturating_sub(1);
                    }
                }
                _ => {}
            }
        }
    }
    ready.wait().await;
    go.wait().await;
    // Publish.
    let publishers: Vec<(usize, TopicName)> =
        members.iter().filter_map(|(i, r)| r.publishes.clone().map(|t| (*i, t))).collect();
    let began = clock();
    let end = began + config.duration;
    let mut seq = 0u64;
    let mut next_due: Vec<Instant> = vec![began; publishers.len()];
    let interval = config.rate.filter(|r| *r > 0.0).map(|r| Duration::from_secs_f64(1.0 / r));
    let drain_until = end + Duration::from_secs(2);
    loop {
        let now = clock();
        let (sent, received) = (totals.sent.load(Ordering::Relaxed), totals.received.load(Ordering::Relaxed));
        if now >= end && (now >= drain_until || received >= sent * fan(&config)) {
            break;
        }
        if now < end {
            for (k, (i, topic)) in publishers.iter().enumerate() {
                // A bounded burst per turn keeps deliveries and acknowledgements flowing.
                for _ in 0..64 {
                    let due = match interval {
                        Some(iv) => (next_due[k] <= now).then(|| {
                            next_due[k] += iv;
                            next_due[k] - iv
                        }),
                        None => {
                            let window = if config.qos == QoS::AtMostOnce { usize::MAX } else { config.window };
                            (pool.pending(*i) < window && pool.queued(*i) < 256 * 1024).then_some(now)
                        }
                    };
                    let Some(due) = due else { break };
                    seq += 1;
                    let p = Publish::new(topic.clone(), payload(config.payload, start, due, seq)).with_qos(config.qos);
                    match pool.publish(now, *i, p) {
                        Ok(_) => {
                            tally.published();
                            totals.sent.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            tally.failed(1);
                            break;
                        }
                    }
                }
            }
        }
        // Wake for the next scheduled publish, and at the end of each phase at the latest.
        let phase_end = if now < end { end } else { drain_until };
        let mut wait = phase_end.saturating_duration_since(now);
        if let Some(iv) = interval {
            wait = wait.min(iv.min(Duration::from_millis(1)));
        }
        drive_for(&mut pool, &mut udp, &mut buf, Some(wait)).await;
        let now = clock();
        while let Some((_, e)) = pool.poll_event() {
            if let ClientEvent::Message(m) = e {
                totals.received.fetch_add(1, Ordering::Relaxed);
                tally.arrived(&m.payload, start, now, end);
            }
        }
        if config.scenario == Scenario::Idle && clock() >= end {
            break;
        }
    }
    for (i, _) in &members {
        let _ = pool.disconnect(clock(), *i);
    }
    drive_for(&mut pool, &mut udp, &mut buf, Some(Duration::from_millis(50))).await;
    tally
}

/// Messages sent and received by all pools, so each knows when everything has arrived.
#[derive(Default)]
struct Totals {
    sent: AtomicU64,
    received: AtomicU64,
}

/// How many deliveries one publish makes.
fn fan(config: &BenchConfig) -> u64 {
    match config.scenario {
        Scenario::FanOut => config.clients.max(1) as u64,
        _ => 1,
    }
}

/// Sends what the pool has, then waits for datagrams or its next deadline.
async fn drive(pool: &mut ClientPool, udp: &mut Udp, buf: &mut Vec<u8>) {
    drive_for(pool, udp, buf, None).await
}

/// Like [`drive`], waiting at most `cap`.
async fn drive_for(pool: &mut ClientPool, udp: &mut Udp, buf: &mut Vec<u8>, cap: Option<Duration>) {
    while let Some(t) = pool.poll_transmit_batch(clock(), udp.max_gso_segments(), buf) {
        let _ = udp.send(&t, &buf[..t.size]).await;
    }
    let now = clock();
    let deadline = pool.poll_timeout().unwrap_or(now + Duration::from_millis(100));
    let deadline = cap.map_or(deadline, |c| deadline.min(now + c)).max(now);
    tokio::select! {
        r = udp.recv() => {
            if r.is_ok() {
                let t = clock();
                for d in udp.datagrams() {
                    pool.handle_datagram(t, d);
                }
            }
        }
        _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => pool.handle_timeout(clock()),
    }
}

/// TCP: one async client per role.
async fn run_stream(
    config: &BenchConfig,
    roles: Vec<Role>,
    start: Instant,
    tallies: Arc<Mutex<Vec<Tally>>>,
) -> Result<(Instant, Duration), ClientError> {
    let url = config.url.to_string();
    let connect_started = clock();
    let mut clients = Vec::new();
    let mut setup = Tally::new(config);
    for (n, role) in roles.into_iter().enumerate() {
        let mut options = config.options.clone();
        options.session.client_id = format!("bench-{}-{n}", std::process::id());
        match Client::connect(&url, options).await {
            Ok(c) => {
                setup.connected += 1;
                setup.last_connack = Some(clock());
                if let Some(f) = &role.subscribes {
                    if c.subscribe(f.clone(), config.qos).await.is_err() {
                        setup.failed(1);
                    }
                }
                clients.push((c, role));
            }
            Err(e) => {
                setup.failed(1);
                setup.first_error.get_or_insert(e.to_string());
            }
        }
    }
    tallies.lock().unwrap_or_else(|e| e.into_inner()).push(setup);
    let began = clock();
    let end = began + config.duration;
    let mut tasks = Vec::new();
    for (client, role) in clients {
        let (config, tallies) = (config.clone(), tallies.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::new(&config);
            if let Some(topic) = role.publishes {
                let interval = config.rate.filter(|r| *r > 0.0).map(|r| Duration::from_secs_f64(1.0 / r));
                // Publishes are queued in call order when `publish` is called, so the oldest
                // completes first: a window of their futures, awaited oldest first, keeps up to
                // `window` in flight without a task per message.
                let mut inflight = std::collections::VecDeque::new();
                let mut seq = 0;
                let mut next_due = began;
                while clock() < end {
                    let due = match interval {
                        Some(iv) => {
                            tokio::time::sleep_until(tokio::time::Instant::from_std(next_due)).await;
                            next_due += iv;
                            next_due - iv
                        }
                        None => clock(),
                    };
                    seq += 1;
                    let p = Publish::new(topic.clone(), payload(config.payload, start, due, seq)).with_qos(config.qos);
                    inflight.push_back(client.publish(p));
                    tally.published();
                    while inflight.len() >= config.window.max(1) {
                        if let Some(done) = inflight.pop_front() {
                            tally.failed(u64::from(done.await.is_err()));
                        }
                    }
                }
                while let Some(done) = inflight.pop_front() {
                    tally.failed(u64::from(done.await.is_err()));
                }
            }
            if role.subscribes.is_some() {
                if let Some(mut messages) = client.messages() {
                    let stop = end + Duration::from_secs(2);
                    while let Ok(Some(m)) =
                        tokio::time::timeout_at(tokio::time::Instant::from_std(stop), messages.recv()).await
                    {
                        tally.arrived(&m.payload, start, clock(), end);
                    }
                }
            }
            let _ = client.disconnect().await;
            tallies.lock().unwrap_or_else(|e| e.into_inner()).push(tally);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok((connect_started, config.duration))
}

/// [`Scenario::Connect`] over QUIC: each round a new pool (so no session ticket), a fresh
/// connection, then a resumed one from the same pool, which holds the ticket the broker sent.
async fn connect_quic(
    config: &BenchConfig,
    tallies: Arc<Mutex<Vec<Tally>>>,
) -> Result<(Instant, Duration), ClientError> {
    let target = QuicTarget::resolve(config).await?;
    let base = base_session(config);
    let mut tally = Tally::new(config);
    let mut buf = Vec::with_capacity(64 * 1024);
    let started = clock();
    for n in 0..config.clients.max(1) {
        let (mut pool, mut udp) = target.pool(config, n)?;
        for resumed in [false, true] {
            let session =
                ClientSessionConfig { client_id: format!("bench-{}-{n}", std::process::id()), ..base.clone() };
            let began = clock();
            let Ok(i) = pool.add(began, session) else {
                tally.failed(1);
                break;
            };
            let took = match until_connack(&mut pool, &mut udp, &mut buf, i).await {
                Ok(took) => took,
                Err(e) => {
                    tally.failed(1);
                    tally.first_error.get_or_insert(e);
                    break;
                }
            };
            tally.connected += 1;
            tally.last_connack = Some(clock());
            let ms = took.as_secs_f64() * 1000.0;
            if resumed {
                tally.resumed_ms.push(ms);
            } else {
                tally.fresh_ms.push(ms);
            }
            // Stay a few round trips so the broker's session ticket arrives, then close.
            idle_for(&mut pool, &mut udp, &mut buf, (took * 3).max(Duration::from_millis(30))).await;
            let _ = pool.disconnect(clock(), i);
            idle_for(&mut pool, &mut udp, &mut buf, Duration::from_millis(20)).await;
        }
    }
    tallies.lock().unwrap_or_else(|e| e.into_inner()).push(tally);
    Ok((started, clock().saturating_duration_since(started)))
}

/// Drives `pool` for `period`, discarding its events.
async fn idle_for(pool: &mut ClientPool, udp: &mut Udp, buf: &mut Vec<u8>, period: Duration) {
    let until = clock() + period;
    while clock() < until {
        drive_for(pool, udp, buf, Some(until.saturating_duration_since(clock()))).await;
        while pool.poll_event().is_some() {}
    }
}

/// Drives `pool` until client `i` is connected (its time to CONNACK) or fails.
async fn until_connack(pool: &mut ClientPool, udp: &mut Udp, buf: &mut Vec<u8>, i: usize) -> Result<Duration, String> {
    let began = clock();
    let give_up = began + Duration::from_secs(10);
    while clock() < give_up {
        drive_for(pool, udp, buf, Some(Duration::from_millis(5))).await;
        while let Some((who, e)) = pool.poll_event() {
            match e {
                ClientEvent::Connected { .. } if who == i => return Ok(clock().saturating_duration_since(began)),
                ClientEvent::Refused { .. } | ClientEvent::Disconnected { .. } if who == i => {
                    return Err(failure(pool, i, &e))
                }
                _ => {}
            }
        }
    }
    Err("no CONNACK within 10 s".into())
}

/// [`Scenario::Connect`] over TCP or TLS: fresh connections only, each timed from the first
/// TCP segment to CONNACK.
async fn connect_stream(config: &BenchConfig, tallies: Arc<Mutex<Vec<Tally>>>) -> (Instant, Duration) {
    let url = config.url.to_string();
    let mut tally = Tally::new(config);
    let started = clock();
    for n in 0..config.clients.max(1) {
        let mut options = config.options.clone();
        options.session.client_id = format!("bench-{}-{n}", std::process::id());
        options.reconnect = None;
        let began = clock();
        match Client::connect(&url, options).await {
            Ok(c) => {
                tally.fresh_ms.push(clock().saturating_duration_since(began).as_secs_f64() * 1000.0);
                tally.connected += 1;
                tally.last_connack = Some(clock());
                let _ = c.disconnect().await;
            }
            Err(e) => {
                tally.failed(1);
                tally.first_error.get_or_insert(e.to_string());
            }
        }
    }
    tallies.lock().unwrap_or_else(|e| e.into_inner()).push(tally);
    (started, clock().saturating_duration_since(started))
}

/// Why client `i` of `pool` failed, in words: the QUIC close reason when there is one.
fn failure(pool: &ClientPool, i: usize, event: &ClientEvent) -> String {
    match (event, pool.close_reason(i)) {
        (ClientEvent::Refused { reason }, _) => format!("the broker refused the connection ({reason:?})"),
        (_, Some(reason)) => reason.to_string(),
        (e, None) => format!("{e:?}"),
    }
}

/// The load generator against the adapter's broker (moved here from the adapter's loopback
/// tests with the generator itself; the assertions are theirs).
#[cfg(test)]
mod tests {
    /// The live histogram's quantiles are within an eighth of the exact ones.
    #[test]
    fn live_latency_quantiles_are_within_an_eighth() {
        let h = LatencyHistogram::default();
        let values: Vec<u32> = (0..10_000u32).map(|i| i * 37 % 50_000 + 1).collect();
        for v in &values {
            h.record(*v);
        }
        let mut sorted = values.clone();
        sorted.sort_unstable();
        for q in [0.5, 0.9, 0.99] {
            let exact = sorted[((sorted.len() - 1) as f64 * q).round() as usize] as f64;
            let got = LatencyHistogram::quantile(&h.counts(), q) as f64;
            assert!(got <= exact && got >= exact * 7.0 / 8.0 - 1.0, "q {q}: {got} vs {exact}");
        }
        for v in [0, 1, 7, 8, 9, 15, 16, 1000, u32::MAX] {
            let b = LatencyHistogram::bucket(v).min(255);
            assert!(LatencyHistogram::floor(b) <= u64::from(v), "{v}");
        }
    }

    use super::*;
    use adapter_tokio::server::{Server, ServerOptions};
    use mqtt_quic_core::tls::{fingerprint_hex, SelfSigned, ServerTls};
    use std::sync::OnceLock;

    fn cert() -> &'static SelfSigned {
        static CERT: OnceLock<SelfSigned> = OnceLock::new();
        CERT.get_or_init(|| SelfSigned::generate(&["localhost"]).unwrap())
    }

    fn pinned() -> ClientTls {
        ClientTls::pinned(&fingerprint_hex(&cert().fingerprint)).unwrap()
    }

    async fn server() -> Server {
        let mut options = ServerOptions::loopback(ServerTls::from_self_signed(cert()).unwrap());
        options.tls = Some("127.0.0.1:0".parse().unwrap());
        Server::start(options).await.unwrap()
    }

    fn url(scheme: &str, addr: Option<SocketAddr>) -> String {
        format!("{scheme}://localhost:{}", addr.unwrap().port())
    }

    #[tokio::test]
    async fn the_load_generator_counts_every_delivery_over_quic_and_tcp() {
        let s = server().await;
        for (url, scenario, qos) in [
            (url("quic", s.quic_addr()), Scenario::Pairs, QoS::AtLeastOnce),
            (url("quic", s.quic_addr()), Scenario::FanOut, QoS::AtMostOnce),
            (url("mqtt", s.tcp_addr()), Scenario::FanIn, QoS::ExactlyOnce),
        ] {
            let config = BenchConfig {
                url: url.parse().unwrap(),
                options: ClientOptions::new().tls(pinned()),
                scenario,
                clients: 3,
                qos,
                payload: 64,
                rate: Some(200.0),
                duration: Duration::from_millis(300),
                sockets: 2,
                bind: vec![],
                window: 16,
                live: Default::default(),
            };
            let report = run(config).await.unwrap();
            let fan = if scenario == Scenario::FanOut { 3 } else { 1 };
            assert!(report.sent > 0, "{url}: nothing sent");
            assert_eq!(report.received, report.sent * fan, "{url} {scenario:?}: {}", report.table());
            assert_eq!(report.latencies_us.len() as u64, report.received);
            assert_eq!(report.errors, 0);
            assert_eq!(report.on_time, report.received, "{url} {scenario:?}: all on time on loopback");
            assert!(report.json().contains("\"msgs_per_sec\""));
        }
        // Connection setup: fresh connections, and over QUIC a resumed one after each.
        for (url, resumed) in [(url("quic", s.quic_addr()), 2), (url("mqtt", s.tcp_addr()), 0)] {
            let report = run(BenchConfig {
                url: url.parse().unwrap(),
                options: ClientOptions::new().tls(pinned()),
                scenario: Scenario::Connect,
                clients: 2,
                qos: QoS::AtMostOnce,
                payload: 16,
                rate: None,
                duration: Duration::from_millis(100),
                sockets: 1,
                bind: vec![],
                window: 1,
                live: Default::default(),
            })
            .await
            .unwrap();
            assert_eq!(report.errors, 0, "{url}: {}", report.table());
            assert_eq!(report.connect_fresh_ms.len(), 2, "{url}");
            assert_eq!(report.connect_resumed_ms.len(), resumed, "{url}");
            assert!(report.connect_fresh_ms.iter().all(|ms| *ms > 0.0 && *ms < 5000.0), "{url}");
        }
        let idle = run(BenchConfig {
            url: url("quic", s.quic_addr()).parse().unwrap(),
            options: ClientOptions::new().tls(pinned()),
            scenario: Scenario::Idle,
            clients: 100,
            qos: QoS::AtMostOnce,
            payload: 16,
            rate: None,
            duration: Duration::from_millis(200),
            sockets: 2,
            bind: vec![],
            window: 1,
            live: Default::default(),
        })
        .await
        .unwrap();
        assert_eq!(idle.connected, 100);
        assert!(idle.connect_rate() > 0.0);
        s.shutdown().await;
    }
}
