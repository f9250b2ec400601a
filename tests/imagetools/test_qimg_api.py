"""imagetools.api, the Python face of the qimg commands (used by the backup client).

qemu-img judges the images the API writes; errors must come out as
ImageError only, with qemu-img's wording.
"""

from __future__ import annotations

import subprocess

import pytest

from imagetools import api
from imagetools.errors import ImageError

pytestmark = pytest.mark.oracle


def sh(*argv: str, cwd) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def disk(qemu_img, qemu_io, tmp_path):
    sh(qemu_img, "create", "-q", "-f", "qcow2", "disk.qcow2", "16M", cwd=tmp_path)
    sh(qemu_io, "-f", "qcow2", "-c", "write -P 0xaa 0 3M", "-c", "write -z 4M 1M",
       "-c", "write -P 0x55 9M 1000", "disk.qcow2", cwd=tmp_path)
    return tmp_path


def test_convert_reports_progress_in_bytes_and_writes_a_clean_image(qemu_img, disk) -> None:
    seen: list[tuple[int, int]] = []
    stats = api.convert([str(disk / "disk.qcow2")], str(disk / "b.qcow2"), compress=True,
                        options={"cluster_size": "64k", "lazy_refcounts": True},
                        progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1] == stats.allocated_bytes
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    assert stats.compressed_clusters > 0
    sh(qemu_img, "compare", "disk.qcow2", "b.qcow2", cwd=disk)
    assert "No errors were found" in sh(qemu_img, "check", "b.qcow2", cwd=disk)
    assert '"lazy-refcounts": true' in sh(qemu_img, "info", "--output=json", "b.qcow2", cwd=disk)


def test_convert_to_raw_is_sparse(disk) -> None:
    api.convert(str(disk / "disk.qcow2"), str(disk / "b.raw"), out_fmt="raw")
    assert (disk / "b.raw").stat().st_blocks * 512 < 4 * 1024 * 1024


def test_compare_result(disk) -> None:
    api.convert(str(disk / "disk.qcow2"), str(disk / "same.raw"), out_fmt="raw")
    same = api.compare(str(disk / "disk.qcow2"), str(disk / "same.raw"))
    assert same.identical and same.exit_code == 0 and same.lines == ["Images are identical."]
    with open(disk / "same.raw", "r+b") as f:
        f.seek(9 * 1024 * 1024 + 700)
        f.write(b"\x01")
    differ = api.compare(str(disk / "disk.qcow2"), str(disk / "same.raw"))
    assert not differ.identical and differ.exit_code == 1
    assert differ.mismatch_offset == 9 * 1024 * 1024 + 512
    strict = api.compare(str(disk / "disk.qcow2"), str(disk / "same.raw"), strict=True)
    assert strict.exit_code == 1 and strict.lines[0].startswith("Strict mode: Offset ")


def test_check_and_info_are_qemu_img_json_as_values(qemu_img, disk) -> None:
    import json
    report = api.check(str(disk / "disk.qcow2"))
    expected = json.loads(sh(qemu_img, "check", "--output=json", str(disk / "disk.qcow2"),
                             cwd=disk))
    assert {k: v for k, v in report.items() if k != "messages"} == expected
    assert report["messages"] == []
    info = api.info(str(disk / "disk.qcow2"))
    assert info == json.loads(sh(qemu_img, "info", "--output=json", str(disk / "disk.qcow2"),
                                 cwd=disk))


def test_errors_are_image_errors_with_qemu_img_words(tmp_path) -> None:
    missing = str(tmp_path / "nope.qcow2")
    with pytest.raises(ImageError) as err:
        api.info(missing)
    assert str(err.value) == f"Could not open '{missing}': Could not open '{missing}': " \
                             "No such file or directory"
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(4096))
    with pytest.raises(ImageError) as err:
        api.check(str(raw))
    assert err.value.exit_code == 63
    with pytest.raises(ImageError) as err:
        api.convert(str(raw), str(tmp_path / "x.qcow2"), options="cluster_size=1000")
    assert "Cluster size must be a power of two" in str(err.value)
    with pytest.raises(ImageError):
        api.compare(str(raw), missing)
