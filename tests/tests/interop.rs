//! Interoperability with software this project did not write, over real loopback sockets:
//!
//! - mosquitto_pub / mosquitto_sub and the paho-mqtt Python client against our broker over TCP
//!   (MQTT 3.1.1 and 5: QoS 0/1/2, retained, will, shared subscriptions, session resumption,
//!   unsubscribe, topic aliases);
//! - an aioquic MQTT-over-QUIC client (`tests/interop/quic_mqtt_client.py`, ALPN `mqtt`, one
//!   bidirectional stream) against our broker over QUIC;
//! - our client against the mosquitto broker over TCP, and over QUIC through an aioquic relay
//!   (`tests/interop/quic_tcp_relay.py`) in front of it;
//! - MQTT over WebSocket (ws and wss): paho-mqtt's scenarios, MQTT.js in node
//!   (`tests/interop/mqttjs_check.mjs`) and MQTT.js in a headless Chromium page
//!   (`tests/interop/browser_check.mjs`, driven by playwright-core) against our broker.
//!
//! The peers come from Debian (mosquitto, mosquitto-clients, chromium), PyPI (paho-mqtt,
//! aioquic; see `tests/interop/requirements.txt`) and npm (mqtt, playwright-core; see
//! `tests/interop/package.json`); `.ci/run` installs them. A test whose peer is missing fails
//! and says how to install it: it never passes without having talked to the peer.

// Real processes on real sockets: the wall clock is the only clock here.
#![allow(clippy::disallowed_methods)]

use adapter_tokio::client::{Client, ClientOptions};
use adapter_tokio::server::{Server, ServerOptions};
use mqtt_proto::{Protocol, Publish, QoS, TopicFilter, TopicName};
use mqtt_quic_core::tls::{ClientTls, SelfSigned, ServerTls};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

fn cert() -> &'static SelfSigned {
    static CERT: OnceLock<SelfSigned> = OnceLock::new();
    CERT.get_or_init(|| SelfSigned::generate(&["localhost"]).expect("certificate"))
}

/// A directory of this test process's own, for certificate files and broker configurations.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mqtt-interop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        std::fs::write(dir.join("cert.pem"), &cert().cert_pem).expect("write cert");
        std::fs::write(dir.join("key.pem"), &cert().key_pem).expect("write key");
        dir
    })
}

fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop")
}

/// The path of a peer program, or a failure that says how to get it.
fn require(program: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin".into(), "/sbin".into()]);
    for dir in dirs {
        let candidate = dir.join(program);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("interop peer `{program}` is not installed: `apt-get install {package}` (.ci/run does this)");
}

/// Python 3 with `module` importable, or a failure that says how to get it.
fn require_python(module: &str) -> PathBuf {
    let python = require("python3", "python3");
    let ok = Command::new(&python).args(["-c", &format!("import {module}")]).output().map(|o| o.status.success());
    assert!(
        ok.unwrap_or(false),
        "interop peer: the Python module `{module}` is not installed: \
         `pip install -r tests/interop/requirements.txt` (.ci/run does this)"
    );
    python
}

/// A peer process whose output lines (stdout and stderr) are collected as they come.
struct Peer {
    name: String,
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Peer {
    fn spawn(name: &str, command: &mut Command) -> Peer {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let (tx, lines) = channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let tx2 = tx.clone();
        std::thread::spawn(move || BufReader::new(out).lines().map_while(Result::ok).try_for_each(|l| tx.send(l)));
        std::thread::spawn(move || {
            BufReader::new(err).lines().map_while(Result::ok).try_for_each(|l| tx2.send(format!("stderr: {l}")))
        });
        Peer { name: name.to_string(), child, lines, seen: Vec::new() }
    }

    /// Waits for a line that satisfies `pred`, and returns it.
    fn expect(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("{}: no {what} within {WAIT:?}; output: {:#?}", self.name, self.seen)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    panic!("{}: exited ({status:?}) before {what}; output: {:#?}", self.name, self.seen)
                }
            }
        }
    }

    /// Waits for the process to end; returns its status and every output line.
    fn finish(mut self) -> (ExitStatus, Vec<String>) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(40);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("{} did not end; output: {:#?}", self.name, self.seen);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The readers end with the pipes.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(line);
        }
        (status, std::mem::take(&mut self.seen))
    }

    /// Like `finish`, and the process must have succeeded.
    fn succeed(self) -> Vec<String> {
        let name = self.name.clone();
        let (status, lines) = self.finish();
        assert!(status.success(), "{name} failed ({status}); output: {lines:#?}");
        lines
    }

    /// Ends the process with a signal (`KILL`: the connection drops without DISCONNECT; `INT`:
    /// mosquitto's clients disconnect cleanly).
    fn signal(&mut self, signal: &str) {
        let status = Command::new("kill").args([&format!("-{signal}"), &self.child.id().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} {}", self.name);
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Our broker (QUIC and TCP on 127.0.0.1, ports chosen by the system) in its own runtime.
struct OurBroker {
    runtime: tokio::runtime::Runtime,
    server: Option<Server>,
}

impl OurBroker {
    fn start() -> OurBroker {
        OurBroker::start_with(|_| {})
    }

    fn start_with(tweak: impl FnOnce(&mut ServerOptions)) -> OurBroker {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let mut options = ServerOptions::loopback(ServerTls::from_self_signed(cert()).expect("server TLS"));
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        (options.ws, options.wss) = (Some(any), Some(any));
        tweak(&mut options);
        let server = runtime.block_on(Server::start(options)).expect("our broker starts");
        OurBroker { runtime, server: Some(server) }
    }

    fn tcp_port(&self) -> u16 {
        self.server.as_ref().and_then(Server::tcp_addr).expect("TCP listener").port()
    }

    fn quic_port(&self) -> u16 {
        self.server.as_ref().and_then(Server::quic_addr).expect("QUIC listener").port()
    }

    /// The ports of the WebSocket listeners: plain, and over TLS.
    fn ws_ports(&self) -> (u16, u16) {
        let at = self.server.as_ref().expect("server").addresses();
        (at.ws.expect("ws listener").port(), at.wss.expect("wss listener").port())
    }
}

impl Drop for OurBroker {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            self.runtime.block_on(server.shutdown());
        }
    }
}

