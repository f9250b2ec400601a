"""Whether the parts built in parallel are there yet: the project's qga
daemon and the image engine's qcow2 support. The real-guest tests expect
failure (strict xfail) until they are, and ``make demo`` says what is missing.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from guest import raw_agent_sync


def project_qga_serves() -> bool:
    """Whether `python -m agent` answers on a socket.

    Only guest-sync-delimited is sent: safe to run on this host.
    """
    with tempfile.TemporaryDirectory(prefix="qga-probe-") as tmp:
        sock = Path(tmp) / "s"
        proc = subprocess.Popen([sys.executable, "-m", "agent", "-m", "unix-listen", "-p", str(sock),
                                 "-t", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and proc.poll() is None:
                if sock.exists() and raw_agent_sync(sock, 2.0):
                    return True
                time.sleep(0.1)
            return False
        finally:
            proc.kill()
            proc.wait()


def engine_ready() -> bool:
    """Whether the project's engine can do what a backup needs: copy a small
    raw image to qcow2, check the copy and compare it with the source."""
    try:
        from imagetools import api
    except ImportError:
        return False
    with tempfile.TemporaryDirectory(prefix="engine-probe-") as tmp:
        src, dst = Path(tmp) / "src.raw", Path(tmp) / "dst.qcow2"
        with open(src, "wb") as f:
            f.truncate(2 << 20)
            f.seek(65536)
            f.write(b"probe" * 1000)
        try:
            api.convert([str(src)], str(dst), src_fmt="raw", out_fmt="qcow2")
            report = api.check(str(dst), fmt="qcow2")
            same = api.compare(str(src), str(dst), fmt_a="raw", fmt_b="qcow2")
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False
    return bool(same.identical) and not report.get("corruptions") and not report.get("leaks")


PROJECT_QGA_SERVES = project_qga_serves()
ENGINE_READY = engine_ready()

#: Parametrisation for "which agent runs in the guest": the real qemu-ga, and
#: the project's qga (expected to fail, loudly, until its daemon serves).
AGENTS = [
    pytest.param("qemu-ga", id="qemu-ga"),
    pytest.param("qga", id="qga", marks=pytest.mark.xfail(
        not PROJECT_QGA_SERVES, strict=True,
        reason="the project's qga daemon does not serve yet (python -m agent -m unix-listen)")),
]

needs_engine = pytest.mark.xfail(not ENGINE_READY, strict=True,
                                 reason="the project's image engine cannot write qcow2 yet "
                                        "(imagetools.api / qcow2 driver)")
