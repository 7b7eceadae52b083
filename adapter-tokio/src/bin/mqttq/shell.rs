//! `mqttq shell`: an interactive client. Commands are read line by line from stdin; incoming
//! messages are printed as they arrive.

use crate::conn::ConnArgs;
use adapter_tokio::client::{Client, ConnectionState};
use clap::Args;
use mqtt_proto::{Publish, QoS, TopicFilter, TopicName};
use tokio::io::AsyncBufReadExt;

/// `mqttq shell` flags: defaults for `connect`.
#[derive(Debug, Args)]
#[command(disable_help_flag = true, disable_version_flag = true)]
pub struct ShellArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Connect at start with these flags instead of waiting for `connect`.
    #[arg(long)]
    connect: bool,
}

const HELP: &str = "\
commands:
  connect [URL] [CLIENT-ID]       connect (default: the flags given to `mqttq shell`)
  sub TOPIC-FILTER [QOS]          subscribe (alias: subscribe)
  unsub TOPIC-FILTER              unsubscribe (alias: unsubscribe)
  pub TOPIC MESSAGE [-q QOS] [-r] publish; MESSAGE is the rest of the line (alias: publish)
  disconnect                      disconnect
  status                          connection state
  help                            this text
  exit                            leave (alias: quit)";

fn say(line: impl AsRef<str>) {
    println!("{}", line.as_ref());
}

fn prompt() {
    use std::io::Write;
    print!("mqttq> ");
    let _ = std::io::stdout().flush();
}

/// Runs the prompt until `exit` or end of input.
pub async fn run(args: ShellArgs) -> Result<(), String> {
    let mut client: Option<Client> = None;
    if args.connect {
        client = Some(args.conn.connect(args.conn.options()?).await?);
        say("connected");
    }
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    prompt();
    while let Some(line) = lines.next_line().await.map_err(|e| format!("stdin: {e}"))? {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [] => {}
            ["help" | "?"] => say(HELP),
            ["exit" | "quit"] => break,
            ["connect", rest @ ..] => {
                if client.is_some() {
                    say("already connected: disconnect first");
                } else {
                    let mut conn = args.conn.clone();
                    if let Some(url) = rest.first() {
                        (conn.url, conn.port) = (vec![url.to_string()], None);
                    }
                    if let Some(id) = rest.get(1) {
                        conn.id = Some(id.to_string());
                    }
                    match conn.options() {
                        Ok(options) => match conn.connect(options).await {
                            Ok(c) => {
                                say(format!("connected as {}", c.client_id()));
                                print_messages(&c);
                                client = Some(c);
                            }
                            Err(e) => say(format!("error: {e}")),
                        },
                        Err(e) => say(format!("error: {e}")),
                    }
                }
            }
            ["status"] => match &client {
                None => say("not connected"),
                Some(c) => say(match c.state() {
                    ConnectionState::Connected { session_present } => {
                        format!("connected as {} (session present: {session_present})", c.client_id())
                    }
                    other => format!("{other:?}"),
                }),
            },
            [cmd, ..] if client.is_none() && !matches!(*cmd, "connect") => say("not connected: use `connect` first"),
            ["disconnect"] => {
                if let Some(c) = client.take() {
                    match c.disconnect().await {
                        Ok(()) => say("disconnected"),
                        Err(e) => say(format!("error: {e}")),
                    }
                }
            }
            ["sub" | "subscribe", filter, rest @ ..] => {
                let qos = rest
                    .first()
                    .and_then(|q| q.parse::<u8>().ok())
                    .and_then(|q| QoS::from_u8(q).ok())
                    .unwrap_or(QoS::AtMostOnce);
                match (TopicFilter::new(*filter), &client) {
                    (Ok(f), Some(c)) => match c.subscribe(f, qos).await {
                        Ok(granted) => say(format!("subscribed to {filter} (granted QoS {})", granted as u8)),
                        Err(e) => say(format!("error: {e}")),
                    },
                    (Err(e), _) => say(format!("error: bad topic filter: {e}")),
                    (_, None) => {}
                }
            }
            ["unsub" | "unsubscribe", filter] => match (TopicFilter::new(*filter), &client) {
                (Ok(f), Some(c)) => match c.unsubscribe(vec![f]).await {
                    Ok(_) => say(format!("unsubscribed from {filter}")),
                    Err(e) => say(format!("error: {e}")),
                },
                (Err(e), _) => say(format!("error: bad topic filter: {e}")),
                (_, None) => {}
            },
            ["pub" | "publish", topic, rest @ ..] => {
                let (mut qos, mut retain, mut message) = (QoS::AtMostOnce, false, Vec::new());
                let mut it = rest.iter();
                while let Some(w) = it.next() {
                    match *w {
                        "-q" => {
                            qos = it
                                .next()
                                .and_then(|q| q.parse::<u8>().ok())
                                .and_then(|q| QoS::from_u8(q).ok())
                                .unwrap_or(qos)
                        }
                        "-r" => retain = true,
                        other => message.push(other),
                    }
                }
                match TopicName::new(*topic) {
                    Ok(t) => {
                        let p = Publish { retain, ..Publish::new(t, message.join(" ")) }.with_qos(qos);
                        if let Some(c) = &client {
                            match c.publish(p).await {
                                Ok(()) => say("published"),
                                Err(e) => say(format!("error: {e}")),
                            }
                        }
                    }
                    Err(e) => say(format!("error: bad topic: {e}")),
                }
            }
            _ => say(format!("unknown command `{line}`; try `help`")),
        }
        prompt();
    }
    if let Some(c) = client {
        let _ = c.disconnect().await;
    }
    Ok(())
}

/// Prints messages for this connection as they arrive.
fn print_messages(client: &Client) {
    client.on_message(|m| {
        println!(
            "\n<- {} [QoS {}{}]: {}",
            m.topic,
            m.qos() as u8,
            if m.retain { ", retained" } else { "" },
            String::from_utf8_lossy(&m.payload)
        );
        prompt();
    });
}