/// The mosquitto broker on a free loopback port.
struct Mosquitto {
    port: u16,
    _peer: Peer,
}

impl Mosquitto {
    fn start() -> Mosquitto {
        let program = require("mosquitto", "mosquitto");
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let config = scratch().join(format!("mosquitto-{port}.conf"));
        std::fs::write(&config, format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"))
            .expect("mosquitto config");
        let peer = Peer::spawn("mosquitto", Command::new(program).arg("-c").arg(&config));
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Mosquitto { port, _peer: peer }
    }
}

/// `mosquitto_sub` printing each message as `retain|qos|topic|payload`, with debug lines so a
/// test can wait for its SUBACK.
fn mosquitto_sub(port: u16, version: &str, args: &[&str]) -> Peer {
    let program = require("mosquitto_sub", "mosquitto-clients");
    // Piped, its output would be block-buffered: stdbuf makes it line by line.
    let mut command = Command::new(require("stdbuf", "coreutils"));
    command
        .arg("-oL")
        .arg(program)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", version, "-d", "-F", "%r|%q|%t|%p"])
        .args(args);
    Peer::spawn(&format!("mosquitto_sub {}", args.join(" ")), &mut command)
}

fn mosquitto_pub(port: u16, version: &str, args: &[&str]) -> Vec<String> {
    let program = require("mosquitto_pub", "mosquitto-clients");
    let mut command = Command::new(program);
    command.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", version]).args(args);
    Peer::spawn(&format!("mosquitto_pub {}", args.join(" ")), &mut command).succeed()
}

fn subscribed(line: &str) -> bool {
    line.starts_with("Subscribed")
}

/// The message lines (`retain|qos|topic|payload`) among a mosquitto_sub's output.
fn messages(lines: &[String]) -> Vec<String> {
    lines.iter().filter(|l| l.contains('|') && !l.starts_with("Client ") && !l.starts_with("stderr")).cloned().collect()
}

#[test]
fn mosquitto_clients_against_our_broker() {
    let broker = OurBroker::start();
    let port = broker.tcp_port();
    for v in ["mqttv311", "mqttv5"] {
        // QoS 0, 1 and 2, in order.
        let mut sub = mosquitto_sub(port, v, &["-t", &format!("mq/{v}/#"), "-q", "2", "-C", "3"]);
        sub.expect("SUBACK", subscribed);
        for q in 0..3 {
            mosquitto_pub(port, v, &["-t", &format!("mq/{v}/q{q}"), "-m", &format!("hello-{q}"), "-q", &q.to_string()]);
        }
        let got = messages(&sub.succeed());
        let want: Vec<String> = (0..3).map(|q| format!("0|{q}|mq/{v}/q{q}|hello-{q}")).collect();
        assert_eq!(got, want, "{v}: QoS 0/1/2");

        // Retained: a later subscriber gets it with RETAIN set; an empty retained message clears it.
        let topic = format!("mq/{v}/retained");
        mosquitto_pub(port, v, &["-t", &topic, "-m", "kept", "-q", "1", "-r"]);
        let got = messages(&mosquitto_sub(port, v, &["-t", &topic, "-q", "1", "-C", "1"]).succeed());
        assert_eq!(got, [format!("1|1|{topic}|kept")], "{v}: retained");
        mosquitto_pub(port, v, &["-t", &topic, "-n", "-r"]);
        let (status, lines) = mosquitto_sub(port, v, &["-t", &topic, "-C", "1", "-W", "1"]).finish();
        assert!(!status.success() && messages(&lines).is_empty(), "{v}: cleared retained message arrived: {lines:?}");

        // Will: a client killed without DISCONNECT has its will published.
        let will_topic = format!("mq/{v}/will");
        let mut watcher = mosquitto_sub(port, v, &["-t", &will_topic, "-q", "1", "-C", "1"]);
        watcher.expect("SUBACK", subscribed);
        let mut victim = mosquitto_sub(
            port,
            v,
            &["-t", "mq/nothing", "--will-topic", &will_topic, "--will-payload", "gone", "--will-qos", "1"],
        );
        victim.expect("SUBACK", subscribed);
        victim.signal("KILL");
        assert_eq!(messages(&watcher.succeed()), [format!("0|1|{will_topic}|gone")], "{v}: will");

        // Shared subscription: each message to exactly one member, both members used.
        let shared = format!("$share/g-{v}/mq/{v}/shared");
        let mut members: Vec<Peer> = (0..2).map(|_| mosquitto_sub(port, v, &["-t", &shared, "-q", "1"])).collect();
        for m in members.iter_mut() {
            m.expect("SUBACK", subscribed);
        }
        for i in 0..20 {
            mosquitto_pub(port, v, &["-t", &format!("mq/{v}/shared"), "-m", &format!("s{i}"), "-q", "1"]);
        }
        let mut counts = Vec::new();
        let mut all = Vec::new();
        for member in members.iter_mut() {
            let mut n = 0;
            while let Ok(line) = member.lines.recv_timeout(Duration::from_millis(500)) {
                if let Some(payload) = messages(std::slice::from_ref(&line)).first().and_then(|l| l.rsplit('|').next())
                {
                    all.push(payload.to_string());
                    n += 1;
                }
            }
            counts.push(n);
        }
        all.sort();
        let mut want: Vec<String> = (0..20).map(|i| format!("s{i}")).collect();
        want.sort();
        assert_eq!(all, want, "{v}: shared subscription delivers each message once (split {counts:?})");
        assert!(counts.iter().all(|&n| n > 0), "{v}: both members get messages: {counts:?}");
        drop(members);

        // Session resumption: messages published while a persistent client is away are
        // delivered when it comes back; unsubscribing on that session stops them.
        let id = format!("persistent-{v}");
        let topic = format!("mq/{v}/session");
        let persistent = |extra: &[&str]| {
            let mut args = vec!["-c", "-i", &id, "-q", "1"];
            if v == "mqttv5" {
                args.extend(["-x", "60"]);
            }
            args.extend(extra);
            mosquitto_sub(port, v, &args)
        };
        let mut first = persistent(&["-t", &topic]);
        first.expect("SUBACK", subscribed);
        first.signal("INT");
        first.finish();
        for i in 0..3 {
            mosquitto_pub(port, v, &["-t", &topic, "-m", &format!("while-away-{i}"), "-q", "1"]);
        }
        let got = messages(&persistent(&["-t", &topic, "-C", "3"]).succeed());
        let want: Vec<String> = (0..3).map(|i| format!("0|1|{topic}|while-away-{i}")).collect();
        assert_eq!(got, want, "{v}: session resumption");
        persistent(&["-t", "mq/nothing", "-U", &topic, "-E"]).succeed();
        mosquitto_pub(port, v, &["-t", &topic, "-m", "after-unsubscribe", "-q", "1"]);
        let (_, lines) = persistent(&["-t", "mq/nothing", "-W", "1"]).finish();
        // (mosquitto_sub -C may leave before acknowledging its last message, which then comes
        // again, correctly, with DUP: only the message published after UNSUBSCRIBE matters.)
        assert!(
            !messages(&lines).iter().any(|l| l.ends_with("after-unsubscribe")),
            "{v}: unsubscribed session still got: {lines:?}"
        );
    }

    // Topic alias (MQTT 5): the publisher sets alias 1 on its PUBLISH; subscribers see the topic.
    let mut sub = mosquitto_sub(port, "mqttv5", &["-t", "mq/alias", "-C", "1"]);
    sub.expect("SUBACK", subscribed);
    mosquitto_pub(port, "mqttv5", &["-t", "mq/alias", "-m", "aliased", "-D", "publish", "topic-alias", "1"]);
    assert_eq!(messages(&sub.succeed()), ["0|0|mq/alias|aliased"]);
}

#[test]
fn paho_against_our_broker() {
    let python = require_python("paho.mqtt.client");
    let broker = OurBroker::start();
    for v in ["5", "3.1.1"] {
        let mut command = Command::new(&python);
        command.arg(interop_dir().join("paho_check.py")).args([
            "--host",
            "127.0.0.1",
            "--port",
            &broker.tcp_port().to_string(),
            "--mqtt",
            v,
            "--scenario",
            "all",
        ]);
        let lines = Peer::spawn(&format!("paho_check.py --mqtt {v}"), &mut command).succeed();
        for scenario in ["connect", "qos", "retained", "will", "shared", "session", "unsubscribe", "topic_alias"] {
            assert!(
                lines.iter().any(|l| l.starts_with(&format!("ok: {scenario} "))),
                "paho {v}: scenario {scenario} did not report ok: {lines:#?}"
            );
        }
    }
}

/// A password file written by mosquitto_passwd (PBKDF2-SHA512, `$7$`) works as it is: its
/// user gets in with mosquitto_pub, a wrong password is refused.
#[test]
fn a_mosquitto_passwd_file_works_with_our_broker() {
    let passwd = require("mosquitto_passwd", "mosquitto");
    let file = scratch().join("mosquitto.passwd");
    let _ = std::fs::remove_file(&file);
    let made = Command::new(passwd).args(["-b", "-c"]).arg(&file).args(["alice", "s3cret"]).status().expect("run");
    assert!(made.success(), "mosquitto_passwd failed");
    let contents = std::fs::read_to_string(&file).expect("password file");
    assert!(contents.contains(":$7$"), "{contents}");
    let auth = mqtt_quic_core::broker::auth::FileAuth::new(false).with_passwords(&contents).expect("accepted");
    let broker = OurBroker::start_with(|o| o.broker.auth = Some(std::sync::Arc::new(auth)));
    let port = broker.tcp_port();
    let publish = |password: &str| {
        let args = ["-h", "127.0.0.1", "-p", &port.to_string(), "-u", "alice", "-P", password, "-t", "t", "-m", "m"];
        Command::new(require("mosquitto_pub", "mosquitto-clients")).args(args).output().expect("run")
    };
    assert!(publish("s3cret").status.success(), "the right password gets in");
    let refused = publish("wrong");
    assert!(!refused.status.success(), "a wrong password is refused");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.to_lowercase().contains("bad user name or password"), "{said}");
}

