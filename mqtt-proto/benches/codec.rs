//! Codec benchmarks: this crate against rumqttc's codec (3.1.1 and 5.0) and mqttrs (3.1.1), on
//! identical wire bytes. Every peer's encoding is checked to be byte-for-byte ours before timing,
//! so each row measures the same work.
//!
//! Run: `cargo bench -p mqtt-proto --bench codec`, then `python3 scripts/bench_table.py` for the
//! table in BENCHMARKS.md.

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use mqtt_proto::{
    Connect, Decoder, MqttString, Packet, PacketId, Protocol, Publish, QoS, QosPid, Subscribe, Subscription,
    SubscriptionOptions, TopicFilter, TopicName, Will,
};
use rumqttc::v5::mqttbytes::v5 as r5;
use std::hint::black_box;
use std::time::Duration;

const TOPIC: &str = "sensors/device-0042/temperature";
const MAX: usize = 16 * 1024 * 1024;

fn s(v: &str) -> MqttString {
    MqttString::try_from(v).unwrap()
}

fn ours_publish(len: usize) -> Packet {
    let mut p = Publish::new(TopicName::new(TOPIC).unwrap(), vec![0xA5u8; len]);
    p.qos_pid = QosPid::AtLeastOnce(PacketId::new(7).unwrap());
    Packet::Publish(p)
}

fn ours_connect(protocol: Protocol) -> Packet {
    let mut c = Connect::new(protocol, s("client-0042"));
    c.username = Some(s("user"));
    c.password = Some(Bytes::from_static(b"secret"));
    c.will = Some(Will {
        topic: TopicName::new("clients/client-0042/status").unwrap(),
        payload: Bytes::from_static(b"offline"),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: Default::default(),
    });
    if protocol.is_v5() {
        c.properties.session_expiry_interval = Some(3600);
        c.properties.receive_maximum = std::num::NonZeroU16::new(100);
        c.properties.maximum_packet_size = std::num::NonZeroU32::new(1 << 20);
        c.properties.topic_alias_maximum = Some(16);
        c.properties.user_properties.push((s("region"), s("eu-west")));
    }
    c.into()
}

fn filter(i: usize) -> String {
    format!("building/{i}/floor/+/temperature")
}

fn ours_subscribe() -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: PacketId::new(9).unwrap(),
        properties: Default::default(),
        subscriptions: (0..10)
            .map(|i| Subscription {
                filter: TopicFilter::new(filter(i)).unwrap(),
                options: SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() },
            })
            .collect(),
    })
}

fn wire(p: &Packet, protocol: Protocol) -> Bytes {
    let mut out = BytesMut::new();
    p.encode(protocol, &mut out).unwrap();
    out.freeze()
}

// ---- peers' equivalents -------------------------------------------------------------------

fn r4_publish(len: usize) -> rumqttc::Packet {
    let mut p = rumqttc::Publish::new(TOPIC, rumqttc::QoS::AtLeastOnce, vec![0xA5u8; len]);
    p.pkid = 7;
    rumqttc::Packet::Publish(p)
}

fn r5_publish(len: usize) -> r5::Packet {
    let mut p = r5::Publish::new(TOPIC, rumqttc::v5::mqttbytes::QoS::AtLeastOnce, vec![0xA5u8; len], None);
    p.pkid = 7;
    r5::Packet::Publish(p)
}

fn r4_connect() -> rumqttc::Packet {
    let mut c = rumqttc::Connect::new("client-0042");
    c.keep_alive = 60;
    c.login = Some(rumqttc::Login::new("user", "secret"));
    c.last_will =
        Some(rumqttc::LastWill::new("clients/client-0042/status", "offline", rumqttc::QoS::AtLeastOnce, true));
    rumqttc::Packet::Connect(c)
}

fn r5_connect() -> r5::Packet {
    let mut props = r5::ConnectProperties::new();
    props.session_expiry_interval = Some(3600);
    props.receive_maximum = Some(100);
    props.max_packet_size = Some(1 << 20);
    props.topic_alias_max = Some(16);
    props.user_properties.push(("region".into(), "eu-west".into()));
    let c = r5::Connect { keep_alive: 60, client_id: "client-0042".into(), clean_start: true, properties: Some(props) };
    let will = r5::LastWill::new(
        "clients/client-0042/status",
        "offline",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        true,
        None,
    );
    r5::Packet::Connect(c, Some(will), Some(r5::Login::new("user", "secret")))
}

