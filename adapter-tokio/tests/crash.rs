//! `mqttq broker` killed with SIGKILL while clients publish to it, over and over on the same data
//! directory: what it acknowledged survives, exactly once where QoS 2 says so. And a torn store
//! file is refused at startup, never read as an empty one.
//!
//! The clients are raw MQTT 5 on blocking `std::net::TcpStream`s, encoded and decoded with
//! `mqtt_proto`, so the test knows exactly which PUBLISH got its PUBACK (QoS 1) or PUBREC
//! (QoS 2): with `--persistence sync` (the default) those go out only once the message is on
//! disk, so every acknowledged message must reach the offline subscriber after the last restart.

// Subprocesses and real sockets: the deadlines here are real time.
#![cfg(unix)]
#![allow(clippy::disallowed_methods)]

mod common;

use bytes::{Bytes, BytesMut};
use mqtt_proto::{
    Ack, ConnAck, Connect, Decoder, Disconnect, MqttString, Packet, PacketId, Protocol, Publish, QoS, QosPid,
    ReasonCode, RetainHandling, Subscribe, Subscription, SubscriptionOptions, TopicFilter, TopicName,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const MQTTQ: &str = env!("CARGO_BIN_EXE_mqttq");

/// How long any one expected answer may take before the test fails.
const WAIT: Duration = Duration::from_secs(20);

/// Kill-and-restart rounds.
const ITERATIONS: u32 = 20;

/// Most PUBLISHes a publisher has unacknowledged at a time.
const PIPELINE: usize = 20;

const Q1: &str = "crash/q1";
const Q2: &str = "crash/q2";
const RETAINED: &str = "crash/retained";

// ---------------------------------------------------------------------------------------------
// The broker process
// ---------------------------------------------------------------------------------------------

/// A temporary directory removed when dropped, unless the test failed (then it is kept, with
/// the brokers' logs, and its path is printed).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("mqttq-crash-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept for inspection: {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// `mqttq broker` on loopback TCP, its stdout lines on a channel and its stderr in a file.
struct Broker {
    child: Child,
    lines: mpsc::Receiver<String>,
    stdout: Vec<String>,
    stderr: PathBuf,
}

impl Broker {
    /// Starts the broker on `data` (logging to `stderr`), without waiting for it.
    fn spawn(data: &Path, config: Option<&Path>, stderr: &Path) -> Broker {
        let mut cmd = Command::new(MQTTQ);
        cmd.args(["broker", "--quic", "off", "--tcp", "127.0.0.1:0", "--data-dir"]).arg(data);
        if let Some(config) = config {
            cmd.arg("--config").arg(config);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(stderr).unwrap())
            .spawn()
            .expect("mqttq did not start");
        let lines = common::stdout_lines(&mut child);
        Broker { child, lines, stdout: Vec::new(), stderr: stderr.to_path_buf() }
    }

    /// Starts the broker and waits until it is ready; returns it and its TCP address.
    fn start(data: &Path, config: Option<&Path>, stderr: &Path) -> (Broker, SocketAddr) {
        let mut b = Broker::spawn(data, config, stderr);
        let line = b.expect("listening: tcp ");
        let addr = line.rsplit(' ').next().unwrap().parse().unwrap();
        b.expect("ready");
        (b, addr)
    }

    /// Waits for a stdout line containing `needle`; returns it.
    fn expect(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.stdout.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with `{needle}` on the broker's stdout; {}", self.output()),
            }
        }
    }

    /// What the broker printed so far, for failure messages.
    fn output(&mut self) -> String {
        self.stdout.extend(self.lines.try_iter());
        let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        format!("stdout:\n{}\nstderr ({}):\n{err}", self.stdout.join("\n"), self.stderr.display())
    }

    /// SIGKILL, and wait for the process to be gone.
    fn kill(&mut self) {
        self.child.kill().expect("SIGKILL the broker");
        self.child.wait().unwrap();
    }

    /// SIGINT (graceful shutdown); returns the exit code.
    fn interrupt(&mut self) -> i32 {
        let ok = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill -INT failed");
        self.finish().0
    }

    /// Waits for the exit (at most [`WAIT`]); returns the code and stderr.
    fn finish(&mut self) -> (i32, String) {
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("mqttq did not exit; {}", self.output());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (status.code().unwrap_or(-1), std::fs::read_to_string(&self.stderr).unwrap_or_default())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// A raw MQTT 5 client
// ---------------------------------------------------------------------------------------------

fn mqtt_string(s: &str) -> MqttString {
    MqttString::try_from(s).unwrap()
}

fn pid(id: u16) -> PacketId {
    PacketId::new(id).unwrap()
}

/// MQTT over a blocking TCP socket, every read with a deadline.
struct Client {
    stream: TcpStream,
    decoder: Decoder,
    buf: BytesMut,
    out: BytesMut,
}

impl Client {
    /// Connects and sends CONNECT; returns the client and the CONNACK.
    fn connect(addr: SocketAddr, connect: Connect) -> io::Result<(Client, ConnAck)> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(WAIT))?;
        let mut c = Client { stream, decoder: Decoder::new(Protocol::V5), buf: BytesMut::new(), out: BytesMut::new() };
        c.queue(connect);
        c.flush()?;
        match c.next(WAIT)? {
            Some(Packet::ConnAck(ack)) => Ok((c, *ack)),
            other => Err(io::Error::other(format!("expected CONNACK, got {other:?}"))),
        }
    }

    /// Adds a packet to what the next [`Client::flush`] writes.
    fn queue(&mut self, packet: impl Into<Packet>) {
        packet.into().encode(Protocol::V5, &mut self.out).expect("encode");
    }

    fn flush(&mut self) -> io::Result<()> {
        let out = self.out.split();
        self.stream.write_all(&out)
    }

    fn send(&mut self, packet: impl Into<Packet>) -> io::Result<()> {
        self.queue(packet);
        self.flush()
    }

    /// The next packet if one arrives within `wait`; `Ok(None)` if none does; an error when
    /// the connection ends.
    fn next(&mut self, wait: Duration) -> io::Result<Option<Packet>> {
        let deadline = Instant::now() + wait;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let decoded = self.decoder.decode(&mut self.buf).map_err(|e| io::Error::other(e.to_string()))?;
            if decoded.is_some() {
                return Ok(decoded);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The next packet; panics if none comes within [`WAIT`].
    fn recv(&mut self) -> Packet {
        match self.next(WAIT) {
            Ok(Some(p)) => p,
            Ok(None) => panic!("no packet within {WAIT:?}"),
            Err(e) => panic!("connection ended while a packet was expected: {e}"),
        }
    }
}

fn publish(to: &str, payload: &str, qos_pid: QosPid, retain: bool) -> Publish {
    let mut p = Publish::new(TopicName::new(to).unwrap(), Bytes::from(payload.to_string()));
    p.qos_pid = qos_pid;
    p.retain = retain;
    p
}

/// Publishes one retained QoS 1 message and waits for its PUBACK; true if it was acknowledged.
fn publish_retained(c: &mut Client, id: u16, payload: &str) -> io::Result<bool> {
    c.send(publish(RETAINED, payload, QosPid::AtLeastOnce(pid(id)), true))?;
    match c.next(WAIT)? {
        Some(Packet::PubAck(ack)) if ack.packet_id == pid(id) => Ok(!ack.reason_code.is_error()),
        Some(other) => Err(io::Error::other(format!("expected PUBACK, got {other:?}"))),
        None => Err(io::Error::other("no PUBACK")),
    }
}

// ---------------------------------------------------------------------------------------------
// Publishers
// ---------------------------------------------------------------------------------------------

/// What one publisher connection did: every payload it sent (in order) and those acknowledged
/// (PUBACK, or a PUBREC, with a success code).
#[derive(Default)]
struct Sent {
    published: Vec<String>,
    acked: Vec<String>,
    /// How the connection ended.
    end: Option<io::Error>,
}

impl Sent {
    /// Whether the connection ended as a killed broker ends it (EOF, a reset, a broken pipe),
    /// not on a protocol error or the time limit.
    fn ended_by_kill(&self) -> bool {
        use io::ErrorKind::*;
        self.end
            .as_ref()
            .is_some_and(|e| matches!(e.kind(), UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe))
    }
}

/// Where a QoS 2 PUBLISH is in its exchange.
enum Stage {
    /// Sent; waiting for PUBREC.
    Published(String),
    /// PUBREL sent; waiting for PUBCOMP.
    Released,
}

/// Publishes `<prefix>-<n>` at `qos` to `topic`, `PIPELINE` in flight, until the connection
/// fails (the broker killed) or `WAIT` has passed. `connected` is told once CONNACK is in.
fn publisher(
    addr: SocketAddr,
    client_id: String,
    topic: &str,
    qos: QoS,
    prefix: String,
    connected: mpsc::Sender<()>,
) -> Sent {
    let mut sent = Sent::default();
    let (mut c, ack) = match Client::connect(addr, Connect::new(Protocol::V5, mqtt_string(&client_id))) {
        Ok(x) => x,
        Err(e) => {
            sent.end = Some(io::Error::other(format!("connect: {e}")));
            let _ = connected.send(());
            return sent;
        }
    };
    assert_eq!(ack.reason_code, ReasonCode::Success, "{client_id} refused");
    let _ = connected.send(());
    let deadline = Instant::now() + WAIT;
    let mut in_flight: HashMap<u16, Stage> = HashMap::new();
    let (mut n, mut next_id) = (0u64, 0u16);
    let result: io::Result<()> = (|| loop {
        if Instant::now() > deadline {
            return Err(io::Error::other("still connected after the time allowed"));
        }
        while in_flight.len() < PIPELINE {
            next_id = next_id.wrapping_add(1).max(1);
            if in_flight.contains_key(&next_id) {
                continue;
            }
            n += 1;
            let payload = format!("{prefix}-{n}");
            let qos_pid = QosPid::from_parts(qos, pid(next_id));
            c.queue(publish(topic, &payload, qos_pid, false));
            sent.published.push(payload.clone());
            in_flight.insert(next_id, Stage::Published(payload));
        }
        c.flush()?;
        // Everything that arrives within a short while, then top the pipeline up again.
        let mut wait = Duration::from_millis(50);
        while let Some(packet) = c.next(wait)? {
            wait = Duration::ZERO;
            match packet {
                Packet::PubAck(ack) if qos == QoS::AtLeastOnce => match in_flight.remove(&ack.packet_id.get()) {
                    Some(Stage::Published(payload)) => {
                        if !ack.reason_code.is_error() {
                            sent.acked.push(payload);
                        }
                    }
                    _ => return Err(io::Error::other(format!("PUBACK for nothing in flight: {ack:?}"))),
                },
                Packet::PubRec(ack) if qos == QoS::ExactlyOnce => {
                    let id = ack.packet_id.get();
                    match in_flight.remove(&id) {
                        Some(Stage::Published(payload)) if !ack.reason_code.is_error() => {
                            sent.acked.push(payload);
                            in_flight.insert(id, Stage::Released);
                            c.queue(Packet::PubRel(Ack::new(ack.packet_id)));
                        }
                        Some(Stage::Published(_)) => {}
                        _ => return Err(io::Error::other(format!("PUBREC for nothing published: {ack:?}"))),
                    }
                }
                Packet::PubComp(ack) if qos == QoS::ExactlyOnce => match in_flight.remove(&ack.packet_id.get()) {
                    Some(Stage::Released) => {}
                    _ => return Err(io::Error::other(format!("PUBCOMP for nothing released: {ack:?}"))),
                },
                other => return Err(io::Error::other(format!("unexpected {other:?}"))),
            }
        }
    })();
    sent.end = result.err();
    sent
}

/// Publishes retained QoS 1 messages one at a time, until the connection fails or `WAIT` has
/// passed. Returns every payload sent (in order) with whether it was acknowledged.
fn retained_publisher(addr: SocketAddr, client_id: String, prefix: String) -> Vec<(String, bool)> {
    let mut sent = Vec::new();
    let Ok((mut c, _)) = Client::connect(addr, Connect::new(Protocol::V5, mqtt_string(&client_id))) else {
        return sent;
    };
    let deadline = Instant::now() + WAIT;
    let mut id = 0u16;
    while Instant::now() < deadline {
        id = id.wrapping_add(1).max(1);
        let payload = format!("{prefix}-{id}");
        sent.push((payload.clone(), false));
        match publish_retained(&mut c, id, &payload) {
            Ok(acked) => sent.last_mut().unwrap().1 = acked,
            Err(_) => break,
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    sent
}

// ---------------------------------------------------------------------------------------------
// The subscriber
// ---------------------------------------------------------------------------------------------

fn subscriber_connect(clean_start: bool) -> Connect {
    let mut c = Connect::new(Protocol::V5, mqtt_string("crash-sub"));
    c.clean_start = clean_start;
    c.properties.session_expiry_interval = Some(3600);
    c
}

fn subscription(filter: &str, qos: QoS) -> Subscription {
    let mut s = Subscription::new(TopicFilter::new(filter).unwrap(), qos);
    s.options = SubscriptionOptions { qos, retain_handling: RetainHandling::SendAtSubscribe, ..s.options };
    s
}

/// What the subscriber got after the last restart: payload -> deliveries, per topic.
#[derive(Default)]
struct Received {
    q1: BTreeMap<String, u32>,
    q2: BTreeMap<String, u32>,
    /// PUBLISHes on a topic it is not subscribed to, or otherwise unexpected.
    strange: Vec<String>,
    /// QoS 2 PUBLISHes repeated (DUP) with an id still awaiting PUBREL: not counted again.
    dup_resends: u32,
}

/// Takes everything the broker has for the subscriber until nothing arrives for a second.
fn drain(c: &mut Client) -> Received {
    let mut got = Received::default();
    let mut awaiting_rel: HashSet<u16> = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "the broker is still sending after 60 s");
        let packet = match c.next(Duration::from_secs(1)) {
            Ok(Some(p)) => p,
            Ok(None) => break,
            Err(e) => panic!("the subscriber's connection ended while draining: {e}"),
        };
        match packet {
            Packet::Publish(p) => {
                let payload = String::from_utf8_lossy(&p.payload).into_owned();
                match (p.topic.as_str(), p.qos_pid) {
                    (Q1, QosPid::AtLeastOnce(id)) => {
                        *got.q1.entry(payload).or_default() += 1;
                        c.queue(Packet::PubAck(Ack::new(id)));
                    }
                    (Q2, QosPid::ExactlyOnce(id)) => {
                        // A PUBLISH with an id awaiting PUBREL is the same message again.
                        if awaiting_rel.insert(id.get()) {
                            *got.q2.entry(payload).or_default() += 1;
                        } else {
                            got.dup_resends += 1;
                        }
                        c.queue(Packet::PubRec(Ack::new(id)));
                    }
                    (topic, qos_pid) => got.strange.push(format!("{topic} {qos_pid:?} {payload}")),
                }
            }
            Packet::PubRel(rel) => {
                awaiting_rel.remove(&rel.packet_id.get());
                c.queue(Packet::PubComp(Ack::new(rel.packet_id)));
            }
            other => got.strange.push(format!("{other:?}")),
        }
        c.flush().expect("subscriber write");
    }
    got
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

/// A config lifting the per-client offline queue limit (1000 by default; beyond it new messages
/// for an offline client are dropped by design, which would look like loss here).
fn write_config(dir: &Path) -> PathBuf {
    let path = dir.join("broker.toml");
    std::fs::write(&path, "max_offline_queue = 1000000\n").unwrap();
    path
}

/// Milliseconds between the publishers' CONNACKs and the SIGKILL in round `i`: 30 to 400,
/// spread over the range so kills land at different points.
fn kill_delay(i: u32) -> Duration {
    Duration::from_millis(30 + u64::from((i * 157 + 11) % 371))
}

/// The round a payload (`q1-<round>-<n>`) was published in; `u32::MAX` for anything else.
fn round_of(payload: &str) -> u32 {
    payload.split('-').nth(1).and_then(|r| r.parse().ok()).unwrap_or(u32::MAX)
}

#[test]
fn sigkill_loses_nothing_acknowledged() {
    let started = Instant::now();
    let tmp = TempDir::new("kill");
    let data = tmp.0.join("data");
    let config = write_config(&tmp.0);
    let log = |name: &str| tmp.0.join(format!("broker-{name}.stderr"));

    // 1. The subscriber: a kept session with two subscriptions, then offline for good.
    let (mut b, addr) = Broker::start(&data, Some(&config), &log("setup"));
    let (mut s, ack) = Client::connect(addr, subscriber_connect(true)).unwrap();
    assert_eq!((ack.reason_code, ack.session_present), (ReasonCode::Success, false));
    s.send(Subscribe {
        packet_id: pid(1),
        properties: Default::default(),
        subscriptions: vec![subscription(Q1, QoS::AtLeastOnce), subscription(Q2, QoS::ExactlyOnce)].into(),
    })
    .unwrap();
    match s.recv() {
        Packet::SubAck(a) => assert_eq!(a.reason_codes.as_slice(), [ReasonCode::GrantedQos1, ReasonCode::GrantedQos2]),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // Every retained payload sent, in order, with whether it was acknowledged.
    let mut retained: Vec<(String, bool)> = vec![("ret-initial".into(), true)];
    assert!(publish_retained(&mut s, 2, "ret-initial").unwrap());
    s.send(Disconnect::new(ReasonCode::Success)).unwrap();
    drop(s);
    b.kill();

    // 2. Publish, SIGKILL at a different point each time, restart on the same directory.
    // Per topic: every payload sent, and those acknowledged.
    let mut published: HashMap<&str, HashSet<String>> = HashMap::new();
    let mut acked: HashMap<&str, Vec<String>> = HashMap::new();
    let mut per_round = Vec::new();
    // What each round's broker printed (stdout and stderr), for failure reports.
    let mut outputs = Vec::new();
    for i in 0..ITERATIONS {
        let (mut b, addr) = Broker::start(&data, Some(&config), &log(&i.to_string()));
        let (tx, connected) = mpsc::channel();
        let mut threads: Vec<(&str, JoinHandle<Sent>)> = Vec::new();
        for (topic, qos, name) in [(Q1, QoS::AtLeastOnce, "q1"), (Q2, QoS::ExactlyOnce, "q2")] {
            let tx = tx.clone();
            let (id, prefix) = (format!("crash-pub-{name}"), format!("{name}-{i}"));
            threads.push((topic, std::thread::spawn(move || publisher(addr, id, topic, qos, prefix, tx))));
        }
        // Every other round also replaces the retained message, one at a time.
        let retainer = (i % 2 == 1)
            .then(|| std::thread::spawn(move || retained_publisher(addr, "crash-ret".into(), format!("ret-{i}"))));
        for _ in 0..2 {
            connected.recv_timeout(WAIT).expect("a publisher did not connect");
        }
        std::thread::sleep(kill_delay(i));
        b.kill();
        let mut round = [0usize; 2];
        for (k, (topic, thread)) in threads.into_iter().enumerate() {
            let sent = thread.join().expect("publisher thread");
            assert!(sent.ended_by_kill(), "round {i}, {topic}: publisher ended with {:?}", sent.end);
            round[k] = sent.acked.len();
            published.entry(topic).or_default().extend(sent.published);
            acked.entry(topic).or_default().extend(sent.acked);
        }
        if let Some(r) = retainer {
            retained.extend(r.join().expect("retained publisher thread"));
        }
        per_round.push(round);
        outputs.push(b.output());
    }

    // 3. The last restart: the subscriber's session is there, with everything queued for it.
    let (mut b, addr) = Broker::start(&data, Some(&config), &log("final"));
    let (mut s, ack) = Client::connect(addr, subscriber_connect(false)).unwrap();
    assert_eq!(ack.reason_code, ReasonCode::Success);
    assert!(ack.session_present, "session present 0 after {ITERATIONS} kills; {}", b.output());
    let got = drain(&mut s);
    s.send(Disconnect::new(ReasonCode::Success)).unwrap();

    // The retained message: a new subscriber gets the last acknowledged one (or one sent after
    // it whose PUBACK the kill cut off: stored but not yet acknowledged).
    let (mut r, _) = Client::connect(addr, Connect::new(Protocol::V5, mqtt_string("crash-retained-check"))).unwrap();
    r.send(Subscribe {
        packet_id: pid(1),
        properties: Default::default(),
        subscriptions: vec![subscription(RETAINED, QoS::AtLeastOnce)].into(),
    })
    .unwrap();
    assert!(matches!(r.recv(), Packet::SubAck(_)));
    let now_retained = match r.recv() {
        Packet::Publish(p) if p.retain && p.topic.as_str() == RETAINED => {
            if let QosPid::AtLeastOnce(id) = p.qos_pid {
                r.send(Packet::PubAck(Ack::new(id))).unwrap();
            }
            String::from_utf8_lossy(&p.payload).into_owned()
        }
        other => panic!("expected the retained message, got {other:?}"),
    };
    let last_acked = retained.iter().rposition(|(_, a)| *a).unwrap();
    let allowed: Vec<&str> = retained[last_acked..].iter().map(|(p, _)| p.as_str()).collect();

    // 4. The verdict.
    let (acked_q1, acked_q2) = (&acked[Q1], &acked[Q2]);
    let received_q1: u32 = got.q1.values().sum();
    let received_q2: u32 = got.q2.values().sum();
    eprintln!(
        "crash test: {ITERATIONS} kills; acknowledged QoS 1 {} / QoS 2 {} (published {} / {}); \
         received QoS 1 {received_q1} ({} distinct) / QoS 2 {received_q2} ({} distinct), {} QoS 2 DUP resends; \
         retained {} updates sent, last acknowledged {:?}, found {now_retained:?}; per round acknowledged {per_round:?}; \
         {:.1} s",
        acked_q1.len(),
        acked_q2.len(),
        published[Q1].len(),
        published[Q2].len(),
        got.q1.len(),
        got.q2.len(),
        got.dup_resends,
        retained.len(),
        retained[last_acked].0,
        started.elapsed().as_secs_f64(),
    );
    // The payloads by round (the round is in the payload), then what the brokers of those
    // rounds and the final one printed.
    let report = |payloads: &[&String]| {
        let mut by_round: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
        for p in payloads {
            by_round.entry(round_of(p)).or_default().push(p);
        }
        let mut text = String::new();
        for (round, list) in &by_round {
            let shown = &list[..list.len().min(20)];
            text += &format!("round {round}: {} payloads, first {shown:?}\n", list.len());
        }
        for round in by_round.keys().filter(|r| **r < ITERATIONS) {
            text += &format!(
                "--- broker of round {round} (SIGKILLed after {:?}):\n{}\n",
                kill_delay(*round),
                outputs[*round as usize]
            );
        }
        text + &format!("--- final broker:\n{}", std::fs::read_to_string(log("final")).unwrap_or_default())
    };
    assert!(got.strange.is_empty(), "unexpected packets: {:?}", got.strange);
    // The subscriptions survived: messages came on both topics without subscribing again.
    assert!(!got.q1.is_empty() && !got.q2.is_empty(), "nothing delivered on one of the topics\n{}", report(&[]));
    let lost_q1: Vec<&String> = acked_q1.iter().filter(|p| !got.q1.contains_key(*p)).collect();
    assert!(lost_q1.is_empty(), "{} acknowledged QoS 1 messages lost:\n{}", lost_q1.len(), report(&lost_q1));
    let lost_q2: Vec<&String> = acked_q2.iter().filter(|p| !got.q2.contains_key(*p)).collect();
    assert!(lost_q2.is_empty(), "{} acknowledged QoS 2 messages lost:\n{}", lost_q2.len(), report(&lost_q2));
    let twice_q2: Vec<&String> = got.q2.iter().filter(|(_, n)| **n > 1).map(|(p, _)| p).collect();
    assert!(
        twice_q2.is_empty(),
        "{} QoS 2 messages delivered more than once: {:?}\n{}",
        twice_q2.len(),
        got.q2.iter().filter(|(_, n)| **n > 1).take(20).collect::<Vec<_>>(),
        report(&twice_q2)
    );
    let unknown: Vec<&String> = (got.q1.keys().filter(|p| !published[Q1].contains(*p)))
        .chain(got.q2.keys().filter(|p| !published[Q2].contains(*p)))
        .collect();
    assert!(unknown.is_empty(), "{} received messages never published:\n{}", unknown.len(), report(&unknown));
    assert!(
        allowed.contains(&now_retained.as_str()),
        "retained is {now_retained:?}, expected one of {allowed:?}\n{}",
        report(&[])
    );
    // Not vacuous: most rounds got messages acknowledged on both topics before the kill.
    let productive = per_round.iter().filter(|r| r[0] > 0 && r[1] > 0).count();
    assert!(
        productive >= ITERATIONS as usize * 3 / 4,
        "only {productive} of {ITERATIONS} rounds acknowledged anything: {per_round:?}"
    );
    drop(r);
    assert_eq!(b.interrupt(), 0, "{}", b.output());
}

/// A store file cut to half its length (an interrupted copy) is refused at startup: a failure
/// exit and one line on stderr naming the file, never a broker that starts empty.
#[test]
fn torn_store_is_refused_with_one_line() {
    let tmp = TempDir::new("torn");
    let data = tmp.0.join("data");
    // A normal session that stores something: a kept session, its subscription, a retained
    // message and a queued one.
    let (mut b, addr) = Broker::start(&data, None, &tmp.0.join("broker-1.stderr"));
    let (mut s, _) = Client::connect(addr, subscriber_connect(true)).unwrap();
    s.send(Subscribe {
        packet_id: pid(1),
        properties: Default::default(),
        subscriptions: vec![subscription(Q1, QoS::AtLeastOnce)].into(),
    })
    .unwrap();
    assert!(matches!(s.recv(), Packet::SubAck(_)));
    s.send(Disconnect::new(ReasonCode::Success)).unwrap();
    drop(s);
    let (mut p, _) = Client::connect(addr, Connect::new(Protocol::V5, mqtt_string("torn-pub"))).unwrap();
    assert!(publish_retained(&mut p, 1, "kept").unwrap());
    p.send(publish(Q1, "queued", QosPid::AtLeastOnce(pid(2)), false)).unwrap();
    assert!(matches!(p.recv(), Packet::PubAck(_)));
    drop(p);
    assert_eq!(b.interrupt(), 0, "{}", b.output());

    let file = data.join("mqttq.redb");
    let len = std::fs::metadata(&file).unwrap().len();
    assert!(len > 0, "no store written");
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(len / 2).unwrap();

    let mut b = Broker::spawn(&data, None, &tmp.0.join("broker-2.stderr"));
    let (code, err) = b.finish();
    // All of stdout: the channel closes once the reader has seen the pipe's end.
    let out: Vec<String> = std::iter::from_fn(|| b.lines.recv_timeout(WAIT).ok()).collect();
    assert!(!out.iter().any(|l| l.contains("ready")), "the broker started on a torn store: {out:?}\n{err}");
    assert_ne!(code, 0, "the broker exited successfully on a torn store: {err}");
    assert!(err.contains(file.to_str().unwrap()), "the error does not name {}: {err}", file.display());
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "a panic reached stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    eprintln!("torn store ({len} bytes cut to {}): exit {code}, stderr: {}", len / 2, err.trim_end());
}
