"""raw: the guest disk byte for byte in a host file or block device.

Sparse-aware as QEMU's raw-over-file: block status comes from SEEK_DATA /
SEEK_HOLE (holes are ``zero``, data is ``data``, and every extent's host
offset equals its guest offset, as ``qemu-img map`` shows), zero writes use
FALLOC_FL_ZERO_RANGE (or punch a hole when unmapping), discards punch holes,
and block devices use BLKZEROOUT / BLKDISCARD.

The virtual size is the file length rounded up to 512 bytes; the tail past
the end of the file reads as zeros.

When the format was probed rather than given, QEMU restricts writes to the
first sector so that a guest cannot turn its disk into something that would
probe as another format (say a qcow2 header naming a host file as backing
file); this driver refuses such writes the same way (EPERM).

Create options (``qemu-img create -f raw``): ``preallocation`` off | falloc |
full, ``nocow`` (accepted, ignored off btrfs), ``extent_size_hint`` (accepted).
A fresh file gets its first 4 KiB written, as QEMU does to let later opens
probe the alignment, which is why ``disk size`` is 4 KiB.
"""

from __future__ import annotations

import errno
import os
TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any, Iterator

from imagetools.errors import ImageError, ImageIOError, UnsupportedError
from imagetools.formats import magic
from imagetools.formats.base import Driver, Extent, check_new_size
from imagetools.formats.hostfile import HostFile

SECTOR = 512
PREALLOC_MODES = ("off", "falloc", "full")


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


