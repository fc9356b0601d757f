#!/usr/bin/env python3
"""Run N ranks in Linux network namespaces joined by a real, ``tc``-shaped network.

    sudo python launch/netns.py --nproc 2 --rate 100mbit -- python -m commtrain.cli train ...
    sudo python launch/netns.py --nproc 2 --rate 100mbit --measure      # achieved bandwidth

This is the real counterpart of ``commtrain.comm.LinkModel``: the simulated link delays
operations in Python; here the kernel shapes every packet. Topology::

    ns <prefix>0: eth0 192.168.77.1 --veth--+
    ns <prefix>1: eth0 192.168.77.2 --veth--+-- bridge br0 in ns <prefix>hub
    ...                                     |

Every veth end gets ``tc qdisc add dev X root tbf rate R burst B latency L``: the rank's
eth0 (its egress) and the hub-side end (its ingress), i.e. a full-duplex NIC of rate R
per direction, like the LinkModel's one egress link per rank. 192.168.77.0/24 exists only
inside these namespaces; nothing reaches the host's network. Latency emulation needs
``netem``, which this kernel may lack; use the LinkModel's latency for that.

Each rank runs ``<command>`` with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR (rank 0's
address), MASTER_PORT and GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME=eth0 set. The namespaces
are removed on every exit path (normal end, a failing rank, Ctrl-C, SIGTERM): try/finally,
atexit and signal handlers. Needs root (CAP_NET_ADMIN); otherwise exits with status 2 and
says why. Standard library only, so it runs under any python3.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

SUBNET = "192.168.77"
EXIT_UNSUPPORTED = 2
_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def parse_rate(text: str) -> float:
    """tc-style rate in bits/s: 100mbit, 1gbit, 500kbit (bytes-per-second units refused: ambiguous in tc)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", text or "")
    if not m or m.group(2).lower() not in _RATE_UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"--rate {text!r} is invalid; allowed: a positive number with unit {', '.join(_RATE_UNITS)}")
    return float(m.group(1)) * _RATE_UNITS[m.group(2).lower()]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


BURST_MIN = 125_000  # bytes: the smallest tbf bucket measured not to drop TCP bursts (see Netns.burst_bytes)