/// Mutual TLS as mosquitto users set it up (`cafile`, `require_certificate`,
/// `use_identity_as_username`), with mosquitto_pub as the client over TLS (1.3, and 1.2 when
/// allowed) and our client over QUIC: a device's certificate is its login, its common name its
/// user name for the ACL; without a certificate the handshake fails.
#[test]
fn client_certificates_log_devices_in_as_mosquitto_does() {
    let pub_program = require("mosquitto_pub", "mosquitto-clients");
    let pki = mqtt_tests::pki::Pki::new();
    let server = pki.issue(&["localhost"], false);
    let device = pki.issue(&["device-7"], true);
    let dir = scratch().join("mtls");
    std::fs::create_dir_all(&dir).expect("dir");
    for (name, pem) in [("ca.pem", &pki.ca_pem), ("dev.pem", &device.cert_pem), ("dev.key", &device.key_pem)] {
        std::fs::write(dir.join(name), pem).expect("write");
    }
    let tls = ServerTls::from_pem(server.cert_pem.as_bytes(), server.key_pem.as_bytes())
        .and_then(|t| t.require_client_certificates(pki.ca_pem.as_bytes()))
        .expect("server TLS")
        .allow_tls12(true);
    let acl = "user device-7\ntopic write devices/device-7/#\n";
    let auth = mqtt_quic_core::broker::auth::FileAuth::new(false).with_acl(acl).expect("ACL");
    let broker = OurBroker::start_with(|o| {
        o.broker.quic.tls = tls;
        o.tls = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        o.broker.use_identity_as_username = true;
        o.broker.auth = Some(std::sync::Arc::new(auth));
    });
    let server_ref = broker.server.as_ref().expect("server");
    let tls_port = server_ref.tls_addr().expect("TLS listener").port().to_string();
    let mut seen = broker
        .runtime
        .block_on(server_ref.subscribe(TopicFilter::new("devices/#").expect("filter"), QoS::AtLeastOnce))
        .expect("subscribe");
    let publish = |extra: &[&str], topic: &str| {
        let mut command = Command::new(&pub_program);
        command.args(["-h", "localhost", "-p", &tls_port, "-q", "1", "-V", "mqttv5", "-t", topic, "-m", "m"]);
        command.arg("--cafile").arg(dir.join("ca.pem")).args(extra);
        command.output().expect("run mosquitto_pub")
    };
    let (cert, key) = (dir.join("dev.pem"), dir.join("dev.key"));
    let with_cert = ["--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()];
    let ok = publish(&with_cert, "devices/device-7/temp");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let tls12 = [&with_cert[..], &["--tls-version", "tlsv1.2"]].concat();
    let ok12 = publish(&tls12, "devices/device-7/tls12");
    assert!(ok12.status.success(), "TLS 1.2: {}", String::from_utf8_lossy(&ok12.stderr));
    // Another device's topic: the ACL of user device-7 says no (the message goes nowhere).
    let _ = publish(&with_cert, "devices/device-8/temp");
    let refused = publish(&[], "devices/device-7/anon");
    assert!(!refused.status.success(), "no certificate, no connection");
    // Found in review: over plain TCP, with no certificate, claiming the device's name in the
    // CONNECT gets nowhere (as with mosquitto).
    let tcp_port = broker.tcp_port().to_string();
    let claim = Command::new(&pub_program)
        .args(["-h", "127.0.0.1", "-p", &tcp_port, "-u", "device-7", "-t", "devices/device-7/claim", "-m", "m"])
        .output()
        .expect("run mosquitto_pub");
    assert!(!claim.status.success(), "a user name is not a certificate");

    // Our client over QUIC, with the device's certificate.
    let trust = ClientTls::with_ca_pem(pki.ca_pem.as_bytes())
        .and_then(|t| t.with_client_certificate(device.cert_pem.as_bytes(), device.key_pem.as_bytes()))
        .expect("client TLS");
    let mut options = ClientOptions::new().tls(trust);
    options.server_name = Some("localhost".into());
    let quic = format!("quic://127.0.0.1:{}", broker.quic_port());
    broker.runtime.block_on(async {
        let client = Client::connect(&quic, options).await.expect("a certificate is a login over QUIC too");
        let p = Publish::new(TopicName::new("devices/device-7/quic").expect("topic"), "q").with_qos(QoS::AtLeastOnce);
        client.publish(p).await.expect("publish");
        client.disconnect().await.expect("disconnect");
    });
    let mut topics = Vec::new();
    broker.runtime.block_on(async {
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), seen.recv()).await {
            topics.push(m.topic.to_string());
        }
    });
    assert_eq!(topics, ["devices/device-7/temp", "devices/device-7/tls12", "devices/device-7/quic"]);
}

