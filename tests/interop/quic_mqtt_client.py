#!/usr/bin/env python3
"""Independent MQTT-over-QUIC interop client (aioquic based).

Wire convention (EMQX compatible): QUIC v1 + TLS 1.3, ALPN "mqtt".  After
the handshake the client opens ONE bidirectional stream and every MQTT
packet of the connection flows on it, in both directions.  A FIN on that
stream closes the MQTT connection.

Usage:
  python3 quic_mqtt_client.py --host 127.0.0.1 --port PORT \
      [--cafile PEM | --insecure] [--server-name NAME] [--mqtt 5|3.1.1] \
      --scenario pubsub|retained|will

Each scenario checks itself: on success it prints one line "ok: ..." on
stdout and exits 0; on failure it prints "FAIL: ..." on stderr and exits 1.
The whole run is bounded by a hard 15 s timeout.

The MQTT encoder/decoder below is written from the MQTT 3.1.1 / 5.0 specs
and deliberately shares nothing with the project under test.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import ssl
import struct
import sys
import threading
import uuid
from dataclasses import dataclass, field

try:
    from aioquic.asyncio import connect
    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.events import ConnectionTerminated, StreamReset
except ImportError as _exc:  # pragma: no cover - environment problem
    print(f"FAIL: aioquic is not installed ({_exc}); pip install -r requirements.txt",
          file=sys.stderr)
    sys.exit(1)

OVERALL_TIMEOUT = 15.0
HANDSHAKE_TIMEOUT = 4.0
STEP_TIMEOUT = 5.0
WILL_TIMEOUT = 5.0

# --------------------------------------------------------------------------
# MQTT codec
# --------------------------------------------------------------------------

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 8, 9, 10, 11
PINGREQ, PINGRESP, DISCONNECT, AUTH = 12, 13, 14, 15

PACKET_NAMES = {
    CONNECT: "CONNECT", CONNACK: "CONNACK", PUBLISH: "PUBLISH",
    PUBACK: "PUBACK", PUBREC: "PUBREC", PUBREL: "PUBREL", PUBCOMP: "PUBCOMP",
    SUBSCRIBE: "SUBSCRIBE", SUBACK: "SUBACK", UNSUBSCRIBE: "UNSUBSCRIBE",
    UNSUBACK: "UNSUBACK", PINGREQ: "PINGREQ", PINGRESP: "PINGRESP",
    DISCONNECT: "DISCONNECT", AUTH: "AUTH",
}

V311 = 4
V5 = 5

# MQTT 5 property identifiers -> value kind
_PROP_KINDS = {
    0x01: "byte", 0x02: "u32", 0x03: "str", 0x08: "str", 0x09: "bin",
    0x0B: "varint", 0x11: "u32", 0x12: "str", 0x13: "u16", 0x15: "str",
    0x16: "bin", 0x17: "byte", 0x18: "u32", 0x19: "byte", 0x1A: "str",
    0x1C: "str", 0x1F: "str", 0x21: "u16", 0x22: "u16", 0x23: "u16",
    0x24: "byte", 0x25: "byte", 0x26: "pair", 0x27: "u32", 0x28: "byte",
    0x29: "byte", 0x2A: "byte",
}
PROP_REASON_STRING = 0x1F


class ProtocolError(Exception):
    """Malformed or unexpected MQTT data from the peer."""


class Fail(Exception):
    """A scenario check failed; the message is printed after 'FAIL: '."""


def enc_varint(n: int) -> bytes:
    if n < 0 or n > 268_435_455:
        raise ValueError(f"varint out of range: {n}")
    out = bytearray()
    while True:
        digit = n % 128
        n //= 128
        if n:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def enc_u16(n: int) -> bytes:
    return struct.pack("!H", n)


def enc_bin(b: bytes) -> bytes:
    if len(b) > 0xFFFF:
        raise ValueError("binary field too long")
    return enc_u16(len(b)) + b


def enc_str(s: str) -> bytes:
    return enc_bin(s.encode("utf-8"))


def enc_props(version: int, props: bytes = b"") -> bytes:
    """Property block (length + bytes) for MQTT 5, nothing for 3.1.1."""
    if version != V5:
        return b""
    return enc_varint(len(props)) + props


def enc_packet(ptype: int, flags: int, body: bytes) -> bytes:
    return bytes([(ptype << 4) | (flags & 0x0F)]) + enc_varint(len(body)) + body


class Cursor:
    """Bounds-checked reader over a packet body."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ProtocolError(f"truncated packet (need {n} bytes, have {self.remaining()})")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("!H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("!I", self.take(4))[0]

    def varint(self) -> int:
        value, mult = 0, 1
        for _ in range(4):
            b = self.u8()
            value += (b & 0x7F) * mult
            if not b & 0x80:
                return value
            mult *= 128
        raise ProtocolError("malformed variable byte integer")

    def bin(self) -> bytes:
        return self.take(self.u16())

    def str(self) -> str:
        raw = self.bin()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"invalid UTF-8 string: {exc}") from None

    def rest(self) -> bytes:
        return self.take(self.remaining())