fn r4_subscribe() -> rumqttc::Packet {
    let mut s = rumqttc::Subscribe::new_many(
        (0..10).map(|i| rumqttc::SubscribeFilter::new(filter(i), rumqttc::QoS::AtLeastOnce)),
    );
    s.pkid = 9;
    rumqttc::Packet::Subscribe(s)
}

fn r5_subscribe() -> r5::Packet {
    let mut s = r5::Subscribe::new_many(
        (0..10).map(|i| r5::Filter::new(filter(i), rumqttc::v5::mqttbytes::QoS::AtLeastOnce)),
        None,
    );
    s.pkid = 9;
    r5::Packet::Subscribe(s)
}

fn rs_publish(payload: &[u8]) -> mqttrs::Packet<'_> {
    mqttrs::Packet::Publish(mqttrs::Publish {
        dup: false,
        qospid: mqttrs::QosPid::AtLeastOnce(mqttrs::Pid::try_from(7).unwrap()),
        retain: false,
        topic_name: TOPIC,
        payload,
    })
}

fn rs_connect() -> mqttrs::Packet<'static> {
    mqttrs::Packet::Connect(mqttrs::Connect {
        protocol: mqttrs::Protocol::MQTT311,
        keep_alive: 60,
        client_id: "client-0042",
        clean_session: true,
        last_will: Some(mqttrs::LastWill {
            topic: "clients/client-0042/status",
            message: b"offline",
            qos: mqttrs::QoS::AtLeastOnce,
            retain: true,
        }),
        username: Some("user"),
        password: Some(b"secret"),
    })
}

fn rs_subscribe() -> mqttrs::Packet<'static> {
    mqttrs::Packet::Subscribe(mqttrs::Subscribe {
        pid: mqttrs::Pid::try_from(9).unwrap(),
        topics: (0..10)
            .map(|i| mqttrs::SubscribeTopic { topic_path: filter(i), qos: mqttrs::QoS::AtLeastOnce })
            .collect(),
    })
}

fn r4_bytes(p: &rumqttc::Packet) -> Bytes {
    let mut b = BytesMut::new();
    p.write(&mut b, MAX).unwrap();
    b.freeze()
}

fn r5_bytes(p: &r5::Packet) -> Bytes {
    let mut b = BytesMut::new();
    p.write(&mut b, None).unwrap();
    b.freeze()
}

fn rs_bytes(p: &mqttrs::Packet<'_>) -> Bytes {
    let mut b = vec![0u8; MAX];
    let n = mqttrs::encode_slice(p, &mut b).unwrap();
    Bytes::copy_from_slice(&b[..n])
}

// ---- benchmark bodies ---------------------------------------------------------------------

struct Case<'a> {
    name: &'a str,
    protocol: Protocol,
    ours: Packet,
    r4: Option<rumqttc::Packet>,
    r5: Option<r5::Packet>,
    rs: Option<mqttrs::Packet<'a>>,
}

