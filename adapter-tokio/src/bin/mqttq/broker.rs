//! `mqttq broker`.

use crate::config::FileConfig;
use adapter_tokio::files;
use adapter_tokio::server::{Server, ServerOptions};
use clap::Args;
use mqtt_proto::Protocol;
use mqtt_quic_core::bridge::config::BridgeConfig;
use mqtt_quic_core::broker::auth::FileAuth;
use mqtt_quic_core::cid::QuicLb;
use mqtt_quic_core::config::{Congestion, MAX_DATA_STREAMS, MAX_DURATION};
use mqtt_quic_core::persist::Persistence;
use mqtt_quic_core::tls::{fingerprint_hex, ClientTls, ServerTls};
use mqtt_quic_core::url::{BrokerUrl, Transport};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::info;

/// `mqttq broker` flags. Each overrides the same setting of `--config`.
#[derive(Debug, Args)]
#[command(after_help = "\
With no flags: MQTT over QUIC on UDP 0.0.0.0:14567 and MQTT over TCP on 0.0.0.0:1883, with a \
self-signed certificate generated into the data directory on first start (its path and SHA-256 \
fingerprint are printed; `mqttq pub`/`sub` on this machine trust it automatically).

SIGHUP re-reads the password file, the ACL and the certificate files without dropping \
connections. Under systemd (Type=notify, see contrib/mqttq.service) readiness is reported once \
every listener is open.

Ctrl-C (or SIGTERM) shuts down gracefully: MQTT 5 clients get DISCONNECT (0x8B Server shutting \
down) and queued bytes are flushed.")]
pub struct BrokerArgs {
    /// UDP address for MQTT over QUIC, or `off` [default: 0.0.0.0:14567].
    #[arg(long, value_name = "ADDR|off")]
    quic: Option<String>,
    /// TCP address (or port) for plain MQTT, or `off`; repeat for several [default:
    /// 0.0.0.0:1883].
    #[arg(long, value_name = "ADDR|off")]
    tcp: Vec<String>,
    /// TCP address (or port) for MQTT over TLS, or `off`; repeat for several [default: off].
    #[arg(long, value_name = "ADDR|off")]
    tls: Vec<String>,
    /// TCP address (or port) for MQTT over WebSocket (ws://, EMQX's port is 8083), or `off`;
    /// repeat for several [default: off].
    #[arg(long, value_name = "ADDR|off")]
    ws: Vec<String>,
    /// TCP address (or port) for MQTT over secure WebSocket (wss://, EMQX's port is 8084; the
    /// certificate of QUIC and TLS), or `off`; repeat for several [default: off].
    #[arg(long, value_name = "ADDR|off")]
    wss: Vec<String>,
    /// Address of the Prometheus metrics endpoint (GET /metrics), or `off` [default: off].
    #[arg(long, value_name = "ADDR|off")]
    metrics: Option<String>,
    /// The HTTP path MQTT over WebSocket is served on [default: /mqtt].
    #[arg(long, value_name = "PATH")]
    ws_path: Option<String>,
    /// CA certificates (PEM) that client certificates are verified against, on the QUIC, TLS
    /// and wss listeners (mosquitto's `cafile`); clients without one still get in unless
    /// --require-certificate.
    #[arg(long, value_name = "FILE")]
    cafile: Option<PathBuf>,
    /// With --cafile: refuse clients without a certificate (mutual TLS).
    #[arg(long, requires = "cafile")]
    require_certificate: bool,
    /// A client's certificate common name is its user name, and its login (no password
    /// checked); the ACL applies to that name.
    #[arg(long, requires = "cafile")]
    use_identity_as_username: bool,
    /// The oldest TLS version the TLS and wss listeners speak: tlsv1.2 or tlsv1.3 [default:
    /// tlsv1.3]. QUIC is TLS 1.3 always.
    #[arg(long, value_name = "VERSION", value_parser = ["tlsv1.2", "tlsv1.3"])]
    tls_version: Option<String>,
    /// Certificate chain (PEM) for QUIC and TLS [default: self-signed, in the data directory].
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// Where the store and the generated certificate live [default: $MQTTQ_DATA_DIR,
    /// systemd's $STATE_DIRECTORY, $XDG_DATA_HOME/mqttq or ~/.local/share/mqttq].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// sync: an acknowledged message, subscription or session survives a crash (PUBACK, PUBREC
    /// and SUBACK wait for the disk); periodic: state is synced every --sync-interval (a crash
    /// loses at most that); off: nothing survives a restart [default: sync].
    #[arg(long, value_name = "MODE", value_parser = ["sync", "periodic", "off"])]
    persistence: Option<String>,
    /// With --persistence periodic: seconds between syncs to disk [default: 1].
    #[arg(long, value_name = "SECS")]
    sync_interval: Option<u64>,
    /// Broker machines, each on a core of its own, 1 to 256 [default: as many as the store in
    /// --data-dir was written with; else the number of cores from 4 up, 1 below (on two cores
    /// the clients and the broker share them, and one shard measured faster)].
    #[arg(long, value_name = "N")]
    shards: Option<u16>,
    /// TOML configuration file (see the crate docs for every key).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Offer QUIC datagrams (RFC 9221): clients may publish QoS 0 in them, and those that ask
    /// (CONNECT user property `quic-datagrams` = `qos0`) get their QoS 0 messages in them
    /// [default: off, or `datagrams` in [quic]].
    #[arg(long)]
    datagrams: bool,
    /// Seconds a client has to complete the QUIC/TLS handshake and send CONNECT [default: 10].
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Log level: off, error, warn, info, debug or trace [default: info, or RUST_LOG].
    #[arg(short = 'v', long, value_name = "LEVEL", value_parser = ["off", "error", "warn", "info", "debug", "trace"])]
    verbosity: Option<String>,
    /// Resend unacknowledged messages to MQTT 3.1.1 clients every SECS seconds [default: off:
    /// resend on reconnect only]. Never applies to MQTT 5 clients: MQTT 5 forbids resending on
    /// a live connection.
    #[arg(long, value_name = "SECS")]
    retry_interval: Option<u64>,
    /// With --retry-interval: resends of one message before the client is disconnected
    /// [default: 5].
    #[arg(long, value_name = "N", requires = "retry_interval")]
    max_retries: Option<u32>,
    /// Password file (lines `user:$pbkdf2-sha256$...`, see FileAuth); clients must log in.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// Access control list file in mosquitto's format.
    #[arg(long, value_name = "FILE")]
    acl_file: Option<PathBuf>,
}

