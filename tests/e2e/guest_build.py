"""Build what a real test guest boots: an uncompressed kernel and an initramfs.

The kernel is Debian's generic ``linux-image-amd64`` (fetched with
``apt-get download``, unpacked without root); its ``vmlinux`` is extracted
from ``vmlinuz`` so QEMU can boot it through PVH. The initramfs holds the
host's static busybox, the few modules the guest needs (loaded with insmod in
dependency order, read from each module's ``.modinfo``) and a first-stage
init that mounts the host's root over virtio-9p read-only under a tmpfs
overlay and switches to it. Everything lands in a cache directory and is
rebuilt only when the kernel package changes.

When the kernel cannot be had (no apt, no network, no busybox) the builder
raises :class:`GuestUnavailable` with a reason a test can skip with.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import lzma
import os
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

#: Modules the guest needs, in an order that already respects soft
#: dependencies (ext4 wants crc32c only as a softdep: name it explicitly).
WANTED_MODULES = (
    "virtio_pci", "virtio_console", "virtio_blk", "virtio_rng",
    "9pnet_virtio", "9p", "overlay", "crc32c_generic", "ext4",
)

#: The init scripts packed into the initramfs (first stage, second stage).
INIT_SCRIPTS = ("guest_init.sh", "guest_stage2.sh")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


class GuestUnavailable(Exception):
    """The guest cannot be built or booted here; the message says why."""


@dataclass(frozen=True)
class GuestImage:
    """A bootable kernel + initramfs pair in the cache."""

    vmlinux: Path
    initramfs: Path
    kernel_release: str


def cache_root() -> Path:
    """Where guest artifacts are cached: $QUIESCE_CACHE or <repo>/.cache."""
    root = os.environ.get("QUIESCE_CACHE")
    return Path(root) if root else REPO / ".cache"


def ensure_guest_image(cache: Path | None = None) -> GuestImage:
    """Build (once) and return the kernel and initramfs for the test guest.

    The kernel is cached per Debian package version; the initramfs per hash
    of its inputs (init scripts, module list), so editing the scripts
    rebuilds only the few-MiB archive.
    """
    cache = (cache or cache_root()) / "guest"
    cache.mkdir(parents=True, exist_ok=True)
    package = _kernel_package()
    kernel_dir = cache / package
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (kernel_dir / "done").exists():
            _build_kernel(package, kernel_dir)
        initramfs = kernel_dir / f"initramfs-{_initramfs_key()}.cpio"
        if not initramfs.exists():
            modules = {_module_name(p.name): p for p in (kernel_dir / "modules").iterdir()}
            order = (kernel_dir / "modules.load").read_text().split()
            tmp = initramfs.with_suffix(".tmp")
            _write_initramfs(tmp, [modules[m] for m in order])
            tmp.rename(initramfs)
    release = (kernel_dir / "release").read_text().strip()
    return GuestImage(kernel_dir / "vmlinux", initramfs, release)


def _initramfs_key() -> str:
    digest = hashlib.sha256(" ".join(WANTED_MODULES).encode())
    for script in INIT_SCRIPTS:
        digest.update((HERE / script).read_bytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- kernel


def _kernel_package() -> str:
    """The versioned kernel package linux-image-amd64 currently depends on."""
    if shutil.which("apt-cache") is None:
        raise GuestUnavailable("apt-cache not found: the guest kernel comes from Debian's archive")
    out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"],
                         capture_output=True, text=True)
    for line in out.stdout.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    raise GuestUnavailable("cannot resolve linux-image-amd64 (apt-cache depends: "
                           f"{(out.stderr or out.stdout).strip()[:200]!r}); run apt-get update")


def _build_kernel(package: str, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        deb = _download(package, staging)
        release, vmlinuz, modules, builtin = _unpack(deb, staging)
        (staging / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
        order = module_load_order(WANTED_MODULES, modules, builtin)
        (staging / "modules").mkdir()
        for name in order:
            shutil.copy(modules[name], staging / "modules" / modules[name].name)
        (staging / "modules.load").write_text("\n".join(order) + "\n")
        (staging / "release").write_text(release + "\n")
        shutil.rmtree(staging / "deb")
        deb.unlink()
        (staging / "done").write_text(package + "\n")
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _download(package: str, where: Path) -> Path:
    if shutil.which("apt-get") is None:
        raise GuestUnavailable("apt-get not found: cannot download the guest kernel")
    out = subprocess.run(["apt-get", "download", "-q", package], cwd=where,
                         capture_output=True, text=True, timeout=600)
    debs = list(where.glob("*.deb"))
    if out.returncode != 0 or not debs:
        raise GuestUnavailable(f"apt-get download {package} failed (offline?): "
                               f"{out.stderr.strip()[-300:]}")
    return debs[0]


def _unpack(deb: Path, where: Path) -> tuple[str, Path, dict[str, Path], set[str]]:
    """Extract vmlinuz and the kernel modules from the package, nothing else."""
    root = where / "deb"
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    vmlinuz = None
    modules: dict[str, Path] = {}
    builtin: set[str] = set()
    release = ""
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name.lstrip("./")
                if not member.isfile():
                    continue
                is_kernel = name.startswith("boot/vmlinuz-")
                is_module = name.startswith("lib/modules/") and name.endswith(".ko")
                is_builtin = name.startswith("lib/modules/") and name.endswith("/modules.builtin")
                if not (is_kernel or is_module or is_builtin):
                    continue
                data = tar.extractfile(member).read()
                path = root / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                if is_kernel:
                    vmlinuz = path
                    release = name[len("boot/vmlinuz-"):]
                elif is_module:
                    modules[_module_name(path.name)] = path
                else:
                    builtin = {_module_name(line.rsplit("/", 1)[-1])
                               for line in data.decode().splitlines() if line}
    finally:
        proc.stdout.close()
        if proc.wait() != 0:
            raise GuestUnavailable(f"dpkg-deb could not unpack {deb.name}")
    if vmlinuz is None:
        raise GuestUnavailable(f"{deb.name} holds no /boot/vmlinuz-*")
    return release, vmlinuz, modules, builtin


def _module_name(filename: str) -> str:
    return filename.removesuffix(".ko").replace("-", "_")


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage (xz, gzip or zstd payload)."""
    candidates = [
        (b"\xfd7zXZ\x00", lambda d: lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(d)),
        (b"\x1f\x8b\x08", lambda d: zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(d)),
        (b"\x28\xb5\x2f\xfd", _zstd_decompress),
    ]
    for magic, decompress in candidates:
        start = vmlinuz.find(magic)
        while start >= 0:
            try:
                out = decompress(vmlinuz[start:])
            except Exception:  # a false magic inside other data: try the next one
                out = b""
            if out.startswith(b"\x7fELF"):
                return out
            start = vmlinuz.find(magic, start + 1)
    raise GuestUnavailable("no compressed ELF kernel found inside vmlinuz")


