"""Crash safety: qimg killed (SIGKILL) at every write of a command.

For each command the test first counts the host-file changes the command
makes, then runs it again on fresh copies of the same images, killed right
after its 1st, 2nd, ... change (``hostfile.set_fault_after``, in a forked
child so no interpreter start is paid per run). After each kill the real
``qemu-img check`` must find every image free of corruption (leaks are
allowed) and the data must be there: what the guest saw before, or -- for
the parts the command changes on purpose -- what it sees after.

A second test kills whole ``qimg`` processes at random moments.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from snap_helpers import guest_bytes, qemu_check, run, snapshot_names

pytestmark = [pytest.mark.oracle, pytest.mark.slow, pytest.mark.timeout(600)]


def _run_child(argv: list[str], cwd: Path, kill_after: int) -> tuple[int, int]:
    """Run ``qimg argv`` in a forked child killed after ``kill_after`` file
    changes (0: never). Returns (wait status, changes made)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the child
        code = 1
        try:
            os.close(read_end)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.chdir(cwd)
            from imagetools import cli
            from imagetools.formats import hostfile
            hostfile.set_fault_after(kill_after)
            code = cli.main(list(argv))
            os.write(write_end, str(hostfile.changes_done()).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        done = pipe.read()
    return status, int(done) if done else -1


#: QIMG_CRASH_EXHAUSTIVE=1 kills at every single change (slow; for development)
EXHAUSTIVE = bool(os.environ.get("QIMG_CRASH_EXHAUSTIVE"))


def _kill_points(total: int, budget: int = 36) -> list[int]:
    if total <= budget or EXHAUSTIVE:
        return list(range(1, total + 1))
    head = list(range(1, 9))
    tail = list(range(total - 7, total + 1))
    step = (total - 16) / (budget - 16)
    middle = [int(9 + k * step) for k in range(budget - 16)]
    return sorted(set(head + middle + tail))


class Scenario:
    """Images made once in ``template``; ``argv`` is the command; ``judge``
    looks at a directory after a kill (or after the command finished)."""

    def __init__(self, tools, name: str) -> None:
        self.tools = tools
        self.template = tools.dir / f"template-{name}"
        self.template.mkdir()
        self.qemu_img = tools.qemu_img

    def image(self, name: str, size: str, *writes: str, opts: str | None = None,
              backing: tuple[str, str] | None = None, fmt: str = "qcow2") -> None:
        argv = [self.qemu_img, "create", "-q", "-f", fmt]
        if opts:
            argv += ["-o", opts]
        if backing:
            argv += ["-b", backing[0], "-F", backing[1]]
        run(*argv, name, size, cwd=self.template)
        if writes:
            argv = [self.tools.qemu_io_bin, "-f", fmt]
            for w in writes:
                argv += ["-c", w]
            run(*argv, name, cwd=self.template)

    def qemu(self, *args: str) -> None:
        run(self.qemu_img, *args, cwd=self.template)

    def view(self, directory: Path, name: str, snapshot: str | None = None) -> bytes:
        return guest_bytes(self.qemu_img, directory / name, directory, snapshot=snapshot)

    def fresh(self, tag: str) -> Path:
        work = self.tools.dir / tag
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(self.template, work)
        return work


def _exercise(scenario: Scenario, argv: list[str], judge, budget: int = 36) -> int:
    """Count the changes, then kill at many of them; ``judge(dir, finished)``."""
    work = scenario.fresh("count")
    status, total = _run_child(argv, work, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"{argv} failed"
    assert total > 0
    if EXHAUSTIVE:
        print(f"\n{' '.join(argv)}: {total} file changes, killed after each")
    judge(work, True)
    for k in _kill_points(total, budget):
        work = scenario.fresh(f"kill-{k}")
        status, _ = _run_child(argv, work, k)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert killed or (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0), status
        try:
            judge(work, not killed)
        except AssertionError as err:
            raise AssertionError(f"{' '.join(argv)} killed after change {k}/{total}: "
                                 f"{err}") from None
        shutil.rmtree(work)
    return total


def _clean(scenario, work, *names):
    for name in names:
        qemu_check(scenario.qemu_img, work / name, allow_leaks=True)


def test_snapshot_create_apply_delete(tools):
    s = Scenario(tools, "snap")
    # 512-byte clusters: 32 L2 tables and many refcount blocks change per step
    s.image("s.qcow2", "1M", "write -P 1 0 1M", "write -z 64k 16k", opts="cluster_size=512")
    s.qemu("snapshot", "-c", "keep", "s.qcow2")
    base = s.view(s.template, "s.qcow2")
    tools.io("qcow2", str(s.template / "s.qcow2"), "write -P 2 256k 512k")
    now = s.view(s.template, "s.qcow2")

    def judge_create(work, finished):
        _clean(s, work, "s.qcow2")
        assert s.view(work, "s.qcow2") == now
        assert s.view(work, "s.qcow2", "keep") == base
        names = [n for _, n in snapshot_names(s.qemu_img, work / "s.qcow2")]
        if "new" in names:
            assert s.view(work, "s.qcow2", "new") == now
        assert ("new" in names) or not finished

    _exercise(s, ["snapshot", "-c", "new", "s.qcow2"], judge_create)

    def judge_apply(work, finished):
        _clean(s, work, "s.qcow2")
        assert s.view(work, "s.qcow2") in (now, base)
        assert s.view(work, "s.qcow2", "keep") == base
        assert s.view(work, "s.qcow2") == base or not finished

    _exercise(s, ["snapshot", "-a", "keep", "s.qcow2"], judge_apply)

    def judge_delete(work, finished):
        _clean(s, work, "s.qcow2")
        assert s.view(work, "s.qcow2") == now
        names = [n for _, n in snapshot_names(s.qemu_img, work / "s.qcow2")]
        if "keep" in names:
            assert s.view(work, "s.qcow2", "keep") == base
        assert "keep" not in names or not finished

    _exercise(s, ["snapshot", "-d", "keep", "s.qcow2"], judge_delete)


def test_commit(tools):
    s = Scenario(tools, "commit")
    s.image("base.qcow2", "4M", "write -P 1 0 4M", opts="cluster_size=64k")
    s.image("mid.qcow2", "4M", "write -P 2 1M 1M", "write -z 3M 256k", opts="cluster_size=4k",
            backing=("base.qcow2", "qcow2"))
    s.image("top.qcow2", "6M", "write -P 3 512k 1M", "write -c -P 4 5M 64k",
            "discard 2M 64k", opts="cluster_size=4k", backing=("mid.qcow2", "qcow2"))
    before = s.view(s.template, "top.qcow2")

    def judge(work, finished):
        _clean(s, work, "top.qcow2", "mid.qcow2", "base.qcow2")
        assert s.view(work, "top.qcow2") == before

    _exercise(s, ["commit", "top.qcow2"], judge)
    _exercise(s, ["commit", "-b", "base.qcow2", "top.qcow2"], judge, budget=24)
    # tables moved by snapshot transactions: emptying goes through a temporary layout
    for action in ("-c", "-d"):
        assert tools.ours("snapshot", action, "x", str(s.template / "top.qcow2")).rc == 0
    _exercise(s, ["commit", "top.qcow2"], judge, budget=24)


def test_rebase(tools):
    s = Scenario(tools, "rebase")
    s.image("old.qcow2", "4M", "write -P 1 0 3M", opts="cluster_size=4k")
    s.image("new.qcow2", "4M", "write -P 1 0 1M", "write -P 5 2M 2M")
    s.image("top.qcow2", "4M", "write -P 3 1536k 4k", opts="cluster_size=4k",
            backing=("old.qcow2", "qcow2"))
    before = s.view(s.template, "top.qcow2")

    def judge(work, finished):
        _clean(s, work, "top.qcow2")
        assert s.view(work, "top.qcow2") == before
        info = json.loads(run(s.qemu_img, "info", "-U", "--output=json", str(work / "top.qcow2"))
                          .stdout)
        assert info.get("backing-filename") in (("new.qcow2",) if finished else
                                                 ("old.qcow2", "new.qcow2"))

    _exercise(s, ["rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"], judge)

    def judge_flat(work, finished):
        _clean(s, work, "top.qcow2")
        assert s.view(work, "top.qcow2") == before

    _exercise(s, ["rebase", "-b", "", "top.qcow2"], judge_flat, budget=24)


def test_resize(tools):
    s = Scenario(tools, "resize")
    s.image("r.qcow2", "3M", "write -P 7 0 3M", opts="cluster_size=512")
    s.qemu("snapshot", "-c", "keep", "r.qcow2")
    s.qemu("bitmap", "--add", "r.qcow2", "dirty")
    before = s.view(s.template, "r.qcow2")

    def judge_grow(work, finished):
        _clean(s, work, "r.qcow2")
        data = s.view(work, "r.qcow2")
        assert data[:len(before)] == before and not any(data[len(before):])
        assert len(data) == (5 << 20) or not finished
        kept = s.view(work, "r.qcow2", "keep")      # (qemu-img shows it at today's size)
        assert kept[:len(before)] == before and not any(kept[len(before):])

    _exercise(s, ["resize", "--preallocation=metadata", "r.qcow2", "5M"], judge_grow)

    def judge_shrink(work, finished):
        _clean(s, work, "r.qcow2")
        data = s.view(work, "r.qcow2")
        assert data[:1 << 20] == before[:1 << 20]
        assert len(data) == (1 << 20) or not finished
        assert s.view(work, "r.qcow2", "keep") == before[:len(data)]

    _exercise(s, ["resize", "--shrink", "r.qcow2", "1M"], judge_shrink)


def test_amend(tools):
    s = Scenario(tools, "amend")
    s.image("a.qcow2", "2M", "write -P 1 0 1M", "write -z 1M 128k", opts="cluster_size=4k")
    s.qemu("snapshot", "-c", "keep", "a.qcow2")
    tools.io("qcow2", str(s.template / "a.qcow2"), "write -z 0 64k", "write -P 2 1536k 64k")
    now, kept = s.view(s.template, "a.qcow2"), s.view(s.template, "a.qcow2", "keep")

    def judge(work, finished):
        _clean(s, work, "a.qcow2")
        assert s.view(work, "a.qcow2") == now
        assert s.view(work, "a.qcow2", "keep") == kept

    _exercise(s, ["amend", "-o", "refcount_bits=4", "a.qcow2"], judge)
    _exercise(s, ["amend", "-o", "compat=0.10", "a.qcow2"], judge)


def test_convert_into_existing_image(tools):
    s = Scenario(tools, "convert")
    s.image("src.qcow2", "3M", "write -P 1 0 1M", "write -P 2 2M 512k")
    s.image("dst.qcow2", "3M", "write -P 9 0 3M", opts="cluster_size=4k")
    s.qemu("snapshot", "-c", "keep", "dst.qcow2")
    old = s.view(s.template, "dst.qcow2")
    src = s.view(s.template, "src.qcow2")

    def judge(work, finished):
        _clean(s, work, "dst.qcow2", "src.qcow2")
        assert s.view(work, "src.qcow2") == src
        assert s.view(work, "dst.qcow2", "keep") == old
        if finished:
            assert s.view(work, "dst.qcow2") == src

    _exercise(s, ["convert", "-n", "-O", "qcow2", "src.qcow2", "dst.qcow2"], judge)


def test_random_kills_of_whole_processes(tools, qimg_bin):
    """Whole qimg processes (interpreter start included) killed after random
    delays while they commit and snapshot a 64 MiB chain with 4 KiB clusters."""
    s = Scenario(tools, "random")
    s.image("base.qcow2", "64M", "write -P 1 0 64M")
    s.image("top.qcow2", "64M", "write -P 2 0 24M", "write -z 40M 8M",
            opts="cluster_size=4k", backing=("base.qcow2", "qcow2"))
    before = s.view(s.template, "top.qcow2")
    rng = random.Random(5)
    env = dict(os.environ, LC_ALL="C")
    for round_ in range(6):
        work = s.fresh(f"random-{round_}")
        argv = ([qimg_bin, "commit", "top.qcow2"] if round_ % 2 == 0 else
                [qimg_bin, "snapshot", "-c", "s", "top.qcow2"])
        proc = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _clean(s, work, "top.qcow2", "base.qcow2")
        assert s.view(work, "top.qcow2") == before, f"round {round_}"
        shutil.rmtree(work)
