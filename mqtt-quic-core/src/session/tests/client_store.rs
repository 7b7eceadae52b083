//! The client store, at the session: what is journaled, what output waits for it, and what a
//! session restored from it sends on the next connection (scripted broker). The same against
//! the real broker machine is in `client_store_broker.rs`.

use super::Harness;
use crate::persist::{ClientRestored, RestoreError, StoreBatch, StoreOp, StoredRecord, Table};
use crate::session::client::*;
use mqtt_proto::*;
use std::collections::BTreeMap;
use std::num::NonZeroU16;
use std::time::Duration;

type H = Harness<ClientSession>;

/// An in-memory store: batches applied in order.
#[derive(Default, Clone)]
pub(crate) struct Disk(pub(crate) BTreeMap<(Table, Vec<u8>), Vec<u8>>);

impl Disk {
    pub(crate) fn apply(&mut self, batch: StoreBatch) {
        for op in batch.ops {
            match op {
                StoreOp::Put { table, key, value } => drop(self.0.insert((table, key), value)),
                StoreOp::Delete { table, key } => drop(self.0.remove(&(table, key))),
                StoreOp::DeletePrefix { table, prefix } => {
                    self.0.retain(|(t, k), _| *t != table || !k.starts_with(&prefix))
                }
            }
        }
    }

    pub(crate) fn records(&self) -> Vec<StoredRecord> {
        let age = Duration::from_secs(5);
        self.0
            .iter()
            .map(|((table, key), value)| StoredRecord { table: *table, key: key.clone(), value: value.clone(), age })
            .collect()
    }

    pub(crate) fn count(&self, table: Table) -> usize {
        self.0.keys().filter(|(t, _)| *t == table).count()
    }
}

/// A persistent session's settings: a client id, no clean start, a session expiry.
pub(crate) fn store_config() -> ClientSessionConfig {
    ClientSessionConfig {
        client_id: "dev-1".into(),
        clean_start: false,
        session_expiry: 3600,
        keep_alive: 0,
        ..Default::default()
    }
}

fn publish(topic: &str, qos: QoS) -> Publish {
    Publish::new(TopicName::new(topic).unwrap(), topic.as_bytes().to_vec()).with_qos(qos)
}

fn pid(v: u16) -> PacketId {
    PacketId::new(v).unwrap()
}

fn connack(session_present: bool, receive_maximum: u16) -> ConnAck {
    let mut ack = ConnAck { session_present, ..Default::default() };
    ack.properties.receive_maximum = NonZeroU16::new(receive_maximum);
    ack
}

impl Harness<ClientSession> {
    /// A session restored from `disk`, connected with this CONNACK.
    fn restored(disk: &Disk, ack: ConnAck) -> (H, ClientRestored) {
        let mut h = Harness::with(Protocol::V5, |_| ClientSession::new(store_config()).unwrap());
        let restored = h.session.restore(h.now, disk.records()).unwrap();
        h.session.connect(h.now).unwrap();
        let sent = h.sent();
        assert!(matches!(&sent[..], [Packet::Connect(c)] if !c.clean_start), "{sent:?}");
        h.feed(ack.into());
        (h, restored)
    }

    /// Writes every pending batch to `disk` and reports it stored.
    fn sync(&mut self, disk: &mut Disk) {
        let mut last = None;
        while let Some(batch) = self.session.poll_store(self.now) {
            last = Some(batch.seq);
            disk.apply(batch);
        }
        if let Some(seq) = last {
            self.session.handle_stored(seq);
        }
    }
}

fn publishes(sent: &[Packet]) -> Vec<(String, Option<u16>, bool)> {
    sent.iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some((p.topic.as_str().to_string(), p.packet_id().map(|i| i.get()), p.dup)),
            _ => None,
        })
        .collect()
}