/// A listener flag: an address, or `off`.
fn listener(flag: &str, value: Option<&str>, default: Option<SocketAddr>) -> Result<Option<SocketAddr>, String> {
    match value {
        None => Ok(default),
        Some("off") => Ok(None),
        // A port alone (mosquitto's `listener 1884`) listens on every address.
        Some(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => v
            .parse::<u16>()
            .map(|port| Some(SocketAddr::from(([0, 0, 0, 0], port))))
            .map_err(|_| format!("--{flag}: `{v}` is not a port (1-65535)")),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| format!("--{flag}: `{v}` is not an address like 0.0.0.0:1883, a port, or `off`")),
    }
}

/// Runs the broker until Ctrl-C or SIGTERM.
pub async fn run(args: BrokerArgs) -> Result<(), String> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    crate::init_logging(args.verbosity.as_deref().or(file.verbosity.as_deref()), "info")?;

    let data_dir = args.data_dir.clone().or(file.data_dir.clone()).unwrap_or_else(files::default_data_dir);
    let tls_files = TlsFiles {
        cert: match (args.cert.as_ref().or(file.cert.as_ref()), args.key.as_ref().or(file.key.as_ref())) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            _ => return Err("give both a certificate and a key (cert and key)".into()),
        },
        data_dir: data_dir.clone(),
        cafile: args.cafile.clone().or(file.tls.cafile.clone()),
        require_certificate: args.require_certificate || file.tls.require_certificate == Some(true),
        tls12: match args.tls_version.as_deref().or(file.tls.tls_version.as_deref()) {
            None | Some("tlsv1.3") => false,
            Some("tlsv1.2") => true,
            Some(other) => return Err(format!("tls_version `{other}`: use tlsv1.2 or tlsv1.3")),
        },
    };
    let tls = tls_files.load()?;
    match &tls_files.cert {
        Some((cert, _)) => println!("certificate: {}", cert.display()),
        None => println!("certificate: {} (self-signed)", data_dir.join("cert.pem").display()),
    }
    println!("fingerprint: {}", fingerprint_hex(&tls.fingerprint()));

    let mut options = ServerOptions::new(tls);
    options.quic = listener("quic", args.quic.as_deref().or(file.quic.listen.as_deref()), options.quic)?;
    // Each kind: the flags, else the file's `listen` (one address or a list), else the default;
    // the first is the kind's listener, the others extra ones.
    let kinds = [
        ("tcp", Transport::Tcp, &args.tcp, file.tcp.listen.as_ref(), options.tcp),
        ("tls", Transport::Tls, &args.tls, file.tls.listen.as_ref(), None),
        ("ws", Transport::Ws, &args.ws, file.ws.listen.as_ref(), None),
        ("wss", Transport::Wss, &args.wss, file.wss.listen.as_ref(), None),
    ];
    for (flag, transport, given, in_file, default) in kinds {
        let values: Vec<String> = match (given.is_empty(), in_file) {
            (false, _) => given.clone(),
            (true, Some(f)) => f.entries(),
            (true, None) => Vec::new(),
        };
        let mut addrs = Vec::new();
        for v in &values {
            addrs.extend(listener(flag, Some(v), None)?);
        }
        let first = if values.is_empty() { default } else { addrs.first().copied() };
        match transport {
            Transport::Tcp => options.tcp = first,
            Transport::Tls => options.tls = first,
            Transport::Ws => options.ws = first,
            _ => options.wss = first,
        }
        options.extra_listeners.extend(addrs.iter().skip(1).map(|a| (transport, *a)));
    }
    if let Some(path) = args.ws_path.or(file.ws.path).or(file.wss.path) {
        options.broker.websocket_path = path;
    }
    if [options.quic, options.tcp, options.tls, options.ws, options.wss].iter().all(Option::is_none)
        && options.extra_listeners.is_empty()
    {
        return Err("every listener is off: nothing to serve".into());
    }
    options.broker.use_identity_as_username =
        args.use_identity_as_username || file.tls.use_identity_as_username == Some(true);
    if options.broker.use_identity_as_username && tls_files.cafile.is_none() {
        return Err("use_identity_as_username needs cafile: the CA that client certificates are checked against".into());
    }
    options.tcp_max_connections = file.tcp.max_connections.unwrap_or(options.tcp_max_connections);
    options.tls_max_connections = file.tls.max_connections.unwrap_or(options.tls_max_connections);

    options.broker.persistence = match args.persistence.as_deref().or(file.persistence.as_deref()).unwrap_or("sync") {
        "sync" => Persistence::Sync,
        "periodic" => Persistence::Periodic,
        "off" => Persistence::Off,
        other => return Err(format!("persistence: `{other}` is not sync, periodic or off")),
    };
    if let Some(secs) = args.sync_interval.or(file.sync_interval) {
        options.sync_interval = seconds("sync interval", secs, 1)?;
    }
    options.data_dir = Some(data_dir.clone());
    options.shards = match args.shards.or(file.shards) {
        Some(n) if (1..=256).contains(&n) => n,
        Some(n) => return Err(format!("shards: {n} is out of range (1 to 256)")),
        None => default_shards(&data_dir, options.broker.persistence.is_on()),
    };
    if let Some(us) = file.commit_delay_us {
        if us > 1_000_000 {
            return Err(format!("commit_delay_us: {us} is out of range (0 to 1000000)"));
        }
        options.broker.commit_delay = Duration::from_micros(us);
    }

    let b = &mut options.broker;
    if let Some(t) = args.timeout.or(file.timeout) {
        let t = seconds("timeout", t, 1)?;
        b.session.connect_timeout = t;
        b.quic.transport.handshake_timeout = t;
        options.tls_handshake_timeout = t;
    }
    if let Some(secs) = args.retry_interval.or(file.retry_interval) {
        b.session.retry_interval = Some(seconds("retry interval", secs, 1)?);
    }
    if let Some(n) = args.max_retries.or(file.max_retries) {
        b.session.max_retries = n;
    }
    let q = &file.quic;
    if let Some(n) = q.max_connections {
        b.quic.max_connections = n;
    }
    if let Some(secs) = q.idle_timeout {
        b.quic.transport.idle_timeout = seconds("[quic] idle_timeout", secs, 1)?;
    }
    if let Some(z) = q.zero_rtt {
        b.quic.zero_rtt = z;
    }
    if let Some(r) = q.stateless_retry {
        b.quic.stateless_retry = r;
    }
    if let Some(c) = &q.congestion {
        b.quic.transport.congestion = match c.to_ascii_lowercase().as_str() {
            "newreno" => Congestion::NewReno,
            "cubic" => Congestion::Cubic,
            "bbr" => Congestion::Bbr,
            other => return Err(format!("[quic] congestion: `{other}` is not newreno, cubic or bbr")),
        };
    }
    if let Some(ms) = q.initial_rtt_ms {
        b.quic.transport.initial_rtt = Duration::from_millis(ms.min(u64::from(u32::MAX)));
    }
    if let Some(n) = q.data_streams {
        if n > MAX_DATA_STREAMS {
            return Err(format!("[quic] data_streams: {n} is above the most allowed, {MAX_DATA_STREAMS}"));
        }
        b.quic.transport.data_streams = n;
    }
    if let Some(d) = q.datagrams {
        b.quic.transport.datagrams = d;
    }
    if args.datagrams {
        b.quic.transport.datagrams = true;
    }
    if let Some(hex) = &q.server_id {
        let id = parse_hex(hex).ok_or_else(|| format!("[quic] server_id: `{hex}` is not hex bytes (e.g. \"4d51\")"))?;
        let mut lb = QuicLb::new(id);
        lb.config_rotation = q.lb_config_rotation.unwrap_or(lb.config_rotation);
        lb.nonce_len = q.lb_nonce_len.unwrap_or(lb.nonce_len);
        lb.validate().map_err(|e| format!("[quic] server_id: {e}"))?;
        b.quic.load_balancer = Some(lb);
    } else if q.lb_config_rotation.is_some() || q.lb_nonce_len.is_some() {
        return Err("[quic] lb_config_rotation and lb_nonce_len need server_id".into());
    }
    // Keys copied as they are (each overrides its default when present).
    macro_rules! copy {
        ($($key:ident => $($field:ident).+),* $(,)?) => {$(
            if let Some(v) = file.$key {
                b.$($field).+ = v;
            }
        )*};
    }
    copy!(
        max_packet_size => session.maximum_packet_size,
        max_inflight => session.max_inflight,
        max_retained => max_retained,
        max_offline_queue => max_offline_queue,
        max_session_expiry => max_session_expiry,
        max_subscriptions_per_client => max_subscriptions_per_client,
        max_queued_bytes => max_queued_bytes,
        max_topic_levels => max_topic_levels,
        max_topic_length => max_topic_length,
        max_retained_bytes => max_retained_bytes,
        max_sessions => max_sessions,
        max_offline_bytes => max_offline_bytes,
        max_total_queued_bytes => max_total_queued_bytes,
        max_keepalive => max_keepalive,
        max_pending_auth => max_pending_auth,
        max_pending_auth_per_ip => max_pending_auth_per_ip,
        max_auth_failures => max_auth_failures,
        outgoing_topic_aliases => session.outgoing_topic_aliases,
    );
    if let Some(v) = file.sys_interval {
        b.sys_interval = if v == 0 { None } else { Some(seconds("sys_interval", v, 1)?) };
    }
    if let Some(v) = file.write_timeout {
        b.write_timeout = seconds("write_timeout", v, 1)?;
    }
    let auth_files = AuthFiles {
        passwords: args.password_file.clone().or(file.password_file.clone()),
        acl: args.acl_file.clone().or(file.acl_file.clone()),
        allow_anonymous: file.allow_anonymous,
    };
    b.auth = auth_files.load()?;

    for (i, section) in file.bridge.iter().enumerate() {
        let bridge = bridge_config(i, section)?;
        println!(
            "bridge: {} -> {}",
            bridge.name,
            bridge.urls.iter().map(|u| u.to_string()).collect::<Vec<_>>().join(", ")
        );
        options.broker.bridges.push(bridge);
    }

    let server = Server::start(options).await.map_err(|e| e.to_string())?;
    if let Some(addr) = server.quic_addr() {
        println!("listening: quic {addr}");
    }
    for (transport, addr) in server.stream_listeners() {
        let what = match transport {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Ws => "ws",
            _ => "wss",
        };
        println!("listening: {what} {addr}");
    }
    let metrics_addr = listener("metrics", args.metrics.as_deref().or(file.metrics.listen.as_deref()), None)?;
    if let Some(addr) = metrics_addr {
        let metrics = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
        println!("listening: metrics {}", metrics.local_addr().map_err(|e| e.to_string())?);
        drop(tokio::spawn(adapter_tokio::metrics::serve(metrics, server.metrics_source())));
    }
    // The reload signal is handled from here on: a `systemctl reload` right after readiness
    // must not find SIGHUP's default action (the end of the process).
    let mut hangups = hangups();
    println!("ready");
    notify_systemd("READY=1\nSTATUS=serving");
    let mut server = server;
    loop {
        tokio::select! {
            _ = shutdown_signal() => break,
            // Ends only if the broker stops by itself (a bug): exit with a failure status so
            // that a supervisor restarts the broker.
            stopped = server.wait() => return Err(stopped.err().map_or_else(|| "the broker stopped".into(), |e| e.to_string())),
            Some(()) = hangups.recv() => reload(&server, &auth_files, &tls_files).await,
        }
    }
    info!("shutdown requested");
    notify_systemd("STOPPING=1");
    server.shutdown().await;
    Ok(())
}

