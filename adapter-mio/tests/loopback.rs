//! The mio broker and the blocking client over real loopback sockets.

use adapter_mio::blocking::Client;
use adapter_mio::broker::spawn;
use mqtt_proto::{Publish, QoS, TopicFilter, TopicName};
use mqtt_quic_core::driver::{ClientOptions, ServerOptions};
use mqtt_quic_core::tls::{ClientTls, SelfSigned, ServerTls};
use std::time::Duration;

fn broker_options() -> ServerOptions {
    ServerOptions::loopback(ServerTls::from_self_signed(&SelfSigned::generate(&["localhost"]).unwrap()).unwrap())
}

fn options(id: &str) -> ClientOptions {
    ClientOptions::new().client_id(id).tls(ClientTls::insecure())
}

#[test]
fn qos_0_1_2_over_quic_and_tcp() {
    let broker = spawn(broker_options()).unwrap();
    let quic = format!("quic://{}", broker.quic_addr().unwrap());
    let tcp = format!("mqtt://{}", broker.tcp_addr().unwrap());
    for (from, to) in [(&quic, &quic), (&tcp, &tcp), (&tcp, &quic), (&quic, &tcp)] {
        let mut sub = Client::connect(to, options("sub")).unwrap();
        sub.subscribe(TopicFilter::new("t/#").unwrap(), QoS::ExactlyOnce).unwrap();
        let mut publisher = Client::connect(from, options("pub")).unwrap();
        for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce].into_iter().enumerate() {
            let p = Publish::new(TopicName::new(format!("t/{i}")).unwrap(), format!("m{i}")).with_qos(qos);
            publisher.publish(p).unwrap();
        }
        for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce].into_iter().enumerate() {
            let m = sub.recv(Duration::from_secs(5)).unwrap().unwrap_or_else(|| panic!("{from} -> {to}: nothing"));
            assert_eq!((m.topic.as_str(), m.qos()), (format!("t/{i}").as_str(), qos), "{from} -> {to}");
        }
        publisher.disconnect().unwrap();
        sub.disconnect().unwrap();
    }
    broker.shutdown();
}

#[test]
fn connect_errors_are_reported() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let e = Client::connect(&format!("mqtt://{closed}"), options("x")).err().unwrap();
    assert!(e.to_string().contains("refused"), "{e}");
    let e = Client::connect("mqtts://127.0.0.1:1", options("x")).err().unwrap();
    assert!(e.to_string().contains("no TLS over TCP"), "{e}");
}
