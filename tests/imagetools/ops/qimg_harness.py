"""Harness for the qimg command tests: run qimg and the real qemu-img side by side.

``tools`` runs both programs in the same scratch directory, with
``LC_ALL=C`` and ``TZ=UTC``. qimg runs through a wrapper *named* qemu-img,
so its messages carry the same ``qemu-img:`` prefix and stdout, stderr and
exit codes can be compared byte for byte. Images are made with the real
qemu-img and qemu-io (the oracle), never with qimg itself.
"""

from __future__ import annotations

import difflib
import os
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest
from image_oracle import ROOT, qimg_wrapper  # noqa: F401  (ROOT: for the tests)


@pytest.fixture(scope="session")
def qimg_as_qemu_img(tmp_path_factory) -> str:
    """qimg, installed under the name qemu-img (a drop-in)."""
    return qimg_wrapper(tmp_path_factory.mktemp("dropin"), "qemu-img")


@pytest.fixture(scope="session")
def qimg_bin(tmp_path_factory) -> str:
    """qimg under its own name."""
    return qimg_wrapper(tmp_path_factory.mktemp("qimgbin"), "qimg")


class Run(NamedTuple):
    rc: int
    out: bytes
    err: bytes

    def text(self) -> str:
        return (f"[exit {self.rc}]\n[stdout]\n{self.out.decode(errors='replace')}"
                f"[stderr]\n{self.err.decode(errors='replace')}")


ENV = dict(os.environ, LC_ALL="C", TZ="UTC")


class Tools:
    def __init__(self, qemu_img: str, qemu_io: str, qimg: str, workdir: Path) -> None:
        self.qemu_img = qemu_img
        self.qemu_io_bin = qemu_io
        self.qimg = qimg
        self.dir = workdir

    def _run(self, argv: list[str], timeout: float = 120, stdin: bytes | None = None) -> Run:
        proc = subprocess.run(argv, cwd=self.dir, env=ENV, capture_output=True,
                              timeout=timeout, input=stdin)
        return Run(proc.returncode, proc.stdout, proc.stderr)

    def ref(self, *args: str, **kw) -> Run:
        return self._run([self.qemu_img, *args], **kw)

    def ours(self, *args: str, **kw) -> Run:
        return self._run([self.qimg, *args], **kw)

    def both(self, *args: str) -> tuple[Run, Run]:
        return self.ref(*args), self.ours(*args)

    def same(self, *args: str) -> Run:
        """Run both; stdout, stderr and exit code must be identical."""
        ref, ours = self.both(*args)
        if ref != ours:
            diff = "\n".join(difflib.unified_diff(ref.text().splitlines(),
                                                  ours.text().splitlines(),
                                                  "qemu-img", "qimg", lineterm=""))
            pytest.fail(f"qimg differs from qemu-img for {' '.join(args)}:\n{diff}")
        return ours

    def ok(self, *args: str) -> Run:
        """Run qemu-img (setup); it must succeed."""
        run = self.ref(*args)
        assert run.rc == 0, run.text()
        return run

    def io(self, fmt: str, image: str, *commands: str) -> None:
        """qemu-io -c ... on an image (to put data into it)."""
        argv = [self.qemu_io_bin, "-f", fmt]
        for command in commands:
            argv += ["-c", command]
        run = self._run(argv + [image])
        assert run.rc == 0 and b"error" not in run.out.lower(), run.text()

    def image(self, name: str, fmt: str, size: str, *writes: str, opts: str | None = None,
              backing: tuple[str, str] | None = None) -> str:
        """Create an image with the real qemu-img and fill it with qemu-io."""
        argv = ["create", "-q", "-f", fmt]
        if opts:
            argv += ["-o", opts]
        if backing:
            argv += ["-b", backing[0], "-F", backing[1]]
        self.ok(*argv, name, size)
        if writes:
            self.io(fmt, name, *writes)
        return name

    def path(self, name: str) -> Path:
        return self.dir / name


class Pair:
    """Two scratch directories: qemu-img works in ``ref``, qimg in ``ours``.

    For commands that write files: both run the same command line on the
    same relative names, each in its own directory, and the outputs must
    match; then the files they wrote can be compared.
    """

    def __init__(self, qemu_img: str, qemu_io: str, qimg: str, root: Path) -> None:
        (root / "ref").mkdir()
        (root / "ours").mkdir()
        self.ref = Tools(qemu_img, qemu_io, qimg, root / "ref")
        self.ours = Tools(qemu_img, qemu_io, qimg, root / "ours")

    def setup(self, method: str, *args, **kw) -> None:
        """Run a Tools setup method (image, io, ok) in both directories."""
        getattr(self.ref, method)(*args, **kw)
        getattr(self.ours, method)(*args, **kw)

    def same(self, *args: str) -> Run:
        ref = self.ref.ref(*args)
        ours = self.ours.ours(*args)
        if ref != ours:
            diff = "\n".join(difflib.unified_diff(ref.text().splitlines(),
                                                  ours.text().splitlines(),
                                                  "qemu-img", "qimg", lineterm=""))
            pytest.fail(f"qimg differs from qemu-img for {' '.join(args)}:\n{diff}")
        return ours

    def judge(self, *args: str) -> tuple[Run, Run]:
        """Run the real qemu-img on the files of both directories (e.g. map, check)."""
        return self.ref.ref(*args), self.ours.ref(*args)

    def judged_same(self, *args: str, ignore: tuple[str, ...] = ()) -> Run:
        """qemu-img gives the same answer on both sides (JSON members in
        ``ignore`` left out of the comparison)."""
        ref, ours = self.judge(*args)
        if ignore:
            ref, ours = _without(ref, ignore), _without(ours, ignore)
        assert ref == ours, f"qemu-img {' '.join(args)}:\n{ref.text()}\nvs\n{ours.text()}"
        return ours


def _without(run: Run, keys: tuple[str, ...]) -> Run:
    import json
    value = json.loads(run.out)

    def strip(item):
        if isinstance(item, dict):
            return {k: strip(v) for k, v in item.items() if k not in keys}
        if isinstance(item, list):
            return [strip(v) for v in item]
        return item
    return Run(run.rc, json.dumps(strip(value), indent=1).encode(), run.err)


@pytest.fixture
def pair(qemu_img, qemu_io, qimg_as_qemu_img, tmp_path) -> Pair:
    return Pair(qemu_img, qemu_io, qimg_as_qemu_img, tmp_path)


@pytest.fixture
def tools(qemu_img, qemu_io, qimg_as_qemu_img, tmp_path) -> Tools:
    """A fresh scratch directory for one test."""
    return Tools(qemu_img, qemu_io, qimg_as_qemu_img, tmp_path)


@pytest.fixture(scope="module")
def shared_tools(qemu_img, qemu_io, qimg_as_qemu_img, tmp_path_factory) -> Tools:
    """One scratch directory for a whole test module (images built once)."""
    return Tools(qemu_img, qemu_io, qimg_as_qemu_img, tmp_path_factory.mktemp("ws"))