/// A first run: q1 (QoS 1) and q2 (QoS 2) in flight, q2 released (PUBREC came, PUBREL sent),
/// q3 (QoS 1) in flight, q4 queued behind a Receive Maximum of 3; the broker's QoS 2 message
/// 9 received, awaiting PUBREL. Returns the disk and q1..q3's identifiers.
fn first_run() -> (Disk, [u16; 3]) {
    let mut disk = Disk::default();
    let (mut h, restored) = H::restored(&disk, connack(false, 3));
    assert_eq!(restored, ClientRestored::default());
    assert!(matches!(h.events()[..], [ClientEvent::Connected { session_present: false, .. }]));
    for (topic, qos) in
        [("q1", QoS::AtLeastOnce), ("q2", QoS::ExactlyOnce), ("q3", QoS::AtLeastOnce), ("q4", QoS::AtLeastOnce)]
    {
        h.session.publish(h.now, publish(topic, qos)).unwrap();
    }
    // q2 goes out under an identifier only once the store knows it (and the rest waits behind).
    assert!(h.sent().is_empty(), "a QoS 2 PUBLISH waits for its batch");
    h.sync(&mut disk);
    let sent = publishes(&h.sent());
    assert_eq!(sent.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(), ["q1", "q2", "q3"]);
    let ids = [sent[0].1.unwrap(), sent[1].1.unwrap(), sent[2].1.unwrap()];
    h.feed(Packet::PubRec(Ack::new(pid(ids[1]))));
    assert!(h.sent().is_empty(), "PUBREL waits until the release is stored");
    h.sync(&mut disk);
    assert_eq!(h.sent(), [Packet::PubRel(Ack::new(pid(ids[1])))]);
    let mut incoming = publish("in", QoS::ExactlyOnce);
    incoming.qos_pid = QosPid::ExactlyOnce(pid(9));
    h.feed(incoming.into());
    assert!(matches!(&h.events()[..], [ClientEvent::Message(m)] if m.topic.as_str() == "in"));
    assert!(h.sent().is_empty(), "PUBREC waits until the identifier is stored");
    h.sync(&mut disk);
    assert_eq!(h.sent(), [Packet::PubRec(Ack::new(pid(9)))]);
    // The process dies here.
    assert_eq!(disk.count(Table::Messages), 4);
    assert_eq!(disk.count(Table::Sessions), 1);
    (disk, ids)
}

#[test]
fn a_restored_session_resends_under_the_stored_identifiers_when_the_broker_kept_it() {
    let (mut disk, ids) = first_run();
    let (mut h, restored) = H::restored(&disk, connack(true, 3));
    assert_eq!(restored, ClientRestored { messages: 4, in_flight: 3, qos2_received: 1 });
    assert!(matches!(h.events()[..], [ClientEvent::Connected { session_present: true, .. }]));
    let sent = h.sent();
    assert_eq!(
        sent,
        [
            Packet::Publish({
                let mut p = publish("q1", QoS::AtLeastOnce);
                p.qos_pid = QosPid::AtLeastOnce(pid(ids[0]));
                p.dup = true;
                p
            }),
            Packet::PubRel(Ack::new(pid(ids[1]))),
            Packet::Publish({
                let mut p = publish("q3", QoS::AtLeastOnce);
                p.qos_pid = QosPid::AtLeastOnce(pid(ids[2]));
                p.dup = true;
                p
            }),
        ],
        "what was owed, in order, under the same identifiers; q4 waits for a slot"
    );
    // The broker resends its QoS 2 message: a duplicate, not delivered again.
    let mut incoming = publish("in", QoS::ExactlyOnce);
    incoming.qos_pid = QosPid::ExactlyOnce(pid(9));
    incoming.dup = true;
    h.feed(incoming.into());
    assert!(h.events().is_empty(), "the restored receive state knows message 9");
    assert_eq!(h.sent(), [Packet::PubRec(Ack::new(pid(9)))]);
    h.feed(Packet::PubRel(Ack::new(pid(9))));
    h.sync(&mut disk);
    assert_eq!(h.sent(), [Packet::PubComp(Ack::new(pid(9)))], "PUBCOMP success: the identifier was known");
    // Completions carry the stored request ids; q4 then goes out as a new message.
    h.feed(Packet::PubComp(Ack::new(pid(ids[1]))));
    h.feed(Packet::PubAck(Ack::new(pid(ids[0]))));
    h.feed(Packet::PubAck(Ack::new(pid(ids[2]))));
    let done = h.events();
    assert_eq!(done.len(), 3, "{done:?}");
    assert!(done.iter().all(|e| matches!(e, ClientEvent::Published { reason: ReasonCode::Success, .. })));
    let sent = publishes(&h.sent());
    assert!(matches!(&sent[..], [(t, Some(_), false)] if t == "q4"), "{sent:?}");
    // A request made now numbers on from the stored ones.
    let id = h.session.publish(h.now, publish("q5", QoS::AtLeastOnce)).unwrap();
    assert!(id.0 > 4, "{id:?}");
    h.sync(&mut disk);
    assert_eq!(disk.count(Table::Messages), 2, "q4 and q5 in flight");
    assert_eq!(disk.count(Table::Sessions), 0, "no QoS 2 message awaits PUBREL");
}

