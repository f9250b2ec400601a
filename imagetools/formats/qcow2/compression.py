"""Compressed clusters: zlib (raw deflate, as QEMU) and zstd.

QEMU's "zlib" compression type is a raw deflate stream (no zlib header)
with a 4 KiB window (``wbits=-12``); its zstd type is one zstd frame. A
compressed cluster is stored in whole 512-byte sectors, so the bytes read
for it may carry the start of the next cluster's data after the stream:
decompression stops once a cluster's worth of output is produced.

Both libraries release the GIL while they work, so :func:`compressor`
returns a plain function that convert may run in worker threads.
"""

from __future__ import annotations

import zlib
TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Callable

from imagetools.errors import CorruptImageError, UnsupportedError
from imagetools.formats.qcow2.header import COMPRESSION_ZLIB, COMPRESSION_ZSTD


def _zstd():
    try:
        import zstandard
    except ImportError:
        raise UnsupportedError("zstd compressed images need the Python package 'zstandard' "
                               "(pip install zstandard)") from None
    return zstandard


def decompress(kind: int, data: bytes, cluster_size: int) -> bytes:
    """One cluster from its compressed bytes; CorruptImageError if they are bad."""
    try:
        if kind == COMPRESSION_ZLIB:
            d = zlib.decompressobj(-12)
            out = d.decompress(data, cluster_size)
        elif kind == COMPRESSION_ZSTD:
            zstd = _zstd()
            # a stream reader bounded to one cluster: a hostile frame that
            # claims gigabytes cannot make us allocate them
            with zstd.ZstdDecompressor().stream_reader(data, read_across_frames=False) as r:
                out = r.read(cluster_size)
                while len(out) < cluster_size:
                    more = r.read(cluster_size - len(out))
                    if not more:
                        break
                    out += more
        else:
            raise UnsupportedError(f"qcow2: unknown compression type: {kind}")
    except (zlib.error, ValueError) as err:
        raise CorruptImageError(f"Could not decompress a compressed cluster: {err}") from None
    except Exception as err:   # zstandard.ZstdError and friends
        if isinstance(err, (UnsupportedError, CorruptImageError)):
            raise
        raise CorruptImageError(f"Could not decompress a compressed cluster: {err}") from None
    if len(out) < cluster_size:
        raise CorruptImageError("Could not decompress a compressed cluster: "
                                f"got {len(out)} of {cluster_size} bytes")
    return out[:cluster_size]


def compressor(kind: int, cluster_size: int) -> Callable[[bytes], bytes | None]:
    """A thread-safe function: cluster data -> compressed bytes, or None if it grows.

    As QEMU, a result must be smaller than the cluster to be worth storing.
    """
    if kind == COMPRESSION_ZLIB:
        def compress_zlib(data: bytes) -> bytes | None:
            c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
            out = c.compress(data) + c.flush()
            return out if len(out) < cluster_size else None
        return compress_zlib
    if kind == COMPRESSION_ZSTD:
        zstd = _zstd()

        def compress_zstd(data: bytes) -> bytes | None:
            out = zstd.ZstdCompressor(write_content_size=False).compress(data)
            return out if len(out) < cluster_size else None
        return compress_zstd
    raise UnsupportedError(f"qcow2: unknown compression type: {kind}")
