"""The other formats through the qimg command line, judged by qemu-img itself.

``qimg create`` prints the same ``Formatting ...`` line and errors as
``qemu-img create`` for every format and option set, and the images it
makes have the same ``qemu-img info``; ``qimg convert -O FMT`` output is
accepted by ``qemu-img check`` and equal to its source for ``qemu-img
compare``; ``qimg info``/``map`` on QEMU's images print what qemu-img prints.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from of_helpers import io_run, qemu_check, qemu_compare, run

pytestmark = pytest.mark.oracle

CREATE = [
    "-f vmdk a.vmdk 1M",
    "-f vmdk -o subformat=monolithicFlat,adapter_type=lsilogic b.vmdk 1M",
    "-f vmdk -o subformat=twoGbMaxExtentSparse,zeroed_grain=on c.vmdk 3M",
    "-f vmdk -o subformat=streamOptimized,toolsversion=5,hwversion=7 d.vmdk 1M",
    "-f vmdk -b base.vmdk -F vmdk e.vmdk",
    "-f vmdk -o hwversion=7,compat6=on f.vmdk 1M",
    "-f vmdk -o subformat=monolithicFlat -b base.vmdk -F vmdk g.vmdk",
    "-f vdi h.vdi 1M",
    "-f vdi -o static=on,preallocation=off i.vdi 1M",
    "-f vdi -b base.vmdk -F vmdk j.vdi 1M",
    "-f vpc k.vhd 1M",
    "-f vpc -o subformat=fixed,force_size=on l.vhd 1M",
    "-f vpc -o subformat=foo m.vhd 1M",
    "-f vhdx n.vhdx 1M",
    "-f vhdx -o block_size=1M,subformat=fixed,block_state_zero=off o.vhdx 1M",
    "-f vhdx -o log_size=0 p.vhdx 1M",
    "-f qed q.qed 1M",
    "-f qed -o table_size=2,cluster_size=8k r.qed 1M",
    "-f qed -o cluster_size=1000 s.qed 1M",
    "-f qed -b base.raw -F raw t.qed",
    "-f parallels u.hds 1M",
    "-f parallels -o cluster_size=64k v.hds 1M",
    "-f qcow w.qcow 1M",
    "-f qcow -b base.raw -F raw x.qcow",
    "-f bochs y.img 1M",
]


def qimg(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imagetools", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def _prepare(root):
    run("qemu-img", "create", "-q", "-f", "vmdk", str(root / "base.vmdk"), "2M")
    run("qemu-img", "create", "-q", "-f", "raw", str(root / "base.raw"), "2M")


def _info(path, cwd) -> dict:
    proc = run("qemu-img", "info", "--output=json", path, cwd=str(cwd))
    info = json.loads(proc.stdout)
    info.pop("actual-size", None)
    spec = info.get("format-specific")
    if spec and spec["type"] == "vmdk":
        spec["data"].pop("cid")
    return info


@pytest.mark.parametrize("args", CREATE)
def test_create_like_qemu_img(tmp_path, args):
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    theirs.mkdir()
    _prepare(theirs)
    shutil.copytree(theirs, ours)          # the same base.vmdk, CID included
    words = args.split()
    expected = run("qemu-img", "create", *words, cwd=str(theirs), check=False)
    got = qimg("create", *words, cwd=ours)
    assert got.stdout == expected.stdout
    assert got.stderr.replace("qimg:", "qemu-img:") == expected.stderr
    assert got.returncode == expected.returncode
    if expected.returncode == 0:
        name = [w for w in words if "." in w and w not in ("base.vmdk", "base.raw")][-1]
        assert _info(name, ours) == _info(name, theirs)


@pytest.mark.parametrize("fmt, opts", [("vmdk", ""), ("vmdk", "subformat=streamOptimized"),
                                       ("vmdk", "subformat=twoGbMaxExtentFlat"), ("vdi", ""),
                                       ("vpc", ""), ("vhdx", ""), ("qed", ""),
                                       ("parallels", ""), ("qcow", "")])
def test_convert_to_format(tmp_path, fmt, opts):
    src = tmp_path / "src.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(src), "5M")
    io_run(str(src), "qcow2", "write -P 0x11 0 64k", "write -P 0x22 1000000 300000",
           "write -z 2M 64k", "write -P 0x33 4M 1M")
    target = tmp_path / f"out.{fmt}"
    args = ["convert", "-O", fmt] + (["-o", opts] if opts else []) + [str(src), str(target)]
    proc = qimg(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cmp = qemu_compare(str(src), "qcow2", str(target), fmt)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    if fmt in ("vmdk", "vdi", "vhdx", "qed", "parallels"):
        assert qemu_check(str(target), fmt)["rc"] == 0


@pytest.mark.parametrize("name", ["vmdk-sparse.vmdk", "vmdk-2gsparse.vmdk", "vdi-dynamic.vdi",
                                  "qed-backed.qed", "vhdx-dynamic.vhdx", "vpc-dynamic.vhd",
                                  "qcow1.qcow"])
def test_info_and_map_print_what_qemu_img_prints(sample, sample_dir, name):
    path, fmt = sample(name)
    for cmd in (["info"], ["info", "--output=json"], ["map"], ["map", "--output=json"]):
        expected = run("qemu-img", *cmd, name, cwd=str(sample_dir), check=False)
        got = qimg(*cmd, name, cwd=sample_dir)
        out = got.stdout
        if cmd[0] == "info":
            # disk usage depends on the filesystem's allocation, not on us
            pattern = r'("actual-size": \d+|disk size: .*)'
            out = re.sub(pattern, "X", out)
            expected_out = re.sub(pattern, "X", expected.stdout)
        else:
            expected_out = expected.stdout
        assert out == expected_out, cmd
        assert got.returncode == expected.returncode


def test_fixed_vhd_is_probed_as_raw(tmp_path):
    path = tmp_path / "f.vhd"
    run("qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed", str(path), "1M")
    got = qimg("info", "--output=json", str(path), cwd=tmp_path)
    assert json.loads(got.stdout)["format"] == "raw"
    got = qimg("info", "--output=json", "-f", "vpc", str(path), cwd=tmp_path)
    assert json.loads(got.stdout)["format"] == "vpc"


@pytest.mark.parametrize("name", [
    "parallels.hds", "udif.dmg",
    "vmdk-flat.vmdk", "vmdk-stream.vmdk", "vdi-static.vdi", "vpc-forcesize.vhd",
    "vhdx-fixed.vhdx", "qcow1-compressed.qcow"])
def test_info_json_of_more_formats(sample, sample_dir, name):
    path, fmt = sample(name)
    expected = run("qemu-img", "info", "--output=json", name, cwd=str(sample_dir))
    got = qimg("info", "--output=json", name, cwd=sample_dir)
    pattern = r'"actual-size": \d+'
    assert re.sub(pattern, "X", got.stdout) == re.sub(pattern, "X", expected.stdout)


@pytest.mark.parametrize("fmt", ["vpc", "qcow", "bochs"])
def test_check_unsupported_formats_exit_63(sample, sample_dir, fmt):
    name = {"vpc": "vpc-dynamic.vhd", "qcow": "qcow1.qcow", "bochs": "bochs-growing.img"}[fmt]
    sample(name)
    expected = run("qemu-img", "check", "-f", fmt, name, cwd=str(sample_dir), check=False)
    got = qimg("check", "-f", fmt, name, cwd=sample_dir)
    assert got.returncode == expected.returncode == 63
    assert got.stderr.replace("qimg:", "qemu-img:") == expected.stderr
    assert got.stdout == expected.stdout


def test_vmdk_check_failure_like_qemu(tmp_path):
    path = tmp_path / "bad.vmdk"
    run("qemu-img", "create", "-q", "-f", "vmdk", str(path), "4M")
    io_run(str(path), "vmdk", "write -P 1 0 64k")
    import struct
    with open(path, "r+b") as f:
        gd_sector = struct.unpack_from("<Q", f.read(512), 4 + 52)[0]
        f.seek(gd_sector * 512)
        gt_sector = struct.unpack("<I", f.read(4))[0]
        f.seek(gt_sector * 512)
        f.write(struct.pack("<I", 99999))
    expected = run("qemu-img", "check", str(path), check=False)
    got = qimg("check", str(path), cwd=tmp_path)
    assert got.returncode == expected.returncode
    assert got.stdout == expected.stdout
    assert got.stderr.replace("qimg:", "qemu-img:") == expected.stderr


@pytest.mark.parametrize("fmt, opts", [("qcow", []), ("vmdk", ["-o", "subformat=streamOptimized"])])
def test_convert_compressed(tmp_path, fmt, opts):
    src = tmp_path / "src.raw"
    src.write_bytes(b"compressible " * 300000 + bytes(1 << 20) + bytes(range(256)) * 400)
    target = tmp_path / f"c.{fmt}"
    proc = qimg("convert", "-c", "-O", fmt, *opts, str(src), str(target), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert qemu_compare(str(src), "raw", str(target), fmt).returncode == 0
    assert target.stat().st_size < src.stat().st_size // 4
    entries = json.loads(run("qemu-img", "map", "--output=json", str(target)).stdout)
    assert any(e["data"] and "offset" not in e for e in entries)      # compressed clusters
