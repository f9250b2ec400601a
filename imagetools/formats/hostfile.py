"""The host file under an image (QEMU's "file" / "host_device" protocol).

One :class:`HostFile` is one open file descriptor with the operations the
format drivers need: positioned reads and writes that never come back short
without saying why, the file or block-device length, allocation queries
(SEEK_DATA / SEEK_HOLE), zeroing and hole punching (fallocate on files,
BLKZEROOUT / BLKDISCARD on block devices), truncation and flushing. Errors
become :class:`~imagetools.errors.ImageIOError` or, at open time,
:class:`~imagetools.errors.ImageOpenError` worded as QEMU words them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

from imagetools.errors import ImageIOError, ImageOpenError
from imagetools.formats.base import BDRV_MAX_LENGTH

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F

SYNC_FILE_RANGE_WRITE = 2


# -- fault injection (crash-safety tests) -------------------------------------
#
# ``QIMG_FAULT_AFTER=N`` makes the process SIGKILL itself right after its Nth
# operation that changes a host file (write, zero, punch, truncate, fallocate,
# kernel copy), so a test can stop a command at every point where its images
# change; ``QIMG_FAULT_COUNT=PATH`` writes the number of such operations done
# to PATH when the process exits. :func:`set_fault_after` is the same from
# Python (a forked test child). Nothing happens when neither is set.

_changes = 0
_fault_after = int(os.environ.get("QIMG_FAULT_AFTER") or 0)


def set_fault_after(count: int) -> None:
    """Kill this process (SIGKILL) right after its ``count``-th file change (0: never)."""
    global _fault_after, _changes
    _fault_after = count
    _changes = 0


def changes_done() -> int:
    """How many host-file changes this process made (see ``set_fault_after``)."""
    return _changes


def _changed() -> None:
    global _changes
    _changes += 1
    if _fault_after and _changes >= _fault_after:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def _write_count_at_exit(path: str) -> None:
    import atexit

    def write() -> None:
        with open(path, "w") as out:
            out.write(str(_changes))
    atexit.register(write)


if os.environ.get("QIMG_FAULT_COUNT"):
    _write_count_at_exit(os.environ["QIMG_FAULT_COUNT"])


def _libc(name: str, *argtypes: str):
    """libc's function ``name`` (ctypes, imported when first needed; argument
    types by ctypes name), or None where libc has no such function."""
    fn = _libc_functions.get(name)
    if fn is None:
        import ctypes
        fn = getattr(ctypes.CDLL(None, use_errno=True), name, False)
        if fn:
            fn.argtypes = [getattr(ctypes, t) for t in argtypes]
            fn.restype = ctypes.c_int
        _libc_functions[name] = fn
    return fn or None


#: libc functions looked up so far (False: missing)
_libc_functions: dict = {}


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none); raises OSError."""
    fn = _libc("fallocate", "c_int", "c_int", "c_int64", "c_int64")
    if fn is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    if fn(fd, mode, offset, length) != 0:
        import ctypes
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def io_error(what: str, err: OSError) -> ImageIOError:
    return ImageIOError(f"{what}: {err.strerror or err}", err.errno)


#: no request may reach past QEMU's BDRV_MAX_LENGTH
_MAX_REQUEST_END = BDRV_MAX_LENGTH
#: fallocate errors that mean "not here" (ENODEV: a character device)
_NO_FALLOCATE = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV)
_copy_file_range_ok = hasattr(os, "copy_file_range")
_NO_CFR = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF,
           errno.ETXTBSY, errno.EPERM)


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int,
               length: int) -> None:
    """Copy bytes between two file descriptors without passing them through Python.

    Uses copy_file_range(2); falls back to pread/pwrite when the kernel
    refuses (different filesystems, special files). Bytes past the end of
    the source are written as zeros, as a read past EOF would give.
    """
    global _copy_file_range_ok
    done = 0
    try:
        while done < length and _copy_file_range_ok:
            try:
                n = os.copy_file_range(src_fd, dst_fd, length - done,
                                       src_offset + done, dst_offset + done)
            except OSError as err:
                if err.errno in _NO_CFR:
                    if err.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
                        _copy_file_range_ok = False
                    break
                raise
            if n == 0:
                break
            done += n
        chunk = 4 << 20
        while done < length:
            n = min(chunk, length - done)
            data = os.pread(src_fd, n, src_offset + done)
            if len(data) < n:
                data += bytes(n - len(data))
            view = memoryview(data)
            written = 0
            while written < n:
                written += os.pwrite(dst_fd, view[written:], dst_offset + done + written)
            done += n
    except OSError as err:
        raise ImageIOError(f"Could not copy data: {err.strerror or err}", err.errno) from None