#[test]
fn a_restored_session_sends_what_was_in_flight_as_new_messages_when_the_broker_lost_it() {
    let (mut disk, ids) = first_run();
    let (mut h, _) = H::restored(&disk, connack(false, 10));
    assert!(h.sent().is_empty(), "q2's new identifier waits for its batch");
    h.sync(&mut disk);
    let sent = publishes(&h.sent());
    let topics: Vec<&str> = sent.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(topics, ["q1", "q2", "q3", "q4"]);
    assert!(sent.iter().all(|p| !p.2), "new messages, no DUP: {sent:?}");
    // The broker's QoS 2 identifiers are forgotten with its session: message 9 is new now.
    let mut incoming = publish("in", QoS::ExactlyOnce);
    incoming.qos_pid = QosPid::ExactlyOnce(pid(9));
    h.feed(incoming.into());
    assert!(matches!(&h.events()[..], [_, ClientEvent::Message(_)]));
    let _ = ids;
}

#[test]
fn qos1_output_never_waits_for_the_store() {
    let disk = Disk::default();
    let (mut h, _) = H::restored(&disk, connack(false, 10));
    h.events();
    h.session.publish(h.now, publish("a", QoS::AtLeastOnce)).unwrap();
    let sent = publishes(&h.sent());
    assert_eq!(sent.len(), 1, "no batch needed first");
    let mut incoming = publish("in", QoS::AtLeastOnce);
    incoming.qos_pid = QosPid::AtLeastOnce(pid(3));
    h.feed(incoming.into());
    assert_eq!(h.sent(), [Packet::PubAck(Ack::new(pid(3)))]);
    // Published and acknowledged before any batch was made: nothing to write at all.
    h.feed(Packet::PubAck(Ack::new(pid(sent[0].1.unwrap()))));
    assert!(h.session.poll_store(h.now).is_none(), "added and completed within one batch: nothing to write");
}

#[test]
fn disconnecting_while_output_waits_sends_the_disconnect_alone() {
    let disk = Disk::default();
    let (mut h, _) = H::restored(&disk, connack(false, 10));
    h.events();
    h.session.publish(h.now, publish("a", QoS::ExactlyOnce)).unwrap();
    assert!(h.sent().is_empty());
    h.session.disconnect(h.now, ReasonCode::Success).unwrap();
    assert!(matches!(&h.sent()[..], [Packet::Disconnect(_)]), "the held QoS 2 PUBLISH is dropped, kept for later");
    let batch = h.session.poll_store(h.now).unwrap();
    assert_eq!(batch.ops.len(), 1, "the message is still written");
}