fn run_case(c: &mut Criterion, case: Case<'_>) {
    let bytes = wire(&case.ours, case.protocol);
    // Identical inputs: each peer must produce exactly our bytes for the same packet.
    if let Some(p) = &case.r4 {
        assert_eq!(r4_bytes(p), bytes, "rumqttc v4 encodes {} differently", case.name);
    }
    if let Some(p) = &case.r5 {
        assert_eq!(r5_bytes(p), bytes, "rumqttc v5 encodes {} differently", case.name);
    }
    if let Some(p) = &case.rs {
        assert_eq!(rs_bytes(p), bytes, "mqttrs encodes {} differently", case.name);
    }

    let mut g = c.benchmark_group(format!("decode/{}", case.name));
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function("mqtt-proto", |b| {
        let mut d = Decoder::new(case.protocol).with_max_packet_size(MAX as u32);
        b.iter_batched_ref(
            || BytesMut::from(&bytes[..]),
            |buf| black_box(d.decode(buf).unwrap()),
            BatchSize::SmallInput,
        )
    });
    if case.r4.is_some() {
        g.bench_function("rumqttc", |b| {
            b.iter_batched_ref(
                || BytesMut::from(&bytes[..]),
                |buf| black_box(rumqttc::Packet::read(buf, MAX).unwrap()),
                BatchSize::SmallInput,
            )
        });
    }
    if case.r5.is_some() {
        g.bench_function("rumqttc", |b| {
            b.iter_batched_ref(
                || BytesMut::from(&bytes[..]),
                |buf| black_box(r5::Packet::read(buf, None).unwrap()),
                BatchSize::SmallInput,
            )
        });
    }
    if case.rs.is_some() {
        g.bench_function("mqttrs", |b| b.iter(|| black_box(mqttrs::decode_slice(black_box(&bytes[..])).unwrap())));
    }
    if matches!(case.ours, Packet::Publish(_)) {
        let d = Decoder::new(case.protocol).with_max_packet_size(MAX as u32);
        g.bench_function("mqtt-proto (borrowed)", |b| {
            b.iter(|| black_box(d.decode_ref(black_box(&bytes[..])).unwrap()))
        });
    }
    g.finish();

    let mut g = c.benchmark_group(format!("encode/{}", case.name));
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    let mut out = BytesMut::with_capacity(bytes.len() * 2);
    g.bench_function("mqtt-proto", |b| {
        b.iter(|| {
            out.clear();
            black_box(&case.ours).encode(case.protocol, &mut out).unwrap();
            black_box(out.len())
        })
    });
    if let Some(p) = &case.r4 {
        g.bench_function("rumqttc", |b| {
            b.iter(|| {
                out.clear();
                black_box(p).write(&mut out, MAX).unwrap()
            })
        });
    }
    if let Some(p) = &case.r5 {
        g.bench_function("rumqttc", |b| {
            b.iter(|| {
                out.clear();
                black_box(p).write(&mut out, None).unwrap()
            })
        });
    }
    if let Some(p) = &case.rs {
        let mut buf = vec![0u8; bytes.len()];
        g.bench_function("mqttrs", |b| b.iter(|| mqttrs::encode_slice(black_box(p), &mut buf).unwrap()));
    }
    g.finish();
}

fn packets(c: &mut Criterion) {
    let v3 = Protocol::V3_1_1;
    let v5 = Protocol::V5;
    let payloads: Vec<(usize, Vec<u8>)> = [16usize, 1024, 65536].iter().map(|&n| (n, vec![0xA5u8; n])).collect();
    for (len, payload) in &payloads {
        let label = match len {
            16 => "16B",
            1024 => "1KiB",
            _ => "64KiB",
        };
        run_case(
            c,
            Case {
                name: &format!("publish_{label}/v3.1.1"),
                protocol: v3,
                ours: ours_publish(*len),
                r4: Some(r4_publish(*len)),
                r5: None,
                rs: Some(rs_publish(payload)),
            },
        );
        run_case(
            c,
            Case {
                name: &format!("publish_{label}/v5"),
                protocol: v5,
                ours: ours_publish(*len),
                r4: None,
                r5: Some(r5_publish(*len)),
                rs: None,
            },
        );
    }
    run_case(
        c,
        Case {
            name: "connect/v3.1.1",
            protocol: v3,
            ours: ours_connect(v3),
            r4: Some(r4_connect()),
            r5: None,
            rs: Some(rs_connect()),
        },
    );
    run_case(
        c,
        Case {
            name: "connect_props/v5",
            protocol: v5,
            ours: ours_connect(v5),
            r4: None,
            r5: Some(r5_connect()),
            rs: None,
        },
    );
    run_case(
        c,
        Case {
            name: "subscribe_10/v3.1.1",
            protocol: v3,
            ours: ours_subscribe(),
            r4: Some(r4_subscribe()),
            r5: None,
            rs: Some(rs_subscribe()),
        },
    );
    run_case(
        c,
        Case {
            name: "subscribe_10/v5",
            protocol: v5,
            ours: ours_subscribe(),
            r4: None,
            r5: Some(r5_subscribe()),
            rs: None,
        },
    );
}

