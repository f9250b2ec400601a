"""A read-only view of an internal snapshot's content (convert -l / -s).

The view is the image seen through the snapshot's L1 table: same host file,
same L2 cache, same backing file, the snapshot's virtual size. It never
writes and closing it leaves the image open.
"""

from __future__ import annotations

from imagetools.errors import CorruptImageError, ImageIOError
from imagetools.formats.base import SnapshotInfo
from imagetools.formats.qcow2.driver import Qcow2Driver
from imagetools.formats.qcow2.tables import L1Table


class SnapshotView(Qcow2Driver):
    """Snapshot ``snap`` of the open image ``image`` (read-only)."""

    def __init__(self, image: Qcow2Driver, snap: SnapshotInfo) -> None:   # noqa: super
        self.__dict__.update(image.__dict__)
        self.read_only = True
        self._closed = False
        self.snapshot = snap
        self._image = image
        layout = image.layout
        size = snap.disk_size if snap.disk_size is not None else image.size
        needed = layout.l1_entries_for(size)
        if snap.l1_size < needed:
            raise CorruptImageError(f"Snapshot '{snap.name}' has an L1 table too small for "
                                    "its disk size")
        if snap.l1_table_offset + 8 * snap.l1_size > image.file.length() + image.cluster_size:
            raise CorruptImageError(f"Snapshot '{snap.name}' L1 table is past the end of "
                                    "the file")
        self.l1 = L1Table(image.file, snap.l1_table_offset, snap.l1_size)
        self._size = size
        self._compressed_cache = None
        self._prealloc_detected = False

    def _writable(self, offset: int = 0, length: int = 0) -> None:
        raise ImageIOError("A snapshot view is read-only")

    def writeback(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._closed = True
