"""Unit tests of qimg's building blocks: option scanning, sizes, JSON, progress,
zero detection. Where qemu-img can be the judge (sizes), it is."""

from __future__ import annotations

import io
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from imagetools.errors import UsageError
from imagetools.ops.args import Getopt
from imagetools.output import dump_qobject, json_string, qdict_order, to_json
from imagetools.progress import Progress
from imagetools.sizes import SizeError, human_size, parse_size


# -- getopt ------------------------------------------------------------------

LONG = [("help", 0, "h"), ("format", 1, "f"), ("output", 1, "output"),
        ("force-share", 0, "U"), ("backing-chain", 0, "backing-chain")]


def scan(*argv: str):
    g = Getopt(["info", *argv], ":f:hU", LONG)
    return list(g), g.operands


def test_getopt_permutes_operands_and_options() -> None:
    opts, rest = scan("a.img", "-f", "raw", "--output=json", "b", "-U")
    assert opts == [("f", "raw"), ("output", "json"), ("U", None)]
    assert rest == ["a.img", "b"]


def test_getopt_clusters_and_attached_arguments() -> None:
    assert scan("-Ufqcow2", "x")[0] == [("U", None), ("f", "qcow2")]


def test_getopt_long_option_abbreviation_and_separate_argument() -> None:
    assert scan("--out", "json", "--back", "x")[0] == [("output", "json"), ("backing-chain", None)]


def test_getopt_double_dash_ends_options() -> None:
    assert scan("--", "-f", "x") == ([], ["-f", "x"])


@pytest.mark.parametrize("argv, message", [
    (("-x", "a"), "unrecognized option '-x'"),
    (("-xU", "a"), "unrecognized option 'info'"),      # glibc: optind not advanced yet
    (("-Ux", "a"), "unrecognized option '-Ux'"),
    (("a", "-f"), "missing argument for option '-f'"),
    (("--output",), "missing argument for option '--output'"),
    (("--fo=raw", "a"), "unrecognized option '--fo=raw'"),     # ambiguous: format/force-share
    (("--backing-chain=1", "a"), "unrecognized option '--backing-chain=1'"),
    (("--nosuch", "a"), "unrecognized option '--nosuch'"),
])
def test_getopt_errors_name_the_argument_as_qemu_img_does(argv, message) -> None:
    with pytest.raises(UsageError) as err:
        scan(*argv)
    assert str(err.value) == message


# -- sizes -------------------------------------------------------------------

SIZE_CASES = ["1000", "1k", "1.5M", "1.5", "0.5k", "1.7k", "1e3", "0x100", "0x1k", "010",
              " 12", "12 ", "1b", "1kB", "1m", "1T", "8E", "7.99E", "+5", "", ".", "1.",
              ".5k", "1.k", "0.0001k", "18446744073709551616", "9223372036854775807",
              "9223372036854775808", "1.5b", "inf", "0x", "1,5k", "1.9k", "0.0005k",
              "3.999999999999999999999k", "0.1M", "0x1.8k", "00x10", "7.9999999999999999E",
              "1e+3k", "-0"]


@pytest.mark.oracle
def test_size_parsing_matches_qemu_img_create(qemu_img, tmp_path) -> None:
    target = str(tmp_path / "s.raw")
    for text in SIZE_CASES:
        run = subprocess.run([qemu_img, "create", "-f", "raw", target, "--", text],
                             capture_output=True, text=True, timeout=60)
        if "size=" in run.stdout:
            want = int(run.stdout.split("size=")[1])
        else:
            want = "range" if "Must be between" in run.stderr else "invalid"
        try:
            got = parse_size(text)
            if got > 2**63 - 1:
                got = "range"
        except SizeError as err:
            got = "range" if err.out_of_range else "invalid"
        assert got == want, text


@pytest.mark.parametrize("value, text", [
    (0, "0 B"), (512, "512 B"), (1024, "1 KiB"), (1536, "1.5 KiB"), (1022976, "999 KiB"),
    (1023488, "1e+03 KiB"), (1024000, "0.977 MiB"), (1047552, "0.999 MiB"),
    (1048576, "1 MiB"), (1126400, "1.07 MiB"), (1610612736, "1.5 GiB"),
    (1073741824000, "0.977 TiB"), (1099511627776, "1 TiB"), (5000192, "4.77 MiB"),
])
def test_human_size_follows_qemu_img_info(value: int, text: str) -> None:
    assert human_size(value) == text


# -- JSON --------------------------------------------------------------------

def test_image_info_members_come_out_in_qdict_order() -> None:
    schema = ["filename", "format", "dirty-flag", "actual-size", "virtual-size",
              "cluster-size", "encrypted", "compressed", "backing-filename",
              "full-backing-filename", "backing-filename-format", "snapshots",
              "backing-image", "format-specific"]
    assert qdict_order(schema) == [
        "backing-image", "compressed", "backing-filename-format", "snapshots", "virtual-size",
        "filename", "cluster-size", "format", "actual-size", "format-specific",
        "full-backing-filename", "encrypted", "backing-filename", "dirty-flag"]


