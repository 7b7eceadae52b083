#!/usr/bin/env python3
"""Interop check: drive an MQTT broker with the paho-mqtt Python client (2.x API).

Usage:
    python3 paho_check.py --host 127.0.0.1 --port 1883 --mqtt 5|3.1.1 --scenario NAME|all
        [--transport tcp|websockets [--ws-path /mqtt]] [--cafile CA.pem]

`--transport websockets` runs the same scenarios over MQTT over WebSocket; `--cafile` puts
TLS below (mqtts, or wss with websockets), trusting that CA.

Scenarios (each one checks itself): connect, qos, retained, will, shared,
session, unsubscribe, topic_alias.  `--scenario all` runs them in that order.

On success each scenario prints `ok: <scenario> mqtt=<v>: <summary>` to stdout.
The first failure prints `FAIL: <scenario> mqtt=<v>: <reason>` to stderr and
exits with status 1.  The whole run is limited to 30 seconds (`--timeout`).

Requires paho-mqtt 2.x (see requirements.txt next to this file).
"""

import argparse
import os
import queue
import sys
import threading
import time
import uuid
from collections import namedtuple

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

SCENARIOS = [
    "connect",
    "qos",
    "retained",
    "will",
    "shared",
    "session",
    "unsubscribe",
    "topic_alias",
]

WAIT = 5.0        # how long to wait for something that must happen
QUIET = 0.5       # how long to watch for something that must NOT happen

Msg = namedtuple("Msg", "topic payload qos retain props")


class CheckFailed(Exception):
    pass


def check(cond, reason):
    if not cond:
        raise CheckFailed(reason)


class Ctx:
    """Run-wide settings: where the broker is, which protocol, unique names."""

    def __init__(self, args):
        self.host = args.host
        self.port = args.port
        self.version = args.mqtt
        self.v5 = args.mqtt == "5"
        self.protocol = mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311
        self.run = uuid.uuid4().hex[:10]
        self.debug = args.debug
        self.scenario = "-"
        self.peers = []
        self.transport = args.transport
        self.ws_path = args.ws_path
        self.cafile = args.cafile

    def client_id(self, name):
        return f"paho-{self.run}-{self.scenario}-{name}"

    def topic(self, *parts):
        return "/".join(["paho_check", self.run, self.scenario] + list(parts))