/// The Prometheus endpoint, read by the Prometheus project's own OpenMetrics parser after
/// some traffic: every family parses, and the counters show what happened (a QUIC handshake,
/// PUBLISH packets both ways, a round-trip time observed).
#[test]
fn prometheus_parses_our_metrics() {
    let python = require_python("prometheus_client");
    let broker = OurBroker::start();
    let source = broker.server.as_ref().expect("server").metrics_source();
    let url = broker.runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        drop(tokio::spawn(adapter_tokio::metrics::serve(listener, source)));
        format!("http://{addr}/metrics")
    });
    let tls = ClientTls::with_ca_pem(cert().cert_pem.as_bytes()).expect("CA");
    let mut options = ClientOptions::new().tls(tls);
    options.server_name = Some("localhost".into());
    let quic = format!("quic://127.0.0.1:{}", broker.quic_port());
    let client = broker.runtime.block_on(Client::connect(&quic, options)).expect("connect");
    let mut messages = client.messages().expect("messages");
    broker.runtime.block_on(async {
        client.subscribe(TopicFilter::new("m/#").expect("filter"), QoS::AtLeastOnce).await.expect("subscribe");
        for i in 0..3 {
            let p = Publish::new(TopicName::new("m/x").expect("topic"), format!("{i}")).with_qos(QoS::AtLeastOnce);
            client.publish(p).await.expect("publish");
            tokio::time::timeout(WAIT, messages.recv()).await.expect("delivered");
        }
    });
    let mut command = Command::new(python);
    command.arg(interop_dir().join("metrics_check.py")).arg(&url);
    let lines = Peer::spawn("metrics_check.py", &mut command).succeed();
    let value = |sample: &str| -> f64 {
        let line = lines.iter().find(|l| l.starts_with(sample)).unwrap_or_else(|| panic!("no {sample}: {lines:#?}"));
        line.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("a number")
    };
    assert_eq!(value("mqttq_connections_count{}"), 1.0);
    assert_eq!(value("mqttq_messages_received_total{}"), 3.0);
    assert_eq!(value("mqttq_packets_received_total{type=\"publish\"}"), 3.0);
    assert_eq!(value("mqttq_packets_sent_total{type=\"publish\"}"), 3.0);
    assert_eq!(value("mqttq_packets_sent_total{type=\"connack\"}"), 1.0);
    assert_eq!(value("mqttq_quic_handshakes_total{zero_rtt=\"none\"}"), 1.0);
    assert_eq!(value("mqttq_quic_connections_established{}"), 1.0);
    assert!(value("mqttq_quic_rtt_seconds{quantile=\"0.5\"}") > 0.0);
    assert!(value("mqttq_quic_packets_sent_total{}") > 0.0);
    assert!(value("mqttq_bytes_received_total{}") > 0.0);
    broker.runtime.block_on(client.disconnect()).expect("disconnect");
}