/// A `[[bridge]]` section as the core's bridge configuration; errors name the bridge and key.
fn bridge_config(i: usize, s: &crate::config::BridgeSection) -> Result<BridgeConfig, String> {
    let name = s.name.clone().unwrap_or_else(|| format!("bridge{}", i + 1));
    let bad = |key: &str, why: String| format!("[[bridge]] `{name}`: {key}: {why}");
    let trust_given = s.bridge_cafile.is_some() || s.bridge_fingerprint.is_some() || s.bridge_insecure == Some(true);
    let entries = s.address.as_ref().map(|a| a.entries()).unwrap_or_default();
    if entries.is_empty() {
        return Err(bad("address", "no upstream address".into()));
    }
    let mut urls = Vec::new();
    for entry in entries {
        // mosquitto writes `host:port`: TCP, or TLS when a CA is given.
        let url = match entry.contains("://") {
            true => entry.clone(),
            false if trust_given => format!("mqtts://{entry}"),
            false => format!("mqtt://{entry}"),
        };
        urls.push(url.parse::<BrokerUrl>().map_err(|e| bad("address", e.to_string()))?);
    }
    let mut b = BridgeConfig::new(name.clone(), urls);
    for line in &s.topic {
        b.mappings
            .push(line.parse().map_err(|e: mqtt_quic_core::bridge::config::MappingError| bad("topic", e.to_string()))?);
    }
    if let Some(v) = &s.bridge_protocol_version {
        b.protocol = match v.to_ascii_lowercase().as_str() {
            "mqttv50" | "mqttv5" | "5" => Protocol::V5,
            "mqttv311" | "311" => Protocol::V3_1_1,
            other => return Err(bad("bridge_protocol_version", format!("`{other}` (use mqttv50 or mqttv311)"))),
        };
    }
    if let Some(id) = &s.remote_clientid {
        b.client_id = id.clone();
    }
    b.username = s.remote_username.clone();
    b.password = s.remote_password.clone().map(bytes::Bytes::from);
    if let Some(c) = s.cleansession {
        b.clean_start = c;
    }
    if let Some(e) = s.session_expiry {
        b.session_expiry = e;
    }
    if let Some(k) = s.keepalive_interval {
        b.keep_alive = k;
    }
    b.server_name = s.server_name.clone();
    if let Some(t) = s.fallback_timeout {
        if !(t > 0.0 && t < 3600.0) {
            return Err(bad("fallback_timeout", "expected seconds above 0 and below 3600".into()));
        }
        b.fallback.handshake_timeout = Duration::from_secs_f64(t);
    }
    if let Some(n) = s.max_inflight {
        b.max_inflight = n;
    }
    if b.urls.iter().any(|u| u.transport == Transport::Quic || u.transport.is_tls()) {
        b.tls = Some(if s.bridge_insecure == Some(true) {
            ClientTls::insecure()
        } else if let Some(fp) = &s.bridge_fingerprint {
            ClientTls::pinned(fp).map_err(|e| bad("bridge_fingerprint", e.to_string()))?
        } else if let Some(ca) = &s.bridge_cafile {
            files::client_tls_from_ca_file(ca).map_err(|e| bad("bridge_cafile", e.to_string()))?
        } else {
            files::client_tls_from_system().map_err(|e| bad("bridge_cafile", e.to_string()))?
        });
    }
    b.validate().map_err(|e| e.to_string())?;
    Ok(b)
}

