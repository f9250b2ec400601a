"""hostclient.engine: the project's engine as the backup uses it."""

from __future__ import annotations

import hashlib
import subprocess

import pytest

from hostclient import engine
from hostclient.errors import EngineError, Interrupted, VerifyError



def test_held_by_qemu(paused_vm):
    a = paused_vm.image("a", "qcow2", "4M")
    free = paused_vm.image("free", "raw", "4M")
    paused_vm.start(paused_vm.blockdev("a", a, "qcow2", "disk-a"))
    assert engine.held_by_qemu(str(a)) is True
    assert engine.held_by_qemu(str(free)) is False
    with pytest.raises(EngineError, match="cannot open"):
        engine.held_by_qemu(str(free) + ".missing")


def test_a_bug_in_the_engine_becomes_an_engine_error(tmp_path, monkeypatch):
    from imagetools import api

    def broken(*args, **kw):
        raise ModuleNotFoundError("No module named 'imagetools.formats.qcow2.check'")

    monkeypatch.setattr(api, "convert", broken)
    target = tmp_path / "out.qcow2"
    target.write_bytes(b"partial")
    with pytest.raises(EngineError, match="internal error in the image engine: ModuleNotFound"):
        engine.copy_image(str(tmp_path / "in.raw"), "raw", target)
    assert not target.exists()


@pytest.mark.oracle
def test_copy_verify_and_sha256_against_qemu_img(tmp_path, qemu_img):
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(b"\x5a" * 70000)
        f.seek(6 << 20)
        f.write(bytes(range(256)) * 100)
    copy = tmp_path / "copy.qcow2"
    seen = []
    stats = engine.copy_image(str(src), "raw", copy, progress=lambda d, t: seen.append((d, t)))
    assert stats.virtual_size == 8 << 20 and seen
    assert subprocess.run([qemu_img, "compare", "-f", "raw", "-F", "qcow2", str(src), str(copy)],
                          capture_output=True).returncode == 0
    assert subprocess.run([qemu_img, "check", str(copy)], capture_output=True).returncode == 0
    engine.verify_copy(str(src), "raw", copy)
    assert engine.content_sha256(str(copy), "qcow2") == hashlib.sha256(src.read_bytes()).hexdigest()
    # a copy that differs is caught
    with open(src, "r+b") as f:
        f.seek(3 << 20)
        f.write(b"x")
    with pytest.raises(VerifyError, match="differs"):
        engine.verify_copy(str(src), "raw", copy)


@pytest.mark.oracle
def test_copy_can_be_interrupted_through_progress(tmp_path):
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.write(b"\x11" * (4 << 20))
    target = tmp_path / "copy.qcow2"

    def stop(done, total):
        raise Interrupted("interrupted (Ctrl-C)")

    with pytest.raises(Interrupted):
        engine.copy_image(str(src), "raw", target, progress=stop)
    assert not target.exists()
