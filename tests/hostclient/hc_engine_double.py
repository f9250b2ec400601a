"""A stand-in for hostclient.engine built on the real qemu-img, for the
orchestration tests: it lets a test make the copy fail, slow it down, or act
(write into the VM, press Ctrl-C) while a copy is under way. The product
never uses it; the real-guest tests run the project's own engine.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hostclient.engine import CopyStats
from hostclient.errors import EngineError, VerifyError


@dataclass
class QemuImgEngine:
    qemu_img: str
    fail_copy: str | None = None            # error message for the next copy
    crash_copy: bool = False                # the copy hits a bug (not an EngineError)
    during_copy: Callable[[str], None] | None = None   # called with the source mid-copy
    copy_steps: int = 4
    step_delay: float = 0.0
    copies: list[str] = field(default_factory=list)

    def copy_image(self, source: str, source_format: str, target: Path, *,
                   out_format: str = "qcow2", compress: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> CopyStats:
        started = time.monotonic()
        size = self.image_format(source)[1]
        self.copies.append(source)
        try:
            for step in range(self.copy_steps):
                if progress:
                    progress(size * step // self.copy_steps, size)
                if step == 1 and self.during_copy:
                    self.during_copy(source)
                time.sleep(self.step_delay)
            if self.fail_copy:
                raise EngineError(self.fail_copy)
            if self.crash_copy:
                raise RuntimeError("simulated bug in the copy")
            cmd = [self.qemu_img, "convert", "-f", source_format, "-O", out_format]
            if compress:
                cmd.append("-c")
            out = subprocess.run([*cmd, source, str(target)], capture_output=True, text=True)
            if out.returncode != 0:
                raise EngineError(out.stderr.strip())
            if progress:
                progress(size, size)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        return CopyStats(size, target.stat().st_size, time.monotonic() - started)

    def verify_copy(self, source: str, source_format: str, copy: Path) -> None:
        out = subprocess.run([self.qemu_img, "compare", "-f", source_format, "-F", "qcow2",
                              source, str(copy)], capture_output=True, text=True)
        if out.returncode != 0:
            raise VerifyError(out.stdout.strip() or out.stderr.strip())
        self.check_image(copy)

    def check_image(self, path: Path) -> None:
        out = subprocess.run([self.qemu_img, "check", str(path)], capture_output=True, text=True)
        if out.returncode != 0:
            raise VerifyError(out.stdout.strip() or out.stderr.strip())

    def content_sha256(self, path: str, fmt: str, check: Callable[[], None] | None = None) -> str:
        with tempfile.NamedTemporaryFile() as raw:
            subprocess.run([self.qemu_img, "convert", "-U", "-f", fmt, "-O", "raw", path, raw.name],
                           check=True)
            return hashlib.sha256(Path(raw.name).read_bytes()).hexdigest()

    def image_format(self, path: str) -> tuple[str, int]:
        out = subprocess.run([self.qemu_img, "info", "-U", "--output=json", path],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise EngineError(out.stderr.strip())
        info = json.loads(out.stdout)
        return info["format"], info["virtual-size"]

    def virtual_size(self, path: str, fmt: str | None = None) -> int:
        return self.image_format(path)[1]

    def install(self, monkeypatch) -> "QemuImgEngine":
        import hostclient.backup as backup
        import hostclient.restore as restore
        for module in (backup, restore):
            for name in ("copy_image", "verify_copy", "content_sha256",
                         "check_image", "virtual_size"):
                if hasattr(module, name):
                    monkeypatch.setattr(module, name, getattr(self, name))
        return self