/// A duration given in seconds by the operator: at least `min`, at most a year (beyond that a
/// deadline computed from it could overflow the clock).
fn seconds(name: &str, value: u64, min: u64) -> Result<Duration, String> {
    let max = MAX_DURATION.as_secs();
    if value < min || value > max {
        return Err(format!("{name}: {value} is out of range (seconds, {min} to {max})"));
    }
    Ok(Duration::from_secs(value))
}

/// Ctrl-C, or SIGTERM where there is such a thing.
/// Tells systemd how the broker is doing (`Type=notify` units: readiness, stopping), when it
/// runs under systemd (`$NOTIFY_SOCKET` set); otherwise nothing. Best effort: a failure to
/// tell is not the broker's failure.
fn notify_systemd(state: &str) {
    #[cfg(unix)]
    {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET").filter(|p| !p.is_empty()) else { return };
        let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else { return };
        let bytes = path.as_encoded_bytes();
        // `@name`: a Linux abstract socket.
        #[cfg(target_os = "linux")]
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            if let Ok(addr) = std::os::unix::net::SocketAddr::from_abstract_name(name) {
                let _ = socket.send_to_addr(state.as_bytes(), &addr);
            }
            return;
        }
        let _ = socket.send_to(state.as_bytes(), std::path::Path::new(&path));
    }
    #[cfg(not(unix))]
    let _ = state;
}