def test_json_layout_and_escapes() -> None:
    value = {"flags": [], "name": 'we"ird\\name é', "n": 3, "ok": True, "sub": {"a": [1]}}
    text = to_json(value)
    assert '"name": "we\\"ird\\\\name \\u00E9"' in text
    assert '"flags": [\n    ]' in text
    assert text.startswith("{\n    ") and text.endswith("\n}")
    assert '"sub": {\n        "a": [\n            1\n        ]\n    }' in text


def test_json_string_escapes_control_and_astral_characters() -> None:
    assert json_string("a\tb\x01\x7f\U0001F600") == '"a\\tb\\u0001\\u007F\\uD83D\\uDE00"'


def test_human_dump_of_format_specific_data() -> None:
    data = {"compat": "1.1", "bitmaps": [{"flags": ["auto"], "name": "b0", "granularity": 65536}],
            "extended-l2": False}
    assert dump_qobject(data) == (
        "    compat: 1.1\n"
        "    bitmaps:\n"
        "        [0]:\n"
        "            flags:\n"
        "                [0]: auto\n"
        "            name: b0\n"
        "            granularity: 65536\n"
        "    extended l2: false\n")


# -- progress ----------------------------------------------------------------

def test_progress_prints_like_qemu_img_convert() -> None:
    out = io.StringIO()
    meter = Progress(True, 1.0, stream=out)
    meter.print(0, 100)
    for done in (16 * 128, 17 * 128):          # 1 MiB then 64 KiB of 17 * 64 KiB
        meter.absolute(done, 17 * 128)
    meter.print(100, 0)
    meter.end()
    assert out.getvalue() == ("    (0.00/100%)\r    (94.12/100%)\r    (100.00/100%)\r"
                              "    (100.00/100%)\r\n")


def test_progress_skips_steps_below_the_minimum() -> None:
    out = io.StringIO()
    meter = Progress(True, 2.0, stream=out)
    meter.print(0, 100)
    for _ in range(100):
        meter.relative(1, 100)
    assert out.getvalue().count("\r") == 1 + 33 + 1   # 0, every 3%, and 100


def test_progress_prints_when_the_value_drops_by_more_than_the_step() -> None:
    """qemu-img 7.2 prints a value that moved back by more than the step (an
    amend's second operation starts low: 0.00, 25.00, 50.00, 0.13, 1.17, ...
    as qemu-img amend -p -o compat=1.1,refcount_bits=4 prints on a v2 image)."""
    out = io.StringIO()
    meter = Progress(True, 1.0, stream=out)
    for value in (0.0, 25.0, 50.0, 49.5, 0.13, 0.5, 1.17, 1.5, 2.21):
        meter.print(value, 0)
    assert out.getvalue() == ("    (0.00/100%)\r    (25.00/100%)\r    (50.00/100%)\r"
                              "    (0.13/100%)\r    (1.17/100%)\r    (2.21/100%)\r")


def test_disabled_progress_is_silent() -> None:
    out = io.StringIO()
    meter = Progress(False, 1.0, stream=out)
    meter.print(50, 0)
    meter.end()
    assert out.getvalue() == ""


# -- zero detection ------------------------------------------------------------

def naive_is_allocated(buf: bytes, first: int, n: int, sector_num: int, alignment: int):
    def zero(i: int) -> bool:
        return not any(buf[i * 512:(i + 1) * 512])
    state = zero(first)
    i = 1
    while i < n and zero(first + i) == state:
        i += 1
    if i == n:
        return not state, i
    tail = (sector_num + i) & (alignment - 1)
    if tail:
        if state and i <= tail:
            state = False
        if not state:
            i = min(i + alignment - tail, n)
        else:
            i -= tail
    return not state, i


sectors = st.lists(st.sampled_from(["z", "d", "d1"]), min_size=1, max_size=40)


def _buffer(kinds: list[str]) -> bytes:
    parts = []
    for kind in kinds:
        if kind == "z":
            parts.append(bytes(512))
        elif kind == "d":
            parts.append(b"\x01" * 512)
        else:                                   # one non-zero byte at the end
            parts.append(bytes(511) + b"\x02")
    return b"".join(parts)


@settings(max_examples=300, deadline=None)
@given(kinds=sectors, sector_num=st.integers(0, 64), align_bits=st.integers(0, 4),
       data=st.data())
def test_zero_scan_matches_a_sector_loop(kinds, sector_num, align_bits, data) -> None:
    from imagetools.ops.zeroscan import is_allocated_sectors
    buf = _buffer(kinds)
    first = data.draw(st.integers(0, len(kinds) - 1))
    n = len(kinds) - first
    alignment = 1 << align_bits
    assert is_allocated_sectors(buf, first, n, sector_num, alignment) == \
        naive_is_allocated(buf, first, n, sector_num, alignment)


def test_first_difference_is_sector_aligned() -> None:
    from imagetools.ops.compare import first_difference
    a = bytearray(2 * 1024 * 1024)
    b = bytearray(a)
    assert first_difference(a, b, len(a)) == -1
    b[1048581] = 1
    assert first_difference(a, b, len(a)) == 1048576
    b[1000] = 1
    assert first_difference(a, b, len(a)) == 512
