"""qga against the real qemu-ga, measured in the same run on this machine.

    python bench/qga_bench.py [--pings N] [--file-mib M] [--runs R]

Both agents run at once and every measurement alternates between them, so
load from elsewhere on the machine weighs on both alike; per run:

* start-up: spawn to the first answer of guest-sync-delimited;
* round trip: N sequential guest-ping requests, median and 99th percentile;
* file read: guest-file-open + guest-file-read of an M MiB file in 48 MiB
  requests (the protocol's limit) + base64 decoding on the client, in MiB/s;
* resident memory (RSS) right after that work, and the peak (VmHWM).

Both agents listen on unix sockets in a temporary directory with a state
directory of their own; only file reads in that directory are performed.
Prints a table and the ratios qga/qemu-ga (for time: lower is better).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
MAX_READ = 48 << 20


class Conn:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = bytearray()

    def call(self, request: dict) -> dict:
        self.sock.sendall(json.dumps(request).encode())
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line = bytes(self.buf[:nl])
                del self.buf[:nl + 1]
                return json.loads(line.lstrip(b"\xff"))
            chunk = self.sock.recv(4 << 20)
            if not chunk:
                raise EOFError
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()


#: bytecode cache for the agent, as an installed package has (pip compiles at
#: install time); set by main() to a temporary directory
PYCACHE: str | None = None


def start(kind: str, workdir: Path) -> tuple[subprocess.Popen, str, float]:
    workdir.mkdir(parents=True, exist_ok=True)
    sock = str(workdir / "sock")
    command = [shutil.which("qemu-ga") or "/usr/sbin/qemu-ga"] if kind == "qemu-ga" \
        else [sys.executable, "-m", "agent"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["QGA_CONF"] = "/nonexistent"
    if PYCACHE:
        env["PYTHONPYCACHEPREFIX"] = PYCACHE
    started = time.perf_counter()
    proc = subprocess.Popen([*command, "-m", "unix-listen", "-p", sock, "-t", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    while True:
        try:
            conn = Conn(sock)
            conn.sock.sendall(b'\xff{"execute":"guest-sync-delimited","arguments":{"id":1}}')
            while not conn.buf.endswith(b'\xff{"return": 1}\n'):
                chunk = conn.sock.recv(4096)
                if not chunk:
                    raise EOFError
                conn.buf += chunk
            elapsed = time.perf_counter() - started
            conn.close()
            return proc, sock, elapsed
        except (FileNotFoundError, ConnectionRefusedError, EOFError):
            if proc.poll() is not None:
                raise RuntimeError(f"{kind} exited with {proc.returncode}")
            time.sleep(0.001)


def read_file(conn: Conn, data_file: Path) -> float:
    """Seconds to read ``data_file`` whole through guest-file-read."""
    t0 = time.perf_counter()
    reply = conn.call({"execute": "guest-file-open", "arguments": {"path": str(data_file)}})
    if "error" in reply:
        raise RuntimeError(f"guest-file-open: {reply['error']['desc']}")
    handle = reply["return"]
    got = 0
    while True:
        reply = conn.call({"execute": "guest-file-read",
                           "arguments": {"handle": handle, "count": MAX_READ}})["return"]
        got += len(base64.b64decode(reply["buf-b64"]))
        if reply["eof"] or reply["count"] == 0:
            break
    elapsed = time.perf_counter() - t0
    conn.call({"execute": "guest-file-close", "arguments": {"handle": handle}})
    assert got == data_file.stat().st_size, got
    return elapsed


def measure_pair(workdir: Path, data_file: Path, pings: int) -> dict[str, dict]:
    """Both agents up at once; every measurement alternates between them, so
    whatever else the machine does weighs on both alike."""
    procs, conns, startup = {}, {}, {}
    try:
        for kind in KINDS:
            procs[kind], sock, startup[kind] = start(kind, workdir / kind)
            conns[kind] = Conn(sock)
        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        # blocks of pings in turn: both see the same background load, and
        # each runs warm, as an agent serving one host does
        for block in range(0, pings, PING_BLOCK):
            for kind in (KINDS if block // PING_BLOCK % 2 else KINDS[::-1]):
                conn = conns[kind]
                for _ in range(min(PING_BLOCK, pings - block)):
                    t0 = time.perf_counter()
                    conn.call({"execute": "guest-ping"})
                    times[kind].append(time.perf_counter() - t0)
        reads: dict[str, float] = {kind: math.inf for kind in KINDS}
        rss: dict[str, int] = {}
        for i in range(2):
            for kind in (KINDS if i % 2 else KINDS[::-1]):
                reads[kind] = min(reads[kind], read_file(conns[kind], data_file))
                rss[kind] = psutil.Process(procs[kind].pid).memory_info().rss
        size_mib = data_file.stat().st_size / (1 << 20)
        out = {}
        for kind in KINDS:
            series = sorted(times[kind])
            out[kind] = {"startup_ms": startup[kind] * 1000,
                         "ping_median_us": statistics.median(series) * 1e6,
                         "ping_p99_us": series[int(len(series) * 0.99) - 1] * 1e6,
                         "read_mib_s": size_mib / reads[kind],
                         "rss_mib": rss[kind] / (1 << 20),
                         "peak_rss_mib": peak_rss(procs[kind].pid) / (1 << 20)}
        return out
    finally:
        for conn in conns.values():
            conn.close()
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                # seen with qemu-ga 7.2 here: SIGTERM blocked in its signal
                # mask, so it never arrives; never leave an agent behind
                proc.kill()
                proc.wait(10)


KINDS = ("qemu-ga", "qga")
PING_BLOCK = 100


def peak_rss(pid: int) -> int:
    """VmHWM: the most resident memory the process ever had."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument("--file-mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    global PYCACHE
    with tempfile.TemporaryDirectory(prefix="qga-bench-") as tmp:
        tmp_path = Path(tmp)
        PYCACHE = str(tmp_path / "pycache")
        proc, _, cold = start("qga", tmp_path / "warm-up")   # fills the bytecode cache
        proc.terminate()
        proc.wait(10)
        data_file = tmp_path / "data.bin"
        with open(data_file, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(args.file_mib):
                f.write(block)
        results: dict[str, list[dict]] = {kind: [] for kind in KINDS}
        for run in range(args.runs):
            pair = measure_pair(tmp_path / f"run-{run}", data_file, args.pings)
            for kind in KINDS:
                results[kind].append(pair[kind])
    keys = [("startup_ms", "start-up to first answer (ms)", statistics.median),
            ("ping_median_us", "guest-ping round trip, median (us)", statistics.median),
            ("ping_p99_us", "guest-ping round trip, p99 (us)", statistics.median),
            ("read_mib_s", f"guest-file-read of {args.file_mib} MiB (MiB/s)", statistics.median),
            ("rss_mib", "resident memory right after the reads (MiB)", max),
            ("peak_rss_mib", "peak resident memory, VmHWM (MiB)", max)]
    print(f"{'measure':44} {'qemu-ga':>10} {'qga':>10} {'qga/qemu-ga':>12}")
    for key, label, pick in keys:
        ref = pick(r[key] for r in results["qemu-ga"])
        ours = pick(r[key] for r in results["qga"])
        print(f"{label:44} {ref:10.1f} {ours:10.1f} {ours / ref:12.2f}")
    print(f"(median of {args.runs} runs, both agents up together and measured in turn; "
          f"{args.pings} pings; python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs; qga start-up without a bytecode cache: {cold * 1000:.0f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
