//! `mqttq pub` and `mqttq sub`.

use crate::conn::ConnArgs;
use adapter_tokio::client::{Client, ClientStream, ConnectionState};
use bytes::Bytes;
use clap::Args;
use mqtt_proto::{Publish, QoS, Subscription, TopicFilter, TopicName};
use std::io::Write;
use std::path::PathBuf;
use tokio::io::AsyncBufReadExt;

/// Most QoS 1 and 2 publishes of `-l` waiting for their acknowledgement at once.
const PIPELINE: usize = 1000;

/// `mqttq pub` flags.
#[derive(Debug, Args)]
#[command(disable_help_flag = true, disable_version_flag = true)]
pub struct PubArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Topic to publish to.
    #[arg(short = 't', long, required_unless_present = "location")]
    topic: Option<String>,
    /// The message.
    #[arg(short = 'm', long, group = "payload")]
    message: Option<String>,
    /// Send each line of stdin as a message.
    #[arg(short = 'l', long = "stdin-line", group = "payload")]
    lines: bool,
    /// Send the whole of stdin as one message.
    #[arg(short = 's', long = "stdin-file", group = "payload")]
    stdin: bool,
    /// Send the content of a file as the message.
    #[arg(short = 'f', long, group = "payload")]
    file: Option<PathBuf>,
    /// Send an empty message.
    #[arg(short = 'n', long = "null-message", group = "payload")]
    null: bool,
    /// Quality of service: 0, 1 or 2.
    #[arg(short = 'q', long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Retain the message.
    #[arg(short = 'r', long)]
    retain: bool,
}

/// `mqttq sub` flags.
#[derive(Debug, Args)]
#[command(disable_help_flag = true, disable_version_flag = true)]
pub struct SubArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Topic filter to subscribe to (repeat for several).
    #[arg(short = 't', long, required_unless_present = "location")]
    topic: Vec<String>,
    /// Maximum quality of service: 0, 1 or 2.
    #[arg(short = 'q', long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Exit after this many messages.
    #[arg(short = 'C', long)]
    count: Option<u64>,
    /// Print each message's topic before its payload.
    #[arg(short = 'v', long)]
    verbose: bool,
    /// Do not print messages with the retain flag (those stored before subscribing).
    #[arg(short = 'R', long = "no-retained")]
    no_retained: bool,
    /// Stop after this many seconds, exiting with status 27 (as mosquitto_sub).
    #[arg(short = 'W', long = "timeout", value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    timeout: Option<u64>,
    /// Print each message with this format: %t topic, %p payload, %q QoS, %r retain flag, %l
    /// payload length, %x payload in hex, %U Unix time, %% a percent sign; \n, \t and \\
    /// escapes.
    #[arg(short = 'F', long = "format")]
    format: Option<String>,
    /// Do not end each message with a newline.
    #[arg(short = 'N', long = "no-eol")]
    no_eol: bool,
    /// Do not print messages whose topic matches this filter (repeat for several).
    #[arg(short = 'T', long = "filter-out")]
    filter_out: Vec<String>,
    /// Unsubscribe from this filter once connected (to clean up a kept session).
    #[arg(short = 'U', long = "unsubscribe")]
    unsubscribe: Vec<String>,
    /// Exit once the subscriptions are acknowledged.
    #[arg(short = 'E')]
    exit_after_subscribe: bool,
}

/// The time of day since the Unix epoch, for `-F %U`: a command-line tool's own clock.
#[allow(clippy::disallowed_methods)]
fn wall_clock() -> std::time::Duration {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
}

