"""qga against the real qemu-ga, measured in the same run on this machine.

    python bench/qga_bench.py [--pings N] [--file-mib M] [--runs R]

For each agent (qemu-ga, then qga, alternating over ``--runs``):

* start-up: spawn to the first answer of guest-sync-delimited;
* round trip: N sequential guest-ping requests, median and 99th percentile;
* file read: guest-file-open + guest-file-read of an M MiB file in 48 MiB
  requests (the protocol's limit) + base64 decoding on the client, in MiB/s;
* resident memory (RSS) after that work.

Both agents listen on unix sockets in a temporary directory with a state
directory of their own; only file reads in that directory are performed.
Prints a table and the ratios qga/qemu-ga (for time: lower is better).
"""

from __future__ import annotations

import argparse
import base64
import json
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


def measure(kind: str, workdir: Path, data_file: Path, pings: int) -> dict:
    proc, sock, startup = start(kind, workdir)
    try:
        conn = Conn(sock)
        times = []
        for _ in range(pings):
            t0 = time.perf_counter()
            conn.call({"execute": "guest-ping"})
            times.append(time.perf_counter() - t0)
        size = data_file.stat().st_size
        t0 = time.perf_counter()
        handle = conn.call({"execute": "guest-file-open", "arguments": {"path": str(data_file)}})
        if "error" in handle:
            raise RuntimeError(f"{kind}: guest-file-open: {handle['error']['desc']}")
        handle = handle["return"]
        got = 0
        while True:
            reply = conn.call({"execute": "guest-file-read",
                               "arguments": {"handle": handle, "count": MAX_READ}})["return"]
            got += len(base64.b64decode(reply["buf-b64"]))
            if reply["eof"] or reply["count"] == 0:
                break
        read_seconds = time.perf_counter() - t0
        conn.call({"execute": "guest-file-close", "arguments": {"handle": handle}})
        assert got == size, (got, size)
        rss = psutil.Process(proc.pid).memory_info().rss
        conn.close()
        times.sort()
        return {"startup_ms": startup * 1000,
                "ping_median_us": statistics.median(times) * 1e6,
                "ping_p99_us": times[int(len(times) * 0.99) - 1] * 1e6,
                "read_mib_s": size / (1 << 20) / read_seconds,
                "rss_mib": rss / (1 << 20)}
    finally:
        proc.terminate()
        proc.wait(10)


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
        results: dict[str, list[dict]] = {"qemu-ga": [], "qga": []}
        for run in range(args.runs):
            for kind in ("qemu-ga", "qga"):
                results[kind].append(measure(kind, tmp_path / f"{kind}-{run}", data_file, args.pings))
    keys = [("startup_ms", "start-up to first answer (ms)", min),
            ("ping_median_us", "guest-ping round trip, median (us)", min),
            ("ping_p99_us", "guest-ping round trip, p99 (us)", min),
            ("read_mib_s", f"guest-file-read of {args.file_mib} MiB (MiB/s)", max),
            ("rss_mib", "resident memory after work (MiB)", max)]
    print(f"{'measure':44} {'qemu-ga':>10} {'qga':>10} {'qga/qemu-ga':>12}")
    for key, label, pick in keys:
        ref = pick(r[key] for r in results["qemu-ga"])
        ours = pick(r[key] for r in results["qga"])
        print(f"{label:44} {ref:10.1f} {ours:10.1f} {ours / ref:12.2f}")
    print(f"(best of {args.runs} runs each; {args.pings} pings; python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs; qga start-up without a bytecode cache: {cold * 1000:.0f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
