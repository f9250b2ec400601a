"""QEMU's image locks, both ways: qimg honours QEMU's, QEMU honours qimg's.

The judge is always the real tool in the same situation: whatever qemu-img
does beside a given holder, qimg must do too, with the same message.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from fmt_helpers import run

from imagetools.errors import ImageLockedError
from imagetools.image import create_image, open_image
from imagetools.locking import LOCK_PERM_BASE, LOCK_SHARED_BASE

pytestmark = [pytest.mark.oracle, pytest.mark.timeout(60)]


def held_bytes(path: str) -> set[int]:
    """Byte offsets of ``path`` locked by anyone, from /proc/locks."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    held = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" in fields or len(fields) < 8 or fields[5] != dev:
                continue
            start = int(fields[6])
            end = start if fields[7] == "EOF" else int(fields[7])
            held.update(range(start, end + 1))
    return held


class Holder:
    """A QEMU process keeping an image open (and locked) until closed."""

    def __init__(self, cmd: list[str], path: str, expect: int) -> None:
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while expect not in held_bytes(path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                _, err = self.proc.communicate()
                pytest.fail(f"{cmd[0]} did not lock {path}: {err!r}")
            time.sleep(0.02)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()

    def __enter__(self) -> "Holder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def qemu_io_holder(qemu_io: str, path: str, fmt: str, *args: str) -> Holder:
    return Holder([qemu_io, *args, "-f", fmt, path], path, LOCK_PERM_BASE)


def vm_holder(qemu_system: str, path: str, fmt: str) -> Holder:
    """A paused VM (-S, no firmware run) with the image as its virtio disk."""
    return Holder([qemu_system, "-M", "pc", "-accel", "tcg", "-nodefaults", "-display", "none",
                   "-S", "-monitor", "none", "-serial", "none",
                   "-drive", f"file={path},format={fmt},if=virtio"], path, LOCK_SHARED_BASE + 1)


def outcome_ours(path: str, fmt: str, *, read_only: bool, force_share: bool = False) -> str:
    """'ok' or qemu-img's message for our open."""
    try:
        with open_image(path, fmt, read_only=read_only, force_share=force_share):
            return "ok"
    except ImageLockedError as err:
        return f"qemu-img: {err}\n"


def outcome_qemu_img(qemu_img: str, path: str, fmt: str, src: str, *, read_only: bool,
                     force_share: bool = False) -> str:
    if read_only:
        cmd = [qemu_img, "info", "-f", fmt] + (["-U"] if force_share else []) + [path]
    else:
        cmd = [qemu_img, "convert", "-n", "-f", "raw", "-O", fmt, src, path]
    proc = run(*cmd, check=False)
    return "ok" if proc.returncode == 0 else proc.stderr


@pytest.fixture
def raw_image(tmp_path):
    path = str(tmp_path / "locked.raw")
    create_image(path, "raw", 1 << 20, {})
    src = str(tmp_path / "src.raw")
    create_image(src, "raw", 1 << 20, {})
    return path, src


MODES = [dict(read_only=False), dict(read_only=True),
         dict(read_only=True, force_share=True)]


def test_raw_beside_qemu_io_writer_behaves_like_qemu_img(qemu_img, qemu_io, raw_image):
    path, src = raw_image
    with qemu_io_holder(qemu_io, path, "raw"):
        for mode in MODES:
            assert outcome_ours(path, "raw", **mode) == \
                outcome_qemu_img(qemu_img, path, "raw", src, **mode), mode


@pytest.mark.slow
def test_raw_disk_of_running_vm_refuses_writers(qemu_img, qemu_system, raw_image):
    path, src = raw_image
    with vm_holder(qemu_system, path, "raw"):
        results = {}
        for mode in MODES:
            ours = outcome_ours(path, "raw", **mode)
            assert ours == outcome_qemu_img(qemu_img, path, "raw", src, **mode), mode
            results[tuple(mode.items())] = ours
    assert results[(("read_only", False),)] == (
        f"qemu-img: Could not open '{path}': Failed to get \"write\" lock\n"
        f"Is another process using the image [{path}]?\n")
    assert results[(("read_only", True),)] == "ok"


@pytest.mark.slow
def test_vm_refuses_raw_image_qimg_writes(qemu_system, raw_image):
    path, _ = raw_image
    with open_image(path, "raw", read_only=False):
        assert held_bytes(path) == {LOCK_PERM_BASE, LOCK_PERM_BASE + 1}
        proc = subprocess.run([qemu_system, "-M", "pc", "-accel", "tcg", "-nodefaults",
                               "-display", "none", "-S", "-monitor", "none", "-serial", "none",
                               "-drive", f"file={path},format=raw,if=virtio"],
                              capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 1
        assert 'Failed to get shared "write" lock' in proc.stderr
    assert held_bytes(path) == set()


def test_locks_vanish_on_close(raw_image):
    path, _ = raw_image
    drv = open_image(path, "raw")
    assert held_bytes(path) == {LOCK_PERM_BASE}
    drv.close()
    assert held_bytes(path) == set()


@pytest.fixture
def qcow2_chain(qemu_img, tmp_path):
    base = str(tmp_path / "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    run(qemu_img, "create", "-q", "-f", "qcow2", base, "1M")
    run(qemu_img, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    src = str(tmp_path / "src.raw")
    create_image(src, "raw", 1 << 20, {})
    return base, top, src


def test_qcow2_beside_qemu_io_writer_behaves_like_qemu_img(qemu_img, qemu_io, qcow2_chain):
    base, top, src = qcow2_chain
    with qemu_io_holder(qemu_io, top, "qcow2"):
        assert held_bytes(top) == {100, 101, 103, 201, 203}
        for mode in MODES:
            assert outcome_ours(top, "qcow2", **mode) == \
                outcome_qemu_img(qemu_img, top, "qcow2", src, **mode), mode
        # the backing file is open read-only: readers welcome, writers not
        assert outcome_ours(base, "qcow2", read_only=True) == "ok"
        assert outcome_ours(base, "qcow2", read_only=False) == \
            outcome_qemu_img(qemu_img, base, "qcow2", src, read_only=False)
        assert outcome_ours(base, "qcow2", read_only=False) != "ok"


def test_qemu_refuses_qcow2_qimg_writes(qemu_img, qemu_io, qcow2_chain):
    base, top, _ = qcow2_chain
    with open_image(top, "qcow2", read_only=False):
        assert held_bytes(top) == {100, 101, 103, 201, 203}
        assert held_bytes(base) == {100, 201, 203}
        proc = run(qemu_img, "info", top, check=False)
        assert proc.returncode == 1
        assert proc.stderr == (f"qemu-img: Could not open '{top}': Failed to get shared "
                               f"\"write\" lock\nIs another process using the image [{top}]?\n")
        proc = run(qemu_io, "-f", "qcow2", "-c", "write 0 512", base, check=False)
        assert proc.returncode == 1 and 'Failed to get "write" lock' in proc.stderr
        assert run(qemu_img, "info", "-U", top).returncode == 0
        assert run(qemu_io, "-r", "-f", "qcow2", "-c", "read 0 512", base).returncode == 0
    assert held_bytes(top) == held_bytes(base) == set()


@pytest.mark.slow
def test_qcow2_disk_of_running_vm(qemu_img, qemu_system, qcow2_chain):
    _, top, src = qcow2_chain
    with vm_holder(qemu_system, top, "qcow2"):
        for mode in MODES:
            assert outcome_ours(top, "qcow2", **mode) == \
                outcome_qemu_img(qemu_img, top, "qcow2", src, **mode), mode


def test_create_refuses_an_image_in_use(qemu_img, qemu_io, qcow2_chain):
    _, top, _ = qcow2_chain
    before = open(top, "rb").read()
    with qemu_io_holder(qemu_io, top, "qcow2"):
        with pytest.raises(ImageLockedError) as err:
            create_image(top, "qcow2", 1 << 20, {})
        proc = run(qemu_img, "create", "-q", "-f", "qcow2", top, "1M", check=False)
        assert proc.stderr == f"qemu-img: {top}: {err.value.reason}\n"
    assert open(top, "rb").read() == before


# -- convert's sources: nobody may write to them while they are copied ------

def qimg_cli(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    """qimg as a separate process, its messages prefixed like qemu-img's."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))
    proc = subprocess.run([sys.executable, "-m", "imagetools", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd,
                          env=dict(os.environ, LC_ALL="C", PYTHONPATH=root))
    proc.stderr = proc.stderr.replace("qimg: ", "qemu-img: ")
    return proc


@pytest.fixture
def raw_backed(qemu_img, tmp_path):
    base = str(tmp_path / "base.raw")
    top = str(tmp_path / "top.qcow2")
    create_image(base, "raw", 1 << 20, {})
    run(qemu_img, "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
    return base, top, str(tmp_path / "out.raw")


def test_convert_refuses_sources_another_process_writes(qemu_img, qemu_io, raw_backed):
    """A raw source, or the raw backing file of a qcow2 source, that a writer
    holds: qemu-img convert refuses (it does not share write on its sources),
    and so does qimg, with the same message; -U lifts it for both."""
    base, top, out = raw_backed
    with qemu_io_holder(qemu_io, base, "raw"):
        for src in ([base, "-f", "raw"], [top]):
            argv = ["convert", "-O", "raw", *src[1:], src[0], out]
            ref = run(qemu_img, *argv, check=False)
            ours = qimg_cli(*argv)
            assert ref.returncode == ours.returncode == 1
            assert 'Failed to get shared "write" lock' in ref.stderr
            assert ours.stderr == ref.stderr
            argv.insert(1, "-U")
            assert run(qemu_img, *argv).returncode == qimg_cli(*argv).returncode == 0


def test_convert_sources_lock_out_writers_in_this_process_too(raw_backed):
    """OFD locks conflict between two opens of one file even in one process:
    once convert holds its sources, opening one of them for writing fails
    with the lock error (not only through convert's explicit same-file check)."""
    from imagetools.ops.common import open_image as cli_open
    from imagetools.output import Reported
    base, top, _ = raw_backed
    with cli_open(top, read_only=True, unchanged=True):
        assert held_bytes(top) == held_bytes(base) == {100, 201, 203}
        for path, fmt in ((base, "raw"), (top, "qcow2")):
            with pytest.raises(ImageLockedError) as err:
                open_image(path, fmt, read_only=False)
            assert err.value.reason == ('Failed to get "write" lock\n'
                                        f"Is another process using the image [{path}]?")
        with open_image(base, "raw", read_only=True):     # readers are welcome
            pass
    with cli_open(base, "raw", read_only=True, force_share=True, unchanged=True):
        assert held_bytes(base) == {100}                    # -U shares everything
    with open_image(base, "raw", read_only=False) as writer:
        with pytest.raises(Reported) as err:
            cli_open(top, read_only=True, unchanged=True)
        assert str(err.value) == (f"Could not open '{top}': Failed to get shared \"write\" "
                                  f"lock\nIs another process using the image [{base}]?")
        del writer
    assert held_bytes(top) == held_bytes(base) == set()
