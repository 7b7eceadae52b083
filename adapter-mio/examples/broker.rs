//! A broker in a mio loop of your own: QUIC on UDP 14567 and MQTT on TCP 1883 (or the
//! addresses given), with a freshly generated self-signed certificate whose fingerprint it
//! prints (clients pin it). It serves until killed.
//!
//! ```sh
//! cargo run -p adapter-mio --example broker -- 127.0.0.1:14567 127.0.0.1:1883
//! ```

use adapter_mio::broker::MioBroker;
use mio::{Events, Poll, Token};
use mqtt_quic_core::driver::ServerOptions;
use mqtt_quic_core::tls::{fingerprint_hex, SelfSigned, ServerTls};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let quic = args.next().unwrap_or_else(|| "0.0.0.0:14567".into()).parse()?;
    let tcp = args.next().unwrap_or_else(|| "0.0.0.0:1883".into()).parse()?;
    let cert = SelfSigned::generate(&["localhost"])?;
    println!("fingerprint: {}", fingerprint_hex(&cert.fingerprint));
    let mut options = ServerOptions::new(ServerTls::from_self_signed(&cert)?);
    (options.quic, options.tcp) = (Some(quic), Some(tcp));

    let mut poll = Poll::new()?;
    // Tokens below 10 stay free for the application's own sockets.
    let mut broker = MioBroker::bind(options, poll.registry(), Token(10))?;
    println!("QUIC on {:?}, TCP on {:?}", broker.quic_addr(), broker.tcp_addr());
    let mut events = Events::with_capacity(1024);
    loop {
        poll.poll(&mut events, broker.timeout())?;
        for event in events.iter() {
            broker.handle_event(poll.registry(), event);
        }
        broker.handle_timeout(poll.registry());
    }
}
