"""QEMU-compatible image locking (the file-posix OFD byte-range protocol).

QEMU 7.2 lets several processes share an image file and tells them apart by
*permissions*. Every open of a file holds shared (read) OFD locks on single
bytes of that file:

* byte ``100 + bit`` for each permission it **uses**,
* byte ``200 + bit`` for each permission it does **not share** with others,

where the bits are 0 consistent read, 1 write, 2 write unchanged, 3 resize.
Before it proceeds, an opener tests (F_OFD_GETLK, as if for a write lock)
the bytes of everyone else: a permission it wants that somebody refuses to
share (``200 + bit`` held) fails with ``Failed to get "write" lock``; a
permission it refuses to share that somebody uses (``100 + bit`` held) fails
with ``Failed to get shared "write" lock``. Observed with qemu-io 7.2 (see
/proc/locks): a qcow2 file opened read-write holds 100, 101, 103 and 201,
203 (the format layer needs resize and never shares write or resize of a
file holding metadata); read-only 100 and 201, 203; read-only with ``-U``
(force-share) only 100; an external data file opened for writing 100, 101,
103 and 203; a backing file like a read-only open. A raw image carries the
tool's own permissions: qemu-img and qemu-io take consistent read (+ write)
and share everything, so two writers of a raw file do not exclude each other
-- but a running VM's disk device does not share write (it holds 201), and
then any writer is refused.

A command may narrow what it shares once a file is open (QEMU's
``blk_set_perm``): ``qemu-img convert`` does not let anybody write to or
resize its sources -- a raw source and every file of a source's backing
chain then also hold 200 + write and 200 + resize -- so a VM or another
tool cannot change them while they are copied (:func:`unshare`).

The locks belong to the open file description, so they vanish when the
file is closed (or the process dies). Two open file descriptions conflict
even inside one process, exactly as between processes: a file a command
reads without sharing write cannot be opened for writing by the same
command. Filesystems without OFD lock support are used unlocked, as QEMU's
``locking=auto`` does.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from imagetools.errors import ImageLockedError

PERM_CONSISTENT_READ = 0x1
PERM_WRITE = 0x2
PERM_WRITE_UNCHANGED = 0x4
PERM_RESIZE = 0x8
PERM_ALL = 0xF

PERM_NAMES = {
    PERM_CONSISTENT_READ: "consistent read",
    PERM_WRITE: "write",
    PERM_WRITE_UNCHANGED: "write unchanged",
    PERM_RESIZE: "resize",
}

LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200

# struct flock on Linux/x86-64 and aarch64: short type, short whence, (pad),
# off_t start, off_t len, pid_t pid, (pad)
_FLOCK = struct.Struct("hhxxxxqqixxxx")


def _ofd(fd: int, cmd: int, lock_type: int, offset: int) -> int:
    """One F_OFD_SETLK / F_OFD_GETLK call on a single byte; returns l_type."""
    arg = _FLOCK.pack(lock_type, os.SEEK_SET, offset, 1, 0)
    res = fcntl.fcntl(fd, cmd, arg)
    return _FLOCK.unpack(res)[0]


def permissions(read_only: bool, force_share: bool, *, metadata: bool = True,
                data_file: bool = False, resize: bool = False) -> tuple[int, int]:
    """(used, shared) permissions on a host file, as QEMU 7.2's qemu-img asks.

    ``metadata``: the file holds format metadata (qcow2): QEMU's format
    layer then uses resize too when writable and shares neither write nor
    resize (unless ``force_share``, -U, on a read-only open). A raw image
    carries qemu-img's own permissions, which share everything.
    ``data_file``: an external data file, which shares write but not resize.
    ``resize``: the command changes the image size (qemu-img resize).
    """
    used = PERM_CONSISTENT_READ
    if not read_only:
        used |= PERM_WRITE
        if metadata or data_file or resize:
            used |= PERM_RESIZE
    if (force_share and read_only) or not (metadata or data_file):
        shared = PERM_ALL
    elif data_file:
        shared = PERM_ALL & ~PERM_RESIZE
    else:
        shared = PERM_ALL & ~(PERM_WRITE | PERM_RESIZE)
    return used, shared


def _bits(mask: int):
    for bit in range(4):
        if mask & (1 << bit):
            yield bit


def lock_file(fd: int, filename: str, used: int, shared: int) -> None:
    """Take QEMU's locks for (used, shared) on ``fd`` and check for conflicts.

    Raises :class:`ImageLockedError` with qemu-img's two-line reason when
    another process's locks conflict; the locks this call took are then
    released again.
    """
    unshared = PERM_ALL & ~shared
    wanted = [LOCK_PERM_BASE + b for b in _bits(used)] + \
             [LOCK_SHARED_BASE + b for b in _bits(unshared)]
    try:
        for byte in wanted:
            _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, byte)
        conflict = _first_conflict(fd, used, unshared)
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            conflict = "write"  # somebody holds an exclusive lock: treat as a write user
            _release(fd, wanted)
            raise ImageLockedError(filename, f'Failed to get "{conflict}" lock\n'
                                   f"Is another process using the image [{filename}]?") from None
        # No OFD locks here (old NFS, some FUSE filesystems): run unlocked.
        return
    if conflict is not None:
        _release(fd, wanted)
        raise ImageLockedError(filename,
                               f"{conflict}\nIs another process using the image [{filename}]?")


def _first_conflict(fd: int, used: int, unshared: int) -> str | None:
    for bit in _bits(used):
        if _ofd(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, LOCK_SHARED_BASE + bit) != fcntl.F_UNLCK:
            return f'Failed to get "{PERM_NAMES[1 << bit]}" lock'
    for bit in _bits(unshared):
        if _ofd(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, LOCK_PERM_BASE + bit) != fcntl.F_UNLCK:
            return f'Failed to get shared "{PERM_NAMES[1 << bit]}" lock'
    return None


def _release(fd: int, wanted: list[int]) -> None:
    for byte in wanted:
        try:
            _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, byte)
        except OSError:
            pass


def unshare(fd: int, filename: str, perms: int) -> None:
    """Stop sharing ``perms`` of a file already opened and locked on ``fd``.

    Takes byte ``200 + bit`` for each permission and fails with qemu-img's
    ``Failed to get shared "write" lock`` when another open file description
    (in this process or another) uses one of them. On a conflict the bytes
    stay taken: the caller is failing and closes the file.
    """
    try:
        for bit in _bits(perms):
            _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, LOCK_SHARED_BASE + bit)
        conflict = None
        for bit in _bits(perms):
            if _ofd(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, LOCK_PERM_BASE + bit) != fcntl.F_UNLCK:
                conflict = f'Failed to get shared "{PERM_NAMES[1 << bit]}" lock'
                break
    except OSError as err:
        if err.errno not in (errno.EAGAIN, errno.EACCES):
            return                      # no OFD locks on this filesystem: unlocked
        conflict = 'Failed to get shared "write" lock'
    if conflict is not None:
        raise ImageLockedError(filename,
                               f"{conflict}\nIs another process using the image [{filename}]?")


def lock_image(fd: int, filename: str, *, read_only: bool, force_share: bool,
               metadata: bool = True, data_file: bool = False, resize: bool = False) -> None:
    """Lock an image file opened for reading or writing, as qemu-img would."""
    used, shared = permissions(read_only, force_share, metadata=metadata,
                               data_file=data_file, resize=resize)
    lock_file(fd, filename, used, shared)
