"""The command line against the real qemu-ga: -D, -V, -b help, option errors.

``-D`` must print byte-for-byte what qemu-ga prints for the same config
file (QGA_CONF) and options, with the same exit status; stderr is compared
after dropping what differs by nature (process id, clock, program name).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.oracle

QGA = [sys.executable, "-m", "agent"]


def run(command, args, conf=None, cwd=None):
    env = {k: v for k, v in os.environ.items() if k not in ("LISTEN_FDS", "NOTIFY_SOCKET")}
    env["QGA_CONF"] = conf or "/nonexistent/qga-test.conf"
    env["LC_ALL"] = "C"
    result = subprocess.run([*command, *args], capture_output=True, env=env, cwd=cwd, timeout=30)
    stdout = re.sub(rb"try '[^']*' for", b"try 'PROG --help' for", result.stdout)
    return result.returncode, stdout, normalize(result.stderr)


def normalize(stderr: bytes) -> bytes:
    text = re.sub(rb"\(process:\d+\)", b"(process:PID)", stderr)
    text = re.sub(rb"\d\d:\d\d:\d\d\.\d\d\d", b"HH:MM:SS.mmm", text)
    text = re.sub(rb"^\d+\.\d{6}: ", b"TIME: ", text, flags=re.M)
    text = re.sub(rb"(^|\n)[^\n:']*(qemu-ga|qga): ", rb"\1PROG: ", text)
    # GLib's curly quotes degrade to '?' in the C locale; ours may too
    return text.replace("\u201c".encode(), b"?").replace("\u201d".encode(), b"?")


@pytest.fixture(scope="module")
def both(qemu_ga):
    def compare(args, conf_text: bytes | None = None, tmp=None):
        conf = None
        if conf_text is not None:
            conf = os.path.join(tmp, "qga.conf")
            with open(conf, "wb") as f:
                f.write(conf_text)
        ref = run([qemu_ga], args, conf, cwd=tmp)
        ours = run(QGA, args, conf, cwd=tmp)
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


@pytest.mark.parametrize("args", ARGS, ids=[" ".join(a) for a in ARGS])
def test_command_line_matches_qemu_ga(both, args, tmp_path):
    ref, ours = both(args, tmp=str(tmp_path))
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


@pytest.mark.parametrize("name", CONFIGS)
def test_config_file_dump_matches_qemu_ga(both, name, tmp_path):
    ref, ours = both(["-D"], CONFIGS[name], tmp=str(tmp_path))
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
         b"Encoding=latin1"]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(lines=st.lists(st.sampled_from(LINES), max_size=8),
       crlf=st.booleans(),
       args=st.lists(st.sampled_from([["-v"], ["-r"], ["-m", "isa-serial"], ["-b", "x,y"],
                                      ["-F"], ["-p", "/q"], ["-t", "/t"]]), max_size=3))
def test_random_config_files_dump_like_qemu_ga(both, tmp_path_factory, lines, crlf, args):
    eol = b"\r\n" if crlf else b"\n"
    text = eol.join(lines) + (eol if lines else b"")
    tmp = str(tmp_path_factory.mktemp("conf"))
    flat = [a for pair in args for a in pair]
    ref, ours = both(["-D", *flat], text, tmp=tmp)
    assert ours == ref
