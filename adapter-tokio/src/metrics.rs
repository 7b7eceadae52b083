//! The broker's metrics in Prometheus' text format: [`render`] turns a
//! [`BrokerMetrics`] snapshot (from
//! [`Server::metrics`](crate::server::Server::metrics)) into what a `/metrics` endpoint
//! serves, through the `prometheus-client` crate. Names follow EMQX's where it has one
//! (`connections_count`, `messages_received`, `packets_publish_received`, ...), with the prefix
//! `mqttq_` and OpenMetrics' `_total` on counters; the QUIC ones are ours.

use mqtt_proto::PacketType;
use mqtt_quic_core::broker::machine::BrokerMetrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// The packet types, as their labels.
const PACKET_TYPES: [(PacketType, &str); 15] = [
    (PacketType::Connect, "connect"),
    (PacketType::ConnAck, "connack"),
    (PacketType::Publish, "publish"),
    (PacketType::PubAck, "puback"),
    (PacketType::PubRec, "pubrec"),
    (PacketType::PubRel, "pubrel"),
    (PacketType::PubComp, "pubcomp"),
    (PacketType::Subscribe, "subscribe"),
    (PacketType::SubAck, "suback"),
    (PacketType::Unsubscribe, "unsubscribe"),
    (PacketType::UnsubAck, "unsuback"),
    (PacketType::PingReq, "pingreq"),
    (PacketType::PingResp, "pingresp"),
    (PacketType::Disconnect, "disconnect"),
    (PacketType::Auth, "auth"),
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuantileLabel {
    quantile: &'static str,
}

/// The 0.5, 0.9, 0.99 and 1 quantiles of `values` (none when there are none).
fn quantiles(mut values: Vec<f64>) -> Family<QuantileLabel, Gauge<f64, AtomicU64>> {
    let family = Family::<QuantileLabel, Gauge<f64, AtomicU64>>::default();
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return family;
    }
    for (q, label) in [(0.5, "0.5"), (0.9, "0.9"), (0.99, "0.99"), (1.0, "1")] {
        let i = ((values.len() - 1) as f64 * q).round() as usize;
        family.get_or_create(&QuantileLabel { quantile: label }).set(values[i]);
    }
    family
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ZeroRttLabel {
    zero_rtt: &'static str,
}

fn counter(value: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(value);
    c
}

fn gauge(value: usize) -> Gauge {
    let g = Gauge::default();
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
    g
}

/// The metrics as Prometheus text (OpenMetrics), ready to serve.
pub fn render(m: &BrokerMetrics) -> String {
    let mut r = Registry::with_prefix("mqttq");
    let s = &m.stats;
    r.register("connections_count", "Clients connected now", gauge(m.connections));
    r.register("sessions_count", "Sessions kept, connected or not", gauge(m.sessions));
    r.register("subscriptions_count", "Subscriptions", gauge(m.subscriptions));
    r.register("retained_count", "Retained messages", gauge(m.retained));
    r.register("uptime_seconds", "Seconds since the broker started", gauge(m.uptime.as_secs() as usize));
    r.register("client_connected", "Clients let in, reconnects included", counter(s.connects));
    r.register("authentication_failure", "CONNECTs refused for wrong credentials", counter(s.auth_failures));
    r.register("messages_received", "PUBLISH packets received from clients", counter(s.messages_received));
    r.register("messages_sent", "PUBLISH packets handed to clients", counter(s.messages_sent));
    let dropped = Family::<ReasonLabel, Counter>::default();
    dropped.get_or_create(&ReasonLabel { reason: "queue_full" }).inc_by(s.messages_dropped);
    dropped.get_or_create(&ReasonLabel { reason: "not_authorized" }).inc_by(s.messages_denied);
    r.register("messages_dropped", "Messages not delivered, by reason", dropped);
    r.register("slow_consumers", "Clients dropped for not reading", counter(s.stalled_clients));
    r.register("bytes_received", "MQTT bytes received", counter(s.bytes_received));
    r.register("bytes_sent", "MQTT bytes sent", counter(s.bytes_sent));
    let (received, sent) = (Family::<TypeLabel, Counter>::default(), Family::<TypeLabel, Counter>::default());
    for (kind, name) in PACKET_TYPES {
        received.get_or_create(&TypeLabel { r#type: name }).inc_by(m.packets.received_of(kind));
        sent.get_or_create(&TypeLabel { r#type: name }).inc_by(m.packets.sent_of(kind));
    }
    r.register("packets_received", "MQTT packets received, by type", received);
    r.register("packets_sent", "MQTT packets sent, by type", sent);

    let q = &m.quic;
    let handshakes = Family::<ZeroRttLabel, Counter>::default();
    handshakes.get_or_create(&ZeroRttLabel { zero_rtt: "accepted" }).inc_by(q.counters.zero_rtt_accepted);
    handshakes
        .get_or_create(&ZeroRttLabel { zero_rtt: "none" })
        .inc_by(q.counters.handshakes - q.counters.zero_rtt_accepted);
    r.register("quic_handshakes", "QUIC handshakes completed, by whether 0-RTT data was accepted", handshakes);
    r.register(
        "quic_migrations",
        "QUIC connections that moved to a new client address",
        counter(q.counters.migrations),
    );
    r.register("quic_packets_sent", "QUIC packets sent", counter(q.sent_packets));
    r.register("quic_packets_lost", "QUIC packets declared lost", counter(q.lost_packets));
    r.register("quic_datagrams_received", "QUIC datagrams received", counter(s.datagrams_received));
    r.register("quic_datagrams_sent", "QoS 0 messages sent as QUIC datagrams", counter(s.datagrams_sent));
    r.register("quic_datagrams_dropped", "QUIC datagrams dropped", counter(s.datagrams_dropped));
    // Where the open connections stand now: quantiles over them, as gauges (a histogram of
    // connections that come and go would go backwards, which Prometheus reads as a reset).
    let rtts: Vec<f64> = q.rtts.iter().map(|t| t.as_secs_f64()).collect();
    r.register(
        "quic_rtt_seconds",
        "Smoothed round-trip time over the open QUIC connections, by quantile (1: the largest)",
        quantiles(rtts),
    );
    r.register(
        "quic_congestion_window_bytes",
        "Congestion window over the open QUIC connections, by quantile (1: the largest)",
        quantiles(q.cwnds.iter().map(|w| *w as f64).collect()),
    );
    r.register("quic_connections_established", "Open QUIC connections past their handshake", gauge(q.rtts.len()));
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &r);
    out
}

/// Serves `GET /metrics` (Prometheus' text format) on `listener`, one request per connection;
/// a request that is not that gets 404, one that takes over 5 s or 8 KiB is dropped, and at
/// most 16 connections are served at once (more are closed at accept).
pub async fn serve(listener: tokio::net::TcpListener, server: crate::server::MetricsSource) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A scraper needs one connection; a few at once are allowed, more are closed at once, so
    // that a flood of idle connections cannot use up the broker's file descriptors.
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
        let server = server.clone();
        drop(tokio::spawn(async move {
            let _slot = slot;
            let mut request = Vec::new();
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                true
            });
            if !matches!(read.await, Ok(true)) {
                return;
            }
            let first = request.split(|b| *b == b'\n').next().unwrap_or_default();
            let wanted = first.starts_with(b"GET /metrics ") || first.starts_with(b"GET /metrics?");
            let snapshot = match wanted {
                true => Some(server.metrics().await),
                false => None,
            };
            let response = match snapshot {
                Some(Ok(m)) => {
                    let body = render(&m);
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                }
                Some(Err(_)) => {
                    "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
                }
                None => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
            };
            let write = async {
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), write).await;
        }));
    }
}
