#!/usr/bin/env python3
"""QUIC -> TCP relay: puts an MQTT-over-QUIC front end on a plain TCP broker.

Wire convention (EMQX compatible): QUIC v1 + TLS 1.3, ALPN "mqtt"; the
client opens one bidirectional stream which carries the whole MQTT byte
stream.  For every QUIC connection the relay opens one TCP connection to
the upstream broker when the client's first bidirectional stream appears
and copies bytes both ways:

  * TCP EOF from upstream   -> FIN on the stream, then close the QUIC connection
  * stream FIN / RESET, or the QUIC connection closing -> close the TCP socket

Usage:
  python3 quic_tcp_relay.py --listen-port 0 --cert CERT.pem --key KEY.pem \
      --upstream 127.0.0.1:1883

Prints exactly one line "listening 127.0.0.1:<port>" on stdout once ready;
diagnostics go to stderr.  Runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aioquic.asyncio import serve
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)

IDLE_TIMEOUT = 60.0
UPSTREAM_CONNECT_TIMEOUT = 10.0
FIN_ACK_TIMEOUT = 3.0

# Application error codes used in CONNECTION_CLOSE frames sent by the relay.
ERR_UPSTREAM_UNREACHABLE = 0x10
ERR_SHUTDOWN = 0x11

_verbose = False
_conn_counter = 0


def log(msg: str) -> None:
    if _verbose:
        print(f"relay: {msg}", file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    print(f"relay: {msg}", file=sys.stderr, flush=True)


def is_client_bidi(stream_id: int) -> bool:
    # RFC 9000 2.1: low two bits 0b00 = client-initiated, bidirectional
    return stream_id & 0x3 == 0


class RelayProtocol(QuicConnectionProtocol):
    """One QUIC connection <-> one TCP connection."""

    upstream: tuple[str, int] = ("127.0.0.1", 1883)
    live: set["RelayProtocol"] = set()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        global _conn_counter
        _conn_counter += 1
        self.tag = f"conn{_conn_counter}"
        self.stream_id: int | None = None
        self.pending = bytearray()      # stream bytes received before TCP is up
        self.pending_fin = False
        self.tcp_writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task | None = None
        self.terminated = False
        RelayProtocol.live.add(self)

    # -- QUIC side ---------------------------------------------------------

    def quic_event_received(self, event) -> None:
        # Deliberately not calling super(): we don't use aioquic's
        # StreamReader/StreamWriter adapters, we pump bytes ourselves.
        if isinstance(event, HandshakeCompleted):
            log(f"{self.tag}: handshake done, alpn={event.alpn_protocol}")
        elif isinstance(event, StreamDataReceived):
            self._on_stream_data(event)
        elif isinstance(event, (StreamReset, StopSendingReceived)):
            if event.stream_id == self.stream_id:
                log(f"{self.tag}: stream {event.stream_id} {type(event).__name__} "
                    f"error 0x{event.error_code:x} -> closing TCP")
                self._close_tcp(abort=True)
        elif isinstance(event, ConnectionTerminated):
            log(f"{self.tag}: QUIC closed error 0x{event.error_code:x} "
                f"{event.reason_phrase!r} -> closing TCP")
            self.terminated = True
            RelayProtocol.live.discard(self)
            self._close_tcp()
            if self.task is not None and self.tcp_writer is None:
                self.task.cancel()  # still connecting upstream

    def _on_stream_data(self, event: StreamDataReceived) -> None:
        sid = event.stream_id
        if self.stream_id is None:
            if not is_client_bidi(sid):
                log(f"{self.tag}: ignoring data on non client-bidi stream {sid}")
                return
            # The first client bidi stream we see is "the" MQTT stream.  aioquic
            # has no stream-opened event: a stream shows up with its first
            # STREAM frame, i.e. the first StreamDataReceived (possibly empty
            # with end_stream=True).
            self.stream_id = sid
            log(f"{self.tag}: MQTT stream {sid} opened, connecting upstream")
            self.task = asyncio.get_running_loop().create_task(self._pump())
        elif sid != self.stream_id:
            log(f"{self.tag}: ignoring data on extra stream {sid}")
            return
        if self.tcp_writer is not None:
            if event.data:
                self.tcp_writer.write(event.data)
            if event.end_stream:
                log(f"{self.tag}: stream FIN -> closing TCP")
                self._close_tcp()
        else:
            self.pending += event.data
            self.pending_fin = self.pending_fin or event.end_stream

    def _close_tcp(self, abort: bool = False) -> None:
        w = self.tcp_writer
        if w is None or w.is_closing():
            return
        if abort:
            w.transport.abort()
        else:
            w.close()  # flushes what was already written, then closes

    def _send_ack_done(self) -> bool:
        """All our stream data + FIN ACKed by the peer (aioquic internals)."""
        streams = getattr(self._quic, "_streams", None)
        if streams is None:
            return True
        stream = streams.get(self.stream_id)
        return stream is None or bool(getattr(stream.sender, "is_finished", True))

    # -- TCP side ----------------------------------------------------------

    async def _pump(self) -> None:
        host, port = self.upstream
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), UPSTREAM_CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            warn(f"{self.tag}: upstream {host}:{port} unreachable: {exc!r}")
            if not self.terminated:
                self.close(error_code=ERR_UPSTREAM_UNREACHABLE,
                           reason_phrase="upstream broker unreachable")
            return
        if self.terminated:
            writer.close()
            return
        self.tcp_writer = writer
        if self.pending:
            writer.write(bytes(self.pending))
            self.pending.clear()
        if self.pending_fin:
            self._close_tcp()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if self.terminated:
                    break
                try:
                    self._quic.send_stream_data(self.stream_id, data)
                except Exception as exc:  # stream reset / already finished by peer
                    log(f"{self.tag}: cannot forward to stream: {exc}")
                    break
                self.transmit()
        except (ConnectionError, OSError) as exc:
            log(f"{self.tag}: TCP error {exc!r}")
        finally:
            self._close_tcp()
        if self.terminated:
            return
        # Upstream EOF: FIN the stream, wait (bounded) until it is ACKed so the
        # last bytes (e.g. a server DISCONNECT) are not lost, then close QUIC.
        log(f"{self.tag}: TCP EOF -> FIN + close QUIC")
        try:
            self._quic.send_stream_data(self.stream_id, b"", end_stream=True)
            self.transmit()
        except Exception as exc:
            log(f"{self.tag}: cannot FIN stream: {exc}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FIN_ACK_TIMEOUT
        while not self.terminated and not self._send_ack_done() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if not self.terminated:
            self.close()


async def run(args) -> None:
    host, _, port = args.upstream.rpartition(":")
    RelayProtocol.upstream = (host or "127.0.0.1", int(port))

    cfg = QuicConfiguration(is_client=False, alpn_protocols=["mqtt"],
                            idle_timeout=args.idle_timeout)
    cfg.load_cert_chain(args.cert, args.key)

    server = await serve("127.0.0.1", args.listen_port, configuration=cfg,
                         create_protocol=RelayProtocol)
    # serve() returns the QuicServer datagram protocol; the bound port is only
    # reachable through its (private) transport.
    sockname = server._transport.get_extra_info("sockname")
    print(f"listening 127.0.0.1:{sockname[1]}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log("shutting down")
    for proto in list(RelayProtocol.live):
        proto._close_tcp()
        proto.close(error_code=ERR_SHUTDOWN, reason_phrase="relay shutting down")
    await asyncio.sleep(0.05)  # let the CONNECTION_CLOSE datagrams go out
    server.close()


def main(argv=None) -> int:
    global _verbose
    p = argparse.ArgumentParser(description="QUIC (ALPN mqtt) to TCP relay")
    p.add_argument("--listen-port", type=int, default=0)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--upstream", required=True, help="HOST:PORT of the TCP broker")
    p.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT)
    p.add_argument("-v", "--verbose", action="store_true", help="log connections to stderr")
    args = p.parse_args(argv)
    _verbose = args.verbose
    try:
        asyncio.run(run(args))
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        print(f"relay: fatal: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