class Netns:
    """Creates and (always) removes the namespaces, veths, bridge and qdiscs of one run."""

    def __init__(self, nproc: int, rate_bps: float | None, prefix: str = "ct", queue_latency: str = "50ms",
                 burst_ms: float | None = None):
        self.nproc, self.rate_bps, self.prefix, self.queue_latency = nproc, rate_bps, prefix, queue_latency
        self.burst_ms = burst_ms
        self.created: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def ns(self, i: int | str) -> str:
        return f"{self.prefix}{i}"

    def addr(self, rank: int) -> str:
        return f"{SUBNET}.{rank + 1}"

    def names(self) -> list[str]:
        return [self.ns(i) for i in range(self.nproc)] + [self.ns("hub")]

    def burst_bytes(self) -> int:
        """The tbf bucket. A wire has no bucket: what fits in it after an idle gap leaves at the
        veth's own speed, so a large one makes the link faster than its rate for traffic in
        short operations (10 ms at 1 Gbit/s: real/simulated 0.93); too small a one drops TCP
        bursts (64 KiB at 100 Mbit/s: 4.9% of the bytes retransmitted). Default: 1 ms of
        traffic, at least BURST_MIN (measured without drops at 100 Mbit/s and 1 Gbit/s,
        benchmarks/results/links.md); ``burst_ms`` overrides it."""
        if self.burst_ms is not None:
            return max(int(self.rate_bps / 8 * self.burst_ms / 1e3), 4 * 1514)
        return max(int(self.rate_bps / 8 / 1e3), BURST_MIN)

    def _shape(self, ns: str, dev: str) -> None:
        if self.rate_bps is None:
            return
        burst = self.burst_bytes()
        r = subprocess.run(
            ["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{int(self.rate_bps)}bit",
             "burst", str(burst), "latency", self.queue_latency],
            capture_output=True, text=True,
        )
        if r.returncode:
            raise PermissionError(f"tc tbf on {ns}/{dev} failed: {r.stderr.strip()}")

    def setup(self) -> None:
        existing = set(_ip("netns", "list").stdout.split())
        clash = sorted(n for n in self.names() if n in existing)
        if clash:
            raise RuntimeError(
                f"namespaces {clash} already exist (another run, or a crashed one): pick another --prefix "
                f"or remove them with `python launch/netns.py --cleanup --prefix {self.prefix} --nproc {self.nproc}`"
            )
        hub = self.ns("hub")
        self._add_ns(hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        for i in range(self.nproc):
            ns = self.ns(i)
            self._add_ns(ns)
            tmp, peer = f"{self.prefix}{i}x", f"{self.prefix}{i}h"
            # created in the hub namespace, so no interface ever appears in the host's namespace
            _ip("-n", hub, "link", "add", tmp, "type", "veth", "peer", "name", peer)
            _ip("-n", hub, "link", "set", tmp, "netns", ns)
            _ip("-n", ns, "link", "set", tmp, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", hub, "link", "set", peer, "master", "br0")
            _ip("-n", hub, "link", "set", peer, "up")
            self._shape(ns, "eth0")  # this rank's egress
            self._shape(hub, peer)  # this rank's ingress

    def _add_ns(self, name: str) -> None:
        r = _ip("netns", "add", name, check=False)
        if r.returncode:
            raise PermissionError(f"`ip netns add {name}` failed: {r.stderr.strip()}")
        self.created.append(name)

    def spawn(self, rank: int, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(rank), *argv], env=env, start_new_session=True)
        self.procs.append(p)
        return p

    def tx_bytes(self) -> dict[int, int]:
        """Bytes each rank's eth0 has transmitted (kernel counters, headers included): proof that
        the ranks' traffic crossed the shaped veths rather than loopback."""
        out = {}
        for i in range(self.nproc):
            r = subprocess.run(["ip", "netns", "exec", self.ns(i), "cat", "/sys/class/net/eth0/statistics/tx_bytes"],
                               capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip().isdigit():
                out[i] = int(r.stdout)
        return out

    def kill_children(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)  # our own child's session only
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()

    def cleanup(self) -> None:
        self.kill_children()
        for name in reversed(self.created or self.names()):
            _ip("netns", "del", name, check=False)  # removes the veths and the bridge inside
        self.created = []


def check_supported() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) to create network namespaces; run with sudo, or use the simulated LinkModel"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    return None


# -- bandwidth measurement: a TCP sink in one namespace, a blaster in another -------------
def _sink(port: int, seconds: float, skip: float) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    srv.settimeout(seconds + 10)
    conn, _ = srv.accept()
    conn.settimeout(5)
    buf = bytearray(1 << 20)
    t_first = counted = t_last = None
    total = 0
    while True:
        try:
            n = conn.recv_into(buf)
        except socket.timeout:
            break
        if not n:
            break
        now = time.monotonic()
        if t_first is None:
            t_first = now
        total += n
        if now - t_first >= skip:  # ignore the tbf burst and TCP slow start
            if counted is None:
                counted, t_start = 0, now
            else:
                counted += n
            t_last = now
    if counted is None or t_last <= t_start:
        print(json.dumps({"error": "too little data to measure", "bytes": total}))
        return
    print(json.dumps({"bytes": counted, "seconds": t_last - t_start, "mbit_s": counted * 8 / (t_last - t_start) / 1e6}))


def _blast(host: str, port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds + 10
    while True:
        try:
            s = socket.create_connection((host, port), timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    data = b"\0" * (1 << 16)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        s.sendall(data)
    s.close()


def measure(net: Netns, seconds: float) -> dict:
    port = 5201
    me = os.path.abspath(__file__)
    sink = subprocess.Popen(
        ["ip", "netns", "exec", net.ns(1), sys.executable, me, "--_sink", str(port), str(seconds)],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    net.procs.append(sink)
    blaster = net.spawn(0, [sys.executable, me, "--_blast", net.addr(1), str(port), str(seconds)], dict(os.environ))
    blaster.wait(seconds + 30)
    out, _ = sink.communicate(timeout=30)
    res = json.loads(out.strip().splitlines()[-1])
    res["rate_mbit_s"] = None if net.rate_bps is None else net.rate_bps / 1e6
    return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_sink"]:
        _sink(int(argv[1]), float(argv[2]), skip=min(0.5, float(argv[2]) / 4))
        return 0
    if argv[:1] == ["--_blast"]:
        _blast(argv[1], int(argv[2]), float(argv[3]))
        return 0
    command: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="ranks = namespaces (2..200)")
    ap.add_argument("--rate", type=parse_rate, default=None, help="per-direction NIC rate, e.g. 100mbit, 1gbit (default: unshaped)")
    ap.add_argument("--queue-latency", default="50ms", help="tbf queue bound (tc 'latency'), default 50ms")
    ap.add_argument("--burst-ms", type=float, default=None,
                    help="tbf bucket, in ms of traffic at --rate (default: 1 ms, at least 125 KB)")
    ap.add_argument("--prefix", default="ct", help="namespace name prefix (default ct: ct0, ct1, ..., cthub)")
    ap.add_argument("--master-port", type=int, default=29500)
    ap.add_argument("--timeout", type=float, default=None, help="kill all ranks after this many seconds")
    ap.add_argument("--measure", action="store_true", help="measure achieved TCP bandwidth rank 0 -> rank 1 and exit")
    ap.add_argument("--seconds", type=float, default=3.0, help="duration of --measure (default 3)")
    ap.add_argument("--cleanup", action="store_true", help="only remove namespaces left by a crashed run")
    args = ap.parse_args(argv)
    if not 2 <= args.nproc <= 200:
        ap.error(f"--nproc {args.nproc} is invalid; allowed: 2..200")
    if not re.fullmatch(r"[a-z][a-z0-9]{0,5}", args.prefix):
        ap.error(f"--prefix {args.prefix!r} is invalid; allowed: 1-6 lowercase letters/digits, starting with a letter")
    if not (command or args.measure or args.cleanup):
        ap.error("give a command after `--`, or --measure, or --cleanup")
    why = check_supported()
    if why:
        print(f"netns: not supported here: {why}", file=sys.stderr)
        return EXIT_UNSUPPORTED

    if args.burst_ms is not None and args.burst_ms <= 0:
        ap.error(f"--burst-ms {args.burst_ms} is invalid; allowed: > 0")
    net = Netns(args.nproc, args.rate, args.prefix, args.queue_latency, args.burst_ms)
    if args.cleanup:
        net.cleanup()
        return 0

    def on_signal(signum, _frame):
        net.cleanup()
        os._exit(128 + signum)

    atexit.register(net.cleanup)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        try:
            net.setup()
        except PermissionError as e:
            print(f"netns: not supported here: {e}", file=sys.stderr)
            return EXIT_UNSUPPORTED
        if args.measure:
            print(json.dumps(measure(net, args.seconds)))
            return 0
        return run_ranks(net, command, args)
    finally:
        net.cleanup()


def run_ranks(net: Netns, command: list[str], args) -> int:
    code = _run_ranks(net, command, args)
    # One JSON line on stderr: what crossed each rank's shaped link during the run.
    print("netns-stats " + json.dumps({"tx_bytes": net.tx_bytes(), "rate_bps": net.rate_bps}), file=sys.stderr)
    return code


def _run_ranks(net: Netns, command: list[str], args) -> int:
    for rank in range(net.nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(net.nproc),
                   MASTER_ADDR=net.addr(0), MASTER_PORT=str(args.master_port),
                   GLOO_SOCKET_IFNAME="eth0", NCCL_SOCKET_IFNAME="eth0")
        # As torchrun does for several ranks on one machine: one intra-op thread per rank unless
        # the user chose otherwise. Without it every rank runs a thread per core and the ranks
        # oversubscribe the CPU, so a real-link run computes slower than the same run under
        # torchrun and the two links cannot be compared.
        env.setdefault("OMP_NUM_THREADS", "1")
        net.spawn(rank, command, env)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    while True:
        codes = [p.poll() for p in net.procs]
        failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            r, c = failed[0]
            print(f"netns: rank {r} exited with status {c}; stopping the others", file=sys.stderr)
            return c
        if all(c == 0 for c in codes):
            return 0
        if deadline is not None and time.monotonic() > deadline:
            print(f"netns: ranks still running after --timeout {args.timeout:g} s; killing them", file=sys.stderr)
            return 124
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
