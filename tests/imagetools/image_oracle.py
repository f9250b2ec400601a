"""Helpers shared by every image test directory (formats, otherformats, ...).

Test files import their own directory's helper module (``fmt_helpers``,
``of_helpers``, ``snap_helpers``); what those have in common lives here, on
the path through ``tests/imagetools/conftest.py``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from imagetools.formats.base import merge_extents

ROOT = Path(__file__).resolve().parents[2]


def qimg_wrapper(directory: Path, name: str) -> str:
    """qimg as an executable named ``name`` in ``directory`` (named qemu-img,
    its error lines carry the same prefix as the real tool's)."""
    path = directory / name
    path.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                    "from imagetools.cli import run\nrun()\n")
    path.chmod(0o755)
    return str(path)


def run(*cmd: str, check: bool = True, timeout: float = 120,
        cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run a command with LC_ALL=C; fail the test with its stderr when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={"LC_ALL": "C", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"})
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def our_map(drv) -> list[dict]:
    """Our block status in qemu-img map's JSON shape (merged as qemu-img merges)."""
    out = []
    for ext in merge_extents(drv.block_status()):
        entry = {"start": ext.start, "length": ext.length, "depth": ext.depth,
                 "present": ext.present, "zero": ext.zero, "data": ext.data}
        if ext.offset is not None:
            entry["offset"] = ext.offset
        out.append(entry)
    return out