/// paho-mqtt's whole scenario list over MQTT over WebSocket, both protocol versions, and over
/// secure WebSocket (TLS with our certificate).
#[test]
fn paho_over_websocket_against_our_broker() {
    let python = require_python("paho.mqtt.client");
    let broker = OurBroker::start();
    let (ws, wss) = broker.ws_ports();
    let cafile = scratch().join("cert.pem");
    let runs: [(&str, u16, Option<&Path>, &str); 3] =
        [("5", ws, None, "all"), ("3.1.1", ws, None, "all"), ("5", wss, Some(&cafile), "qos")];
    for (v, port, ca, scenario) in runs {
        let mut command = Command::new(&python);
        command.arg(interop_dir().join("paho_check.py")).args(["--port", &port.to_string(), "--mqtt", v]);
        command.args(["--transport", "websockets", "--scenario", scenario]);
        if let Some(ca) = ca {
            command.args(["--host", "localhost", "--cafile"]).arg(ca);
        }
        let name = format!("paho_check.py websockets --mqtt {v} tls={}", ca.is_some());
        let lines = Peer::spawn(&name, &mut command).succeed();
        let expected: &[&str] = match scenario {
            "all" => &["connect", "qos", "retained", "will", "shared", "session", "unsubscribe", "topic_alias"],
            _ => &["qos"],
        };
        for scenario in expected {
            assert!(lines.iter().any(|l| l.starts_with(&format!("ok: {scenario} "))), "{name}: {scenario}: {lines:#?}");
        }
    }
}

/// node with the npm packages of `tests/interop/package.json`, or a failure that says how to
/// get them.
fn require_node_modules() -> PathBuf {
    let node = require("node", "nodejs");
    assert!(
        interop_dir().join("node_modules/mqtt/package.json").is_file(),
        "interop peer: MQTT.js is not installed: `npm ci --prefix tests/interop` (.ci/run does this)"
    );
    node
}

/// MQTT.js (the npm `mqtt` package) in node over ws:// (MQTT 5 and 3.1.1) and wss://.
#[test]
fn mqttjs_over_websocket_against_our_broker() {
    let node = require_node_modules();
    let broker = OurBroker::start();
    let (ws, wss) = broker.ws_ports();
    let cafile = scratch().join("cert.pem");
    let runs = [
        (format!("ws://127.0.0.1:{ws}/mqtt"), "5", false),
        (format!("ws://127.0.0.1:{ws}/mqtt"), "3.1.1", false),
        (format!("wss://localhost:{wss}/mqtt"), "5", true),
    ];
    for (url, v, tls) in runs {
        let mut command = Command::new(&node);
        command.arg(interop_dir().join("mqttjs_check.mjs")).args([&url, "--mqtt", v]);
        if tls {
            command.arg("--ca").arg(&cafile);
        }
        let lines = Peer::spawn(&format!("mqttjs_check.mjs {url} --mqtt {v}"), &mut command).succeed();
        for check in ["qos", "retained", "all"] {
            assert!(lines.iter().any(|l| l.starts_with(&format!("ok: {check} mqtt={v}"))), "{url} {v}: {lines:#?}");
        }
    }
}