/// The certificate the broker serves and its client-certificate settings, read again on
/// SIGHUP.
struct TlsFiles {
    /// `--cert` and `--key`; `None`: the self-signed certificate in `data_dir`.
    cert: Option<(PathBuf, PathBuf)>,
    data_dir: PathBuf,
    cafile: Option<PathBuf>,
    require_certificate: bool,
    tls12: bool,
}

impl TlsFiles {
    /// Reads the files into the TLS the listeners serve.
    fn load(&self) -> Result<ServerTls, String> {
        let tls = match &self.cert {
            Some((cert, key)) => files::server_tls_from_files(cert, key).map_err(|e| e.to_string())?,
            None => files::self_signed_in(&self.data_dir).map_err(|e| e.to_string())?.0,
        };
        let tls = match &self.cafile {
            None => tls,
            Some(ca) => {
                let pem = std::fs::read(ca).map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
                let tls = match self.require_certificate {
                    true => tls.require_client_certificates(&pem),
                    false => tls.accept_client_certificates(&pem),
                };
                tls.map_err(|e| format!("{}: {e}", ca.display()))?
            }
        };
        Ok(tls.allow_tls12(self.tls12))
    }

    /// Whether a reload has files to read.
    fn has_files(&self) -> bool {
        self.cert.is_some() || self.cafile.is_some()
    }
}