def dec_props(cur: Cursor) -> dict:
    length = cur.varint()
    sub = Cursor(cur.take(length))
    props: dict = {}
    while sub.remaining():
        pid = sub.varint()
        kind = _PROP_KINDS.get(pid)
        if kind is None:
            raise ProtocolError(f"unknown MQTT 5 property id 0x{pid:02x}")
        if kind == "byte":
            val = sub.u8()
        elif kind == "u16":
            val = sub.u16()
        elif kind == "u32":
            val = sub.u32()
        elif kind == "varint":
            val = sub.varint()
        elif kind == "str":
            val = sub.str()
        elif kind == "bin":
            val = sub.bin()
        else:  # string pair
            val = (sub.str(), sub.str())
        props.setdefault(pid, []).append(val)
    return props


@dataclass
class Packet:
    ptype: int
    flags: int = 0
    packet_id: int | None = None
    reason: int | None = None           # CONNACK / acks / DISCONNECT / AUTH
    reasons: list = field(default_factory=list)  # SUBACK / UNSUBACK
    session_present: bool = False
    topic: str = ""
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    props: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return PACKET_NAMES.get(self.ptype, f"type{self.ptype}")

    def reason_string(self) -> str:
        rs = self.props.get(PROP_REASON_STRING)
        return f" ({rs[0]})" if rs else ""


@dataclass
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


def mk_connect(version: int, client_id: str, keepalive: int = 30,
               clean: bool = True, will: Will | None = None) -> bytes:
    flags = 0x02 if clean else 0x00
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    body = enc_str("MQTT") + bytes([version, flags]) + enc_u16(keepalive)
    body += enc_props(version)
    body += enc_str(client_id)
    if will is not None:
        body += enc_props(version)  # will properties (MQTT 5 only)
        body += enc_str(will.topic) + enc_bin(will.payload)
    return enc_packet(CONNECT, 0, body)


