#!/usr/bin/env python3
"""A userspace network impairer on NFQUEUE (stdlib only; netem's delay, loss and reordering).

Binds to an NFQUEUE queue over a raw NETLINK_NETFILTER socket and gives every queued packet a
verdict: DROP at once with probability --loss, otherwise ACCEPT after --delay-ms (or after twice
that, with probability --reorder, so that later packets overtake it). Verdicts can be given in
any order and at any time, which is all that delay and reordering need.

Route packets to it with e.g. `iptables -A INPUT -i veth0 -j NFQUEUE --queue-num 1`. Without
`--queue-bypass` nothing passes while no impairer is bound, which is what we want.

SIGTERM/SIGINT: accept every held packet, write the JSON stats to --stats, exit 0. Stats: seen,
dropped, reordered, enobufs (netlink overflows: packets the kernel dropped before we saw them),
loss_rate = dropped/seen, max_len (largest packet: above the MTU means offloads are on), cpu_s,
late_*_us (how late held packets were released against their due time) and the kernel's own
counters for the queue (queue_dropped: queue full; user_dropped: netlink overflow).

Caveat: the kernel timestamps a packet when it arrives, before the hook, so a receiver that
reads kernel receive timestamps (SO_TIMESTAMP, e.g. `ping` without -U) does not see the delay
added on its side.
"""
import argparse
import ctypes
import errno
import heapq
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import time

# Constants from linux/netlink.h, linux/netfilter/nfnetlink.h and nfnetlink_queue.h.
NETLINK_NETFILTER = 12
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = NFNL_SUBSYS_QUEUE << 8 | 0
NFQNL_MSG_VERDICT = NFNL_SUBSYS_QUEUE << 8 | 1
NFQNL_MSG_CONFIG = NFNL_SUBSYS_QUEUE << 8 | 2
NFQNL_CFG_CMD_BIND = 1
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQNL_COPY_PACKET = 2
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_PAYLOAD, NFQA_CAP_LEN = 1, 2, 10, 13
NF_DROP, NF_ACCEPT = 0, 1
SOL_NETLINK = 270
PR_SET_TIMERSLACK = 29
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Python 3.11 lacks the name

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid (host order)
NFGENMSG = struct.Struct(">BBH")    # family, version, res_id (the queue number, big endian)
NLATTR = struct.Struct("=HH")       # len, type (host order)
# Only the IPv4 header is copied: enough to see the packet's length, cheap to copy.
COPY_RANGE = 20


def attr(kind, payload):
    pad = b"\0" * (-len(payload) % 4)
    return NLATTR.pack(NLATTR.size + len(payload), kind) + payload + pad