/// The password file and ACL the broker was started with, read again on SIGHUP.
struct AuthFiles {
    passwords: Option<PathBuf>,
    acl: Option<PathBuf>,
    allow_anonymous: Option<bool>,
}

impl AuthFiles {
    /// Reads and checks the files; `None` when there are none (everyone is let in).
    fn load(&self) -> Result<Option<Arc<dyn mqtt_quic_core::broker::auth::Auth>>, String> {
        if self.passwords.is_none() && self.acl.is_none() {
            return Ok(None);
        }
        let read = |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
        let mut auth = FileAuth::new(self.allow_anonymous.unwrap_or(self.passwords.is_none()));
        if let Some(p) = &self.passwords {
            auth = auth.with_passwords(&read(p)?).map_err(|e| format!("{}: {e}", p.display()))?;
        }
        if let Some(p) = &self.acl {
            auth = auth.with_acl(&read(p)?).map_err(|e| format!("{}: {e}", p.display()))?;
            auth.check().map_err(|e| format!("{}: {e}", p.display()))?;
        }
        Ok(Some(Arc::new(auth)))
    }
}

/// SIGHUP (mosquitto's reload signal), as a stream; never on other systems.
fn hangups() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        drop(tokio::spawn(async move {
            while hup.recv().await.is_some() {
                // Several signals while one reload runs make one more reload.
                let _ = tx.try_send(());
            }
        }));
    }
    #[cfg(not(unix))]
    drop(tx);
    rx
}