def _zstd_decompress(data: bytes) -> bytes:
    import zstandard
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def read_modinfo(ko: bytes) -> dict[str, list[str]]:
    """The key=value pairs of an ELF64 module's ``.modinfo`` section."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2:
        raise GuestUnavailable("not an ELF64 kernel module")
    shoff, = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _, _, _, offset, size = struct.unpack_from("<IIQQQQ", ko, shoff + i * shentsize)
        return name, offset, size

    _, str_off, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name, offset, size = section(i)
        end = ko.index(b"\0", str_off + name)
        if ko[str_off + name:end] != b".modinfo":
            continue
        for entry in ko[offset:offset + size].split(b"\0"):
            if b"=" in entry:
                key, value = entry.decode(errors="replace").split("=", 1)
                info.setdefault(key, []).append(value)
    return info


def module_load_order(wanted: tuple[str, ...], modules: dict[str, Path],
                      builtin: set[str]) -> list[str]:
    """Wanted modules and their dependencies, each after what it depends on."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order or name in builtin:
            return
        if name not in modules:
            raise GuestUnavailable(f"kernel module {name} is neither shipped nor built in")
        if name in visiting:
            raise GuestUnavailable(f"module dependency cycle at {name}")
        visiting.add(name)
        info = read_modinfo(modules[name].read_bytes())
        for dep in ",".join(info.get("depends", [])).split(","):
            if dep:
                visit(_module_name(dep))
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


# ------------------------------------------------------------- initramfs


class _Cpio:
    """A newc cpio archive written in memory (no root, no cpio binary needed)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self._pad()
        self.buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _is_static_elf(path: Path) -> bool:
    """True for an ELF64 executable without a PT_INTERP program header."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def _static_busybox() -> Path:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.exists() and _is_static_elf(path):
            return path
    raise GuestUnavailable("static busybox not found (Debian package busybox-static)")


def _write_initramfs(path: Path, modules: list[Path]) -> None:
    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules", "mnt", "mnt/host",
              "mnt/rw", "newroot", "etc"):
        cpio.directory(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3)
    cpio.file("bin/busybox", _static_busybox().read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    names = []
    for ko in modules:
        cpio.file(f"lib/modules/{ko.name}", ko.read_bytes())
        names.append(ko.name)
    cpio.file("etc/modules", ("\n".join(names) + "\n").encode())
    cpio.file("init", (HERE / "guest_init.sh").read_bytes(), 0o755)
    cpio.file("stage2", (HERE / "guest_stage2.sh").read_bytes(), 0o755)
    path.write_bytes(cpio.finish())