#[test]
fn a_store_needs_a_session_that_outlives_the_connection() {
    let refused = |config: ClientSessionConfig| {
        let mut h = Harness::with(config.protocol, |_| ClientSession::new(config).unwrap());
        match h.session.restore(h.now, vec![]) {
            Err(RestoreError::Config(e)) => e.to_string(),
            other => panic!("{other:?}"),
        }
    };
    assert!(refused(ClientSessionConfig { clean_start: true, ..store_config() }).contains("clean_start"));
    assert!(refused(ClientSessionConfig { session_expiry: 0, ..store_config() }).contains("session expiry"));
    assert!(refused(ClientSessionConfig { client_id: String::new(), ..store_config() }).contains("client id"));
    // MQTT 3.1.1 has no session expiry: clean session off is enough.
    let config = ClientSessionConfig { protocol: Protocol::V3_1_1, session_expiry: 0, ..store_config() };
    let mut h = Harness::with(Protocol::V3_1_1, |_| ClientSession::new(config).unwrap());
    assert!(h.session.restore(h.now, vec![]).is_ok());
    // Once, before anything else.
    assert!(matches!(h.session.restore(h.now, vec![]), Err(RestoreError::TooLate)));
}

#[test]
fn another_clients_records_are_refused() {
    let (disk, _) = first_run();
    let config = ClientSessionConfig { client_id: "dev-2".into(), ..store_config() };
    let mut h = Harness::with(Protocol::V5, |_| ClientSession::new(config).unwrap());
    let e = h.session.restore(h.now, disk.records()).unwrap_err();
    assert!(matches!(e, RestoreError::Record(_)), "{e:?}");
    assert!(e.to_string().contains("belongs to client id \"dev-1\""), "{e}");
    let mut broker = Disk::default();
    broker.0.insert((Table::Retained, b"a/b".to_vec()), vec![0; 12]);
    let mut h = Harness::with(Protocol::V5, |_| ClientSession::new(store_config()).unwrap());
    let e = h.session.restore(h.now, broker.records()).unwrap_err();
    assert!(e.to_string().contains("broker's store"), "{e}");
}

/// A store that fails stops the client: its DISCONNECT goes out (with an error code, so the
/// broker publishes the will) even though a QoS 2 PUBLISH waited for the store, and the
/// waiting caller gets the store's error.
#[test]
fn a_failed_store_stops_the_driver_and_fails_its_callers() {
    use crate::client::{ClientMachine, StreamCommand};
    use crate::driver::{ClientDriver, ConnectionState, DriverError};
    use bytes::BytesMut;
    #[allow(clippy::disallowed_methods)]
    let now = std::time::Instant::now();
    let machine = ClientMachine::over_stream(store_config(), None, 1).unwrap();
    let mut driver: ClientDriver<u32> = ClientDriver::new(machine);
    driver.restore(now, vec![]).unwrap();
    driver.start(now);
    assert_eq!(driver.poll_stream(), Some(StreamCommand::Open(None)));
    driver.handle_stream_open(now);
    assert!(matches!(driver.poll_stream(), Some(StreamCommand::Data(_))), "CONNECT");
    let mut connack = BytesMut::new();
    Packet::ConnAck(Box::default()).encode(Protocol::V5, &mut connack).unwrap();
    driver.handle_stream_data(now, &connack);
    assert!(matches!(driver.poll_connected(), Some(Ok(_))));
    driver.publish(now, publish("a", QoS::ExactlyOnce), 7);
    assert_eq!(driver.poll_stream(), None, "the QoS 2 PUBLISH waits for its batch");
    assert!(driver.poll_store(now).is_some());
    driver.handle_store_failed(now, "the disk is full");
    let Some(StreamCommand::Data(bytes)) = driver.poll_stream() else { panic!("DISCONNECT") };
    let mut bytes = BytesMut::from(&bytes[..]);
    let sent = Decoder::new(Protocol::V5).decode(&mut bytes).unwrap();
    assert!(matches!(&sent, Some(Packet::Disconnect(d)) if d.reason_code == ReasonCode::UnspecifiedError), "{sent:?}");
    assert!(bytes.is_empty(), "the held PUBLISH is not sent");
    assert_eq!(driver.poll_stream(), Some(StreamCommand::Close));
    assert!(driver.is_done(now));
    let (token, result) = driver.poll_completion().unwrap();
    assert_eq!(token, 7);
    assert!(matches!(&result, Err(DriverError::Store(e)) if e.contains("the disk is full")), "{result:?}");
    assert!(matches!(driver.state(), ConnectionState::Closed { reason } if reason.contains("client store failed")));
}
