"""The qimg entry point: dispatch, message prefix, errors, lazy imports.

In-process tests of imagetools.cli; the byte-for-byte comparisons with the
real qemu-img are in tests/imagetools/ops/test_qimg_*.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagetools import cli, output

ROOT = Path(__file__).resolve().parents[2]


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_no_arguments_is_a_usage_error(capsys) -> None:
    rc, out, err = run_main(capsys)
    assert (rc, out) == (1, "")
    assert err == "qimg: Not enough arguments\nTry 'qimg --help' for more information\n"


def test_unknown_command(capsys) -> None:
    rc, out, err = run_main(capsys, "frobnicate")
    assert rc == 1
    assert err == "qimg: Command not found: frobnicate\nTry 'qimg --help' for more information\n"


def test_unknown_global_option(capsys) -> None:
    rc, _, err = run_main(capsys, "--bogus", "info")
    assert rc == 1
    assert err.startswith("qimg: unrecognized option '--bogus'\n")


def test_version_names_the_qemu_img_it_follows(capsys) -> None:
    rc, out, _ = run_main(capsys, "--version")
    assert rc == 0
    assert out.splitlines()[0] == f"qimg version {cli.__version__} (qemu-img 7.2.22 compatible)"


def test_help_lists_every_command_and_the_formats(capsys) -> None:
    rc, out, _ = run_main(capsys, "--help")
    assert rc == 0
    for command in cli.COMMANDS:
        assert f"\n  {command} " in out
    assert "Supported formats:" in out and " raw" in out


def test_help_after_a_command(capsys) -> None:
    rc, out, _ = run_main(capsys, "info", "-h")
    assert rc == 0 and "usage: qimg" in out


def test_a_command_without_a_module_says_not_implemented(capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + ("frobnicate",))
    rc, out, err = run_main(capsys, "frobnicate", "x.qcow2")
    assert (rc, out) == (1, "")
    assert err == "qimg: 'frobnicate' is not implemented yet\n"


#: the qemu-img 7.2 commands qimg does not implement (docs/qimg.md says so)
UNIMPLEMENTED = ["bitmap"]


def test_every_other_command_has_its_module() -> None:
    """A command that lost (or never got) its module would answer "not
    implemented yet" instead of working: only the documented ones may."""
    missing = [c for c in cli.COMMANDS
               if importlib.util.find_spec(f"imagetools.ops.{c}") is None]
    assert missing == UNIMPLEMENTED


@pytest.mark.parametrize("argv", [["bitmap"], ["bitmap", "--add", "x.qcow2", "b0"],
                                  ["bitmap", "--help"]])
def test_bitmap_says_not_implemented_in_one_line(capsys, argv) -> None:
    rc, out, err = run_main(capsys, *argv)
    assert (rc, out) == (1, "")
    assert err == "qimg: 'bitmap' is not implemented yet\n"


def test_prefix_follows_the_program_name() -> None:
    try:
        assert output.set_prog("/usr/local/bin/qemu-img") == "qemu-img"
        assert output.set_prog("/usr/bin/qimg") == "qimg"
        assert output.set_prog("python -m imagetools") == "qimg"
    finally:
        output.set_prog("qimg")


def test_engine_errors_print_one_line_and_their_exit_code(capsys, tmp_path) -> None:
    missing = str(tmp_path / "nope.img")
    rc, out, err = run_main(capsys, "info", missing)
    assert (rc, out) == (1, "")
    assert err == f"qimg: Could not open '{missing}': Could not open '{missing}': " \
                  "No such file or directory\n"


def test_internal_errors_are_one_line_not_a_traceback(capsys, monkeypatch) -> None:
    from imagetools.ops import info

    def boom(argv):
        raise RuntimeError("kaput")
    monkeypatch.setattr(info, "main", boom)
    monkeypatch.delenv("QIMG_DEBUG", raising=False)
    rc, _, err = run_main(capsys, "info", "x")
    assert rc == 1
    assert err == "qimg: internal error: RuntimeError: kaput (set QIMG_DEBUG=1 for a traceback)\n"


