"""Helpers of the snapshot/commit tests: oracle runs, content and check judgements."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

ENV = dict(os.environ, LC_ALL="C", TZ="UTC")


def run(*argv: str, cwd: Path | str | None = None, check: bool = True,
        timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n"
                             f"{proc.stdout.decode(errors='replace')}"
                             f"{proc.stderr.decode(errors='replace')}")
    return proc


def qemu_check(qemu_img: str, path: Path | str, *, allow_leaks: bool = False) -> dict:
    """qemu-img check --output=json; asserts no corruption (and no leaks unless allowed)."""
    proc = run(qemu_img, "check", "--output=json", str(path), check=False,
               cwd=Path(path).parent)
    assert proc.returncode in ((0, 3) if allow_leaks else (0,)), (
        f"qemu-img check {path}: exit {proc.returncode}\n{proc.stdout.decode()}"
        f"{proc.stderr.decode()}")
    return json.loads(proc.stdout)


def guest_bytes(qemu_img: str, path: Path | str, scratch: Path, *,
                snapshot: str | None = None, fmt: str | None = None) -> bytes:
    """The guest content per qemu-img convert -O raw (optionally of a snapshot)."""
    out = scratch / f"content-{os.getpid()}-{abs(hash((str(path), snapshot)))}.raw"
    argv = [qemu_img, "convert", "-U", "-O", "raw"]
    if fmt:
        argv += ["-f", fmt]
    if snapshot is not None:
        argv += ["-l", snapshot]
    run(*argv, str(path), str(out), cwd=Path(path).parent)
    data = out.read_bytes()
    out.unlink()
    return data


def snapshot_names(qemu_img: str, path: Path | str) -> list[tuple[str, str]]:
    info = json.loads(run(qemu_img, "info", "-U", "--output=json", str(path)).stdout)
    return [(sn["id"], sn["name"]) for sn in info.get("snapshots", [])]


_DATE = re.compile(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def mask_dates(text: bytes) -> bytes:
    """Snapshot listings of two runs differ only in their DATE column."""
    return _DATE.sub(b"YYYY-MM-DD hh:mm:ss", text)