class Queue:
    """One bound NFQUEUE queue."""

    def __init__(self, num, maxlen=8192, rcvbuf=64 << 20):
        self.num = num
        self.seq = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        # SO_RCVBUFFORCE ignores net.core.rmem_max (we are root): a burst must not overflow it.
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        self.sock.bind((0, 0))
        self.config(attr(NFQA_CFG_CMD, struct.pack(">BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET)))
        self.config(attr(NFQA_CFG_PARAMS, struct.pack(">IB", COPY_RANGE, NFQNL_COPY_PACKET)))
        self.config(attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", maxlen)))
        self.sock.setblocking(False)
        self.buf = bytearray(65536)
        # One preallocated verdict message; only verdict and id change.
        self.verdict_msg = bytearray(self.message(NFQNL_MSG_VERDICT, 0, attr(NFQA_VERDICT_HDR, bytes(8))))

    def message(self, kind, flags, attrs):
        self.seq += 1
        body = NFGENMSG.pack(socket.AF_UNSPEC, 0, self.num) + attrs
        return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | flags, self.seq, 0) + body

    def config(self, attrs):
        """Sends one config message and waits for its ack (raises on error)."""
        self.sock.send(self.message(NFQNL_MSG_CONFIG, NLM_F_ACK, attrs))
        while True:
            data = self.sock.recv(65536)
            _, kind, _, seq, _ = NLMSGHDR.unpack_from(data)
            if kind == NLMSG_ERROR and seq == self.seq:
                (err,) = struct.unpack_from("=i", data, NLMSGHDR.size)
                if err:
                    raise OSError(-err, f"NFQUEUE config of queue {self.num}: {os.strerror(-err)}")
                return

    def verdict(self, packet_id, verdict):
        # Offset: nlmsghdr 16 + nfgenmsg 4 + nlattr 4.
        struct.pack_into(">II", self.verdict_msg, 24, verdict, packet_id)
        self.sock.send(self.verdict_msg)

    def recv(self):
        """(packet_id, length) of the next queued packet, or None if there is none now."""
        while True:
            n = self.sock.recv_into(self.buf)  # BlockingIOError when empty
            _, kind, _, _, _ = NLMSGHDR.unpack_from(self.buf)
            if kind != NFQNL_MSG_PACKET:
                continue
            off, packet_id, length = NLMSGHDR.size + NFGENMSG.size, None, 0
            while off + NLATTR.size <= n:
                alen, atype = NLATTR.unpack_from(self.buf, off)
                atype &= 0x3FFF  # strip NLA_F_NESTED / NLA_F_NET_BYTEORDER
                if atype == NFQA_PACKET_HDR:
                    (packet_id,) = struct.unpack_from(">I", self.buf, off + 4)
                elif atype == NFQA_CAP_LEN:  # present when the packet is longer than the copy
                    (length,) = struct.unpack_from(">I", self.buf, off + 4)
                elif atype == NFQA_PAYLOAD and not length:
                    length = alen - NLATTR.size
                off += (alen + 3) & ~3
            if packet_id is not None:
                return packet_id, length


def kernel_queue_stats(num):
    """This netns's counters for the queue from /proc (queue_dropped: queue full;
    user_dropped: the netlink socket buffer overflowed)."""
    try:
        with open("/proc/net/netfilter/nfnetlink_queue") as f:
            for line in f:
                v = line.split()
                if int(v[0]) == num:
                    return {"queue_dropped": int(v[5]), "user_dropped": int(v[6]), "id_sequence": int(v[7])}
    except (OSError, ValueError, IndexError):
        pass
    return {}


class Lateness:
    """How late packets were released against their due time: mean, max and a 10 us histogram."""

    def __init__(self):
        self.n, self.total, self.max, self.hist = 0, 0.0, 0.0, [0] * 1001  # last bucket: >= 10 ms

    def add(self, late):
        self.n += 1
        self.total += late
        if late > self.max:
            self.max = late
        self.hist[min(int(late * 1e5), 1000)] += 1

    def quantile(self, q):
        want, acc = q * self.n, 0
        for i, c in enumerate(self.hist):
            acc += c
            if acc >= want:
                return (i + 1) * 10
        return 0

    def summary(self):
        if not self.n:
            return {}
        return {"late_mean_us": round(self.total / self.n * 1e6, 1), "late_p50_us": self.quantile(0.5),
                "late_p99_us": self.quantile(0.99), "late_p999_us": self.quantile(0.999),
                "late_max_us": round(self.max * 1e6, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queue", type=int, required=True, help="NFQUEUE queue number")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="added one-way delay")
    ap.add_argument("--loss", type=float, default=0.0, help="drop probability (0..1)")
    ap.add_argument("--reorder", type=float, default=0.0,
                    help="probability that a packet is held 2*delay (delay+2 ms if delay is 0)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--stats", help="write JSON stats here on exit")
    a = ap.parse_args()

    # Release times must not wait for the CPU: with the broker and the load generator busy on a
    # small machine, a normal-priority impairer wakes up milliseconds late. Real-time priority
    # makes it preempt them (the kernel's RT throttling still caps it at 95% of a CPU). Timer
    # slack (50 us by default) would add that much to every wake-up.
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (OSError, AttributeError):
        print("impair: no real-time priority; release times may be late under load", file=sys.stderr)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass

    rng = random.Random(a.seed)
    delay = a.delay_ms / 1000
    reorder_delay = 2 * delay if delay > 0 else 0.002
    q = Queue(a.queue)

    # A signal only sets a flag; the wakeup fd makes select() return at once.
    stop = []
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.append(1))

    held = []  # heap of (due, seq, packet_id); seq keeps equal due times in arrival order
    seen = dropped = reordered = enobufs = max_len = 0
    late = Lateness()
    now = time.monotonic
    print(f"impair: queue {a.queue} delay {a.delay_ms} ms loss {a.loss} reorder {a.reorder}", flush=True)

    def release(t, timed=True):
        while held and held[0][0] <= t:
            due, _, pid = heapq.heappop(held)
            q.verdict(pid, NF_ACCEPT)
            if timed:
                late.add(t - due)

    while not stop:
        timeout = max(0.0, held[0][0] - now()) if held else None
        readable, _, _ = select.select([q.sock, wake_r], [], [], timeout)
        if wake_r in readable:
            os.read(wake_r, 512)
        # Drain what is queued, but release due packets between receives so that a burst does
        # not delay them; bounded so a flood cannot starve the timers.
        for _ in range(256):
            try:
                got = q.recv()
            except BlockingIOError:
                break
            except OSError as e:  # ENOBUFS: the kernel dropped packets it could not hand us
                if e.errno != errno.ENOBUFS:
                    raise
                enobufs += 1
                continue
            t = now()
            pid, length = got
            seen += 1
            max_len = max(max_len, length)
            if a.loss and rng.random() < a.loss:
                dropped += 1
                q.verdict(pid, NF_DROP)
            else:
                hold = delay
                if a.reorder and rng.random() < a.reorder:
                    reordered += 1
                    hold = reorder_delay
                if hold:
                    heapq.heappush(held, (t + hold, seen, pid))
                else:
                    q.verdict(pid, NF_ACCEPT)
            release(t)
        release(now())

    release(float("inf"), timed=False)  # accept everything still held
    stats = {"queue": a.queue, "delay_ms": a.delay_ms, "loss": a.loss, "reorder": a.reorder,
             "seen": seen, "dropped": dropped, "reordered": reordered, "enobufs": enobufs,
             "loss_rate": dropped / seen if seen else 0.0, "max_len": max_len,
             "cpu_s": round(sum(os.times()[:2]), 2),
             **late.summary(), **kernel_queue_stats(a.queue)}
    if a.stats:
        tmp = a.stats + ".tmp"
        with open(tmp, "w") as f:
            json.dump(stats, f)
        os.replace(tmp, a.stats)
    print("impair: " + json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
