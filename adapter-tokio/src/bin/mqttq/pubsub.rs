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
    #[arg(short = 't', long)]
    topic: String,
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
    #[arg(short = 't', long, required = true)]
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
    /// Ask the broker to keep the session after disconnecting (no clean start).
    #[arg(short = 'c', long = "disable-clean-session")]
    persistent: bool,
    /// Session expiry in seconds with -c (MQTT 5) [default: 3600].
    #[arg(short = 'x', long = "session-expiry", requires = "persistent")]
    session_expiry: Option<u32>,
    /// Do not print messages with the retain flag (those stored before subscribing).
    #[arg(short = 'R', long = "no-retained")]
    no_retained: bool,
}

fn qos(q: u8) -> QoS {
    QoS::from_u8(q).unwrap_or(QoS::AtMostOnce)
}

/// Publishes as told, then disconnects.
pub async fn publish(args: PubArgs) -> Result<(), String> {
    let topic = TopicName::new(&args.topic).map_err(|e| format!("bad topic `{}`: {e}", args.topic))?;
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
        Publish { retain: args.retain, ..Publish::new(topic.clone(), payload) }.with_qos(qos(args.qos))
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
    let mut filters = Vec::new();
    for t in &args.topic {
        filters.push(TopicFilter::new(t).map_err(|e| format!("bad topic filter `{t}`: {e}"))?);
    }
    let mut options = args.conn.options()?;
    if args.persistent {
        options.session.clean_start = false;
        options.session.session_expiry = args.session_expiry.unwrap_or(3600);
    }
    let client = args.conn.connect(options).await?;
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
    for (code, topic) in codes.iter().zip(&args.topic) {
        if code.is_error() {
            let _ = client.disconnect().await;
            return Err(format!("subscription to `{topic}` refused: {code}"));
        }
    }
    let mut seen = 0u64;
    let mut out = std::io::stdout().lock();
    let result = loop {
        if args.count.is_some_and(|c| seen >= c) {
            break Ok(());
        }
        let message = tokio::select! {
            m = messages.recv() => m,
            _ = tokio::signal::ctrl_c() => break Ok(()),
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
        seen += 1;
        let written = if args.verbose {
            out.write_all(m.topic.as_str().as_bytes()).and_then(|_| out.write_all(b" "))
        } else {
            Ok(())
        };
        if written
            .and_then(|_| out.write_all(&m.payload))
            .and_then(|_| out.write_all(b"\n"))
            .and_then(|_| out.flush())
            .is_err()
        {
            // Stdout closed (e.g. piped into `head`): stop quietly.
            break Ok(());
        }
    };
    drop(stream);
    let _ = client.disconnect().await;
    result
}
