//! The `mqttq` binary run as a subprocess: broker startup and shutdown, pub and sub across
//! QUIC and TCP, the shell, and the one-line errors for bad input.
// Subprocesses run on the wall clock: the deadlines here are real time.
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MQTTQ: &str = env!("CARGO_BIN_EXE_mqttq");

/// A child process whose stdout lines arrive on a channel.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(args: &[&str]) -> Proc {
        let mut child = Command::new(MQTTQ)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mqttq did not start");
        let lines = common::stdout_lines(&mut child);
        Proc { child, lines }
    }

    /// Waits for a stdout line containing `needle`; returns it.
    fn expect(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("no line with `{needle}` on stdout"),
            }
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for the exit; returns the code and stderr.
    fn finish(&mut self) -> (i32, String) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("mqttq did not exit");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut err).unwrap();
        (status.code().unwrap_or(-1), err)
    }

    fn interrupt(&self) {
        let ok = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill -INT failed");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs mqttq to completion: exit code, stdout, stderr.
fn run(args: &[&str]) -> (i32, String, String) {
    let mut p = Proc::spawn(args);
    let (code, err) = p.finish();
    let out: Vec<String> = p.lines.try_iter().collect();
    (code, out.join("\n"), err)
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mqttq-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A broker on loopback ports; returns it with its QUIC and TCP ports.
fn broker(data: &str) -> (Proc, String, String) {
    let b = Proc::spawn(&["broker", "--quic", "127.0.0.1:0", "--tcp", "127.0.0.1:0", "--data-dir", data]);
    let port = |l: String| l.rsplit(':').next().unwrap().to_string();
    b.expect("fingerprint: ");
    let quic = port(b.expect("listening: quic"));
    let tcp = port(b.expect("listening: tcp"));
    b.expect("ready");
    (b, quic, tcp)
}

#[test]
fn pub_and_sub_across_quic_and_tcp_then_graceful_shutdown() {
    let dir = temp_dir("pubsub");
    let data = dir.to_str().unwrap();
    let (mut b, quic, tcp) = broker(data);
    // Over TCP, retained, MQTT 3.1.1; then read back over QUIC with certificate verification
    // against the broker's generated certificate (found through --data-dir).
    let (code, _, err) = run(&["pub", "--transport", "tcp", "-p", &tcp, "-V", "311", "-t", "t/a", "-m", "first", "-r"]);
    assert_eq!((code, err.as_str()), (0, ""));
    let mut sub = Proc::spawn(&["sub", "-p", &quic, "--data-dir", data, "-t", "t/#", "-C", "2", "-v", "-q", "1"]);
    assert_eq!(sub.expect("t/a"), "t/a first");
    let (code, _, err) = run(&["pub", "-p", &quic, "--data-dir", data, "-t", "t/b", "-m", "second", "-q", "2"]);
    assert_eq!((code, err.as_str()), (0, ""));
    assert_eq!(sub.expect("t/b"), "t/b second");
    assert_eq!(sub.finish(), (0, String::new()), "sub -C 2 exits by itself");

    // A subscriber still connected when the broker is interrupted is told why.
    let mut sub = Proc::spawn(&["sub", "--transport", "tcp", "-p", &tcp, "-t", "t/a"]);
    sub.expect("first");
    b.interrupt();
    let (code, err) = b.finish();
    assert_eq!(code, 0, "broker exit: {err}");
    // As mosquitto_sub, it stays to reconnect, and says why the connection went.
    std::thread::sleep(Duration::from_millis(500));
    sub.interrupt();
    let (code, err) = sub.finish();
    assert_eq!(code, 0);
    assert!(err.contains("Server shutting down (0x8B)") && err.contains("reconnecting"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lines_from_stdin_become_messages() {
    let dir = temp_dir("lines");
    let data = dir.to_str().unwrap();
    let (_b, quic, tcp) = broker(data);
    let mut sub = Proc::spawn(&["sub", "--transport", "tcp", "-p", &tcp, "-t", "l", "-C", "3", "-q", "1"]);
    // Wait until the subscription is in place: a retained marker proves it.
    let (code, _, _) = run(&["pub", "--transport", "tcp", "-p", &tcp, "-t", "l", "-m", "0", "-r"]);
    assert_eq!(code, 0);
    sub.expect("0");
    let mut p = Proc::spawn(&["pub", "-p", &quic, "--data-dir", data, "-t", "l", "-l", "-q", "1"]);
    p.send("one");
    p.send("two");
    drop(p.child.stdin.take());
    assert_eq!(p.finish().0, 0);
    assert_eq!(sub.expect("one"), "one");
    assert_eq!(sub.expect("two"), "two");
    assert_eq!(sub.finish().0, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shell_connects_subscribes_publishes_and_prints_arrivals() {
    let dir = temp_dir("shell");
    let data = dir.to_str().unwrap();
    let (_b, quic, _) = broker(data);
    let mut sh = Proc::spawn(&["shell", "-p", &quic, "--data-dir", data, "-i", "me"]);
    sh.send("status");
    sh.expect("not connected");
    sh.send("connect");
    sh.expect("connected as me");
    sh.send("sub s/# 1");
    sh.expect("subscribed to s/# (granted QoS 1)");
    sh.send("pub s/x hello there -q 1");
    sh.expect("<- s/x [QoS 1]: hello there");
    sh.send("frobnicate");
    sh.expect("unknown command");
    sh.send("disconnect");
    sh.expect("disconnected");
    sh.send("exit");
    assert_eq!(sh.finish().0, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_gives_one_line_errors() {
    let dir = temp_dir("errors");
    let data = dir.to_str().unwrap();
    let one_line = |err: &str| {
        assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
        assert!(!err.contains("panicked"), "{err}");
    };
    // Unknown flag: usage error (clap's exit code 2).
    let (code, _, err) = run(&["broker", "--bogus"]);
    assert_eq!(code, 2);
    assert!(err.contains("--bogus"), "{err}");
    // Port in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, _, err) = run(&["broker", "--quic", "off", "--tcp", &addr, "--data-dir", data, "-v", "off"]);
    assert_eq!(code, 1);
    one_line(&err);
    assert!(err.contains(&format!("cannot listen for TCP on {addr}")), "{err}");
    // Unreadable certificate, and a key that is not the certificate's.
    let (code, _, err) = run(&["broker", "--cert", "/nonexistent/cert.pem", "--key", "/nonexistent/key.pem"]);
    assert_eq!(code, 1);
    one_line(&err);
    assert!(err.contains("cannot read /nonexistent/cert.pem"), "{err}");
    std::fs::create_dir_all(&dir).unwrap();
    let not_pem = dir.join("garbage.pem");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    let (code, _, err) = run(&["broker", "--cert", not_pem.to_str().unwrap(), "--key", not_pem.to_str().unwrap()]);
    assert_eq!(code, 1);
    one_line(&err);
    assert!(err.contains("garbage.pem"), "{err}");
    // A config file with a typo.
    let config = dir.join("broker.toml");
    std::fs::write(&config, "[quic]\nlisten = \"127.0.0.1:0\"\nidle_timout = 5\n").unwrap();
    let (code, _, err) = run(&["broker", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("idle_timout"), "{err}");
    // Nobody listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let (code, _, err) = run(&["pub", "--transport", "tcp", "-p", &closed, "-t", "a", "-m", "x"]);
    assert_eq!(code, 1);
    one_line(&err);
    assert!(err.contains("cannot connect to mqtt://localhost:") && err.contains("refused"), "{err}");
    // A certificate nobody vouches for.
    let (_b, quic, _) = broker(data);
    let stranger = dir.join("stranger.pem");
    std::fs::write(&stranger, mqtt_quic_core::tls::SelfSigned::generate(&["x"]).unwrap().cert_pem).unwrap();
    let (code, _, err) = run(&["pub", "-p", &quic, "--cafile", stranger.to_str().unwrap(), "-t", "a", "-m", "x"]);
    assert_eq!(code, 1);
    one_line(&err);
    assert!(err.contains("certificate"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn password_file_users_get_in_and_others_are_refused_by_name() {
    let dir = temp_dir("auth");
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.to_str().unwrap();
    let file = dir.join("passwords");
    let f = file.to_str().unwrap();
    assert_eq!(run(&["passwd", f, "alice", "s3cret"]).0, 0);
    assert_eq!(run(&["passwd", f, "bob", "other"]).0, 0);
    assert_eq!(run(&["passwd", f, "bob", "-D"]).0, 0);
    let b = Proc::spawn(&["broker", "--quic", "127.0.0.1:0", "--tcp", "off", "--data-dir", data, "--password-file", f]);
    let quic = b.expect("listening: quic").rsplit(':').next().unwrap().to_string();
    b.expect("ready");
    let publish = |user: &str, pw: &str| {
        run(&["pub", "-p", &quic, "--data-dir", data, "-t", "a", "-m", "x", "-u", user, "-P", pw, "-i", "c"])
    };
    assert_eq!(publish("alice", "s3cret").0, 0);
    let (code, _, err) = publish("alice", "wrong");
    assert_eq!(code, 1);
    assert!(err.contains("refused the connection: Bad User Name or Password (0x86)"), "{err}");
    let (code, _, err) = publish("bob", "other");
    assert_eq!(code, 1, "a deleted user got in");
    assert!(err.contains("0x86"), "{err}");
    let (code, _, err) = run(&["pub", "-p", &quic, "--data-dir", data, "-t", "a", "-m", "x"]);
    assert_eq!(code, 1, "anonymous client got in");
    assert!(err.contains("refused"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A startup error: a failure exit status and one line on stderr, no panic or backtrace.
fn assert_one_line_failure(code: i32, err: &str) {
    assert_ne!(code, 0, "mqttq succeeded: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
}

/// Runs `mqttq broker` on loopback (TCP only, no logging) with these extra flags, expecting it
/// to fail at startup: its exit code and stderr.
fn broker_fails(data: &str, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["broker", "--quic", "off", "--tcp", "127.0.0.1:0", "--data-dir", data, "-v", "off"];
    args.extend_from_slice(extra);
    let (code, _, err) = run(&args);
    assert_one_line_failure(code, &err);
    (code, err)
}

/// An ACL with `user` sections and no password file would let anyone claim any user name (and
/// its rights): the broker refuses to start, saying why.
#[test]
fn acl_with_users_and_no_password_file_is_refused() {
    let dir = temp_dir("acl-users");
    std::fs::create_dir_all(&dir).unwrap();
    let acl = dir.join("acl");
    std::fs::write(&acl, "user alice\ntopic readwrite alice/#\n").unwrap();
    let (_, err) = broker_fails(dir.to_str().unwrap(), &["--acl-file", acl.to_str().unwrap()]);
    assert!(err.contains("password file"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A misspelt access word (`reed`) is an error naming the file and the line, not a rule for a
/// topic called `reed`.
#[test]
fn acl_with_an_unknown_access_word_names_file_and_line() {
    let dir = temp_dir("acl-typo");
    std::fs::create_dir_all(&dir).unwrap();
    let acl = dir.join("acl");
    std::fs::write(&acl, "topic reed a/b\n").unwrap();
    let (_, err) = broker_fails(dir.to_str().unwrap(), &["--acl-file", acl.to_str().unwrap()]);
    assert!(err.contains(acl.to_str().unwrap()) && err.contains("line 1"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A timeout too large to add to a clock (an overflow panic in a deadline computation) is
/// refused at startup with a one-line error.
#[test]
fn huge_timeout_is_a_one_line_error() {
    let dir = temp_dir("huge-timeout");
    let (_, err) = broker_fails(dir.to_str().unwrap(), &["--timeout", "99999999999"]);
    assert!(err.contains("timeout"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The password file holds password hashes: `mqttq passwd` creates it readable by its owner
/// only.
#[cfg(unix)]
#[test]
fn passwd_creates_the_file_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("passwd-mode");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("passwords");
    let (code, _, err) = run(&["passwd", file.to_str().unwrap(), "u", "pw"]);
    assert_eq!((code, err.as_str()), (0, ""));
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "mode {mode:o}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// README "Scaling out": a broker behind a QUIC-LB balancer, from its configuration file,
/// serves QUIC as usual; a server id that cannot be one is a one-line error.
#[test]
fn a_quic_lb_server_id_from_the_config_file() {
    let dir = temp_dir("quic-lb");
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.to_str().unwrap();
    let config = dir.join("broker.toml");
    std::fs::write(&config, "[quic]\nlisten = \"127.0.0.1:0\"\nserver_id = \"4d51\"\nlb_config_rotation = 1\n")
        .unwrap();
    let b = Proc::spawn(&["broker", "--tcp", "off", "--data-dir", data, "--config", config.to_str().unwrap()]);
    let quic = b.expect("listening: quic").rsplit(':').next().unwrap().to_string();
    b.expect("ready");
    let sub = Proc::spawn(&["sub", "-p", &quic, "--data-dir", data, "-t", "lb", "-C", "1"]);
    // Retained, so it does not matter whether the subscription or the publish comes first.
    let (code, _, err) = run(&["pub", "-p", &quic, "--data-dir", data, "-t", "lb", "-m", "routed", "-r"]);
    assert_eq!((code, err.as_str()), (0, ""));
    assert_eq!(sub.expect("routed"), "routed");
    drop(b);
    std::fs::write(&config, "[quic]\nserver_id = \"4d5\"\n").unwrap();
    let (_, err) = broker_fails(data, &["--config", config.to_str().unwrap()]);
    assert!(err.contains("server_id"), "{err}");
    std::fs::write(&config, "[quic]\nserver_id = \"00112233445566778899aabbccddeeff\"\n").unwrap();
    let (_, err) = broker_fails(data, &["--config", config.to_str().unwrap()]);
    assert!(err.contains("1 to 15"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// README "Scaling out": an edge broker bridged to a cloud broker over QUIC by a `[[bridge]]`
/// section written with mosquitto's keys; a message published at the edge reaches the cloud
/// under the remote prefix, and a bad mapping is a one-line error naming the bridge.
#[test]
fn a_bridge_from_the_config_file() {
    let dir = temp_dir("bridge");
    let (cloud_dir, edge_dir) = (dir.join("cloud"), dir.join("edge"));
    std::fs::create_dir_all(&cloud_dir).unwrap();
    std::fs::create_dir_all(&edge_dir).unwrap();
    let cloud_data = cloud_dir.to_str().unwrap();
    let cloud = Proc::spawn(&["broker", "--quic", "127.0.0.1:0", "--tcp", "off", "--data-dir", cloud_data]);
    let fingerprint = cloud.expect("fingerprint: ").trim_start_matches("fingerprint: ").to_string();
    let cloud_port = cloud.expect("listening: quic").rsplit(':').next().unwrap().to_string();
    cloud.expect("ready");
    let config = edge_dir.join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "[[bridge]]\nconnection = \"cloud\"\naddress = \"quic://127.0.0.1:{cloud_port}\"\n\
             topic = [\"sensors/# out 1 \\\"\\\" site1/\"]\nremote_clientid = \"site1-edge\"\n\
             bridge_fingerprint = \"{fingerprint}\"\n"
        ),
    )
    .unwrap();
    let edge_data = edge_dir.to_str().unwrap();
    let edge = Proc::spawn(&[
        "broker",
        "--quic",
        "127.0.0.1:0",
        "--tcp",
        "off",
        "--data-dir",
        edge_data,
        "--config",
        config.to_str().unwrap(),
    ]);
    let bridge_line = edge.expect("bridge: ");
    assert!(bridge_line.contains("cloud -> quic://127.0.0.1:"), "{bridge_line}");
    let edge_port = edge.expect("listening: quic").rsplit(':').next().unwrap().to_string();
    edge.expect("ready");
    let sub = Proc::spawn(&["sub", "-p", &cloud_port, "--data-dir", cloud_data, "-t", "site1/#", "-q", "1", "-C", "1"]);
    // The subscription may come after the message: publish until it arrives.
    let mut got = false;
    for _ in 0..20 {
        let (code, _, err) =
            run(&["pub", "-p", &edge_port, "--data-dir", edge_data, "-t", "sensors/t", "-m", "21.5", "-q", "1"]);
        assert_eq!((code, err.as_str()), (0, ""));
        if sub.lines.recv_timeout(Duration::from_millis(500)).is_ok_and(|l| l == "21.5") {
            got = true;
            break;
        }
    }
    assert!(got, "nothing reached the cloud over the bridge");
    drop((sub, edge));
    std::fs::write(&config, "[[bridge]]\nname = \"x\"\naddress = \"mqtt://h\"\ntopic = [\"a out 3\"]\n").unwrap();
    let (_, err) = broker_fails(edge_data, &["--config", config.to_str().unwrap()]);
    assert!(err.contains("`x`") && err.contains("QoS"), "{err}");
    drop(cloud);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `mqttq broker --ws` and `--wss` serve MQTT over WebSocket on their path; `pub` and `sub` reach
/// them with `--transport ws` or a `ws://`/`wss://` URL; a client asking for another path is
/// told the broker's answer.
#[test]
fn websocket_listeners_and_clients() {
    let dir = temp_dir("ws");
    let data = dir.to_str().unwrap();
    let args = ["broker", "--quic", "off", "--tcp", "off", "--data-dir", data, "--ws", "127.0.0.1:0"];
    let b = Proc::spawn(&[&args[..], &["--wss", "127.0.0.1:0", "--ws-path", "/dash/mqtt"]].concat());
    let port = |l: String| l.rsplit(':').next().unwrap().to_string();
    let ws = port(b.expect("listening: ws "));
    let wss = port(b.expect("listening: wss "));
    b.expect("ready");
    let mut sub =
        Proc::spawn(&["sub", "--url", &format!("ws://127.0.0.1:{ws}/dash/mqtt"), "-t", "w/#", "-C", "2", "-v"]);
    // Retained, so that it arrives whenever the subscriber's SUBSCRIBE lands.
    let wss_url = format!("wss://localhost:{wss}/dash/mqtt");
    let (code, _, err) =
        run(&["pub", "--url", &wss_url, "--data-dir", data, "-t", "w/tls", "-m", "over wss", "-q", "1", "-r"]);
    assert_eq!((code, err.as_str()), (0, ""));
    assert_eq!(sub.expect("w/tls"), "w/tls over wss");
    let (code, _, err) =
        run(&["pub", "--url", &format!("ws://127.0.0.1:{ws}/dash/mqtt"), "-V", "311", "-t", "w/3", "-m", "v3"]);
    assert_eq!((code, err.as_str()), (0, ""));
    assert_eq!(sub.expect("w/3"), "w/3 v3");
    assert_eq!(sub.finish(), (0, String::new()));
    let (code, _, err) = run(&["pub", "--transport", "ws", "-p", &ws, "-t", "w/x", "-m", "wrong path"]);
    assert_eq!(code, 1);
    assert!(err.contains("HTTP 404"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGHUP re-reads the password file and the certificate without dropping anyone: a user added
/// to the file gets in, a subscriber connected before stays connected and receives, new QUIC
/// connections see the new certificate; a broken file keeps the old one and says why.
#[test]
fn sighup_reloads_passwords_and_certificate_without_dropping_anyone() {
    use mqtt_quic_core::broker::auth::FileAuth;
    use mqtt_quic_core::tls::{fingerprint_hex, SelfSigned, ServerTls};
    let dir = temp_dir("reload");
    std::fs::create_dir_all(&dir).unwrap();
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let n = std::num::NonZeroU32::new(1000).unwrap();
    let entry = |user: &str, pass: &str| FileAuth::hash_password(user, pass, [7; 16], n);
    std::fs::write(path("pw"), format!("{}\n", entry("ann", "a-pass"))).unwrap();
    let write_cert = |cert: &SelfSigned| {
        std::fs::write(path("cert.pem"), &cert.cert_pem).unwrap();
        std::fs::write(path("key.pem"), &cert.key_pem).unwrap();
    };
    write_cert(&SelfSigned::generate(&["localhost"]).unwrap());
    let (pw, cert, key, data) = (path("pw"), path("cert.pem"), path("key.pem"), path("data"));
    let args = ["broker", "--quic", "127.0.0.1:0", "--tcp", "127.0.0.1:0", "--password-file", &pw];
    let b = Proc::spawn(&[&args[..], &["--cert", &cert, "--key", &key, "--data-dir", &data]].concat());
    let port = |l: String| l.rsplit(':').next().unwrap().to_string();
    let quic = port(b.expect("listening: quic"));
    let tcp = port(b.expect("listening: tcp"));
    b.expect("ready");
    let sub_args = ["sub", "--transport", "tcp", "-p", &tcp, "-u", "ann", "-P", "a-pass", "-t", "r/#", "-v"];
    let sub = Proc::spawn(&sub_args);
    let publish = |user: &str, pass: &str, payload: &str| {
        run(&["pub", "--transport", "tcp", "-p", &tcp, "-u", user, "-P", pass, "-t", "r/x", "-m", payload, "-q", "1"])
    };
    // Retained, so that it arrives whenever the subscriber's SUBSCRIBE lands.
    let retained =
        ["pub", "--transport", "tcp", "-p", &tcp, "-u", "ann", "-P", "a-pass", "-t", "r/x", "-m", "before", "-r"];
    assert_eq!(run(&retained).0, 0);
    sub.expect("r/x before");
    assert_eq!(publish("bob", "b-pass", "refused").0, 1, "bob is not in the file yet");

    // Bob joins the file, the certificate is renewed: SIGHUP.
    std::fs::write(&pw, format!("{}\n{}\n", entry("ann", "a-pass"), entry("bob", "b-pass"))).unwrap();
    let renewed = SelfSigned::generate(&["localhost"]).unwrap();
    write_cert(&renewed);
    let hup =
        |p: &Proc| assert!(Command::new("kill").args(["-HUP", &p.child.id().to_string()]).status().unwrap().success());
    hup(&b);
    let line = b.expect("reload:");
    assert_eq!(line, "reload: password file and ACL reloaded; certificate reloaded");
    let (code, _, err) = publish("bob", "b-pass", "from bob");
    assert_eq!((code, err.as_str()), (0, ""));
    sub.expect("r/x from bob");
    let fp = fingerprint_hex(&ServerTls::from_self_signed(&renewed).unwrap().fingerprint());
    let (code, _, err) =
        run(&["pub", "-p", &quic, "--fingerprint", &fp, "-u", "bob", "-P", "b-pass", "-t", "r/q", "-m", "new cert"]);
    assert_eq!((code, err.as_str()), (0, ""), "QUIC serves the renewed certificate");
    sub.expect("r/q new cert");

    // A broken file: the old one stays in force.
    std::fs::write(&pw, "bob:not a hash\n").unwrap();
    hup(&b);
    let line = b.expect("reload:");
    assert!(line.contains("not reloaded") && line.contains("keeping the old ones"), "{line}");
    assert_eq!(publish("bob", "b-pass", "still in").0, 0);
    sub.expect("r/x still in");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Running as a service: the broker keeps its data in systemd's `$STATE_DIRECTORY`, reports
/// readiness and stopping on `$NOTIFY_SOCKET`, and `contrib/mqttq.service` passes
/// `systemd-analyze verify` (where that tool is installed; the rest runs everywhere).
#[test]
fn runs_as_a_systemd_service() {
    let dir = temp_dir("systemd");
    std::fs::create_dir_all(&dir).unwrap();
    let socket_path = dir.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let state = dir.join("state");
    let mut child = Command::new(MQTTQ)
        .args(["broker", "--quic", "127.0.0.1:0", "--tcp", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("STATE_DIRECTORY", &state)
        .env_remove("MQTTQ_DATA_DIR")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 within 15 s");
    assert!(std::str::from_utf8(&buf[..n]).unwrap().starts_with("READY=1"), "{:?}", &buf[..n]);
    assert!(state.join("cert.pem").exists(), "the data directory is $STATE_DIRECTORY");
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let n = notify.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(child.wait().unwrap().success());

    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/mqttq.service")).unwrap();
    for line in [
        "Type=notify",
        "ExecStart=/usr/local/bin/mqttq broker",
        "StateDirectory=mqttq",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit has `{line}`");
    }
    if let Ok(analyze) = which("systemd-analyze") {
        // Verified with the binary just built in place of the installed one.
        let here = dir.join("mqttq.service");
        std::fs::write(&here, unit.replace("/usr/local/bin/mqttq", MQTTQ)).unwrap();
        let out = Command::new(analyze).arg("verify").arg(&here).output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        // Complaints about other units of the machine it runs on are not ours.
        let ours: Vec<&str> = said.lines().filter(|l| l.contains("mqttq.service")).collect();
        assert!(out.status.success() && ours.is_empty(), "systemd-analyze verify: {said}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The path of `program` on `$PATH`.
fn which(program: &str) -> Result<PathBuf, ()> {
    let path = std::env::var_os("PATH").ok_or(())?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file()).ok_or(())
}

/// `mqttq bench` prints a live line on stderr each second, its report as JSON (through serde)
/// on stdout with `--json`, and a summary when stopped with Ctrl-C.
#[test]
fn bench_shows_progress_and_sums_up_when_interrupted() {
    let dir = temp_dir("bench");
    let (mut b, _, tcp) = broker(dir.to_str().unwrap());
    let mut p = Proc::spawn(&[
        "bench",
        "--transport",
        "tcp",
        "-p",
        &tcp,
        "-n",
        "2",
        "--rate",
        "200",
        "--duration",
        "2.5",
        "--json",
    ]);
    let (code, err) = p.finish();
    assert_eq!(code, 0, "{err}");
    let live: Vec<&str> = err.lines().filter(|l| l.contains("received") && l.contains("/s")).collect();
    assert!(live.len() >= 2, "a live line each second: {err}");
    let out: Vec<String> = p.lines.try_iter().collect();
    let json: serde_json::Value = serde_json::from_str(out.last().unwrap()).unwrap();
    assert!(json["received"].as_u64().unwrap() > 500, "{json}");
    assert_eq!(json["stopped_early"], false);

    let mut p =
        Proc::spawn(&["bench", "--transport", "tcp", "-p", &tcp, "-n", "2", "--rate", "200", "--duration", "60"]);
    std::thread::sleep(Duration::from_millis(1500));
    p.interrupt();
    let started = Instant::now();
    let (code, err) = p.finish();
    assert_eq!(code, 0, "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "it stops at once");
    let out: Vec<String> = p.lines.try_iter().collect();
    assert!(out.iter().any(|l| l.starts_with("stopped after")), "{out:?}");
    assert!(out.iter().any(|l| l.starts_with("received")), "{out:?}");
    b.interrupt();
    let _ = b.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

/// mosquitto_sub's and mosquitto_pub's flags behave as theirs do, checked side by side with the
/// real tools on the same broker: `-F`, `-N`, `-T`, `-W` (status 27), `-E`, `-U`, `-L`, `-D`
/// (read back by mosquitto_sub), `--will-*`, `-c`/`-x` on pub, and the broker's port-only
/// listener address.
#[test]
fn mosquitto_flags_behave_as_mosquitto_s() {
    let dir = temp_dir("mosqflags");
    let data = dir.to_str().unwrap();
    let b = Proc::spawn(&["broker", "--quic", "127.0.0.1:0", "--tcp", "0", "--data-dir", data]);
    let tcp = b.expect("listening: tcp 0.0.0.0:").rsplit(':').next().unwrap().to_string();
    b.expect("ready");
    let mosquitto = |program: &str, args: &[&str]| {
        let mut c = Command::new(program);
        c.args(["-h", "127.0.0.1", "-p", &tcp]).args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        c.spawn().expect("mosquitto clients are installed (scripts/test installs them)")
    };
    let ours = |args: &[&str]| {
        let all = [args, &["-h", "127.0.0.1", "-p", &tcp, "--transport", "tcp"][..]].concat();
        Proc::spawn(&all)
    };
    let publish = |topic: &str, payload: &str| {
        let (code, _, err) =
            run(&["pub", "-h", "127.0.0.1", "-p", &tcp, "--transport", "tcp", "-t", topic, "-m", payload, "-q", "1"]);
        assert_eq!((code, err.as_str()), (0, ""));
    };
    // Time for both subscribers to subscribe (each also gives up after -W 20 s, so that a
    // missed message fails the test instead of hanging it).
    let settle = || std::thread::sleep(Duration::from_millis(1000));

    // -F and -N and -T: the same bytes out of both.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);
    let cases: [Case<'_>; 3] = [
        (&["-t", "f/#", "-F", "%t|%p|%q|%r|%l|%x", "-C", "1", "-W", "20"], &[("f/a", "hi")]),
        (&["-t", "n/#", "-N", "-C", "2", "-W", "20"], &[("n/1", "one"), ("n/2", "two")]),
        (&["-t", "g/#", "-T", "g/skip", "-v", "-C", "1", "-W", "20"], &[("g/skip", "no"), ("g/ok", "yes")]),
    ];
    for (args, messages) in cases {
        let theirs = mosquitto("mosquitto_sub", args);
        let mut mine = ours(&[&["sub"][..], args].concat());
        settle();
        for (topic, payload) in messages {
            publish(topic, payload);
        }
        let theirs = theirs.wait_with_output().unwrap();
        let (code, err) = mine.finish();
        assert_eq!(code, 0, "{err}");
        let mine: Vec<String> = mine.lines.try_iter().collect();
        assert_eq!(mine.join("\n"), String::from_utf8_lossy(&theirs.stdout).trim_end(), "{args:?}");
    }

    // -W: both give up with status 27; -E: both leave once subscribed.
    for (args, status) in [(&["-t", "w", "-W", "1"][..], 27), (&["-t", "e", "-E"][..], 0)] {
        let theirs = mosquitto("mosquitto_sub", args).wait().unwrap().code();
        let (code, _, _) = run(&[&["sub", "-h", "127.0.0.1", "-p", &tcp, "--transport", "tcp"][..], args].concat());
        assert_eq!((theirs, code), (Some(status), status), "{args:?}");
    }

    // -D publish properties, read back by mosquitto_sub.
    let theirs =
        mosquitto("mosquitto_sub", &["-V", "mqttv5", "-t", "d/#", "-F", "%C|%E|%P|%R|%D", "-C", "1", "-W", "20"]);
    settle();
    let props = [
        "-D",
        "publish",
        "content-type",
        "text/plain",
        "-D",
        "publish",
        "message-expiry-interval",
        "60",
        "-D",
        "publish",
        "user-property",
        "site",
        "east",
        "-D",
        "publish",
        "response-topic",
        "r/t",
        "-D",
        "publish",
        "correlation-data",
        "abc",
    ];
    let (code, _, err) =
        run(&[&["pub", "-h", "127.0.0.1", "-p", &tcp, "--transport", "tcp", "-t", "d/x", "-m", "hi"][..], &props]
            .concat());
    assert_eq!((code, err.as_str()), (0, ""));
    let out = theirs.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end(), "text/plain|60|site:east|r/t|abc");

    // -L with credentials in the URL, and a will: a subscriber whose connection dies.
    let mut watcher = ours(&["sub", "-t", "l/#", "-t", "wills/#", "-v", "-C", "2", "-W", "20"]);
    settle();
    let url = format!("mqtt://someone:pw@127.0.0.1:{tcp}/l/x");
    let (code, _, err) = run(&["pub", "-L", &url, "-m", "via -L"]);
    assert_eq!((code, err.as_str()), (0, ""));
    let mut doomed = ours(&["sub", "-t", "z", "--will-topic", "wills/me", "--will-payload", "gone", "--will-qos", "1"]);
    settle();
    let _ = doomed.child.kill();
    let (code, err) = watcher.finish();
    assert_eq!(code, 0, "{err}");
    let seen: Vec<String> = watcher.lines.try_iter().collect();
    assert_eq!(seen, ["l/x via -L", "wills/me gone"]);

    // -U: a kept session's subscription removed; what is published meanwhile no longer waits
    // for it. The same with mosquitto_sub on its own client id.
    for (who, ours_too) in [("mosq-u", false), ("ours-u", true)] {
        let keep = ["-i", who, "-c", "-q", "1"];
        let (first, drop_it) =
            ([&keep[..], &["-t", "u/#", "-E"]].concat(), [&keep[..], &["-t", "v", "-U", "u/#", "-E"]].concat());
        let later = [&keep[..], &["-t", "v", "-W", "1", "-C", "1"]].concat();
        let sub = |args: &[&str]| match ours_too {
            true => run(&[&["sub", "-h", "127.0.0.1", "-p", &tcp, "--transport", "tcp"][..], args].concat()).0,
            false => mosquitto("mosquitto_sub", args).wait().unwrap().code().unwrap_or(-1),
        };
        assert_eq!(sub(&first), 0);
        assert_eq!(sub(&drop_it), 0);
        publish("u/x", "for nobody");
        assert_eq!(sub(&later), 27, "{who}: nothing waited for the unsubscribed session");
    }

    // -c and -x on pub keep its session, as mosquitto_pub's do: a second connection with the
    // same id finds it.
    let keep = [
        "pub",
        "-h",
        "127.0.0.1",
        "-p",
        &tcp,
        "--transport",
        "tcp",
        "-i",
        "keeper",
        "-c",
        "-x",
        "60",
        "-t",
        "k",
        "-m",
        "1",
    ];
    for _ in 0..2 {
        assert_eq!(run(&keep).0, 0);
    }
    let mut b = b;
    b.interrupt();
    let (_, log) = b.finish();
    let kept = log.lines().filter(|l| l.contains("client connected") && l.contains("\"keeper\"")).collect::<Vec<_>>();
    assert_eq!(kept.len(), 2, "{log}");
    assert!(kept[1].contains("session_present=true"), "{}", kept[1]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Several listeners of a kind, as mosquitto's several `listener` lines: two TCP ports given
/// as ports alone, both serving the same broker.
#[test]
fn several_listeners_of_a_kind() {
    let dir = temp_dir("listeners");
    let data = dir.to_str().unwrap();
    let b = Proc::spawn(&["broker", "--quic", "off", "--tcp", "127.0.0.1:0", "--tcp", "0", "--data-dir", data]);
    let port = |l: String| l.rsplit(':').next().unwrap().to_string();
    let (first, second) = (port(b.expect("listening: tcp")), port(b.expect("listening: tcp")));
    b.expect("ready");
    assert_ne!(first, second);
    let mut sub = Proc::spawn(&["sub", "-p", &first, "--transport", "tcp", "-t", "two/#", "-C", "1", "-v"]);
    std::thread::sleep(Duration::from_millis(300));
    // Retained: it arrives whenever the SUBSCRIBE lands.
    let (code, _, err) =
        run(&["pub", "-p", &second, "--transport", "tcp", "-t", "two/x", "-m", "across", "-q", "1", "-r"]);
    assert_eq!((code, err.as_str()), (0, ""));
    assert_eq!(sub.expect("two/x"), "two/x across");
    assert_eq!(sub.finish().0, 0);
    let _ = std::fs::remove_dir_all(&dir);
}