/// Reads the password file, the ACL and the certificate again and hands them to the broker,
/// without dropping a connection. Each file that cannot be used keeps the old version in force
/// and says why; the outcome is one line on stdout (and in the log).
async fn reload(server: &Server, auth: &AuthFiles, tls: &TlsFiles) {
    let mut done = Vec::new();
    let mut failed = false;
    let mut report = |outcome: Result<(), String>, what: &str, old: &str| match outcome {
        Ok(()) => done.push(format!("{what} reloaded")),
        Err(e) => {
            failed = true;
            done.push(format!("{what} not reloaded ({e}); keeping the old {old}"));
        }
    };
    if auth.passwords.is_some() || auth.acl.is_some() {
        let outcome = match auth.load() {
            Ok(loaded) => server.reload_auth(loaded).await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        report(outcome, "password file and ACL", "ones");
    }
    if tls.has_files() {
        let outcome = match tls.load() {
            Ok(loaded) => server.reload_tls(loaded).await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        report(outcome, "certificate", "one");
    }
    if done.is_empty() {
        done.push("nothing to reload (no password file, ACL or certificate files)".into());
    }
    let line = format!("reload: {}", done.join("; "));
    notify_systemd(&format!("STATUS={line}"));
    if failed {
        tracing::warn!("{line}");
    } else {
        info!("{line}");
    }
    println!("{line}");
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return drop(tokio::signal::ctrl_c().await),
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Bytes from hex digits (an even number of them, at least two).
fn parse_hex(hex: &str) -> Option<Vec<u8>> {
    let hex = hex.trim();
    if hex.is_empty() || hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect()
}

/// The number of shards when none is asked for: the store's (a broker restarted with another
/// number would look for its sessions on other shards), else one per core from 4 cores up.
/// Below that one shard: `bench/multicore` and `bench/compare` on two cores measured it ahead,
/// the clients and the broker sharing the cores (see BENCHMARKS.md).
fn default_shards(data_dir: &std::path::Path, persistent: bool) -> u16 {
    if let Some(n) = mqtt_store::stored_shards(data_dir).filter(|_| persistent) {
        return n;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores >= 4 {
        cores.min(256) as u16
    } else {
        1
    }
}
