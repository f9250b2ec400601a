"""qcow2's fast map path (Qcow2Reader.map_runs) against qemu-img and the general path.

``qimg map`` takes qemu-img map's items straight from the L2 tables
(scattered data clusters even in whole-table passes) and only the rest
through block_status. Both must print what qemu-img 7.2 prints, byte for
byte, on every layout: scattered clusters with and without a backing file
(also one shorter than the image), plain and allocated zero clusters,
compressed clusters, extended L2, external data files, metadata
preallocation, tiny and huge clusters, windows at odd offsets and a
corrupt entry in the middle of a table. The general path
(``Driver.map_runs``, through block_status) is the second judge.
"""

from __future__ import annotations

import io
import os
import random
import subprocess
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from fmt_helpers import run
from image_oracle import qimg_wrapper

from imagetools.formats.base import Driver
from imagetools.image import open_image
from imagetools.ops.map import print_human, print_json

pytestmark = pytest.mark.oracle

K = 1024


def scattered(count: int, clusters: int, cluster: int, seed: int, first: int = 0) -> list[str]:
    """qemu-io writes of ``count`` clusters out of ``clusters``, in random order."""
    rng = random.Random(seed)
    picks = rng.sample(range(clusters), count)
    return [f"write -P {1 + i % 250} {(first + c) * cluster} {cluster}"
            for i, c in enumerate(picks)]


def make(qemu_img, qemu_io, path: Path, size: str, options: str = "", *writes: str,
         backing: str | None = None) -> str:
    cmd = [qemu_img, "create", "-q", "-f", "qcow2"]
    if options:
        cmd += ["-o", options]
    if backing:
        cmd += ["-b", backing, "-F", "qcow2"]
    # QEMU opens a data_file named relatively from the working directory
    run(*cmd, path.name, size, cwd=str(path.parent))
    for i in range(0, len(writes), 200):           # bounded command lines
        args = [qemu_io, "-f", "qcow2"]
        for command in writes[i:i + 200]:
            args += ["-c", command]
        run(*args, path.name, cwd=str(path.parent))
    return str(path)


