//! `mqttq`: an MQTT-over-QUIC broker and client on the command line.
//!
//! - `mqttq broker`: serve MQTT over QUIC (UDP 14567) and TCP (1883), optionally TLS (8883).
//! - `mqttq pub` / `mqttq sub`: publish and subscribe, with mosquitto_pub/mosquitto_sub's flags.
//! - `mqttq shell`: an interactive client.
//! - `mqttq passwd`: manage the broker's password file.
//! - `mqttq bench`: a load generator.

mod bench;
mod broker;
mod config;
mod conn;
mod load;
mod passwd;
mod props;
mod pubsub;
mod shell;
/// The adapter's UDP socket (GSO, batched receives, ECN), compiled into the binary for the
/// load generator's pools rather than exported from the library.
#[path = "../../udp.rs"]
#[allow(dead_code)]
mod udp;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// MQTT over QUIC: a broker and clients.
#[derive(Parser)]
#[command(name = "mqttq", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a broker: MQTT over QUIC on UDP 14567 and MQTT over TCP on 1883 by default.
    Broker(Box<broker::BrokerArgs>),
    /// Publish messages (flags as mosquitto_pub).
    Pub(Box<pubsub::PubArgs>),
    /// Subscribe and print messages (flags as mosquitto_sub).
    Sub(Box<pubsub::SubArgs>),
    /// An interactive client: connect, subscribe, publish, watch messages arrive.
    Shell(Box<shell::ShellArgs>),
    /// Add, change or remove a user in a broker password file.
    Passwd(passwd::PasswdArgs),
    /// Load generator: many clients, messages timed from publish to delivery.
    Bench(Box<bench::BenchArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Broker(args) => broker::run(*args).await,
            Command::Pub(args) => pubsub::publish(*args).await,
            Command::Sub(args) => pubsub::subscribe(*args).await,
            Command::Shell(args) => shell::run(*args).await,
            Command::Passwd(args) => passwd::run(args),
            Command::Bench(args) => bench::run(*args).await,
        }
    });
    // Tasks still writing to a closed connection are not worth waiting for.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("mqttq: error: {message}");
    ExitCode::FAILURE
}

/// Logs to stderr at `level` (`off`, `error`, `warn`, `info`, `debug`, `trace`), or as
/// `RUST_LOG` says when no level is given, or at `default`.
fn init_logging(level: Option<&str>, default: &str) -> Result<(), String> {
    use tracing_subscriber::filter::Targets;
    let spec = match level {
        Some(l) => l.to_string(),
        None => std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| default.to_string()),
    };
    let filter: Targets = spec.parse().map_err(|e| format!("bad log level `{spec}`: {e}"))?;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(filter)
        .try_init()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn mosquitto_flags_parse() {
        let cli =
            Cli::try_parse_from(["mqttq", "pub", "-h", "broker", "-p", "1883", "-t", "a/b", "-m", "hi", "-q", "1"]);
        assert!(cli.is_ok(), "{:?}", cli.err());
        let cli = Cli::try_parse_from(["mqttq", "sub", "-t", "a/#", "-t", "b", "-C", "1", "-v", "-V", "311"]);
        assert!(cli.is_ok(), "{:?}", cli.err());
        let e = Cli::try_parse_from(["mqttq", "pub", "-t", "a", "-m", "x", "-q", "3"]).err().unwrap();
        assert!(e.to_string().contains("-q"), "{e}");
        assert!(Cli::try_parse_from(["mqttq", "broker", "--bogus"]).is_err());
    }

    /// mosquitto users write `-p 1883` and mean TCP (and 8883 TLS, 8083/8084 WebSocket): a
    /// well-known port picks its transport unless --transport says otherwise.
    #[test]
    fn a_well_known_port_picks_its_transport() {
        let transport_of = |args: &[&str]| {
            let all = [&["mqttq", "pub", "-t", "a", "-m", "x"][..], args].concat();
            match Cli::try_parse_from(all).unwrap().command {
                Command::Pub(p) => p.conn().url().unwrap().transport,
                _ => unreachable!(),
            }
        };
        use adapter_tokio::url::Transport;
        assert_eq!(transport_of(&["-p", "1883"]), Transport::Tcp);
        assert_eq!(transport_of(&["-p", "8883"]), Transport::Tls);
        assert_eq!(transport_of(&["-p", "8083"]), Transport::Ws);
        assert_eq!(transport_of(&["-p", "14567"]), Transport::Quic);
        assert_eq!(transport_of(&[]), Transport::Quic);
        assert_eq!(transport_of(&["-p", "1883", "--transport", "quic"]), Transport::Quic);
    }
}
