"""The command line against the real qemu-ga: -D, -V, -b help, option errors.

``-D`` must print byte-for-byte what qemu-ga prints for the same config
file (QGA_CONF) and options, with the same exit status; stderr is compared
after dropping what differs by nature (process id, clock, program name).

qemu-ga prints the same bytes whatever the locale (it never calls
setlocale: GLib's curly quotes and any non-ASCII in its messages come out
as '?'), so cases run under LC_ALL=C, LC_ALL=C.UTF-8 and with no locale
variable at all, and non-ASCII cases also under locales built here with
localedef (a real en_US.UTF-8 and a Latin-1 one).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.oracle

QGA = [sys.executable, "-m", "agent"]


#: the locale settings every case runs under (what LANG/LC_* hold; "unset": none)
LOCALES = {"C": {"LC_ALL": "C"}, "C.UTF-8": {"LC_ALL": "C.UTF-8"}, "unset": {}}


def locale_env(settings: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LISTEN_FDS", "NOTIFY_SOCKET", "LANG", "LANGUAGE", "LOCPATH")
           and not k.startswith("LC_")}
    env.update(settings)
    return env


def run(command, args, conf=None, cwd=None, locale="C"):
    env = locale_env(LOCALES[locale] if isinstance(locale, str) else locale)
    env["QGA_CONF"] = conf or "/nonexistent/qga-test.conf"
    result = subprocess.run([*command, *args], capture_output=True, env=env, cwd=cwd, timeout=30)
    stdout = re.sub(rb"try '[^']*' for", b"try 'PROG --help' for", result.stdout)
    return result.returncode, stdout, normalize(result.stderr)


def normalize(stderr: bytes) -> bytes:
    text = re.sub(rb"\(process:\d+\)", b"(process:PID)", stderr)
    text = re.sub(rb"\d\d:\d\d:\d\d\.\d\d\d", b"HH:MM:SS.mmm", text)
    text = re.sub(rb"^\d+\.\d{6}: ", b"TIME: ", text, flags=re.M)
    return re.sub(rb"(^|\n)[^\n:']*(qemu-ga|qga): ", rb"\1PROG: ", text)


@pytest.fixture(scope="module")
def both(qemu_ga):
    def compare(args, conf_text: bytes | None = None, tmp=None, locale="C"):
        conf = None
        if conf_text is not None:
            conf = os.path.join(tmp, "qga.conf")
            with open(conf, "wb") as f:
                f.write(conf_text)
        ref = run([qemu_ga], args, conf, cwd=tmp, locale=locale)
        ours = run(QGA, args, conf, cwd=tmp, locale=locale)
        return ref, ours
    return compare


ARGS = [
    ["-D"],
    ["-D", "-m", "isa-serial"],
    ["-D", "-m", "unix-listen", "-p", "/tmp/x.sock"],
    ["-D", "-m", "unix-listen"],
    ["-D", "-m", "vsock-listen", "-p", "3:1234"],
    ["-D", "-m", "bogus"],
    ["-D", "-F"],
    ["-D", "-F/x/hook", "-v", "-d", "-r", "-l", "/tmp/l", "-t", "/tmp/st", "-f", "/tmp/p"],
    ["-D", "--fsfreeze-hook=/y"],
    ["-D", "--fsfreeze-hook", "/y"],
    ["-D", "-t", "relative/dir"],
    ["-D", "-b", "a,b,c"],
    ["-D", "-b", "a,,b", "-b", "", "-b", "c"],
    ["-D", "-b", "help,guest-ping"],
    ["-D", "--blacklist=guest-ping"],
    ["-D", "--block-rpcs", "x,y"],
    ["-D", "--bl=z"],
    ["-D", "--meth", "unix-listen", "--pa", "/tmp/s"],
    ["-D", "-s", "install"],
    ["-D", "extra", "words", "-v"],
    ["-D", "--", "-v"],
    ["-D", "-m", "unix-listen", "-p", "  lead\\back\nnl\ttab "],
    ["-D", "-vdr"],
    ["-Dvm", "isa-serial"],
    ["-V"],
    ["--version", "-D"],
    ["-b", "help"],
    ["-b", "?"],
    ["--block-rpcs=help"],
    ["-D", "-b", "help"],
    ["--bogus"],
    ["--bogus=1"],
    ["-a", "guest-ping"],
    ["-c", "/tmp/x"],
    ["--debug", "-D"],
    ["-D", "-m"],
    ["-D", "--method"],
    ["-D", "--verbose=1"],
    ["-D", "--ver"],
    ["-D", "--d"],
    ["-D", "-F", "-x"],
]


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("args", ARGS, ids=[" ".join(a) for a in ARGS])
def test_command_line_matches_qemu_ga(both, args, tmp_path, locale):
    ref, ours = both(args, tmp=str(tmp_path), locale=locale)
    assert ours == ref


CONFIGS = {
    "full": b"# test config\n[general]\ndaemon=false\nmethod=unix-listen\npath=/tmp/qga/conf.sock\n"
            b"logfile=/tmp/qga/conf.log\npidfile=/tmp/qga/conf.pid\nfsfreeze-hook=/tmp/qga/hook.sh\n"
            b"statedir=/tmp/qga/confstate\nverbose=true\nretry-path=true\n"
            b"block-rpcs=guest-file-open,guest-file-write,guest-exec\n",
    "old-key": b"[general]\nblacklist=guest-ping,guest-info\n",
    "both-keys": b"[general]\nblacklist=guest-ping\nblock-rpcs=guest-info\n",
    "bad-bool": b"[general]\ndaemon=yes\n",
    "num-bool": b"[general]\ndaemon=1\nverbose=0\nretry-path=TRUE\n",
    "bool-trailing-blank": b"[general]\ndaemon=true  \nverbose=1\t\n",
    "misc": b"[other]\nmethod=isa-serial\n[general]\nunknown-key=1\nmethod = unix-listen \npath=/tmp/a b.sock\n",
    "separators": b"[general]\nblock-rpcs=guest-ping; guest-info ,guest-exec\n",
    "duplicate": b"[general]\nblock-rpcs=guest-ping\nblock-rpcs=guest-info\n",
    "escapes": b"[general]\nlogfile=/tmp/qga/x\\sy\\tz\\\\w\npidfile=\\s\\slead\n",
    "bad-escape": b"[general]\nlogfile=/tmp/\\q\n",
    "trailing-backslash": b"[general]\nlogfile=/tmp/x\\\n",
    "garbage": b"this is not a keyfile\n",
    "key-before-group": b"daemon=true\n[general]\n",
    "bad-group": b"[gen[eral]\n",
    "empty": b"",
    "comments-only": b"# nothing\n\n   \n#[general]\n",
    "crlf": b"[general]\r\nmethod=isa-serial\r\npath=/dev/ttyS1\r\n",
    "repeated-group": b"[general]\nmethod=isa-serial\n[x]\n[general]\npath=/dev/ttyS3\n",
    "group-trailing-blank": b"[general]  \t\nverbose=true\n",
    "not-utf8": b"[general]\npath=/tmp/\xff\n",
    "not-utf8-unused": b"[general]\nunused=\xff\nmethod=isa-serial\n",
    "equals-first": b"[general]\n=x\n",
    "space-key": b"[general]\n verbose =true\n",
    "locale-key": b"[general]\npath[de]=/x\npath=/y\n",
    "two-errors": b"[general]\ndaemon=maybe\nverbose=perhaps\n",
    "empty-list": b"[general]\nblock-rpcs=\n",
    "hook-and-dirs": b"[general]\nfsfreeze-hook=\nstatedir=/s\npidfile=/p\n",
}


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("name", CONFIGS)
def test_config_file_dump_matches_qemu_ga(both, name, tmp_path, locale):
    ref, ours = both(["-D"], CONFIGS[name], tmp=str(tmp_path), locale=locale)
    assert ours == ref


def test_config_plus_command_line(both, tmp_path):
    ref, ours = both(["-D", "-m", "isa-serial", "-p", "/dev/ttyS9", "-b", "guest-ping,guest-info",
                      "-b", "guest-sync"], CONFIGS["full"], tmp=str(tmp_path))
    assert ours == ref
    assert ours[1].endswith(b"block-rpcs=guest-exec,guest-file-write,guest-file-open,"
                            b"guest-info,guest-ping,guest-sync\n")


def test_config_named_by_qga_conf_may_be_a_directory(qemu_ga, tmp_path):
    ref = run([qemu_ga], ["-D"], str(tmp_path))
    ours = run(QGA, ["-D"], str(tmp_path))
    assert ours == ref
    assert ours[0] == 1 and b"Not a regular file" in ours[2]


LINES = [b"[general]", b"[other]", b"daemon=true", b"daemon=0", b"daemon=no", b"verbose=1",
         b"retry-path=false", b"method=unix-listen", b"method=isa-serial", b"path=/x y",
         b"path= \\s\\t\\n\\r\\\\", b"logfile=\\z", b"pidfile=/p", b"statedir=/s",
         b"fsfreeze-hook=/h", b"block-rpcs=a,b", b"blacklist=c", b"block-rpcs=", b"# c",
         b"", b"  ", b"k = v ", b"bad line", b"=x", b"[g]x", b"key[fr]=v", b"Encoding=UTF-8",
         b"Encoding=latin1", "path=/t\u00e9st".encode(), "b\u00e4d line".encode(),
         "daemon=j\u00e4".encode(), "block-rpcs=\u00e9,x".encode()]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(lines=st.lists(st.sampled_from(LINES), max_size=8),
       crlf=st.booleans(),
       args=st.lists(st.sampled_from([["-v"], ["-r"], ["-m", "isa-serial"], ["-b", "x,y"],
                                      ["-F"], ["-p", "/q"], ["-t", "/t"],
                                      ["-p", "/\u00e9"], ["-\u00e9"]]), max_size=3),
       locale=st.sampled_from(list(LOCALES)))
def test_random_config_files_dump_like_qemu_ga(both, tmp_path_factory, lines, crlf, args, locale):
    eol = b"\r\n" if crlf else b"\n"
    text = eol.join(lines) + (eol if lines else b"")
    tmp = str(tmp_path_factory.mktemp("conf"))
    flat = [a for pair in args for a in pair]
    ref, ours = both(["-D", *flat], text, tmp=tmp, locale=locale)
    assert ours == ref


@pytest.fixture(scope="module")
def built_locales(tmp_path_factory) -> dict[str, dict[str, str]]:
    """A real en_US.UTF-8 and a Latin-1 locale (where localedef can build
    them), on top of LOCALES: the locale must not change a byte."""
    found = {**LOCALES, "LANG=C.UTF-8": {"LANG": "C.UTF-8"}, "LC_CTYPE=C.UTF-8": {"LC_CTYPE": "C.UTF-8"}}
    localedef = shutil.which("localedef")
    if localedef is None:
        return found
    where = tmp_path_factory.mktemp("locales")
    for name, source, charset in (("en_US.UTF-8", "en_US", "UTF-8"),
                                  ("de_DE.ISO-8859-1", "de_DE", "ISO-8859-1")):
        made = subprocess.run([localedef, "-i", source, "-f", charset, str(where / name)],
                              capture_output=True, timeout=60)
        if made.returncode == 0 or (where / name / "LC_CTYPE").exists():
            found[name] = {"LOCPATH": str(where), "LANG": name}
    return found


NON_ASCII_CASES = {
    "invalid short option": (["-D", "-\u00e9"], None),
    "unknown long option": (["-D", "--bog\u00fcs"], None),
    "unknown method": (["-D", "-m", "f\u00e9"], None),
    "paths and list": (["-D", "-m", "unix-listen", "-p", "/tmp/s\u00e9", "-b", "\u00e9x,y",
                        "-t", "rel\u00e9"], None),
    "bad line": (["-D"], b"[general]\nfoo\n"),
    "bad line, UTF-8": (["-D"], "[general]\nf\u00e9\u201cx\n".encode()),
    "bad line, Latin-1": (["-D"], b"[general]\nf\xe9\n"),
    "bad group": (["-D"], b"[gen\xc3\xa9\n"),
    "bad boolean": (["-D"], b"[general]\nverbose=yes\n"),
    "bad boolean, UTF-8": (["-D"], "[general]\ndaemon=j\u00e4\n".encode()),
    "bad boolean, Latin-1": (["-D"], b"[general]\ndaemon=\xe9\n"),
    "bad encoding": (["-D"], b"[general]\nEncoding=latin1\n"),
    "good, UTF-8": (["-D"], b"[general]\nmethod=unix-listen\npath=/tmp/\xc3\xa9\n"),
    "config path": (["-D"], "DIRECTORY"),
}


@pytest.mark.parametrize("case", NON_ASCII_CASES)
def test_non_ascii_output_is_the_same_in_every_locale(qemu_ga, built_locales, case, tmp_path):
    args, conf_text = NON_ASCII_CASES[case]
    conf = None
    if conf_text == "DIRECTORY":                # "Not a regular file", naming the path
        conf = str(tmp_path / "dir\u00e9")
        os.mkdir(conf)
    elif conf_text is not None:
        conf = str(tmp_path / "qga-\u00e9.conf")
        with open(conf, "wb") as f:
            f.write(conf_text)
    seen = {}
    for name, settings in built_locales.items():
        ref = run([qemu_ga], args, conf, cwd=str(tmp_path), locale=settings)
        ours = run(QGA, args, conf, cwd=str(tmp_path), locale=settings)
        assert ours == ref, name
        seen[name] = ours
    assert len(set(seen.values())) == 1, "the locale changed qga's output"
