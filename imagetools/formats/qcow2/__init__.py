"""qcow2: QEMU's copy-on-write format, read and write (QEMU 7.2's feature set).

Modules: ``header`` (header and extensions), ``layout`` (geometry, L2 entry
types), ``tables`` (L1 and the L2 cache), ``refcount`` (refcounts and the
allocator), ``driver`` (open, metadata, writeback, close), ``read`` (cluster
map, reads, block status), ``write`` (writes, zeroes, discards, compressed
clusters), ``compression``, ``snapshots`` and ``snapview`` (internal
snapshots, read-only), ``bitmaps`` (persistent bitmaps, kept in sync on
writes), ``crypto`` (LUKS header info), ``check`` (qemu-img check's
detection), ``repair`` (refcount repair of dirty images), ``create`` and
``measure``.
"""

from imagetools.formats.qcow2.driver import DRIVER, Qcow2Driver

__all__ = ["DRIVER", "Qcow2Driver"]