def mk_publish(version: int, topic: str, payload: bytes, qos: int = 0,
               retain: bool = False, packet_id: int | None = None,
               dup: bool = False) -> bytes:
    flags = (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = enc_str(topic)
    if qos > 0:
        if not packet_id:
            raise ValueError("QoS>0 PUBLISH needs a packet id")
        body += enc_u16(packet_id)
    body += enc_props(version) + payload
    return enc_packet(PUBLISH, flags, body)


def mk_ack(version: int, ptype: int, packet_id: int, reason: int = 0) -> bytes:
    """PUBACK / PUBREC / PUBREL / PUBCOMP."""
    flags = 0x02 if ptype == PUBREL else 0
    body = enc_u16(packet_id)
    if version == V5:
        body += bytes([reason]) + enc_props(version)
    return enc_packet(ptype, flags, body)


def mk_subscribe(version: int, packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    body = enc_u16(packet_id) + enc_props(version)
    for topic_filter, qos in filters:
        body += enc_str(topic_filter) + bytes([qos & 0x03])
    return enc_packet(SUBSCRIBE, 0x02, body)


def mk_unsubscribe(version: int, packet_id: int, filters: list[str]) -> bytes:
    body = enc_u16(packet_id) + enc_props(version)
    for topic_filter in filters:
        body += enc_str(topic_filter)
    return enc_packet(UNSUBSCRIBE, 0x02, body)


def mk_pingreq() -> bytes:
    return enc_packet(PINGREQ, 0, b"")


def mk_disconnect(version: int, reason: int = 0) -> bytes:
    if version == V5 and reason != 0:
        return enc_packet(DISCONNECT, 0, bytes([reason]) + enc_props(version))
    return enc_packet(DISCONNECT, 0, b"")


def decode_packet(version: int, first: int, body: bytes) -> Packet:
    """Decode one packet coming from a broker."""
    ptype, flags = first >> 4, first & 0x0F
    pkt = Packet(ptype=ptype, flags=flags)
    cur = Cursor(body)
    if ptype == CONNACK:
        ack_flags = cur.u8()
        pkt.session_present = bool(ack_flags & 0x01)
        pkt.reason = cur.u8()
        if version == V5 and cur.remaining():
            pkt.props = dec_props(cur)
    elif ptype == PUBLISH:
        pkt.qos = (flags >> 1) & 0x03
        if pkt.qos == 3:
            raise ProtocolError("PUBLISH with QoS 3")
        pkt.retain = bool(flags & 0x01)
        pkt.dup = bool(flags & 0x08)
        pkt.topic = cur.str()
        if pkt.qos > 0:
            pkt.packet_id = cur.u16()
        if version == V5:
            pkt.props = dec_props(cur)
        pkt.payload = cur.rest()
    elif ptype in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        if ptype == PUBREL and flags != 0x02:
            raise ProtocolError(f"PUBREL with flags 0x{flags:x}")
        pkt.packet_id = cur.u16()
        pkt.reason = 0
        if version == V5 and cur.remaining():
            pkt.reason = cur.u8()
            if cur.remaining():
                pkt.props = dec_props(cur)
    elif ptype == SUBACK:
        pkt.packet_id = cur.u16()
        if version == V5:
            pkt.props = dec_props(cur)
        pkt.reasons = list(cur.rest())
    elif ptype == UNSUBACK:
        pkt.packet_id = cur.u16()
        if version == V5:
            pkt.props = dec_props(cur)
            pkt.reasons = list(cur.rest())
    elif ptype == PINGRESP:
        pass
    elif ptype in (DISCONNECT, AUTH):
        if version != V5 and ptype == AUTH:
            raise ProtocolError("AUTH packet on an MQTT 3.1.1 connection")
        pkt.reason = 0
        if cur.remaining():
            pkt.reason = cur.u8()
            if cur.remaining():
                pkt.props = dec_props(cur)
    else:
        raise ProtocolError(f"unexpected packet type {ptype} from server")
    if cur.remaining():
        raise ProtocolError(f"{pkt.name}: {cur.remaining()} trailing bytes")
    return pkt


async def read_packet(reader: asyncio.StreamReader, version: int) -> Packet | None:
    """Read one packet; None on a clean EOF at a packet boundary."""
    first = await reader.read(1)
    if not first:
        return None
    length, mult = 0, 1
    for i in range(4):
        b = await reader.readexactly(1)
        length += (b[0] & 0x7F) * mult
        if not b[0] & 0x80:
            break
        mult *= 128
    else:
        raise ProtocolError("malformed remaining length")
    body = await reader.readexactly(length) if length else b""
    return decode_packet(version, first[0], body)


# --------------------------------------------------------------------------
# QUIC transport
# --------------------------------------------------------------------------

TLS_ALERTS = {
    10: "unexpected_message", 40: "handshake_failure", 42: "bad_certificate",
    43: "unsupported_certificate", 44: "certificate_revoked",
    45: "certificate_expired", 46: "certificate_unknown",
    47: "illegal_parameter", 48: "unknown_ca", 50: "decode_error",
    51: "decrypt_error", 70: "protocol_version", 80: "internal_error",
    109: "missing_extension", 112: "unrecognized_name",
    116: "certificate_required", 120: "no_application_protocol",
}


def describe_close(ev: ConnectionTerminated | None) -> str:
    if ev is None:
        return "no CONNECTION_CLOSE seen"
    code = ev.error_code
    if 0x100 <= code <= 0x1FF:
        alert = code - 0x100
        what = f"TLS alert {alert} {TLS_ALERTS.get(alert, '')}".rstrip()
        kind = f"CRYPTO_ERROR 0x{code:x} = {what}"
    elif ev.frame_type is None:
        kind = f"application error 0x{code:x}"
    else:
        kind = f"transport error 0x{code:x}"
    reason = f": {ev.reason_phrase}" if ev.reason_phrase else ""
    return f"{kind}{reason}"


class ClientProtocol(QuicConnectionProtocol):
    """Records why the connection ended and turns stream resets into EOF."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.terminated: ConnectionTerminated | None = None
        self.stream_resets: dict[int, int] = {}
        self.socket_error: Exception | None = None
        self.readers: dict[int, asyncio.StreamReader] = {}

    def quic_event_received(self, event) -> None:
        if isinstance(event, ConnectionTerminated):
            self.terminated = event
        elif isinstance(event, StreamReset):
            self.stream_resets[event.stream_id] = event.error_code
            reader = self.readers.get(event.stream_id)
            if reader is not None:
                reader.feed_eof()
        super().quic_event_received(event)

    def error_received(self, exc: Exception) -> None:  # ICMP errors, if the OS reports them
        self.socket_error = exc


def quic_config(args) -> QuicConfiguration:
    cfg = QuicConfiguration(is_client=True, alpn_protocols=["mqtt"], idle_timeout=30.0)
    if args.server_name:
        cfg.server_name = args.server_name
    if args.insecure:
        cfg.verify_mode = ssl.CERT_NONE
    elif args.cafile:
        cfg.load_verify_locations(cafile=args.cafile)
    return cfg


def check_cafile(path: str) -> None:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise Fail(f"cannot read --cafile {path}: {exc.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise Fail(f"--cafile {path} contains no PEM certificate")


class Session:
    """One MQTT connection over one QUIC connection / one bidi stream."""

    def __init__(self, name: str, args, version: int):
        self.name = name
        self.args = args
        self.version = version
        self.proto: ClientProtocol | None = None
        self._cm = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.stream_id: int | None = None
        self._next_id = 0
        self._rx_task: asyncio.Task | None = None
        self._control: list[Packet] = []
        self.messages: list[Packet] = []
        self._changed = asyncio.Event()
        self.eof = False
        self.rx_error: str | None = None
        self.inbound_qos2: set[int] = set()   # PUBREC sent, waiting for PUBREL
        self.qos2_completed = 0                # PUBREL received, PUBCOMP sent
        self.fin_sent = False

    # ---- setup / teardown ----------------------------------------------

    async def open(self) -> None:
        holder: list[ClientProtocol] = []

        def factory(*a, **kw):
            p = ClientProtocol(*a, **kw)
            holder.append(p)
            return p

        where = f"{self.args.host}:{self.args.port}"
        self._cm = connect(self.args.host, self.args.port,
                           configuration=quic_config(self.args),
                           create_protocol=factory)
        try:
            self.proto = await asyncio.wait_for(self._cm.__aenter__(), HANDSHAKE_TIMEOUT)
        except asyncio.TimeoutError:
            self._cm = None
            sock_err = holder[0].socket_error if holder else None
            extra = f" (socket error: {sock_err})" if sock_err else ""
            raise Fail(f"{self.name}: QUIC handshake with {where} got no answer within "
                       f"{HANDSHAKE_TIMEOUT:.0f} s - nothing listening there, or not a "
                       f"QUIC server{extra}") from None
        except ConnectionError:
            self._cm = None
            ev = holder[0].terminated if holder else None
            detail = describe_close(ev)
            hint = ""
            if ev is not None and ev.error_code - 0x100 in (42, 43, 45, 46, 48):
                hint = (" - server certificate not trusted (check --cafile / "
                        "--server-name, or use --insecure)")
            elif ev is not None and ev.error_code - 0x100 == 120:
                hint = " - server does not accept ALPN 'mqtt'"
            raise Fail(f"{self.name}: QUIC/TLS handshake with {where} failed: "
                       f"{detail}{hint}") from None
        except OSError as exc:
            self._cm = None
            raise Fail(f"{self.name}: cannot reach {where}: {exc}") from None
        alpn = self.proto._quic.tls.alpn_negotiated if hasattr(self.proto._quic, "tls") else None
        if alpn not in (None, "mqtt"):
            raise Fail(f"{self.name}: server negotiated ALPN {alpn!r}, expected 'mqtt'")
        # The stream only exists on the wire once we send on it (the CONNECT).
        self.reader, self.writer = await self.proto.create_stream()
        self.stream_id = self.writer.get_extra_info("stream_id")
        self.proto.readers[self.stream_id] = self.reader
        self._rx_task = asyncio.get_running_loop().create_task(self._rx_loop())

    def _send_side_acked(self) -> bool | None:
        """True once our FIN (and all data) on the stream has been ACKed.

        Uses aioquic internals; returns None if they are not available."""
        streams = getattr(self.proto._quic, "_streams", None)
        if streams is None:
            return None
        stream = streams.get(self.stream_id)
        if stream is None:  # both directions done, aioquic discarded it
            return True
        sender = getattr(stream, "sender", None)
        return None if sender is None else bool(sender.is_finished)

    async def finish(self, timeout: float = 3.0) -> None:
        """Send FIN on the stream, wait until it is ACKed, then close QUIC cleanly."""
        if self.writer is not None and not self.fin_sent:
            self.fin_sent = True
            self.writer.write_eof()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while loop.time() < deadline and self.proto.terminated is None:
                acked = self._send_side_acked()
                if acked is None:
                    await asyncio.sleep(0.3)
                    break
                if acked:
                    break
                await asyncio.sleep(0.01)
            # give the server a moment to FIN back / close (not required)
            if not self.eof:
                try:
                    await asyncio.wait_for(self._wait(lambda: self.eof), 0.5)
                except asyncio.TimeoutError:
                    pass
        await self.close_quic()

    async def close_quic(self, error_code: int = 0, reason: str = "") -> None:
        if self.proto is not None and self.proto.terminated is None:
            self.proto.close(error_code=error_code, reason_phrase=reason)
        await self._teardown()

    async def abort(self, error_code: int, reason: str) -> None:
        """Abrupt close: CONNECTION_CLOSE (application error) without MQTT DISCONNECT
        and without a FIN on the MQTT stream."""
        await self.close_quic(error_code, reason)

    async def _teardown(self) -> None:
        if self._rx_task is not None:
            self._rx_task.cancel()
            try:
                await self._rx_task
            except (asyncio.CancelledError, Exception):
                pass
            self._rx_task = None
        if self._cm is not None:
            cm, self._cm = self._cm, None
            try:
                await asyncio.wait_for(cm.__aexit__(None, None, None), 5.0)
            except (asyncio.TimeoutError, Exception):
                pass

    # ---- receive side ---------------------------------------------------

    def _closed_reason(self) -> str:
        parts = []
        if self.rx_error:
            parts.append(self.rx_error)
        if self.stream_id in self.proto.stream_resets:
            parts.append(f"stream reset by server (error 0x{self.proto.stream_resets[self.stream_id]:x})")
        if self.proto.terminated is not None:
            parts.append("QUIC connection closed: " + describe_close(self.proto.terminated))
        elif self.eof and not parts:
            parts.append("server sent FIN on the MQTT stream")
        return "; ".join(parts) or "connection closed"

    def _send(self, data: bytes) -> None:
        if self.fin_sent:
            raise Fail(f"{self.name}: internal error: send after FIN")
        if self.proto.terminated is not None:
            raise Fail(f"{self.name}: cannot send, {self._closed_reason()}")
        self.writer.write(data)

    async def _rx_loop(self) -> None:
        try:
            while True:
                pkt = await read_packet(self.reader, self.version)
                if pkt is None:
                    break
                if pkt.ptype == PUBLISH:
                    if pkt.qos == 1:
                        self._send(mk_ack(self.version, PUBACK, pkt.packet_id))
                    elif pkt.qos == 2:
                        self._send(mk_ack(self.version, PUBREC, pkt.packet_id))
                        if pkt.packet_id in self.inbound_qos2:
                            # redelivery of a message we already have: don't duplicate it
                            self._changed.set()
                            continue
                        self.inbound_qos2.add(pkt.packet_id)
                    self.messages.append(pkt)
                elif pkt.ptype == PUBREL:
                    if pkt.packet_id not in self.inbound_qos2:
                        self.rx_error = f"PUBREL for unknown packet id {pkt.packet_id}"
                    self.inbound_qos2.discard(pkt.packet_id)
                    self.qos2_completed += 1
                    self._send(mk_ack(self.version, PUBCOMP, pkt.packet_id))
                else:
                    self._control.append(pkt)
                self._changed.set()
        except asyncio.IncompleteReadError:
            self.rx_error = "stream ended in the middle of an MQTT packet"
        except ProtocolError as exc:
            self.rx_error = f"protocol error: {exc}"
        except Fail as exc:
            self.rx_error = str(exc)
        finally:
            self.eof = True
            self._changed.set()

    async def _wait(self, predicate) -> None:
        while not predicate():
            self._changed.clear()
            await self._changed.wait()

    async def expect(self, ptype: int, packet_id: int | None = None,
                     timeout: float = STEP_TIMEOUT) -> Packet:
        what = PACKET_NAMES[ptype] + (f" (id {packet_id})" if packet_id else "")
        found: list[Packet] = []

        def ready() -> bool:
            for i, pkt in enumerate(self._control):
                if pkt.ptype == ptype and (packet_id is None or pkt.packet_id == packet_id):
                    found.append(self._control.pop(i))
                    return True
                if pkt.ptype == DISCONNECT and ptype != DISCONNECT:
                    raise Fail(f"{self.name}: server sent DISCONNECT reason 0x{pkt.reason:02x}"
                               f"{pkt.reason_string()} while waiting for {what}")
                # acks for other packet ids may legitimately be queued; anything
                # else showing up unrequested (CONNACK twice, AUTH, ...) is wrong
                if pkt.ptype not in (PUBACK, PUBREC, PUBCOMP, SUBACK, UNSUBACK, PINGRESP):
                    raise Fail(f"{self.name}: unexpected {pkt.name} while waiting for {what}")
            if self.eof:
                raise Fail(f"{self.name}: connection ended while waiting for {what}: "
                           f"{self._closed_reason()}")
            return False

        try:
            await asyncio.wait_for(self._wait(ready), timeout)
        except asyncio.TimeoutError:
            raise Fail(f"{self.name}: no {what} within {timeout:.0f} s") from None
        return found[0]

    async def next_message(self, timeout: float = STEP_TIMEOUT, what: str = "PUBLISH") -> Packet:
        def ready() -> bool:
            if self.messages:
                return True
            if self.eof:
                raise Fail(f"{self.name}: connection ended while waiting for {what}: "
                           f"{self._closed_reason()}")
            return False

        try:
            await asyncio.wait_for(self._wait(ready), timeout)
        except asyncio.TimeoutError:
            raise Fail(f"{self.name}: no {what} within {timeout:g} s") from None
        return self.messages.pop(0)

    # ---- MQTT operations -------------------------------------------------

    def packet_id(self) -> int:
        self._next_id = self._next_id % 0xFFFF + 1
        return self._next_id

    async def mqtt_connect(self, client_id: str, will: Will | None = None,
                           keepalive: int = 30) -> Packet:
        self._send(mk_connect(self.version, client_id, keepalive, True, will))
        ack = await self.expect(CONNACK)
        if ack.reason != 0:
            raise Fail(f"{self.name}: CONNACK reason 0x{ack.reason:02x}{ack.reason_string()}")
        if ack.session_present:
            raise Fail(f"{self.name}: CONNACK session_present=1 despite clean start")
        return ack

    async def subscribe(self, topic_filter: str, qos: int) -> int:
        pid = self.packet_id()
        self._send(mk_subscribe(self.version, pid, [(topic_filter, qos)]))
        ack = await self.expect(SUBACK, pid)
        if len(ack.reasons) != 1:
            raise Fail(f"{self.name}: SUBACK carries {len(ack.reasons)} codes, expected 1")
        if ack.reasons[0] != qos:
            raise Fail(f"{self.name}: SUBACK for {topic_filter!r} granted 0x{ack.reasons[0]:02x}"
                       f"{ack.reason_string()}, expected QoS {qos}")
        return ack.reasons[0]

    async def unsubscribe(self, topic_filter: str) -> None:
        pid = self.packet_id()
        self._send(mk_unsubscribe(self.version, pid, [topic_filter]))
        ack = await self.expect(UNSUBACK, pid)
        if self.version == V5 and ack.reasons != [0]:
            raise Fail(f"{self.name}: UNSUBACK reason codes {ack.reasons}, expected [0]")

    async def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> None:
        """Publish and run the sender side of the QoS flow to completion."""
        pid = self.packet_id() if qos else None
        self._send(mk_publish(self.version, topic, payload, qos, retain, pid))
        if qos == 1:
            ack = await self.expect(PUBACK, pid)
            if ack.reason >= 0x80:
                raise Fail(f"{self.name}: PUBACK reason 0x{ack.reason:02x}{ack.reason_string()}")
        elif qos == 2:
            rec = await self.expect(PUBREC, pid)
            if rec.reason >= 0x80:
                raise Fail(f"{self.name}: PUBREC reason 0x{rec.reason:02x}{rec.reason_string()}")
            self._send(mk_ack(self.version, PUBREL, pid))
            comp = await self.expect(PUBCOMP, pid)
            if comp.reason != 0:
                raise Fail(f"{self.name}: PUBCOMP reason 0x{comp.reason:02x}{comp.reason_string()}")

    async def ping(self) -> None:
        self._send(mk_pingreq())
        await self.expect(PINGRESP)

    async def disconnect_and_close(self) -> None:
        self._send(mk_disconnect(self.version))
        await self.finish()

    async def wait_inbound_qos2_done(self, timeout: float = STEP_TIMEOUT) -> None:
        try:
            await asyncio.wait_for(self._wait(lambda: not self.inbound_qos2 or self.eof), timeout)
        except asyncio.TimeoutError:
            raise Fail(f"{self.name}: no PUBREL for inbound QoS 2 id(s) "
                       f"{sorted(self.inbound_qos2)}") from None
        if self.inbound_qos2:
            raise Fail(f"{self.name}: connection ended before PUBREL: {self._closed_reason()}")
        if self.rx_error:
            raise Fail(f"{self.name}: {self.rx_error}")


# --------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------

class Progress:
    step = "starting"


def step(text: str) -> None:
    Progress.step = text


def new_client_id(tag: str) -> str:
    return f"interop-{tag}-{uuid.uuid4().hex[:12]}"


async def scenario_pubsub(args, version: int) -> str:
    cid = new_client_id("ps")
    s = Session("pubsub", args, version)
    step("QUIC handshake")
    await s.open()
    try:
        step("CONNECT")
        await s.mqtt_connect(cid)
        step("SUBSCRIBE")
        base = f"interop/{cid}"
        await s.subscribe(f"{base}/#", 2)
        sent = []
        for qos in (0, 1, 2):
            step(f"PUBLISH QoS {qos}")
            topic, payload = f"{base}/q{qos}", f"hello-{qos}".encode()
            await s.publish(topic, payload, qos)
            sent.append((topic, payload, qos))
        step("receiving the 3 messages back")
        got = {}
        for _ in range(3):
            msg = await s.next_message(what=f"message {len(got) + 1}/3 back")
            if msg.topic in got:
                raise Fail(f"pubsub: duplicate delivery on {msg.topic}")
            got[msg.topic] = msg
        for topic, payload, qos in sent:
            msg = got.get(topic)
            if msg is None:
                raise Fail(f"pubsub: nothing received on {topic} (got {sorted(got)})")
            if msg.payload != payload:
                raise Fail(f"pubsub: {topic}: payload {msg.payload!r}, expected {payload!r}")
            want_qos = min(qos, 2)
            if msg.qos != want_qos:
                raise Fail(f"pubsub: {topic}: delivered QoS {msg.qos}, expected {want_qos}")
            if msg.retain:
                raise Fail(f"pubsub: {topic}: RETAIN set on a live message")
        step("inbound QoS 2 PUBREL/PUBCOMP")
        await s.wait_inbound_qos2_done()
        step("UNSUBSCRIBE")
        await s.unsubscribe(f"{base}/#")
        step("PINGREQ")
        await s.ping()
        if s.messages:
            raise Fail(f"pubsub: unexpected extra message on {s.messages[0].topic}")
        step("DISCONNECT + FIN")
        await s.disconnect_and_close()
    finally:
        await s.close_quic()
    return (f"pubsub mqtt={args.mqtt}: CONNACK 0, SUBACK 2, QoS0/1/2 published and "
            f"received back, UNSUBACK, PINGRESP, DISCONNECT+FIN ({cid})")


async def scenario_retained(args, version: int) -> str:
    cid1 = new_client_id("rp")
    cid2 = new_client_id("rs")
    topic = f"interop/retained/{cid1}"
    payload = f"retained-{cid1}".encode()

    pub = Session("retained-publisher", args, version)
    step("publisher: QUIC handshake")
    await pub.open()
    try:
        step("publisher: CONNECT")
        await pub.mqtt_connect(cid1)
        step("publisher: retained PUBLISH QoS 1")
        await pub.publish(topic, payload, 1, retain=True)
        step("publisher: DISCONNECT + FIN")
        await pub.disconnect_and_close()
    finally:
        await pub.close_quic()

    sub = Session("retained-subscriber", args, version)
    step("subscriber: QUIC handshake")
    await sub.open()
    try:
        step("subscriber: CONNECT")
        await sub.mqtt_connect(cid2)
        step("subscriber: SUBSCRIBE")
        await sub.subscribe(topic, 1)
        step("subscriber: waiting for the retained message")
        msg = await sub.next_message(what="retained message")
        if msg.topic != topic or msg.payload != payload:
            raise Fail(f"retained: got {msg.topic!r}={msg.payload!r}, expected {topic!r}={payload!r}")
        if not msg.retain:
            raise Fail("retained: message arrived without the RETAIN flag")
        if msg.qos != 1:
            raise Fail(f"retained: delivered QoS {msg.qos}, expected 1")
        step("subscriber: clearing the retained message")
        await sub.publish(topic, b"", 1, retain=True)
        # We are subscribed, so the (empty) clearing publish comes back live.
        await sub.next_message(what="echo of the clearing publish")
        step("subscriber: checking the retained message is gone")
        await sub.unsubscribe(topic)
        await sub.subscribe(topic, 1)
        try:
            stale = await sub.next_message(timeout=0.7)
        except Fail:
            stale = None
        if stale is not None:
            raise Fail(f"retained: message still retained after clearing: {stale.payload!r}")
        step("subscriber: DISCONNECT + FIN")
        await sub.disconnect_and_close()
    finally:
        await sub.close_quic()
    return (f"retained mqtt={args.mqtt}: retained QoS1 message delivered to a new "
            f"subscriber with RETAIN=1, then cleared ({topic})")


async def scenario_will(args, version: int) -> str:
    cid_a = new_client_id("wa")
    cid_b = new_client_id("wb")
    topic = f"interop/will/{cid_a}"
    a = Session("will-A", args, version)
    b = Session("will-B", args, version)
    try:
        step("A: QUIC handshake")
        await a.open()
        step("A: CONNECT with Will")
        await a.mqtt_connect(cid_a, will=Will(topic, b"gone", qos=1), keepalive=60)
        step("B: QUIC handshake")
        await b.open()
        step("B: CONNECT")
        await b.mqtt_connect(cid_b)
        step("B: SUBSCRIBE")
        await b.subscribe(topic, 1)
        step("A: abrupt QUIC close (no DISCONNECT, no FIN)")
        await a.abort(0x1, "interop: abrupt close without MQTT DISCONNECT")
        step("B: waiting for the Will message")
        msg = await b.next_message(timeout=WILL_TIMEOUT, what="Will message")
        if msg.topic != topic or msg.payload != b"gone":
            raise Fail(f"will: got {msg.topic!r}={msg.payload!r}, expected {topic!r}=b'gone'")
        if msg.qos != 1:
            raise Fail(f"will: delivered QoS {msg.qos}, expected 1")
        step("B: DISCONNECT + FIN")
        await b.disconnect_and_close()
    finally:
        await a.close_quic()
        await b.close_quic()
    return (f"will mqtt={args.mqtt}: abrupt QUIC close of A (app error 0x1, no DISCONNECT) "
            f"delivered Will 'gone' to B ({topic})")


SCENARIOS = {
    "pubsub": scenario_pubsub,
    "retained": scenario_retained,
    "will": scenario_will,
}


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="MQTT-over-QUIC interop client (aioquic)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    trust = p.add_mutually_exclusive_group()
    trust.add_argument("--cafile", help="PEM file with the CA / self-signed server cert to trust")
    trust.add_argument("--insecure", action="store_true", help="do not verify the server certificate")
    p.add_argument("--server-name", help="TLS server name (SNI / verification), default --host")
    p.add_argument("--mqtt", default="5", choices=["5", "5.0", "3.1.1", "4"],
                   help="MQTT protocol version (default 5)")
    p.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    return p.parse_args(argv)


def quiet_aioquic() -> None:
    """aioquic logs handshake errors via logging's last-resort handler; we
    report them ourselves in a single FAIL line instead."""
    quic_logger = logging.getLogger("quic")
    quic_logger.addHandler(logging.NullHandler())
    quic_logger.propagate = False


def loop_exception_handler(loop, context) -> None:
    # After a handshake timeout aioquic fails its internal "connected" future
    # with ConnectionError once nobody awaits it any more; that is expected.
    if isinstance(context.get("exception"), ConnectionError):
        return
    loop.default_exception_handler(context)


async def run_scenario(args, version: int) -> str:
    asyncio.get_running_loop().set_exception_handler(loop_exception_handler)
    return await SCENARIOS[args.scenario](args, version)


def fail(msg: str) -> None:
    sys.stdout.flush()
    print(f"FAIL: {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    version = V5 if args.mqtt in ("5", "5.0") else V311
    quiet_aioquic()

    def watchdog():
        fail(f"overall timeout of {OVERALL_TIMEOUT:.0f} s hit during: {Progress.step}")
        os._exit(1)

    timer = threading.Timer(OVERALL_TIMEOUT, watchdog)
    timer.daemon = True
    timer.start()
    try:
        if args.cafile:
            check_cafile(args.cafile)
        summary = asyncio.run(run_scenario(args, version))
    except Fail as exc:
        timer.cancel()
        fail(str(exc))
        return 1
    except KeyboardInterrupt:
        timer.cancel()
        fail("interrupted")
        return 1
    except Exception as exc:  # anything unexpected still gets one clear line
        timer.cancel()
        fail(f"unexpected error during {Progress.step}: {type(exc).__name__}: {exc}")
        return 1
    timer.cancel()
    print(f"ok: {summary}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