def _modules_after(*argv: str, prefix: str = "imagetools") -> set[str]:
    code = ("import os, sys\n"
            f"sys.argv = ['qimg', {', '.join(repr(a) for a in argv)}]\n"
            "from imagetools.cli import main\n"
            "main()\n"
            f"loaded = ' '.join(m for m in sys.modules if m.startswith({prefix!r}))\n"
            "os.write(2, loaded.encode())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    return set(proc.stderr.split())


def test_commands_are_imported_lazily() -> None:
    loaded = _modules_after("--version")
    assert not any(m.startswith("imagetools.ops.") and m != "imagetools.ops.args"
                   for m in loaded), loaded
    assert "imagetools.formats" not in loaded


def test_info_imports_no_other_command(tmp_path) -> None:
    image = tmp_path / "x.raw"
    image.write_bytes(bytes(4096))
    loaded = _modules_after("info", str(image))
    for other in ("convert", "copy", "compare", "check", "dd", "bench", "measure", "create"):
        assert f"imagetools.ops.{other}" not in loaded, loaded


def test_info_of_a_qcow2_decodes_no_table(tmp_path, qemu_img) -> None:
    """``array`` (which imports ``collections``, ~1.4 ms) is loaded only when
    a table is decoded, and ``info`` decodes none; ``map`` does."""
    image = tmp_path / "x.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    assert "array" not in _modules_after("info", str(image), prefix="array")
    assert "array" in _modules_after("map", str(image), prefix="array")


def test_only_writable_opens_load_the_qcow2_write_side(tmp_path, qemu_img) -> None:
    """The write side (``imagetools.formats.qcow2.write``, about 0.5 ms of
    imports) is the class a writable open returns; read-only commands never
    load it, and a read-only driver still refuses writes as before."""
    import errno
    from imagetools.errors import ImageIOError
    from imagetools.image import open_image
    image = tmp_path / "x.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    writer = "imagetools.formats.qcow2.write"
    for argv in (["info", str(image)], ["check", str(image)], ["map", str(image)]):
        assert writer not in _modules_after(*argv, prefix=writer), argv
    assert writer in _modules_after("resize", str(image), "+1M", prefix=writer)
    with open_image(str(image)) as drv:
        for write in (lambda: drv.write(0, b"x"), lambda: drv.write_zeroes(0, 512),
                      lambda: drv.discard(0, 512)):
            with pytest.raises(ImageIOError, match="Image is read-only") as err:
                write()
            assert err.value.errno == errno.EACCES
    with open_image(str(image), read_only=False) as drv:
        drv.write(0, b"x" * 512)
    with open_image(str(image)) as drv:
        assert drv.read(0, 512) == b"x" * 512


def _run_program(tmp_path, prelude: str, *argv: str) -> subprocess.CompletedProcess:
    """``imagetools.cli.run`` (the installed qimg) after ``prelude``, with a
    probe object whose finalizer says on stderr when the interpreter frees it."""
    code = ("import os, sys\n"
            "class Probe:\n"
            "    def __del__(self):\n"
            "        os.write(2, b'<finalized>')\n"
            "probe = Probe()\n"
            f"{prelude}\n"
            f"sys.argv = ['qimg', {', '.join(repr(a) for a in argv)}]\n"
            "from imagetools.cli import run\n"
            "run()\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=tmp_path,
                          timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_the_program_exits_without_finalizing_once_its_output_is_out(tmp_path) -> None:
    """run() flushes the output and leaves without the interpreter's
    finalization (about 1.3 ms of every start); statuses are main()'s."""
    image = tmp_path / "x.raw"
    image.write_bytes(bytes(1 << 20))
    proc = _run_program(tmp_path, "", "info", "--output=json", str(image))
    assert proc.returncode == 0, proc.stderr
    assert b'"virtual-size": 1048576' in proc.stdout and proc.stdout.endswith(b"}\n")
    assert b"<finalized>" not in proc.stderr
    proc = _run_program(tmp_path, "", "info", "nosuch")
    assert proc.returncode == 1
    assert proc.stderr == b"qimg: Could not open 'nosuch': Could not open 'nosuch': " \
                          b"No such file or directory\n"
    out = tmp_path / "big.json"          # more than a buffer, to a file
    image.write_bytes(b"\1" * 512 + bytes(511) + b"\1" + bytes(1 << 16) * 4)
    with open(out, "wb") as stdout:
        assert subprocess.run([sys.executable, "-m", "imagetools", "map", "--output=json",
                               str(image)], stdout=stdout, cwd=tmp_path, timeout=60,
                              env=dict(os.environ, PYTHONPATH=str(ROOT))).returncode == 0
    assert json.loads(out.read_text())[-1]["start"] + json.loads(out.read_text())[-1]["length"] \
        == image.stat().st_size


def test_the_program_reports_output_it_could_not_write(tmp_path) -> None:
    """Output that fails when run() flushes it (a full disk under a
    redirection): one line on stderr and status 1, not a silent success."""
    prelude = ("import errno, io\n"
               "class Full(io.RawIOBase):\n"
               "    def writable(self):\n"
               "        return True\n"
               "    def write(self, data):\n"
               "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
               "sys.stdout = io.TextIOWrapper(io.BufferedWriter(Full()))")
    proc = _run_program(tmp_path, prelude, "--version")
    assert proc.returncode == 1
    assert proc.stderr == b"qimg: error writing output: No space left on device\n"


def test_the_program_exits_normally_when_something_is_left_to_finish(tmp_path) -> None:
    """Another thread alive, or an atexit callback (the fault-injection
    counter registers one): the normal exit, which waits for the thread and
    runs the callback."""
    done = tmp_path / "thread-done"
    proc = _run_program(tmp_path, "import threading, time\n"
                        "threading.Thread(target=lambda: (time.sleep(0.2), "
                        f"open({str(done)!r}, 'w').close())).start()", "--version")
    assert proc.returncode == 0, proc.stderr
    assert done.exists()
    assert b"<finalized>" in proc.stderr
    called = tmp_path / "atexit-called"
    proc = _run_program(tmp_path, "import atexit\n"
                        f"atexit.register(lambda: open({str(called)!r}, 'w').close())",
                        "info", "nosuch")
    assert proc.returncode == 1
    assert called.exists()
    assert b"<finalized>" in proc.stderr


def test_module_entry_point_uses_qimg_prefix() -> None:
    proc = subprocess.run([sys.executable, "-m", "imagetools", "nosuch"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("qimg: Command not found: nosuch\n")


def test_file_names_are_printed_back_byte_for_byte(tmp_path) -> None:
    name = os.fsdecode(b"sp\xe9c-\xc3\xa9.raw")
    (tmp_path / name).write_bytes(bytes(1024))
    proc = subprocess.run([sys.executable, "-m", "imagetools", "info", name], cwd=tmp_path,
                          capture_output=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == b"image: sp\xe9c-\xc3\xa9.raw"
