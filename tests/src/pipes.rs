//! A broker and client machines joined by in-memory byte streams (the TCP/TLS path, or MQTT
//! over WebSocket), bytes passed with a virtual clock.

use mqtt_quic_core::broker::machine::{Broker, BrokerConfig, StreamId, StreamOutput};
use mqtt_quic_core::client::{ClientMachine, ClientUrlsConfig, ReconnectPolicy, StreamCommand};
use mqtt_quic_core::config::ServerConfig;
use mqtt_quic_core::session::client::{ClientEvent, ClientSessionConfig};
use mqtt_quic_core::tls::{SelfSigned, ServerTls};
use std::time::{Duration, Instant};

/// Clients on in-memory byte streams and a broker (the TCP/TLS path, no sockets), on a virtual
/// clock; a client's `None` stream is closed.
pub struct Pipes {
    /// The broker.
    pub broker: Broker,
    /// Each client machine, its stream (while open) and the events it reported.
    pub clients: Vec<(ClientMachine, Option<StreamId>, Vec<ClientEvent>)>,
    /// The virtual clock.
    pub now: Instant,
    /// Streams the clients asked for so far.
    pub opens: usize,
    /// Clients whose output is not delivered (a socket nobody reads), counted in bytes.
    pub stalled: Vec<(StreamId, usize)>,
}

impl Pipes {
    /// `n` clients (client ids `c0`, `c1`, ...), not started, that reconnect with `policy`.
    pub fn new(n: usize, policy: ReconnectPolicy) -> Pipes {
        let cert = SelfSigned::generate(&["localhost"]).unwrap();
        let broker =
            Broker::new(BrokerConfig::new(ServerConfig::new(ServerTls::from_self_signed(&cert).unwrap()))).unwrap();
        let clients = (0..n)
            .map(|i| {
                let session = ClientSessionConfig { client_id: format!("c{i}"), ..Default::default() };
                (ClientMachine::over_stream(session, Some(policy), i as u64).unwrap(), None, Vec::new())
            })
            .collect();
        // The origin of virtual time; only differences matter from here on.
        #[allow(clippy::disallowed_methods)]
        let now = Instant::now();
        Pipes { broker, clients, now, opens: 0, stalled: Vec::new() }
    }

    /// As [`Pipes::new`], with clients that speak MQTT over WebSocket to `url` (`ws://...`): the
    /// broker serves each of their connections as one accepted on a WebSocket listener.
    pub fn over_websocket(n: usize, policy: ReconnectPolicy, url: &str) -> Pipes {
        let mut pipes = Pipes::new(0, policy);
        for i in 0..n {
            let config = ClientUrlsConfig {
                urls: vec![url.parse().unwrap()],
                quic: None,
                session: ClientSessionConfig { client_id: format!("c{i}"), ..Default::default() },
                server_name: None,
                reconnect: Some(policy),
                fallback: Default::default(),
                seed: i as u64,
                resolve_literals: false,
            };
            pipes.clients.push((ClientMachine::with_urls(config).unwrap(), None, Vec::new()));
        }
        pipes
    }

    /// Moves everything both ways until quiet, then advances the clock by `step`.
    pub fn run(&mut self, step: Duration) {
        loop {
            let mut moved = false;
            for (client, stream, events) in &mut self.clients {
                while let Some(cmd) = client.poll_stream() {
                    moved = true;
                    match cmd {
                        StreamCommand::Open(url) => {
                            self.opens += 1;
                            *stream = Some(match url.is_some_and(|u| u.transport.is_websocket()) {
                                true => self.broker.handle_stream_open_ws(self.now, None),
                                false => self.broker.handle_stream_open(self.now, None),
                            });
                            client.handle_stream_open(self.now);
                        }
                        StreamCommand::Data(bytes) => {
                            if let Some(id) = *stream {
                                self.broker.handle_stream_data(self.now, id, &bytes);
                            }
                        }
                        StreamCommand::Close => {
                            if let Some(id) = stream.take() {
                                self.broker.handle_stream_closed(self.now, id);
                            }
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
                events.extend(std::iter::from_fn(|| client.poll_event()));
            }
            while let Some((id, out)) = self.broker.poll_stream() {
                moved = true;
                if let Some(s) = self.stalled.iter_mut().find(|s| s.0 == id) {
                    if let StreamOutput::Data(bytes) = &out {
                        s.1 += bytes.len();
                        continue;
                    }
                }
                if let StreamOutput::Data(bytes) = &out {
                    self.broker.handle_stream_written(id, bytes.len());
                }
                let Some((client, stream, _)) = self.clients.iter_mut().find(|c| c.1 == Some(id)) else { continue };
                match out {
                    StreamOutput::Data(bytes) => client.handle_stream_data(self.now, &bytes),
                    StreamOutput::Close | StreamOutput::Abort => {
                        *stream = None;
                        client.handle_stream_closed(self.now);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            if !moved {
                break;
            }
        }
        self.now += step;
        self.broker.handle_timeout(self.now);
        for (client, _, _) in &mut self.clients {
            client.handle_timeout(self.now);
        }
    }

    /// Runs in steps of 10 ms until `done`; panics after 2,000 steps.
    pub fn run_until(&mut self, mut done: impl FnMut(&Pipes) -> bool) {
        for _ in 0..2000 {
            if done(self) {
                return;
            }
            self.run(Duration::from_millis(10));
        }
        panic!("condition not reached");
    }
}