/// MQTT.js in a real browser: a headless Chromium page connects over ws:// and then wss://
/// (TLS with ALPN http/1.1, as browsers offer), subscribes, and says hello; our client, over
/// QUIC, receives it and answers, and the page lists the answer in its DOM (checked, and a
/// screenshot taken, by `browser_check.mjs`).
#[test]
fn mqttjs_in_chromium_against_our_broker() {
    let broker = OurBroker::start();
    let (ws, wss) = broker.ws_ports();
    browser_round_trip(&broker, &format!("ws://127.0.0.1:{ws}/mqtt"), "ws");
    browser_round_trip(&broker, &format!("wss://localhost:{wss}/mqtt"), "wss");
}

/// One page in Chromium against `url`, answered by our client over QUIC.
fn browser_round_trip(broker: &OurBroker, url: &str, tag: &str) {
    let node = require_node_modules();
    let chromium = require("chromium", "chromium");
    let run = format!("r{}{tag}", std::process::id());
    let screenshot = scratch().join(format!("browser-{tag}.png"));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let tls = ClientTls::with_ca_pem(cert().cert_pem.as_bytes()).expect("CA");
    let quic = format!("quic://127.0.0.1:{}", broker.quic_port());
    let mut options = ClientOptions::new().tls(tls);
    options.server_name = Some("localhost".into());
    let ours = runtime.block_on(Client::connect(&quic, options)).expect("our client connects");
    let mut messages = ours.messages().expect("message stream");
    let out = TopicFilter::new(format!("browser/{run}/out")).expect("filter");
    runtime.block_on(ours.subscribe(out, QoS::AtLeastOnce)).expect("subscribe");

    let mut command = Command::new(&node);
    command.arg(interop_dir().join("browser_check.mjs")).args([url, &run]);
    command.arg(&screenshot).env("CHROMIUM", &chromium);
    let page = Peer::spawn("browser_check.mjs", &mut command);
    let hello = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(30), messages.recv()).await })
        .expect("the page's hello in time")
        .expect("a message");
    assert_eq!(&hello.payload[..], b"hello from chromium");
    let answer = Publish::new(TopicName::new(format!("browser/{run}/in")).expect("topic"), "hello page");
    runtime.block_on(ours.publish(answer.with_qos(QoS::AtLeastOnce))).expect("answer");
    let lines = page.succeed();
    let want = format!("ok: page received browser/{run}/in hello page");
    assert!(lines.contains(&want), "{lines:#?}");
    assert!(std::fs::metadata(&screenshot).is_ok_and(|m| m.len() > 0), "no screenshot");
    runtime.block_on(ours.disconnect()).expect("disconnect");
}

#[test]
fn aioquic_client_against_our_broker() {
    let python = require_python("aioquic");
    let broker = OurBroker::start();
    let cafile = scratch().join("cert.pem");
    for v in ["5", "3.1.1"] {
        for scenario in ["pubsub", "retained", "will"] {
            let mut command = Command::new(&python);
            command.arg(interop_dir().join("quic_mqtt_client.py")).args([
                "--host",
                "127.0.0.1",
                "--port",
                &broker.quic_port().to_string(),
                "--server-name",
                "localhost",
                "--mqtt",
                v,
                "--scenario",
                scenario,
                "--cafile",
            ]);
            command.arg(&cafile);
            let lines = Peer::spawn(&format!("aioquic {scenario} --mqtt {v}"), &mut command).succeed();
            assert!(lines.iter().any(|l| l.starts_with("ok: ")), "aioquic {scenario} {v}: {lines:#?}");
        }
    }
}

/// Publishes QoS 0, 1 and 2 and a retained message through `url` with our tokio client, and
/// checks they come back through a second connection.
async fn our_client_round_trip(url: &str, protocol: Protocol, tls: Option<ClientTls>) {
    let options = |id: &str| {
        let mut o = ClientOptions::new().client_id(id);
        o.session.protocol = protocol;
        o.server_name = Some("localhost".into());
        if let Some(tls) = &tls {
            o = o.tls(tls.clone());
        }
        o
    };
    let tag = if protocol.is_v5() { "v5" } else { "v311" };
    let connect = |id: String| {
        let options = options(&id);
        async move {
            tokio::time::timeout(WAIT, Client::connect(url, options))
                .await
                .expect("connect timed out")
                .unwrap_or_else(|e| panic!("{url}: {e}"))
        }
    };
    let sub = connect(format!("ours-sub-{tag}")).await;
    let mut messages = sub.messages().expect("message stream");
    let filter = TopicFilter::new(format!("ours/{tag}/#")).expect("filter");
    assert_eq!(sub.subscribe(filter, QoS::ExactlyOnce).await.expect("subscribe"), QoS::ExactlyOnce);
    let publisher = connect(format!("ours-pub-{tag}")).await;
    let qos = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];
    for (i, q) in qos.into_iter().enumerate() {
        let topic = TopicName::new(format!("ours/{tag}/q{i}")).expect("topic");
        publisher.publish(Publish::new(topic, format!("m{i}")).with_qos(q)).await.expect("publish");
    }
    for (i, q) in qos.into_iter().enumerate() {
        let m = tokio::time::timeout(WAIT, messages.recv()).await.expect("message timed out").expect("message");
        assert_eq!(
            (m.topic.as_str(), &m.payload[..], m.qos()),
            (format!("ours/{tag}/q{i}").as_str(), format!("m{i}").as_bytes(), q)
        );
    }
    let mut retained =
        Publish::new(TopicName::new(format!("ours/{tag}/kept")).expect("topic"), "kept").with_qos(QoS::AtLeastOnce);
    retained.retain = true;
    publisher.publish(retained).await.expect("retained publish");
    let _ = tokio::time::timeout(WAIT, messages.recv()).await.expect("live copy");
    let late = connect(format!("ours-late-{tag}")).await;
    let mut late_messages = late.messages().expect("message stream");
    late.subscribe(TopicFilter::new(format!("ours/{tag}/kept")).expect("filter"), QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let m = tokio::time::timeout(WAIT, late_messages.recv()).await.expect("retained timed out").expect("retained");
    assert!(m.retain && &m.payload[..] == b"kept", "{m:?}");
    for client in [publisher, sub, late] {
        client.disconnect().await.expect("disconnect");
    }
}