class HostFile:
    """An open host file or block device."""

    def __init__(self, fd: int, filename: str, read_only: bool) -> None:
        self.fd = fd
        self.filename = filename
        self.read_only = read_only
        st = os.fstat(fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        #: a block or character device (QEMU's host_device): its size is fixed
        self.is_device = self.is_block or stat.S_ISCHR(st.st_mode)
        self.dev_ino = (st.st_dev, st.st_ino)
        self._can_zero_range = True
        self._can_punch = True
        #: cache=unsafe: never fdatasync (ordering of writes is kept)
        self.no_flush = False

    @classmethod
    def open(cls, filename: str, *, read_only: bool = True, create: bool = False,
             lock: bool = True, force_share: bool = False, metadata: bool = True,
             data_file: bool = False) -> "HostFile":
        """Open ``filename`` and take QEMU's image locks on it.

        Errors read ``Could not open 'F': <strerror>`` (ImageOpenError) or
        are the lock conflict (ImageLockedError). ``create`` makes the file
        if needed but does not truncate it: the caller truncates once the
        locks are held, as QEMU does, so a file in use is never clobbered.
        """
        flags = os.O_CLOEXEC | (os.O_RDONLY if read_only else os.O_RDWR)
        if create:
            flags |= os.O_CREAT
        try:
            fd = os.open(filename, flags, 0o644)
        except OSError as err:
            reason = f"Could not open '{filename}': {err.strerror}"
            raise ImageOpenError(filename, reason) from None
        except ValueError:          # a NUL byte in a name read from an image
            raise ImageOpenError(filename, f"Could not open '{filename}': Invalid argument") \
                from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise ImageOpenError(filename, "'file' driver requires "
                                     f"'{filename}' to be a regular file")
            if lock:
                from imagetools.locking import lock_image
                lock_image(fd, filename, read_only=read_only, force_share=force_share,
                           metadata=metadata, data_file=data_file)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, filename, read_only)

    # -- size and allocation --------------------------------------------

    def length(self) -> int:
        """Bytes in the file (or block device)."""
        try:
            if self.is_block:
                return os.lseek(self.fd, 0, os.SEEK_END)
            return os.fstat(self.fd).st_size
        except OSError as err:
            raise io_error(f"Could not get the size of '{self.filename}'", err) from None

    def allocated(self) -> int:
        """Host bytes allocated to the file (st_blocks x 512); 0 for devices."""
        try:
            st = os.fstat(self.fd)
        except OSError as err:
            raise io_error(f"Could not stat '{self.filename}'", err) from None
        return 0 if self.is_block else st.st_blocks * 512

    def data_runs(self, start: int, end: int):
        """(offset, length, is_data) runs covering ``[start, end)`` of the file.

        Uses SEEK_DATA / SEEK_HOLE; where the filesystem cannot tell, the
        whole range is data. ``end`` must not pass the file length.
        """
        pos = start
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:      # only a hole up to EOF
                    yield pos, end - pos, False
                    return
                yield pos, end - pos, True        # no SEEK_DATA: assume data
                return
            if data > pos:
                hole_end = min(data, end)
                yield pos, hole_end - pos, False
                pos = hole_end
                continue
            try:
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            except OSError:
                hole = end
            hole = min(max(hole, pos + 1), end)
            yield pos, hole - pos, True
            pos = hole

    # -- data ---------------------------------------------------------

    def _range(self, offset: int, length: int) -> None:
        # QEMU's block layer fails any request reaching past BDRV_MAX_LENGTH
        # with EIO (a table offset near 2^63 in a header is only an I/O error)
        if offset < 0 or length < 0 or offset + length > _MAX_REQUEST_END:
            raise ImageIOError("Input/output error", errno.EIO)

    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; shorter only at end of file."""
        self._range(offset, length)
        try:
            data = os.pread(self.fd, length, offset)
            if len(data) == length or not data:
                return data
            parts = [data]
            got = len(data)
            while got < length:
                more = os.pread(self.fd, length - got, offset + got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            return b"".join(parts)
        except OSError as err:
            raise io_error(f"Could not read '{self.filename}'", err) from None

    def pread_full(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes; past end of file reads as zeros."""
        data = self.pread(offset, length)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def preadinto(self, offset: int, view: memoryview) -> int:
        """Fill ``view`` from ``offset``; zero-fills past end of file. Returns bytes read."""
        total = len(view)
        got = 0
        self._range(offset, total)
        try:
            while got < total:
                n = os.preadv(self.fd, [view[got:]], offset + got)
                if n == 0:
                    view[got:] = bytes(total - got)
                    break
                got += n
        except OSError as err:
            raise io_error(f"Could not read '{self.filename}'", err) from None
        return got

    def pwrite(self, offset: int, data) -> None:
        """Write all of ``data`` at ``offset``."""
        view = memoryview(data).cast("B")
        done = 0
        self._range(offset, len(view))
        try:
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], offset + done)
        except OSError as err:
            raise io_error(f"Could not write to '{self.filename}'", err) from None
        _changed()

    def pwritev(self, offset: int, buffers: list) -> None:
        """Write several buffers back to back starting at ``offset``."""
        total = sum(len(b) for b in buffers)
        self._range(offset, total)
        try:
            n = os.pwritev(self.fd, buffers, offset)
        except OSError as err:
            raise io_error(f"Could not write to '{self.filename}'", err) from None
        if n < total:
            self.pwrite(offset + n, b"".join(bytes(b) for b in buffers)[n:])
            return
        _changed()

    # -- kernel-side copies ----------------------------------------------

    def copy_in(self, src_fd: int, src_offset: int, offset: int, length: int) -> None:
        """Copy ``length`` bytes from ``src_fd`` into this file, in the kernel.

        os.copy_file_range where the kernel can (same filesystem type), else
        a bounce buffer; past the end of the source reads as zeros.
        """
        copy_range(src_fd, src_offset, self.fd, offset, length)
        _changed()

    def copy_out(self, offset: int, dst_fd: int, dst_offset: int, length: int) -> None:
        """Copy ``length`` bytes of this file to ``dst_fd``, in the kernel."""
        copy_range(self.fd, offset, dst_fd, dst_offset, length)

    # -- zeroes, holes, size ---------------------------------------------

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make ``[offset, offset+length)`` read as zeros, cheaply where possible.

        ``unmap`` allows freeing the space (punch a hole); otherwise the
        range stays allocated (FALLOC_FL_ZERO_RANGE) as QEMU does.
        """
        if length <= 0:
            return
        if self.is_block:
            if self._ioctl_range(BLKZEROOUT, offset, length):
                _changed()
                return
        else:
            if unmap and self.punch_hole(offset, length):
                return
            if self._can_zero_range:
                try:
                    _fallocate(self.fd, FALLOC_FL_ZERO_RANGE, offset, length)
                    _changed()
                    return
                except OSError as err:
                    if err.errno not in _NO_FALLOCATE:
                        raise io_error(f"Could not write zeroes to '{self.filename}'",
                                       err) from None
                    self._can_zero_range = False
        self.write_zero_data(offset, length)

    def write_zero_data(self, offset: int, length: int) -> None:
        """Write real zero bytes (allocates; preallocation=full)."""
        chunk = bytes(min(length, 1 << 20))
        pos, end = offset, offset + length
        while pos < end:
            n = min(len(chunk), end - pos)
            self.pwrite(pos, memoryview(chunk)[:n])
            pos += n

    def punch_hole(self, offset: int, length: int) -> bool:
        """Free ``[offset, offset+length)`` (reads zeros after); False if unsupported."""
        if length <= 0:
            return True
        if self.is_block:
            done = self._ioctl_range(BLKDISCARD, offset, length)
            if done:
                _changed()
            return done
        if not self._can_punch:
            return False
        try:
            _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            _changed()
            return True
        except OSError as err:
            if err.errno in _NO_FALLOCATE:
                self._can_punch = False
                return False
            raise io_error(f"Could not discard in '{self.filename}'", err) from None

    def _ioctl_range(self, request: int, offset: int, length: int) -> bool:
        try:
            fcntl.ioctl(self.fd, request, struct.pack("QQ", offset, length))
            return True
        except OSError:
            return False

    def truncate(self, length: int) -> None:
        """Set the file length; a device keeps its size (QEMU's non-exact
        truncate of a host device: shrinking is a no-op, growing fails)."""
        if self.is_device:
            if length > self.length():
                raise ImageIOError("Cannot grow device files", errno.EINVAL)
            return
        try:
            os.ftruncate(self.fd, length)
        except OSError as err:
            raise io_error(f"Could not resize '{self.filename}'", err) from None
        _changed()

    def fallocate(self, offset: int, length: int) -> None:
        """Reserve space (posix_fallocate), extending the file if needed."""
        if length <= 0:
            return
        try:
            os.posix_fallocate(self.fd, offset, length)
        except OSError as err:
            raise io_error(f"Could not preallocate data for '{self.filename}'", err) from None
        _changed()

    def start_writeback(self) -> None:
        """Have the kernel start writing this file's dirty pages to disk
        without waiting (sync_file_range, SYNC_FILE_RANGE_WRITE), so that a
        later flush finds less to do. Only a hint: it changes no order and
        promises nothing; where the call is missing or fails, nothing."""
        if self.read_only or self.no_flush:
            return
        fn = _libc("sync_file_range", "c_int", "c_int64", "c_int64", "c_uint")
        if fn is not None:
            fn(self.fd, 0, 0, SYNC_FILE_RANGE_WRITE)

    def flush(self) -> None:
        if self.read_only or self.no_flush:
            return
        try:
            os.fdatasync(self.fd)
        except OSError as err:
            if err.errno == errno.EINVAL:
                return          # a special file that cannot be synced (/dev/null)
            raise io_error(f"Could not flush '{self.filename}'", err) from None

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            finally:
                self.fd = -1
