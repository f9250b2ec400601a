"""Images made by the real qemu-img / qemu-io read exactly as QEMU reads them.

For every sample of format-samples.md whose format has a driver here: the
guest bytes equal ``qemu-img convert -O raw``, block status equals
``qemu-img map --output=json`` and the info fields equal ``qemu-img info
--output=json`` (virtual size, cluster size, backing file and format,
format-specific).
"""

from __future__ import annotations

import importlib

import pytest

from of_helpers import SAMPLES, our_map, qemu_info, qemu_map, qemu_raw
from imagetools.image import open_image

pytestmark = pytest.mark.oracle


def _have(fmt: str) -> bool:
    try:
        importlib.import_module(f"imagetools.formats.{fmt}")
    except ImportError:
        return False
    return True


NAMES = [name for name, (fmt, _) in SAMPLES.items() if _have(fmt)]


@pytest.mark.parametrize("name", NAMES)
def test_content_map_and_info_match_qemu(sample, tmp_path, name):
    path, fmt = sample(name)
    expected = qemu_raw(path, fmt, tmp_path / "expected.raw")
    drv = open_image(path, fmt)
    try:
        assert drv.size == len(expected)
        assert drv.read(0, drv.size) == expected
        # odd, unaligned reads go through the same mapping
        for off, n in ((1, 4095), (65535, 2), (1049000, 5000), (drv.size - 3, 3)):
            assert drv.read(off, n) == expected[off:off + n]
        assert our_map(drv) == qemu_map(path, fmt)
    finally:
        drv.close()
    info = qemu_info(path, fmt)
    drv = open_image(path, fmt, open_backing=False)
    try:
        assert drv.size == info["virtual-size"]
        assert drv.cluster_size == info.get("cluster-size")
        assert drv.backing_filename == info.get("backing-filename")
        assert drv.backing_format == info.get("backing-filename-format")
        assert drv.format_specific() == info.get("format-specific")
        assert drv.format_name == info["format"]
    finally:
        drv.close()