/// 1 MiB of back-to-back QoS 0 PUBLISHes with 16-byte payloads, decoded to the end.
fn stream(c: &mut Criterion) {
    let mut one = Publish::new(TopicName::new(TOPIC).unwrap(), vec![0x5Au8; 16]);
    one.qos_pid = QosPid::AtMostOnce;
    let one = wire(&Packet::Publish(one), Protocol::V3_1_1);
    let count = (1 << 20) / one.len();
    let mut all = BytesMut::new();
    for _ in 0..count {
        all.extend_from_slice(&one);
    }
    let all = all.freeze();

    let mut g = c.benchmark_group("decode/stream_1MiB_publish_16B/v3.1.1");
    g.throughput(Throughput::Elements(count as u64));
    g.bench_function("mqtt-proto", |b| {
        let mut d = Decoder::new(Protocol::V3_1_1);
        b.iter(|| {
            let mut buf = all.clone();
            let mut n = 0;
            while let Some(p) = d.decode_bytes(&mut buf).unwrap() {
                black_box(p);
                n += 1;
            }
            assert_eq!(n, count);
        })
    });
    g.bench_function("mqtt-proto (borrowed)", |b| {
        let d = Decoder::new(Protocol::V3_1_1);
        b.iter(|| {
            let mut rest = &all[..];
            let mut n = 0;
            while let Some((p, used)) = d.decode_ref(rest).unwrap() {
                black_box(p);
                rest = &rest[used..];
                n += 1;
            }
            assert_eq!(n, count);
        })
    });
    g.bench_function("mqtt-proto (BytesMut)", |b| {
        let mut d = Decoder::new(Protocol::V3_1_1);
        b.iter_batched_ref(
            || BytesMut::from(&all[..]),
            |buf| {
                let mut n = 0;
                while let Some(p) = d.decode(buf).unwrap() {
                    black_box(p);
                    n += 1;
                }
                assert_eq!(n, count);
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("rumqttc", |b| {
        b.iter_batched_ref(
            || BytesMut::from(&all[..]),
            |buf| {
                let mut n = 0;
                while !buf.is_empty() {
                    black_box(rumqttc::Packet::read(buf, MAX).unwrap());
                    n += 1;
                }
                assert_eq!(n, count);
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("mqttrs", |b| {
        // mqttrs does not report how much it consumed; every packet here has the same length.
        b.iter(|| {
            let mut rest = &all[..];
            let mut n = 0;
            while let Some(p) = mqttrs::decode_slice(rest).unwrap() {
                black_box(p);
                rest = &rest[one.len()..];
                n += 1;
            }
            assert_eq!(n, count);
        })
    });
    g.finish();

    // The same stream when the caller must own what it decoded (a broker queues messages for
    // subscribers): mqttrs borrows from the input, so owning means copying topic and payload.
    let mut g = c.benchmark_group("decode/stream_1MiB_publish_16B_owned/v3.1.1");
    g.throughput(Throughput::Elements(count as u64));
    g.bench_function("mqtt-proto", |b| {
        let mut d = Decoder::new(Protocol::V3_1_1);
        b.iter(|| {
            let mut buf = all.clone();
            let mut kept = Vec::with_capacity(count);
            while let Some(Packet::Publish(p)) = d.decode_bytes(&mut buf).unwrap() {
                kept.push((p.topic, p.payload));
            }
            assert_eq!(kept.len(), count);
            kept
        })
    });
    g.bench_function("rumqttc", |b| {
        b.iter_batched_ref(
            || BytesMut::from(&all[..]),
            |buf| {
                let mut kept = Vec::with_capacity(count);
                while !buf.is_empty() {
                    if let rumqttc::Packet::Publish(p) = rumqttc::Packet::read(buf, MAX).unwrap() {
                        kept.push((p.topic, p.payload));
                    }
                }
                assert_eq!(kept.len(), count);
                kept
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("mqttrs", |b| {
        b.iter(|| {
            let mut rest = &all[..];
            let mut kept = Vec::with_capacity(count);
            while let Some(mqttrs::Packet::Publish(p)) = mqttrs::decode_slice(rest).unwrap() {
                kept.push((Bytes::copy_from_slice(p.topic_name.as_bytes()), Bytes::copy_from_slice(p.payload)));
                rest = &rest[one.len()..];
            }
            assert_eq!(kept.len(), count);
            kept
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! { name = benches; config = config(); targets = packets, stream }
criterion_main!(benches);
