//! An MQTT-over-QUIC client embedded in a mio loop that also runs an unrelated TCP echo server.
//!
//! Every line the echo server receives is echoed back and also published to `echo/lines`; the
//! client subscribes to that topic and prints what comes back from the broker. To be complete
//! on its own, the example starts a broker on a thread and plays the echo server's user itself.
//!
//! ```sh
//! cargo run -p adapter-mio --example embed_client
//! ```

use adapter_mio::broker::spawn;
use adapter_mio::client::MioClient;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use mqtt_proto::{Publish, QoS, Subscription, TopicFilter, TopicName};
use mqtt_quic_core::driver::{ClientOptions, ServerOptions};
use mqtt_quic_core::tls::{fingerprint_hex, ClientTls, SelfSigned, ServerTls};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};

const ECHO: Token = Token(0);
const MQTT: Token = Token(1);
// Echo connections use tokens from 100 up.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A broker to talk to, and a client that trusts exactly its certificate.
    let cert = SelfSigned::generate(&["localhost"])?;
    let broker = spawn(ServerOptions::loopback(ServerTls::from_self_signed(&cert)?))?;
    let url = format!("quic://localhost:{}", broker.quic_addr().ok_or("no QUIC listener")?.port());
    let trust = ClientTls::pinned(&fingerprint_hex(&cert.fingerprint))?;

    // The application's own loop: an echo server and the MQTT client share one Poll.
    let mut poll = Poll::new()?;
    let mut echo = TcpListener::bind("127.0.0.1:0".parse()?)?;
    poll.registry().register(&mut echo, ECHO, Interest::READABLE)?;
    let echo_addr = echo.local_addr()?;
    let mut mqtt = MioClient::connect(&url, ClientOptions::new().client_id("echo").tls(trust), poll.registry(), MQTT)?;
    let mut peers: HashMap<Token, TcpStream> = HashMap::new();

    let mut events = Events::with_capacity(64);
    let mut subscribing = None;
    let mut user = None;
    loop {
        poll.poll(&mut events, mqtt.timeout())?;
        for event in events.iter() {
            match event.token() {
                ECHO => {
                    while let Ok((mut s, _)) = echo.accept() {
                        let token = Token(100 + peers.len());
                        poll.registry().register(&mut s, token, Interest::READABLE)?;
                        peers.insert(token, s);
                    }
                }
                token if peers.contains_key(&token) => {
                    let mut buf = [0u8; 1024];
                    let s = peers.get_mut(&token).ok_or("peer gone")?;
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        s.write_all(&buf[..n])?;
                        let line = String::from_utf8_lossy(&buf[..n]).trim_end().to_string();
                        mqtt.publish(
                            poll.registry(),
                            Publish::new(TopicName::new("echo/lines")?, line).with_qos(QoS::AtLeastOnce),
                        );
                    }
                }
                _ => {
                    mqtt.handle_event(poll.registry(), event);
                }
            }
        }
        mqtt.handle_timeout(poll.registry());
        if let Some(connected) = mqtt.poll_connected() {
            println!("connected to {url} as {}", connected?);
        }
        if subscribing.is_none() && matches!(mqtt.state(), mqtt_quic_core::driver::ConnectionState::Connected { .. }) {
            let filter = Subscription::new(TopicFilter::new("echo/#")?, QoS::AtLeastOnce);
            subscribing = Some(mqtt.subscribe(poll.registry(), vec![filter]));
        }
        while let Some((token, result)) = mqtt.poll_completion() {
            result?;
            if Some(token) == subscribing && user.is_none() {
                // Subscribed: now someone uses the echo server, from another thread.
                user = Some(std::thread::spawn(move || -> std::io::Result<String> {
                    let mut s = std::net::TcpStream::connect(echo_addr)?;
                    s.write_all(b"hello over quic\n")?;
                    let mut line = String::new();
                    BufReader::new(s).read_line(&mut line)?;
                    Ok(line)
                }));
            }
        }
        if let Some(m) = mqtt.poll_message() {
            println!("from the broker: {} = {}", m.topic, String::from_utf8_lossy(&m.payload));
            break;
        }
    }
    let echoed = user.ok_or("no echo user")?.join().map_err(|_| "echo user panicked")??;
    println!("echoed: {}", echoed.trim_end());
    mqtt.disconnect(poll.registry());
    while !mqtt.is_done(poll.registry()) {
        poll.poll(&mut events, mqtt.timeout())?;
        for event in events.iter() {
            mqtt.handle_event(poll.registry(), event);
        }
        mqtt.handle_timeout(poll.registry());
    }
    broker.shutdown();
    Ok(())
}