class RawDriver(Driver):
    format_name = "raw"

    def __init__(self, file: HostFile, *, read_only: bool, probed: bool = False) -> None:
        super().__init__(file.filename, read_only=read_only)
        self.file = file
        self.format_probed = probed
        self._size = _round_up(file.length(), SECTOR)

    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        return 1

    @classmethod
    def open(cls, filename: str, *, read_only: bool = True, force_share: bool = False,
             probed: bool = False) -> "RawDriver":
        file = HostFile.open(filename, read_only=read_only, force_share=force_share,
                             metadata=False)
        try:
            return cls(file, read_only=read_only, probed=probed)
        except BaseException:
            file.close()
            raise

    @classmethod
    def create(cls, filename: str, size: int, options: dict[str, Any]) -> None:
        prealloc = str(options.get("preallocation") or "off")
        if prealloc not in PREALLOC_MODES:
            if prealloc == "metadata":
                raise UnsupportedError("Unsupported preallocation mode: metadata")
            raise ImageError(f"invalid parameter value: {prealloc}")
        if "nocow" in options and str(options["nocow"]).lower() not in (
                "on", "off", "yes", "no", "true", "false", "y", "n"):
            raise ImageError("Parameter 'nocow' expects 'on' or 'off'")
        for key in options:
            if key not in ("preallocation", "nocow", "extent_size_hint", "size"):
                raise ImageError(f"Invalid parameter '{key}'")
        if options.get("backing_file"):
            raise UnsupportedError("Backing file not supported for file format 'raw'")
        size = _round_up(size, SECTOR)
        file = HostFile.open(filename, read_only=False, create=True)
        try:
            create_file(file, size, prealloc)
        finally:
            file.close()

    @classmethod
    def measure(cls, options: dict[str, Any], size: int | None = None,
                source: Driver | None = None) -> dict[str, int]:
        """Unallocated sectors count too: raw needs the whole virtual size."""
        required = source.size if source is not None else _round_up(size or 0, SECTOR)
        return {"required": required, "fully-allocated": required}

    # -- size and data -------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ImageIOError(f"Request out of range: offset {offset} length {length} "
                               f"(image size {self._size})", errno.EINVAL)

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        return self.file.pread_full(offset, length)

    def read_into(self, offset: int, buf) -> None:
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        self.file.preadinto(offset, view)

    def _writable(self) -> None:
        if self.read_only:
            raise ImageIOError("Image is read-only", errno.EACCES)

    def write(self, offset: int, data) -> None:
        self._writable()
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        if self.format_probed and offset < SECTOR and len(view):
            self._check_probed_write(offset, view)
        self.file.pwrite(offset, view)

    def write_from_fd(self, offset: int, length: int, src_fd: int, src_offset: int) -> None:
        self._writable()
        self._check_range(offset, length)
        if self.format_probed and offset < SECTOR and length:
            import os
            self._check_probed_write(offset, memoryview(os.pread(src_fd, SECTOR, src_offset)))
        self.file.copy_in(src_fd, src_offset, offset, length)

    def read_to_fd(self, offset: int, length: int, dst_fd: int, dst_offset: int) -> None:
        self._check_range(offset, length)
        file_len = self.file.length()
        inside = max(0, min(length, file_len - offset))
        if inside:
            self.file.copy_out(offset, dst_fd, dst_offset, inside)
        if inside < length:
            from imagetools.formats.hostfile import copy_range
            copy_range(self.file.fd, file_len, dst_fd, dst_offset + inside, length - inside)

    def _check_probed_write(self, offset: int, view: memoryview) -> None:
        """Refuse a first-sector write that would make the file probe as non-raw."""
        first = bytearray(self.file.pread_full(0, SECTOR))
        n = min(SECTOR - offset, len(view))
        first[offset:offset + n] = view[:n]
        if magic.probe_format(bytes(first), "") != "raw":
            raise ImageIOError("Operation not permitted", errno.EPERM)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self._writable()
        self._check_range(offset, length)
        end = offset + length
        file_len = self.file.length()
        if offset >= file_len:
            return                      # the tail past EOF reads as zeros already
        self.file.write_zeroes(offset, min(end, file_len) - offset, unmap=unmap)

    def discard(self, offset: int, length: int) -> None:
        self._writable()
        self._check_range(offset, length)
        end = min(offset + length, self.file.length())
        if end > offset:
            self.file.punch_hole(offset, end - offset)

    # -- status --------------------------------------------------------

    def block_status(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        if length is None:
            length = self._size - offset
        self._check_range(offset, length)
        end = offset + length
        file_end = min(end, self.file.length())
        name = self.filename
        if offset < file_end:
            for pos, n, is_data in self.file.data_runs(offset, file_end):
                yield Extent(pos, n, True, not is_data, is_data, pos, 0, name)
        tail = max(offset, file_end)
        if tail < end:
            yield Extent(tail, end - tail, True, True, False, tail, 0, name)

    def truncate(self, size: int, *, prealloc: str = "off") -> None:
        """qemu-img resize: the file becomes exactly ``size`` bytes (QEMU's
        file protocol with exact=true); falloc reserves and full writes the
        new part. Block devices cannot change size. (Added for the
        snapshot/commit issue.)"""
        if prealloc not in PREALLOC_MODES:
            raise UnsupportedError(f"Unsupported preallocation mode: {prealloc}")
        if self.read_only:
            raise ImageIOError("Image is read-only", errno.EACCES)
        check_new_size(size)
        file = self.file
        old = file.length()
        if file.is_device:
            if size != old:
                raise UnsupportedError("Cannot resize device files")
            return
        if size < old and prealloc != "off":
            raise ImageError("Cannot use preallocation for shrinking files")
        try:
            if size > old and prealloc == "falloc":
                file.fallocate(old, size - old)
            elif size > old and prealloc == "full":
                file.write_zero_data(old, size - old)
            file.truncate(size)
        except ImageIOError as err:
            if err.errno is None or not str(err).startswith("Could not resize "):
                raise
            raise ImageIOError(f"Could not resize file: {os.strerror(err.errno)}",
                               err.errno) from None
        self._size = _round_up(size, SECTOR)

    def allocated_size(self) -> int | None:
        return self.file.allocated()

    def has_zero_init(self) -> bool:
        return not self.file.is_block

    # -- lifetime ------------------------------------------------------

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        if self.backing is not None:
            self.backing.close()


def create_file(file: HostFile, size: int, prealloc: str) -> None:
    """Size a freshly truncated host file as QEMU's file protocol does.

    off: sparse; falloc: posix_fallocate; full: zeros written. For off and
    falloc the first min(size, 4 KiB) are then written as zeros, as QEMU's
    allocate_first_block does (so alignment probing works on later opens).
    Nothing is flushed, as QEMU's file protocol does not at creation: an
    fdatasync here cost 8-23 ms of a 0.22 s convert to raw (the journal
    commit), for no promise qemu-img makes.
    """
    if file.is_device:
        _create_on_device(file, size, prealloc)
        return
    file.truncate(0)
    if prealloc == "full":
        file.write_zero_data(0, size)
    else:
        file.truncate(size)
        if prealloc == "falloc":
            file.fallocate(0, size)
        if size:
            file.pwrite(0, bytes(min(size, 4096)))


def _create_on_device(file: HostFile, size: int, prealloc: str) -> None:
    """QEMU's host_device creation: the device keeps its size (it must be at
    least ``size``) and its first sector is zeroed, so that what it held
    before is not probed as a format on the next open."""
    if prealloc != "off":
        raise UnsupportedError(f"Unsupported preallocation mode '{prealloc}'")
    length = file.length()
    if size > length:
        raise ImageIOError("Cannot grow device files", errno.EINVAL)
    if length:
        file.write_zeroes(0, min(length, SECTOR))
    file.flush()


DRIVER = RawDriver