@pytest.fixture(scope="module")
def layouts(qemu_img, qemu_io, tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("fastmap")
    out: dict[str, str] = {}
    # 4 KiB clusters: one L2 table covers 2 MiB. The first table is all
    # scattered data and holes; the second also has zero and compressed ones.
    mixed = ["write -z 3700k 12k", "write -P 7 3800k 8k", "write -z 3800k 4k",
             "write -c -P 9 3900k 4k", "write -c -P 10 3904k 4k", "discard 3950k 8k"]
    out["scattered"] = make(qemu_img, qemu_io, d / "scattered.qcow2", "4M",
                            "cluster_size=4k", *scattered(380, 512, 4096, 1),
                            *scattered(200, 400, 4096, 2, first=512), *mixed)
    out["dense"] = make(qemu_img, qemu_io, d / "dense.qcow2", "4M", "cluster_size=4k",
                        *scattered(512, 512, 4096, 3))
    make(qemu_img, qemu_io, d / "base.qcow2", "4M", "", "write -P 0xaa 0 1M",
         "write -P 0xbb 1500k 300k", "write -z 3M 64k", "write -P 0xcc 3900k 100k")
    out["over-backing"] = make(qemu_img, qemu_io, d / "top.qcow2", "4M", "cluster_size=4k",
                               *scattered(600, 1024, 4096, 4), backing="base.qcow2")
    make(qemu_img, qemu_io, d / "short.qcow2", "3000k", "", "write -P 0xdd 2900k 100k")
    out["short-backing"] = make(qemu_img, qemu_io, d / "overshort.qcow2", "4M",
                                "cluster_size=4k", *scattered(400, 1024, 4096, 5),
                                backing="short.qcow2")
    make(qemu_img, qemu_io, d / "mid.qcow2", "4M", "cluster_size=4k",
         *scattered(300, 1024, 4096, 6), backing="base.qcow2")
    out["chain-of-3"] = make(qemu_img, qemu_io, d / "top3.qcow2", "4M", "cluster_size=4k",
                             *scattered(300, 1024, 4096, 7), "write -z 8k 40k",
                             backing="mid.qcow2")
    out["zero-plain-and-alloc"] = make(
        qemu_img, qemu_io, d / "zeros.qcow2", "4M", "", "write -P 1 0 512k", "write -z 64k 128k",
        "write -z 1M 256k", "write -z -u 320k 64k", "write -P 2 2M 64k", "write -z 2M 64k")
    run(qemu_img, "convert", "-c", "-O", "qcow2", out["scattered"], str(d / "comp.qcow2"))
    out["compressed"] = str(d / "comp.qcow2")
    out["extended-l2"] = make(qemu_img, qemu_io, d / "el2.qcow2", "4M",
                              "extended_l2=on,cluster_size=64k", *scattered(40, 64, 65536, 8),
                              "write -P 3 100k 5000", "write -z 1M 40k")
    out["data-file"] = make(qemu_img, qemu_io, d / "df.qcow2", "4M",
                            "data_file=df.data,cluster_size=4k", *scattered(300, 1024, 4096, 9))
    out["data-file-raw"] = make(qemu_img, qemu_io, d / "dfr.qcow2", "4M",
                                "data_file=dfr.data,data_file_raw=on",
                                "write -P 1 64k 64k", "write -z 1M 64k")
    out["prealloc-metadata"] = make(qemu_img, qemu_io, d / "pm.qcow2", "4M",
                                    "preallocation=metadata,cluster_size=4k",
                                    *scattered(100, 1024, 4096, 10))
    out["c512"] = make(qemu_img, qemu_io, d / "c512.qcow2", "1M", "cluster_size=512",
                       *scattered(900, 2048, 512, 11))
    out["c2M"] = make(qemu_img, qemu_io, d / "c2m.qcow2", "16M", "cluster_size=2M",
                      "write -P 1 0 1k", "write -P 2 6M 2M", "write -P 3 4M 100k",
                      "write -z 10M 2M")
    out["v2"] = make(qemu_img, qemu_io, d / "v2.qcow2", "4M", "compat=0.10,cluster_size=4k",
                     *scattered(300, 1024, 4096, 12), "write -z 8k 8k")
    return out


@pytest.fixture(scope="module")
def qimg(tmp_path_factory) -> str:
    return qimg_wrapper(tmp_path_factory.mktemp("qimg"), "qemu-img")


def both(qemu_img: str, qimg: str, *args: str, cwd: str) -> None:
    """qemu-img and qimg print the same stdout and stderr and exit alike."""
    env = dict(os.environ, LC_ALL="C")
    ref = subprocess.run([qemu_img, *args], capture_output=True, cwd=cwd, env=env, timeout=120)
    ours = subprocess.run([qimg, *args], capture_output=True, cwd=cwd, env=env, timeout=120)
    assert (ours.returncode, ours.stderr.decode(), ours.stdout.decode()) == \
        (ref.returncode, ref.stderr.decode(), ref.stdout.decode())


NAMES = ["scattered", "dense", "over-backing", "short-backing", "chain-of-3",
         "zero-plain-and-alloc", "compressed", "extended-l2", "data-file", "data-file-raw",
         "prealloc-metadata", "c512", "c2M", "v2"]


@pytest.mark.parametrize("name", NAMES)
def test_map_prints_what_qemu_img_prints(layouts, qemu_img, qimg, name):
    path = layouts[name]
    cwd = os.path.dirname(path)
    both(qemu_img, qimg, "map", "--output=json", path, cwd=cwd)
    both(qemu_img, qimg, "map", path, cwd=cwd)


WINDOWS = [("1", "5000"), ("4095", "4097"), ("12345", "2000000"), ("2097151", "3"),
           ("2000000", "1000000"), ("3999999", "100000")]


@pytest.mark.parametrize("name", ["scattered", "over-backing", "short-backing", "c512"])
def test_windows_at_odd_offsets_match_qemu_img(layouts, qemu_img, qimg, name):
    path = layouts[name]
    for start, length in WINDOWS:
        both(qemu_img, qimg, "map", "--output=json", f"--start-offset={start}",
             f"--max-length={length}", path, cwd=os.path.dirname(path))


def _printed(printer, batches, *args) -> str:
    buf = io.StringIO()
    with redirect_stdout(buf):
        try:
            printer(batches, *args)
        except Exception as err:          # noqa: BLE001 - the failure is compared too
            buf.write(f"\n<{type(err).__name__}: {err}>")
    return buf.getvalue()


@pytest.mark.parametrize("name", NAMES)
def test_fast_path_merges_to_the_general_path(layouts, name):
    """Same JSON and table through block_status, over random windows too."""
    rng = random.Random(name)
    with open_image(layouts[name]) as drv:
        size = drv.size
        windows = [(0, size)] + [(a, rng.randrange(1, size - a + 1))
                                 for a in (rng.randrange(size) for _ in range(25))]
        for start, length in windows:
            fast = drv.map_runs(start, length)
            general = Driver.map_runs(drv, start, length)
            assert _printed(print_json, fast, start) == _printed(print_json, general, start)
        assert _printed(print_human, drv.map_runs(0, size)) == \
            _printed(print_human, Driver.map_runs(drv, 0, size))


def test_scattered_tables_take_the_whole_table_path(layouts, monkeypatch):
    """The scattered layouts do go through the C-speed pass (else the tests above
    would not be testing it)."""
    from imagetools.formats.qcow2.read import Qcow2Reader
    calls = []
    real = Qcow2Reader._map_scattered
    monkeypatch.setattr(Qcow2Reader, "_map_scattered",
                        lambda self, *a: calls.append(self.backing is None) or real(self, *a))
    for name in ("scattered", "over-backing", "c512"):
        with open_image(layouts[name]) as drv:
            for _ in drv.map_runs(0, drv.size):
                pass
    assert True in calls and False in calls


@pytest.mark.parametrize("index", [0, 1, 37, 511])
def test_a_corrupt_entry_fails_where_qemu_img_fails(qemu_img, qemu_io, qimg, tmp_path, index):
    """An unaligned data cluster at L2 index ``index``: the entries before it are
    printed, then qemu-img's lines, as qemu-img does (fast and general path alike)."""
    path = make(qemu_img, qemu_io, tmp_path / "bad.qcow2", "4M", "cluster_size=4k",
                *scattered(400, 512, 4096, 13), "write -P 5 0 4k", "write -P 6 2044k 4k")
    with open(path, "rb") as f:
        head = f.read(48)
        l1 = int.from_bytes(head[40:48], "big")
        f.seek(l1)
        l2 = int.from_bytes(f.read(8), "big") & 0x00FFFFFFFFFFFE00
        f.seek(l2 + 8 * index)
        entry = int.from_bytes(f.read(8), "big")
    assert entry & 0x00FFFFFFFFFFFE00, "the test needs a data cluster there"
    with open(path, "r+b") as f:
        f.seek(l2 + 8 * index)
        f.write((entry | 0x200).to_bytes(8, "big"))
    for fmt in ("--output=json", "--output=human"):
        both(qemu_img, qimg, "map", fmt, path, cwd=str(tmp_path))
    with open_image(path) as drv:
        assert _printed(print_json, drv.map_runs(0, drv.size)) == \
            _printed(print_json, Driver.map_runs(drv, 0, drv.size))


def test_column_batches_print_as_their_items(tmp_path):
    """print_json reads a ClusterItems batch from its columns: the same text as
    from its items, also where entries continue across batches of either kind
    (holes into holes, data into contiguous data) and for runs of contiguous
    data inside a batch, which the images above rarely have."""
    from imagetools.formats.base import MapStatus
    from imagetools.formats.qcow2.read import ClusterItems
    from array import array
    rng = random.Random(18)
    cs = 4096
    data = MapStatus.of(0, True, False, True, str(tmp_path / "x.qcow2"))
    hole = MapStatus.of(0, False, True, False)
    zero = MapStatus.of(0, True, True, False)
    for _ in range(40):
        batches, pos, host = [], 0, 0
        for _ in range(rng.randrange(1, 6)):
            n = rng.randrange(1, 40)
            hosts = array("Q")
            for _ in range(n):
                kind = rng.random()
                if kind < 0.3:
                    hosts.append(0)
                else:                    # contiguous with the one before, or not
                    host = host + cs if kind < 0.6 and host else rng.randrange(1, 500) * cs
                    hosts.append(host)
            columns = ClusterItems(pos, cs, hosts, data, hole)
            batches.append(columns if rng.random() < 0.7 else list(columns))
            pos += n * cs
            if rng.random() < 0.3:       # something else in between
                length = rng.randrange(1, 4) * cs
                batches.append([(pos, length, rng.choice((zero, hole)), None)])
                pos += length
        items = [list(batch) for batch in batches]
        assert all(type(b) is list for b in items)
        assert _printed(print_json, iter(batches)) == _printed(print_json, iter(items))
        assert _printed(print_human, iter(batches)) == _printed(print_human, iter(items))