#[test]
fn our_client_against_mosquitto_broker() {
    let mosquitto = Mosquitto::start();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let url = format!("mqtt://127.0.0.1:{}", mosquitto.port);
    for protocol in [Protocol::V5, Protocol::V3_1_1] {
        runtime.block_on(our_client_round_trip(&url, protocol, None));
    }
}

#[test]
fn our_client_over_quic_through_an_aioquic_relay_to_mosquitto() {
    let python = require_python("aioquic");
    let mosquitto = Mosquitto::start();
    let mut command = Command::new(python);
    command
        .arg(interop_dir().join("quic_tcp_relay.py"))
        .args(["--listen-port", "0", "--cert"])
        .arg(scratch().join("cert.pem"))
        .arg("--key")
        .arg(scratch().join("key.pem"))
        .args(["--upstream", &format!("127.0.0.1:{}", mosquitto.port)]);
    let mut relay = Peer::spawn("quic_tcp_relay.py", &mut command);
    let line = relay.expect("its listening line", |l| l.starts_with("listening "));
    let addr: SocketAddr = line["listening ".len()..].parse().expect("relay address");
    let tls = ClientTls::with_ca_pem(cert().cert_pem.as_bytes()).expect("CA");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let url = format!("quic://127.0.0.1:{}", addr.port());
    for protocol in [Protocol::V5, Protocol::V3_1_1] {
        runtime.block_on(our_client_round_trip(&url, protocol, Some(tls.clone())));
    }
    drop(relay);
}

/// mosquitto on `port` with its store in `dir` (so a restart keeps its sessions, as a
/// production broker does), once it listens.
fn mosquitto_with_store(port: u16, dir: &Path) -> Peer {
    let program = require("mosquitto", "mosquitto");
    std::fs::create_dir_all(dir).expect("mosquitto store dir");
    // mosquitto started as root runs as the `mosquitto` user: it must be able to write here.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).expect("store dir mode");
    let config = dir.join("mosquitto.conf");
    let text = format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n",
        dir.display()
    );
    std::fs::write(&config, text).expect("mosquitto config");
    let peer = Peer::spawn("mosquitto", Command::new(program).arg("-c").arg(&config));
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    peer
}

/// Our broker bridged to Debian's mosquitto over TCP (MQTT 5): topics out (with a remote
/// prefix), in, and both ways without loops; then mosquitto is stopped during a QoS 1 flow and
/// started again 3 s later: every message our broker acknowledged meanwhile reaches mosquitto's
/// subscriber.
#[test]
fn our_broker_bridged_to_mosquitto_through_an_outage() {
    use mqtt_quic_core::bridge::config::BridgeConfig;
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let store = scratch().join(format!("mosquitto-store-{port}"));
    let mut mosquitto = mosquitto_with_store(port, &store);
    let data = scratch().join(format!("edge-{port}"));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut bridge = BridgeConfig::new("mosquitto", vec![format!("mqtt://127.0.0.1:{port}").parse().unwrap()]);
        bridge.client_id = "edge-interop".into();
        bridge.mappings =
            ["edge/# out 1 \"\" site1/", "cmd/# in 1", "loop/# both 1"].iter().map(|m| m.parse().unwrap()).collect();
        bridge.reconnect = mqtt_quic_core::client::ReconnectPolicy {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(1),
        };
        let mut options = ServerOptions::loopback(ServerTls::from_self_signed(cert()).unwrap());
        options.broker.persistence = mqtt_quic_core::persist::Persistence::Sync;
        options.data_dir = Some(data.clone());
        options.broker.bridges = vec![bridge];
        let edge = Server::start(options).await.expect("edge broker");

        let mut kept = ClientOptions::new().client_id("cloud-app");
        kept.session.clean_start = false;
        kept.session.session_expiry = 3600;
        let cloud = Client::connect(&format!("mqtt://127.0.0.1:{port}"), kept).await.expect("to mosquitto");
        let mut at_cloud = cloud.messages().unwrap();
        for f in ["site1/#", "loop/#"] {
            cloud.subscribe(TopicFilter::new(f).unwrap(), QoS::AtLeastOnce).await.unwrap();
        }
        let local = format!("mqtt://{}", edge.tcp_addr().unwrap());
        let app = Client::connect(&local, ClientOptions::new().client_id("edge-app")).await.expect("to the edge");
        let mut at_edge = app.messages().unwrap();
        for f in ["cmd/#", "loop/#"] {
            app.subscribe(TopicFilter::new(f).unwrap(), QoS::AtLeastOnce).await.unwrap();
        }
        let topic = |t: &str| TopicName::new(t).unwrap();
        // In: once the bridge is up and subscribed, mosquitto's messages come down.
        let mut came = false;
        for i in 0..50 {
            cloud.publish(Publish::new(topic("cmd/ping"), format!("p{i}")).with_qos(QoS::AtLeastOnce)).await.unwrap();
            if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), at_edge.recv()).await {
                assert_eq!(m.topic.as_str(), "cmd/ping");
                came = true;
                break;
            }
        }
        assert!(came, "nothing came in from mosquitto over the bridge");
        // Out, under the remote prefix.
        app.publish(Publish::new(topic("edge/t"), "e1").with_qos(QoS::AtLeastOnce)).await.unwrap();
        let m = tokio::time::timeout(WAIT, at_cloud.recv()).await.expect("out to mosquitto").unwrap();
        assert_eq!((m.topic.as_str(), &m.payload[..]), ("site1/edge/t", &b"e1"[..]));
        // Both ways: each side sees each message once (an echo would make it twice).
        cloud.publish(Publish::new(topic("loop/c"), "from mosquitto").with_qos(QoS::AtLeastOnce)).await.unwrap();
        app.publish(Publish::new(topic("loop/e"), "from the edge").with_qos(QoS::AtLeastOnce)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        for (side, rx) in [("mosquitto", &mut at_cloud), ("edge", &mut at_edge)] {
            let mut got = Vec::new();
            while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
                if m.topic.as_str().starts_with("loop/") {
                    got.push(m.topic.to_string());
                }
            }
            got.sort();
            assert_eq!(got, ["loop/c", "loop/e"], "{side}");
        }

        // mosquitto stops (saving its sessions); the edge keeps acknowledging.
        mosquitto.signal("TERM");
        let (_, lines) = mosquitto.finish();
        assert!(!lines.iter().any(|l| l.contains("Error saving")), "mosquitto could not save its store: {lines:#?}");
        for i in 0..20 {
            app.publish(Publish::new(topic("edge/t"), format!("o{i}")).with_qos(QoS::AtLeastOnce)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let _mosquitto = mosquitto_with_store(port, &store);
        let mut missing: std::collections::BTreeSet<String> = (0..20).map(|i| format!("o{i}")).collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !missing.is_empty() && Instant::now() < deadline {
            if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), at_cloud.recv()).await {
                missing.remove(&String::from_utf8_lossy(&m.payload).into_owned());
            }
        }
        assert!(missing.is_empty(), "acknowledged by the edge and lost: {missing:?}");
        app.disconnect().await.unwrap();
        edge.shutdown().await;
    });
}

