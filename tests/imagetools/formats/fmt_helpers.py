"""Helpers of the format-driver tests (run the QEMU oracles, compare maps).

A uniquely named module rather than conftest.py: test files import these
by name, and a module called `conftest` may already be another directory's
when several test directories run in one pytest session.
"""

from __future__ import annotations

import json

from image_oracle import our_map, run  # noqa: F401  (shared, re-exported)


def qemu_map(qemu_img: str, path: str, fmt: str | None = None) -> list[dict]:
    """qemu-img map --output=json as a list of dicts."""
    cmd = [qemu_img, "map", "--output=json"]
    if fmt:
        cmd += ["-f", fmt]
    return json.loads(run(*cmd, path).stdout)


def io_cmds(qemu_io_path: str, path: str, *commands: str, fmt: str = "qcow2") -> None:
    args = [qemu_io_path, "-f", fmt]
    for c in commands:
        args += ["-c", c]
    run(*args, path)


def qemu_raw_bytes(qemu_img: str, path: str, tmp_path, fmt: str | None = None) -> bytes:
    """The guest content according to qemu-img convert -O raw."""
    out = tmp_path / f"oracle-{abs(hash(path))}.raw"
    cmd = [qemu_img, "convert", "-O", "raw"]
    if fmt:
        cmd += ["-f", fmt]
    run(*cmd, path, str(out))
    return out.read_bytes()


def qemu_check(qemu_img: str, path: str) -> dict:
    """qemu-img check --output=json (any exit code) as a dict plus 'rc' and 'stderr'."""
    proc = run(qemu_img, "check", "--output=json", path, check=False)
    try:
        result = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        result = {}
    result["rc"] = proc.returncode
    result["stderr"] = proc.stderr
    return result
