//! `mqttq bench`: the load generator.

use crate::conn::ConnArgs;
use crate::load::{self, BenchConfig, Scenario};
use clap::{Args, ValueEnum};
use mqtt_proto::QoS;
use mqtt_quic_core::client::ReconnectPolicy;
use mqtt_quic_core::config::Congestion;
use std::time::Duration;

/// Scenario names on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum ScenarioArg {
    // N publishers, each with its own subscriber.
    Pairs,
    // N publishers, one subscriber to all.
    FanIn,
    // One publisher, N subscribers.
    FanOut,
    // N idle connections (setup rate, memory per connection).
    Idle,
    // N sequential connects: fresh, and over QUIC resumed with 0-RTT.
    Connect,
}

/// Congestion controller names on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum CongestionArg {
    Bbr,
    Cubic,
    Newreno,
}

/// `mqttq bench` flags.
#[derive(Debug, Args)]
#[command(disable_help_flag = true, disable_version_flag = true)]
pub struct BenchArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Who publishes to whom.
    #[arg(long, value_enum, default_value = "pairs")]
    scenario: ScenarioArg,
    /// N: pairs, publishers (fan-in), subscribers (fan-out) or idle connections.
    #[arg(short = 'n', long, default_value_t = 1)]
    clients: usize,
    /// QoS of publishes and subscriptions.
    #[arg(short = 'q', long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Payload bytes (at least 16: the send time and a sequence number).
    #[arg(short = 's', long, default_value_t = 64)]
    size: usize,
    /// Messages per second per publisher [default: flat out].
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds of publishing (or of holding idle connections).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// UDP sockets the QUIC clients share.
    #[arg(long, default_value_t = 1)]
    sockets: usize,
    /// Local addresses for the QUIC sockets, comma-separated: socket k binds the k-th (cycling).
    #[arg(long, value_delimiter = ',')]
    bind: Vec<std::net::IpAddr>,
    /// Most QoS 1/2 publishes in flight per publisher when flat out.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// QUIC congestion controller of the load's clients [default: the core's, bbr].
    #[arg(long, value_enum)]
    congestion: Option<CongestionArg>,
    /// TCP/TLS clients reconnect after a lost connection and resume their session (clean start
    /// off, session expiry 300 s), so QoS 1/2 in flight is resent. QUIC clients never reconnect.
    #[arg(long)]
    reconnect: bool,
    /// Print the result as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs the load and prints the report.
pub async fn run(args: BenchArgs) -> Result<(), String> {
    crate::init_logging(args.conn.debug.then_some("debug"), "warn")?;
    let mut options = args.conn.options()?;
    options.reconnect = None;
    if args.reconnect {
        options.reconnect = Some(ReconnectPolicy::default());
        options.session.clean_start = false;
        options.session.session_expiry = 300;
    }
    // `-x`/`--session-expiry` SECS (a connection flag) wins over --reconnect's 300: TCP/TLS
    // clients' sessions then outlive the connection, so a persisting broker stores their
    // subscriptions and what is in flight to them, the durable workload; QUIC clients always
    // use 0.
    if let Some(secs) = args.conn.session_expiry {
        options.session.session_expiry = secs;
    }
    if let Some(c) = args.congestion {
        options.transport.congestion = match c {
            CongestionArg::Bbr => Congestion::Bbr,
            CongestionArg::Cubic => Congestion::Cubic,
            CongestionArg::Newreno => Congestion::NewReno,
        };
    }
    let config = BenchConfig {
        url: args.conn.url()?,
        options,
        scenario: match args.scenario {
            ScenarioArg::Pairs => Scenario::Pairs,
            ScenarioArg::FanIn => Scenario::FanIn,
            ScenarioArg::FanOut => Scenario::FanOut,
            ScenarioArg::Idle => Scenario::Idle,
            ScenarioArg::Connect => Scenario::Connect,
        },
        clients: args.clients.max(1),
        qos: QoS::from_u8(args.qos).unwrap_or(QoS::AtMostOnce),
        payload: args.size.max(16),
        rate: args.rate,
        duration: Duration::from_secs_f64(args.duration.max(0.1)),
        sockets: args.sockets.max(1),
        bind: args.bind,
        window: args.window.max(1),
        live: Default::default(),
    };
    let live = config.live.clone();
    let started = load::clock();
    // A live line on stderr each second (stdout keeps the report alone, for scripts).
    let ticker = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.tick().await;
        let mut before = live.snapshot();
        loop {
            every.tick().await;
            let now = live.snapshot();
            eprintln!(
                "{:>4.0}s  sent {:>8}/s  received {:>8}/s  p99 {} us  errors {}",
                started.elapsed().as_secs_f64(),
                now.sent - before.sent,
                now.received - before.received,
                now.latency_since(&before, 0.99),
                now.errors
            );
            before = now;
        }
    });
    let live = config.live.clone();
    let outcome = tokio::select! {
        r = load::run(config) => Some(r),
        _ = tokio::signal::ctrl_c() => None,
    };
    ticker.abort();
    let report = match outcome {
        Some(r) => r.map_err(|e| e.to_string())?,
        None => {
            // Stopped early: the summary of what happened so far.
            let secs = started.elapsed().as_secs_f64();
            let now = live.snapshot();
            let none = load::LiveSnapshot::default();
            let latency = |q| u32::try_from(now.latency_since(&none, q)).unwrap_or(u32::MAX);
            let rate = |n: u64| n as f64 / secs.max(1e-9);
            if args.json {
                let json = load::JsonReport {
                    connected: 0,
                    connect_secs: 0.0,
                    connects_per_sec: 0.0,
                    sent: now.sent,
                    received: now.received,
                    secs,
                    msgs_per_sec: rate(now.received),
                    mb_per_sec: rate(now.received) * args.size.max(16) as f64 / 1e6,
                    p50_us: latency(0.5),
                    p99_us: latency(0.99),
                    p999_us: latency(0.999),
                    errors: now.errors,
                    delivered_per_sec: rate(now.received),
                    max_gap_ms: 0.0,
                    connect_fresh_ms: 0.0,
                    connect_resumed_ms: 0.0,
                    stopped_early: true,
                };
                println!("{}", serde_json::to_string(&json).map_err(|e| e.to_string())?);
            } else {
                println!(
                    "stopped after {secs:.1} s\nsent        {:>10}\nreceived    {:>10}   {:.0} msg/s\nlatency us  p50 {}  p99 {}  p999 {} (to within an eighth)\nerrors      {:>10}",
                    now.sent,
                    now.received,
                    rate(now.received),
                    latency(0.5),
                    latency(0.99),
                    latency(0.999),
                    now.errors
                );
            }
            return Ok(());
        }
    };
    if report.connected == 0 {
        let why = report.first_error.as_deref().unwrap_or("no connection completed");
        return Err(format!("no client connected: {why}"));
    }
    if args.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