class Peer:
    """One paho client with its callbacks turned into queues and events."""

    def __init__(self, ctx, name, clean_session=True, sink=None):
        self.ctx = ctx
        self.name = name
        self.client_id = ctx.client_id(name)
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=ctx.protocol,
            clean_session=None if ctx.v5 else clean_session,
            reconnect_on_failure=False,
            transport=ctx.transport,
        )
        if ctx.transport == "websockets":
            self.client.ws_set_options(path=ctx.ws_path)
        if ctx.cafile:
            self.client.tls_set(ca_certs=ctx.cafile)
        self.connacks = queue.Queue()
        self.msgs = sink if sink is not None else queue.Queue()
        self.disconnected = threading.Event()
        self.disconnect_info = None
        self._acks = {}               # (kind, mid) -> payload
        self._acks_cond = threading.Condition()
        self.loop_running = False

        c = self.client
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_unsubscribe = self._on_unsubscribe
        c.on_publish = self._on_publish
        c.on_disconnect = self._on_disconnect
        if ctx.debug:
            c.on_log = lambda _c, _u, _lvl, s: print(
                f"  [{self.name}] {s}", file=sys.stderr)
        ctx.peers.append(self)

    # ---- callbacks (network thread) ----
    def _on_connect(self, _c, _u, flags, reason_code, properties):
        self.connacks.put((flags, reason_code, properties))

    def _on_message(self, _c, _u, m):
        self.msgs.put((self.name, Msg(m.topic, bytes(m.payload), m.qos,
                                      bool(m.retain),
                                      getattr(m, "properties", None))))

    def _ack(self, kind, mid, value):
        with self._acks_cond:
            self._acks[(kind, mid)] = value
            self._acks_cond.notify_all()

    def _on_subscribe(self, _c, _u, mid, reason_codes, properties):
        self._ack("sub", mid, list(reason_codes))

    def _on_unsubscribe(self, _c, _u, mid, reason_codes, properties):
        self._ack("unsub", mid, list(reason_codes))

    def _on_publish(self, _c, _u, mid, reason_code, properties):
        self._ack("pub", mid, reason_code)

    def _on_disconnect(self, _c, _u, flags, reason_code, properties):
        self.disconnect_info = (flags, reason_code, properties)
        self.disconnected.set()

    # ---- helpers (main thread) ----
    def wait_ack(self, kind, mid, what):
        deadline = time.monotonic() + WAIT
        with self._acks_cond:
            while (kind, mid) not in self._acks:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CheckFailed(
                        f"{self.name}: no {what} for mid {mid} within {WAIT:g} s")
                self._acks_cond.wait(left)
            return self._acks.pop((kind, mid))

    def connect(self, clean_start=True, properties=None, expect_session=None):
        """Connect, wait for CONNACK, check success. Returns (flags, rc, props)."""
        kwargs = {"keepalive": 30}
        if self.ctx.v5:
            kwargs["clean_start"] = clean_start
            if properties is not None:
                kwargs["properties"] = properties
        try:
            self.client.connect(self.ctx.host, self.ctx.port, **kwargs)
        except OSError as e:
            raise CheckFailed(f"{self.name}: TCP connect to "
                              f"{self.ctx.host}:{self.ctx.port} failed: {e}")
        self.client.loop_start()
        self.loop_running = True
        try:
            flags, rc, props = self.connacks.get(timeout=WAIT)
        except queue.Empty:
            raise CheckFailed(f"{self.name}: no CONNACK within {WAIT:g} s")
        check(rc.value == 0,
              f"{self.name}: CONNACK reason code {rc.value:#04x} ({rc})")
        if expect_session is not None:
            check(bool(flags.session_present) == expect_session,
                  f"{self.name}: CONNACK session_present="
                  f"{int(flags.session_present)}, expected {int(expect_session)}")
        return flags, rc, props

    def subscribe(self, topic, qos):
        """Subscribe and wait for SUBACK; returns the granted QoS."""
        res, mid = self.client.subscribe(topic, qos)
        check(res == mqtt.MQTT_ERR_SUCCESS,
              f"{self.name}: subscribe({topic!r}) returned {res}")
        codes = self.wait_ack("sub", mid, "SUBACK")
        check(len(codes) == 1,
              f"{self.name}: SUBACK for {topic!r} has {len(codes)} reason codes")
        rc = codes[0]
        check(rc.value < 0x80,
              f"{self.name}: SUBACK for {topic!r} refused: {rc.value:#04x} ({rc})")
        return rc.value

    def unsubscribe(self, topic):
        res, mid = self.client.unsubscribe(topic)
        check(res == mqtt.MQTT_ERR_SUCCESS,
              f"{self.name}: unsubscribe({topic!r}) returned {res}")
        return self.wait_ack("unsub", mid, "UNSUBACK")

    def publish(self, topic, payload, qos, retain=False, properties=None):
        """Publish; returns the MQTTMessageInfo (not yet waited for)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain,
                                   properties=properties)
        check(info.rc == mqtt.MQTT_ERR_SUCCESS,
              f"{self.name}: publish to {topic!r} returned rc={info.rc}")
        return info

    def wait_published(self, info, what="publish"):
        """Wait for on_publish (PUBACK / PUBCOMP / sent for QoS 0)."""
        rc = self.wait_ack("pub", info.mid, f"completion of {what}")
        check(info.is_published(),
              f"{self.name}: {what} mid {info.mid} not marked published")
        if self.ctx.v5 and rc is not None:
            check(rc.value < 0x80,
                  f"{self.name}: {what} refused by broker: {rc.value:#04x} ({rc})")
        return rc

    def next_msg(self, what, timeout=WAIT):
        try:
            return self.msgs.get(timeout=timeout)[1]
        except queue.Empty:
            raise CheckFailed(f"{self.name}: {what}: nothing received within "
                              f"{timeout:g} s")

    def expect_nothing(self, what, timeout=QUIET):
        try:
            _, m = self.msgs.get(timeout=timeout)
        except queue.Empty:
            return
        raise CheckFailed(f"{self.name}: {what}: unexpectedly received "
                          f"topic={m.topic!r} payload={m.payload!r} "
                          f"retain={int(m.retain)}")

    def disconnect(self):
        """Clean DISCONNECT, wait until paho has sent it and closed the socket."""
        if self.loop_running:
            self.client.disconnect()
            if not self.disconnected.wait(WAIT):
                raise CheckFailed(f"{self.name}: clean disconnect did not "
                                  f"complete within {WAIT:g} s")
            self.stop()

    def stop(self):
        if self.loop_running:
            self.client.loop_stop()
            self.loop_running = False

    def kill(self):
        """Drop the TCP connection without sending DISCONNECT."""
        self.stop()          # network thread gone: nothing more is sent
        sock = self.client.socket()
        check(sock is not None, f"{self.name}: no socket to close")
        # Over WebSocket (or TLS) paho hands out a wrapper: the TCP socket is underneath.
        raw = getattr(sock, "_socket", sock)
        try:
            raw.shutdown(2)  # socket.SHUT_RDWR: FIN now, no MQTT DISCONNECT
        except OSError:
            pass
        sock.close()


def msg_desc(m):
    return f"topic={m.topic!r} payload={m.payload!r} qos={m.qos} retain={int(m.retain)}"


# ---------------------------------------------------------------- scenarios

def sc_connect(ctx):
    p = Peer(ctx, "c")
    flags, rc, props = p.connect()
    summary = f"CONNACK rc={rc.value} session_present={int(flags.session_present)}"
    if ctx.v5:
        shown = props.json() if props is not None else {}
        if shown:
            summary += " props: " + ", ".join(f"{k}={v}" for k, v in shown.items())
        else:
            summary += " props: (none)"
    p.disconnect()
    dflags, drc, _ = p.disconnect_info
    check(not dflags.is_disconnect_packet_from_server,
          f"server sent DISCONNECT ({drc}) during clean disconnect")
    return summary + "; clean disconnect"


def sc_qos(ctx):
    base = ctx.topic()
    sub = Peer(ctx, "sub")
    sub.connect()
    granted = sub.subscribe(base + "/#", 2)
    check(granted == 2, f"SUBACK granted QoS {granted}, expected 2")
    pub = Peer(ctx, "pub")
    pub.connect()
    sent = {}
    for q in (0, 1, 2):
        topic = f"{base}/q{q}"
        payload = f"qos{q}-{ctx.run}".encode()
        info = pub.publish(topic, payload, q)
        pub.wait_published(info, f"QoS {q} publish")
        sent[topic] = (payload, q)
    got = {}
    while len(got) < 3:
        m = sub.next_msg(f"waiting for message {len(got) + 1} of 3 "
                         f"(have {sorted(got)})")
        check(m.topic in sent, f"unexpected message {msg_desc(m)}")
        check(m.topic not in got, f"duplicate message {msg_desc(m)}")
        payload, q = sent[m.topic]
        check(m.payload == payload,
              f"{m.topic}: payload {m.payload!r}, expected {payload!r}")
        check(m.qos == q, f"{m.topic}: delivered with QoS {m.qos}, expected {q}")
        check(not m.retain, f"{m.topic}: retain flag set on live message")
        got[m.topic] = m.qos
    sub.expect_nothing("after the 3 messages")
    pub.disconnect()
    sub.disconnect()
    return "published QoS 0/1/2 (all completed), received all 3 with matching payload and QoS"


def sc_retained(ctx):
    topic = ctx.topic("r")
    payload = f"retained-{ctx.run}".encode()
    pub = Peer(ctx, "pub")
    pub.connect()
    pub.wait_published(pub.publish(topic, payload, 1, retain=True), "retained publish")

    s1 = Peer(ctx, "s1")
    s1.connect()
    s1.subscribe(topic, 1)
    m = s1.next_msg("waiting for the retained message")
    check(m.topic == topic and m.payload == payload,
          f"wrong retained message: {msg_desc(m)}")
    check(m.retain, f"retained message delivered without retain flag: {msg_desc(m)}")
    check(m.qos == 1, f"retained message delivered with QoS {m.qos}, expected 1")
    s1.disconnect()

    pub.wait_published(pub.publish(topic, b"", 1, retain=True), "retained clear")
    pub.disconnect()

    s2 = Peer(ctx, "s2")
    s2.connect()
    s2.subscribe(topic, 1)
    s2.expect_nothing("after the retained message was cleared")
    s2.disconnect()
    return ("new subscriber got retained message (retain=1, QoS 1); after clearing "
            f"with an empty payload a third subscriber got nothing in {QUIET:g} s")


def sc_will(ctx):
    will_topic = ctx.topic("a-will")
    will_payload = f"a-is-gone-{ctx.run}".encode()
    clean_topic = ctx.topic("c-will")

    b = Peer(ctx, "b")
    b.connect()
    b.subscribe(will_topic, 1)
    b.subscribe(clean_topic, 1)

    a = Peer(ctx, "a")
    a.client.will_set(will_topic, will_payload, qos=1, retain=False)
    a.connect()
    a.kill()
    t0 = time.monotonic()
    m = b.next_msg("waiting for A's will after its socket was closed")
    dt = time.monotonic() - t0
    check(m.topic == will_topic and m.payload == will_payload,
          f"wrong will message: {msg_desc(m)}")
    check(m.qos == 1, f"will delivered with QoS {m.qos}, expected 1")

    c = Peer(ctx, "c")
    c.client.will_set(clean_topic, b"c-should-not-appear", qos=1, retain=False)
    c.connect()
    c.disconnect()
    b.expect_nothing("will of C, which disconnected cleanly")
    b.disconnect()
    return (f"will (QoS 1) delivered {dt * 1000:.0f} ms after abrupt close; "
            f"no will after clean DISCONNECT within {QUIET:g} s")


def sc_shared(ctx):
    topic = ctx.topic("s")
    share = f"$share/g{ctx.run}/{topic}"
    sink = queue.Queue()
    s1 = Peer(ctx, "s1", sink=sink)
    s2 = Peer(ctx, "s2", sink=sink)
    for s in (s1, s2):
        s.connect()
        g = s.subscribe(share, 1)
        check(g == 1, f"{s.name}: shared SUBACK granted QoS {g}, expected 1")
    pub = Peer(ctx, "pub")
    pub.connect()
    n = 20
    infos = [pub.publish(topic, f"m{i:02d}".encode(), 1) for i in range(n)]
    for i, info in enumerate(infos):
        pub.wait_published(info, f"message {i}")

    counts = {"s1": 0, "s2": 0}
    seen = {}
    deadline = time.monotonic() + WAIT
    while len(seen) < n:
        left = deadline - time.monotonic()
        try:
            who, m = sink.get(timeout=max(left, 0.01))
        except queue.Empty:
            raise CheckFailed(f"only {len(seen)} of {n} messages arrived "
                              f"(split s1={counts['s1']} s2={counts['s2']})")
        check(m.topic == topic, f"{who}: unexpected message {msg_desc(m)}")
        check(m.payload not in seen,
              f"{m.payload!r} delivered twice (first to {seen.get(m.payload)}, "
              f"again to {who})")
        seen[m.payload] = who
        counts[who] += 1
    # anything more is a duplicate
    try:
        who, m = sink.get(timeout=QUIET)
        raise CheckFailed(f"extra delivery after all {n} arrived: {who} got "
                          f"{m.payload!r} (first went to {seen.get(m.payload)})")
    except queue.Empty:
        pass
    check(counts["s1"] >= 1 and counts["s2"] >= 1,
          f"all messages went to one subscriber: s1={counts['s1']} s2={counts['s2']}")
    pub.disconnect()
    s1.disconnect()
    s2.disconnect()
    return f"{n} QoS 1 messages each delivered exactly once; split s1={counts['s1']} s2={counts['s2']}"


def sc_session(ctx):
    topic = ctx.topic("t")

    def session_props(expiry):
        if not ctx.v5:
            return None
        p = Properties(PacketTypes.CONNECT)
        p.SessionExpiryInterval = expiry
        return p

    s = Peer(ctx, "s", clean_session=False)
    s.connect(clean_start=False, properties=session_props(60), expect_session=False)
    s.subscribe(topic, 1)
    s.disconnect()

    pub = Peer(ctx, "pub")
    pub.connect()
    payloads = [f"offline-{i}-{ctx.run}".encode() for i in range(3)]
    for i, pl in enumerate(payloads):
        pub.wait_published(pub.publish(topic, pl, 1), f"offline message {i}")
    pub.disconnect()

    s2 = Peer(ctx, "s", clean_session=False)   # same client id as s
    s2.connect(clean_start=False, properties=session_props(60), expect_session=True)
    got = []
    for i in range(3):
        m = s2.next_msg(f"waiting for queued message {i + 1} of 3 (have {got})")
        check(m.topic == topic, f"unexpected message {msg_desc(m)}")
        check(m.qos == 1, f"queued message delivered with QoS {m.qos}, expected 1")
        got.append(m.payload)
    check(got == payloads, f"queued messages out of order or wrong: {got!r}")
    s2.expect_nothing("after the 3 queued messages")
    s2.disconnect()

    # clean up the stored session
    s3 = Peer(ctx, "s", clean_session=True)
    s3.connect(clean_start=True, properties=session_props(0), expect_session=False)
    s3.disconnect()
    return ("reconnect got session_present=1 and the 3 offline QoS 1 messages in order; "
            "session removed with clean start")


def sc_unsubscribe(ctx):
    topic = ctx.topic("u")
    s = Peer(ctx, "s")
    s.connect()
    s.subscribe(topic, 1)
    pub = Peer(ctx, "pub")
    pub.connect()
    pub.wait_published(pub.publish(topic, b"before", 1), "first publish")
    m = s.next_msg("waiting for the message before unsubscribing")
    check(m.payload == b"before", f"wrong message {msg_desc(m)}")
    codes = s.unsubscribe(topic)
    if ctx.v5:
        check(len(codes) == 1, f"UNSUBACK has {len(codes)} reason codes, expected 1")
        check(codes[0].value == 0,
              f"UNSUBACK reason code {codes[0].value:#04x} ({codes[0]}), expected 0x00")
        detail = f"UNSUBACK rc={codes[0].value}"
    else:
        detail = "UNSUBACK received"
    pub.wait_published(pub.publish(topic, b"after", 1), "second publish")
    s.expect_nothing("after UNSUBSCRIBE")
    pub.disconnect()
    s.disconnect()
    return f"received 1 message, {detail}, nothing after within {QUIET:g} s"


def sc_topic_alias(ctx):
    if not ctx.v5:
        return "skipped (MQTT 5 feature)"
    topic = ctx.topic("alias", "long", "topic", "name")
    sub = Peer(ctx, "sub")
    sub.connect()
    sub.subscribe(topic, 1)
    pub = Peer(ctx, "pub")
    _, _, props = pub.connect()
    tam = getattr(props, "TopicAliasMaximum", 0) if props is not None else 0
    check(tam >= 1, f"CONNACK TopicAliasMaximum is {tam} (absent means 0): "
                    "broker does not accept topic aliases")

    def alias_props():
        p = Properties(PacketTypes.PUBLISH)
        p.TopicAlias = 1
        return p

    sent = [b"alias-0-with-topic", b"alias-1-empty-topic", b"alias-2-empty-topic"]
    pub.wait_published(pub.publish(topic, sent[0], 1, properties=alias_props()),
                       "publish with topic + alias 1")
    for i, pl in enumerate(sent[1:], 1):
        pub.wait_published(pub.publish("", pl, 1, properties=alias_props()),
                           f"publish {i} with empty topic + alias 1")
    check(not pub.disconnected.is_set(),
          f"publisher was disconnected: {pub.disconnect_info}")
    got = []
    for i in range(len(sent)):
        m = sub.next_msg(f"waiting for aliased message {i + 1} of {len(sent)}")
        check(m.topic == topic, f"message {i} arrived under topic {m.topic!r}, "
                                f"expected {topic!r}")
        alias = getattr(m.props, "TopicAlias", None) if m.props is not None else None
        check(alias is None, f"broker sent TopicAlias={alias} to a subscriber "
                             "that allowed none (TopicAliasMaximum 0)")
        got.append(m.payload)
    check(got == sent, f"aliased messages wrong or out of order: {got!r}")
    pub.disconnect()
    sub.disconnect()
    return (f"TopicAliasMaximum={tam}; 1 publish with topic+alias and 2 with empty "
            "topic+alias all delivered under the full topic")


RUNNERS = {
    "connect": sc_connect,
    "qos": sc_qos,
    "retained": sc_retained,
    "will": sc_will,
    "shared": sc_shared,
    "session": sc_session,
    "unsubscribe": sc_unsubscribe,
    "topic_alias": sc_topic_alias,
}


def fail(ctx, reason):
    sys.stdout.flush()
    print(f"FAIL: {ctx.scenario} mqtt={ctx.version}: {reason}", file=sys.stderr)
    sys.stderr.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--mqtt", choices=["5", "3.1.1"], default="5")
    ap.add_argument("--scenario", choices=SCENARIOS + ["all"], default="all")
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="hard limit for the whole run, seconds [30]")
    ap.add_argument("--debug", action="store_true", help="print paho's log")
    ap.add_argument("--transport", choices=["tcp", "websockets"], default="tcp")
    ap.add_argument("--ws-path", default="/mqtt")
    ap.add_argument("--cafile", help="connect over TLS, trusting this CA (PEM)")
    args = ap.parse_args()
    ctx = Ctx(args)

    def on_timeout():
        fail(ctx, f"overall timeout of {args.timeout:g} s hit")
        os._exit(1)

    watchdog = threading.Timer(args.timeout, on_timeout)
    watchdog.daemon = True
    watchdog.start()

    names = SCENARIOS if args.scenario == "all" else [args.scenario]
    t_start = time.monotonic()
    for name in names:
        ctx.scenario = name
        ctx.peers = []
        t0 = time.monotonic()
        try:
            summary = RUNNERS[name](ctx)
        except CheckFailed as e:
            fail(ctx, str(e))
            os._exit(1)
        except Exception as e:  # a bug here or a paho error: still a failure
            fail(ctx, f"{type(e).__name__}: {e}")
            os._exit(1)
        finally:
            for p in ctx.peers:
                if p.loop_running:
                    try:
                        p.client.loop_stop()
                    except Exception:
                        pass
        if not summary.startswith("skipped"):
            summary += f" [{(time.monotonic() - t0) * 1000:.0f} ms]"
        print(f"ok: {name} mqtt={ctx.version}: {summary}", flush=True)
    watchdog.cancel()
    if len(names) > 1:
        print(f"all {len(names)} scenarios passed mqtt={ctx.version} "
              f"in {time.monotonic() - t_start:.2f} s", flush=True)


if __name__ == "__main__":
    main()