/// One message as `-F FORMAT` says (see [`SubArgs`]).
fn format_message(format: &str, m: &Publish) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        match c {
            '%' => match chars.next() {
                Some('t') => out.extend_from_slice(m.topic.as_str().as_bytes()),
                Some('p') => out.extend_from_slice(&m.payload),
                Some('q') => out.extend_from_slice((m.qos() as u8).to_string().as_bytes()),
                Some('r') => out.extend_from_slice(if m.retain { b"1" } else { b"0" }),
                Some('l') => out.extend_from_slice(m.payload.len().to_string().as_bytes()),
                Some('x') => {
                    for b in m.payload.iter() {
                        out.extend_from_slice(format!("{b:02x}").as_bytes());
                    }
                }
                Some('U') => {
                    let t = wall_clock();
                    out.extend_from_slice(format!("{}.{:09}", t.as_secs(), t.subsec_nanos()).as_bytes());
                }
                Some('%') => out.push(b'%'),
                Some(other) => out.extend_from_slice(format!("%{other}").as_bytes()),
                None => out.push(b'%'),
            },
            '\\' => match chars.next() {
                Some('n') => out.push(b'\n'),
                Some('t') => out.push(b'\t'),
                Some('r') => out.push(b'\r'),
                Some('\\') => out.push(b'\\'),
                Some(other) => {
                    out.push(b'\\');
                    out.extend_from_slice(other.to_string().as_bytes());
                }
                None => out.push(b'\\'),
            },
            c => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

impl PubArgs {
    /// The connection flags.
    #[cfg(test)]
    pub fn conn(&self) -> &ConnArgs {
        &self.conn
    }
}

fn qos(q: u8) -> QoS {
    QoS::from_u8(q).unwrap_or(QoS::AtMostOnce)
}

/// Publishes as told, then disconnects.
pub async fn publish(args: PubArgs) -> Result<(), String> {
    let topic = match args.topic.clone().or(args.conn.location_topic()?) {
        Some(t) => t,
        None => return Err("give a topic: -t TOPIC or -L URL".into()),
    };
    let topic = TopicName::new(&topic).map_err(|e| format!("bad topic `{topic}`: {e}"))?;
    let properties = args.conn.publish_properties()?;
    let payload: Option<Bytes> = match (&args.message, &args.file, args.stdin, args.null, args.lines) {
        (Some(m), ..) => Some(Bytes::from(m.clone())),
        (_, Some(f), ..) => Some(std::fs::read(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?.into()),
        (_, _, true, ..) => {
            let mut all = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut all).map_err(|e| format!("stdin: {e}"))?;
            Some(all.into())
        }
        (_, _, _, true, _) => Some(Bytes::new()),
        (_, _, _, _, true) => None,
        _ => return Err("nothing to publish: give -m MESSAGE, -f FILE, -s, -l or -n".into()),
    };
    let client = args.conn.connect(args.conn.options()?).await?;
    let message = |payload: Bytes| {
        let mut p = Publish { retain: args.retain, ..Publish::new(topic.clone(), payload) }.with_qos(qos(args.qos));
        p.properties = properties.clone().into();
        p
    };
    let stream = match args.conn.data_stream {
        true => Some(client.open_stream(0).await.map_err(|e| e.to_string())?),
        false => None,
    };
    let outcome = match (payload, &stream) {
        (Some(p), None) => client.publish(message(p)).await.map_err(|e| e.to_string()),
        (Some(p), Some(s)) => match s.publish(message(p.clone())).await {
            // A broker without EMQX's multi-stream mode refuses the stream (the client then
            // uses the control stream): once more, there.
            Err(e) if matches!(client.state(), ConnectionState::Connected { .. }) => {
                refused(&e);
                client.publish(message(p)).await.map_err(|e| e.to_string())
            }
            r => r.map_err(|e| e.to_string()),
        },
        (None, _) => publish_lines(&client, stream.as_ref(), message).await,
    };
    drop(stream);
    let _ = client.disconnect().await;
    outcome
}

/// `-l`: one message per line of stdin, acknowledgements awaited in a window so a slow
/// broker does not make input pile up in memory.
async fn publish_lines(
    client: &Client,
    stream: Option<&ClientStream>,
    message: impl Fn(Bytes) -> Publish,
) -> Result<(), String> {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut pending = tokio::task::JoinSet::new();
    while let Some(line) = lines.next_line().await.map_err(|e| format!("stdin: {e}"))? {
        // Queued in line order now; only the acknowledgements are awaited out of order.
        match stream {
            Some(s) => pending.spawn(s.publish(message(Bytes::from(line)))),
            None => pending.spawn(client.publish(message(Bytes::from(line)))),
        };
        while pending.len() >= PIPELINE {
            if let Some(r) = pending.join_next().await {
                r.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
            }
        }
    }
    while let Some(r) = pending.join_next().await {
        r.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Says that the data stream failed and the control stream is used instead.
fn refused(e: &impl std::fmt::Display) {
    eprintln!("mqttq: the data stream failed ({e}): the broker may not support data streams; using the control stream");
}

/// Subscribes and prints messages until `-C` is reached, the connection ends, or Ctrl-C.
pub async fn subscribe(args: SubArgs) -> Result<(), String> {
    let mut topics = args.topic.clone();
    topics.extend(args.conn.location_topic()?);
    let filter = |t: &String| TopicFilter::new(t).map_err(|e| format!("bad topic filter `{t}`: {e}"));
    let filters = topics.iter().map(filter).collect::<Result<Vec<_>, _>>()?;
    let filter_out = args.filter_out.iter().map(filter).collect::<Result<Vec<_>, _>>()?;
    let unsubscribe = args.unsubscribe.iter().map(filter).collect::<Result<Vec<_>, _>>()?;
    let mut options = args.conn.options()?;
    // As mosquitto_sub: once connected, a lost connection is made again (and the
    // subscriptions with it) rather than the end.
    options.reconnect.get_or_insert_with(Default::default);
    // -W counts from the start, connecting included (the range above keeps it finite).
    let deadline = args.timeout.map(|s| tokio::time::Instant::now() + std::time::Duration::from_secs(s));
    let client = match deadline {
        Some(at) => match tokio::time::timeout_at(at, args.conn.connect(options)).await {
            Ok(c) => c?,
            Err(_) => {
                eprintln!("Timed out");
                std::process::exit(27);
            }
        },
        None => args.conn.connect(options).await?,
    };
    let mut messages = client.messages().ok_or("message stream already taken")?;
    let subscriptions: Vec<Subscription> = filters.into_iter().map(|f| Subscription::new(f, qos(args.qos))).collect();
    let stream = match args.conn.data_stream {
        true => Some(client.open_stream(0).await.map_err(|e| e.to_string())?),
        false => None,
    };
    let codes = match &stream {
        Some(s) => match s.subscribe_many(subscriptions.clone()).await {
            Err(e) if matches!(client.state(), ConnectionState::Connected { .. }) => {
                refused(&e);
                s.subscribe_many(subscriptions).await
            }
            r => r,
        },
        None => client.subscribe_many(subscriptions).await,
    };
    let codes = codes.map_err(|e| e.to_string())?;
    for (code, topic) in codes.iter().zip(&topics) {
        if code.is_error() {
            let _ = client.disconnect().await;
            return Err(format!("subscription to `{topic}` refused: {code}"));
        }
    }
    // -U after the subscriptions, as mosquitto_sub does (and again after each reconnect).
    let unsubscribe_all = || {
        let (client, filters) = (client.clone(), unsubscribe.clone());
        async move {
            if !filters.is_empty() {
                let _ = client.unsubscribe(filters).await;
            }
        }
    };
    unsubscribe_all().await;
    if args.exit_after_subscribe {
        drop(stream);
        let _ = client.disconnect().await;
        return Ok(());
    }
    let mut seen = 0u64;
    let mut out = std::io::stdout().lock();
    let mut states = client.state_changes();
    let result = loop {
        if args.count.is_some_and(|c| seen >= c) {
            break Ok(());
        }
        let timed_out = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let message = tokio::select! {
            m = messages.recv() => m,
            Some(state) = states.recv() => {
                // As mosquitto_sub: say why the connection went, and stay to reconnect.
                match state {
                    ConnectionState::Reconnecting { reason } => eprintln!("mqttq: connection lost: {reason}; reconnecting"),
                    ConnectionState::Connected { .. } => drop(tokio::spawn(unsubscribe_all())),
                    _ => {}
                }
                continue;
            }
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = timed_out => {
                // mosquitto_sub's -W: status 27 once the time is up.
                let _ = client.disconnect().await;
                eprintln!("Timed out");
                std::process::exit(27);
            }
        };
        let Some(m) = message else {
            break Err(match client.state() {
                ConnectionState::Closed { reason } | ConnectionState::Reconnecting { reason } => reason,
                other => format!("connection ended ({other:?})"),
            });
        };
        if args.no_retained && m.retain {
            continue;
        }
        if filter_out.iter().any(|f| f.matches(&m.topic)) {
            continue;
        }
        seen += 1;
        let mut line = match &args.format {
            Some(format) => format_message(format, &m),
            None if args.verbose => [m.topic.as_str().as_bytes(), b" ", &m.payload].concat(),
            None => m.payload.to_vec(),
        };
        if !args.no_eol {
            line.push(b'\n');
        }
        if out.write_all(&line).and_then(|_| out.flush()).is_err() {
            // Stdout closed (e.g. piped into `head`): stop quietly.
            break Ok(());
        }
    };
    drop(stream);
    let _ = client.disconnect().await;
    result
}