/// An MQTT 3.1.1 bridge to mosquitto: 3.1.1 has no No Local, so the bridge says it is one with
/// mosquitto's flag (protocol level 0x84), and mosquitto does not send back what it published:
/// a topic mapped both ways arrives once on each side.
#[test]
fn a_3_1_1_bridge_to_mosquitto_does_not_loop() {
    use mqtt_quic_core::bridge::config::BridgeConfig;
    let mosquitto = Mosquitto::start();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut bridge =
            BridgeConfig::new("mosquitto", vec![format!("mqtt://127.0.0.1:{}", mosquitto.port).parse().unwrap()]);
        bridge.protocol = Protocol::V3_1_1;
        bridge.client_id = "edge-311".into();
        bridge.mappings = vec!["loop/# both 1".parse().unwrap()];
        let mut options = ServerOptions::loopback(ServerTls::from_self_signed(cert()).unwrap());
        options.broker.bridges = vec![bridge];
        let edge = Server::start(options).await.expect("edge broker");
        let cloud = Client::connect(&format!("mqtt://127.0.0.1:{}", mosquitto.port), ClientOptions::new())
            .await
            .expect("to mosquitto");
        let mut at_cloud = cloud.messages().unwrap();
        cloud.subscribe(TopicFilter::new("loop/#").unwrap(), QoS::AtLeastOnce).await.unwrap();
        let app = Client::connect(&format!("mqtt://{}", edge.tcp_addr().unwrap()), ClientOptions::new())
            .await
            .expect("to the edge");
        let mut at_edge = app.messages().unwrap();
        app.subscribe(TopicFilter::new("loop/#").unwrap(), QoS::AtLeastOnce).await.unwrap();
        // Wait for the bridge: mosquitto's messages come down once it is up.
        let mut up = false;
        for _ in 0..50 {
            cloud.publish(Publish::new(TopicName::new("loop/probe").unwrap(), "p")).await.unwrap();
            if tokio::time::timeout(Duration::from_millis(200), at_edge.recv()).await.is_ok() {
                up = true;
                break;
            }
        }
        assert!(up, "the bridge did not come up");
        tokio::time::sleep(Duration::from_millis(500)).await;
        while tokio::time::timeout(Duration::from_millis(100), at_edge.recv()).await.is_ok() {}
        while tokio::time::timeout(Duration::from_millis(100), at_cloud.recv()).await.is_ok() {}
        app.publish(Publish::new(TopicName::new("loop/e").unwrap(), "edge").with_qos(QoS::AtLeastOnce)).await.unwrap();
        cloud
            .publish(Publish::new(TopicName::new("loop/c").unwrap(), "cloud").with_qos(QoS::AtLeastOnce))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        for (side, rx) in [("mosquitto", &mut at_cloud), ("edge", &mut at_edge)] {
            let mut got = Vec::new();
            while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
                got.push(m.topic.to_string());
            }
            got.sort();
            assert_eq!(got, ["loop/c", "loop/e"], "{side}");
        }
        edge.shutdown().await;
    });
}
