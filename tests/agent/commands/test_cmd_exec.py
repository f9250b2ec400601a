"""guest-exec / guest-exec-status: spawning, output capture and limits, exit codes and signals."""

from __future__ import annotations

import base64
import hashlib
import time

import pytest

from agent.commands.exec import MAX_OUTPUT
from agent.platform import Platform
from qga_helpers import agent_call, make_ctx


@pytest.fixture
def call(tmp_path):
    ctx = make_ctx(Platform(env={"PATH": "/usr/bin:/bin"}), tmp_path)
    return lambda name, **a: agent_call(ctx, name, **a)


def run(call, path, *args, timeout=10, **extra):
    """guest-exec, then poll guest-exec-status until it reports the exit."""
    started = call("guest-exec", path=path, arg=list(args), **extra)
    assert "return" in started, started
    pid = started["return"]["pid"]
    deadline = time.monotonic() + timeout
    while True:
        status = call("guest-exec-status", pid=pid)["return"]
        if status["exited"]:
            return pid, status
        assert time.monotonic() < deadline, "the child did not finish"
        time.sleep(0.01)


def decoded(status, stream):
    return base64.b64decode(status[f"{stream}-data"])


@pytest.mark.timeout(30)
def test_exit_code_and_both_streams(call):
    _pid, status = run(call, "/bin/sh", "-c", "echo out; echo err >&2; exit 3",
                       **{"capture-output": True})
    assert status == {"exited": True, "exitcode": 3,
                      "out-data": base64.b64encode(b"out\n").decode(), "out-truncated": False,
                      "err-data": base64.b64encode(b"err\n").decode(), "err-truncated": False}


@pytest.mark.timeout(30)
def test_killed_by_signal_reports_the_signal(call):
    _pid, status = run(call, "/bin/sh", "-c", "kill -9 $$", **{"capture-output": True})
    assert status == {"exited": True, "signal": 9}


@pytest.mark.timeout(30)
def test_status_is_reported_once(call):
    pid, _status = run(call, "/bin/true")
    assert call("guest-exec-status", pid=pid) == \
        {"error": {"class": "GenericError", "desc": "Invalid parameter 'pid'"}}
    assert call("guest-exec-status", pid=0)["error"]["desc"] == "Invalid parameter 'pid'"


@pytest.mark.timeout(30)
def test_running_then_exited(call):
    pid = call("guest-exec", path="/bin/sleep", arg=["0.3"])["return"]["pid"]
    assert call("guest-exec-status", pid=pid) == {"return": {"exited": False}}
    time.sleep(0.6)
    assert call("guest-exec-status", pid=pid) == {"return": {"exited": True, "exitcode": 0}}


@pytest.mark.timeout(30)
def test_input_data_goes_to_stdin_and_stdin_is_null_otherwise(call):
    _pid, status = run(call, "/bin/cat", **{"input-data": "ZnJvbSBzdGRpbgo=",
                                           "capture-output": True})
    assert decoded(status, "out") == b"from stdin\n"
    _pid, status = run(call, "/bin/sh", "-c", "readlink /proc/self/fd/0",
                       **{"capture-output": True})
    assert decoded(status, "out") == b"/dev/null\n"
    assert call("guest-exec", path="/bin/cat", **{"input-data": "@@@"})["error"]["desc"] == \
        "Base64 data contains invalid characters"


@pytest.mark.timeout(30)
def test_large_input_is_fed_without_blocking_the_agent(call):
    data = bytes(range(256)) * 4096  # 1 MiB, far more than a pipe buffer
    started = time.monotonic()
    pid = call("guest-exec", path="/usr/bin/sha256sum",
               **{"input-data": base64.b64encode(data).decode(), "capture-output": True})
    assert time.monotonic() - started < 1
    _pid, status = run(call, "/bin/true")  # the agent still answers meanwhile
    deadline = time.monotonic() + 10
    while not (status := call("guest-exec-status", pid=pid["return"]["pid"])["return"])["exited"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert decoded(status, "out").split()[0].decode() == hashlib.sha256(data).hexdigest()


@pytest.mark.timeout(30)
def test_env_replaces_the_environment(call):
    _pid, status = run(call, "/usr/bin/env", env=["FOO=bar"], **{"capture-output": True})
    assert decoded(status, "out") == b"FOO=bar\n"


@pytest.mark.timeout(30)
def test_program_search_uses_envs_path_else_the_agents(call, tmp_path):
    _pid, status = run(call, "echo", "via-path", env=["FOO=bar"], **{"capture-output": True})
    assert decoded(status, "out") == b"via-path\n"
    tool = tmp_path / "only-here"
    tool.write_text("#!/bin/sh\necho found\n")
    tool.chmod(0o755)
    _pid, status = run(call, "only-here", env=[f"PATH={tmp_path}"], **{"capture-output": True})
    assert decoded(status, "out") == b"found\n"
    assert call("guest-exec", path="only-here")["error"]["desc"] == (
        "Guest agent command failed, error was 'Failed to execute child process "
        "\u201conly-here\u201d (No such file or directory)'")


@pytest.mark.timeout(30)
def test_script_without_interpreter_line_runs_with_sh(call, tmp_path):
    script = tmp_path / "plain"
    script.write_text('echo "$0" "$@"\n')
    script.chmod(0o755)
    _pid, status = run(call, str(script), "a b", **{"capture-output": True})
    assert decoded(status, "out") == f"{script} a b\n".encode()


@pytest.mark.parametrize("path, reason", [
    ("/no/such/program", "No such file or directory"),
    ("/tmp", "Permission denied"),
    ("", "No such file or directory"),
])
def test_spawn_failures(call, path, reason):
    assert call("guest-exec", path=path, **{"capture-output": True}) == {"error": {
        "class": "GenericError",
        "desc": "Guest agent command failed, error was 'Failed to execute child process "
                f"\u201c{path}\u201d ({reason})'"}}


@pytest.mark.timeout(30)
def test_without_capture_output_nothing_is_kept(call):
    _pid, status = run(call, "/bin/echo", "hi")
    assert status == {"exited": True, "exitcode": 0}


@pytest.mark.timeout(30)
def test_grandchild_holding_stdout_keeps_it_running(call):
    pid = call("guest-exec", path="/bin/sh", arg=["-c", "(sleep 0.5; echo late) & echo early"],
               **{"capture-output": True})["return"]["pid"]
    time.sleep(0.25)
    assert call("guest-exec-status", pid=pid) == {"return": {"exited": False}}
    time.sleep(0.6)
    status = call("guest-exec-status", pid=pid)["return"]
    assert status["exited"] and decoded(status, "out") == b"early\nlate\n"


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_output_is_capped_at_16_mib_and_flagged(call):
    _pid, status = run(call, "/bin/sh", "-c", "head -c 17000000 /dev/zero; echo done >&2",
                       **{"capture-output": True}, timeout=30)
    out = decoded(status, "out")
    assert len(out) == MAX_OUTPUT and out.count(0) == MAX_OUTPUT
    assert status["out-truncated"] is True
    assert decoded(status, "err") == b"done\n" and status["err-truncated"] is False


@pytest.mark.oracle
@pytest.mark.timeout(60)
def test_same_answers_as_qemu_ga(reference_agent, tmp_path):
    ours = make_ctx(Platform(), tmp_path)
    plain = tmp_path / "plain-script"
    plain.write_text('echo "$0" "$@"\n')
    plain.chmod(0o755)
    cases = [
        {"path": "/bin/echo", "arg": ["hi"], "capture-output": True},
        {"path": "/bin/echo", "arg": ["hi"]},
        {"path": "/bin/cat", "input-data": "ZnJvbSBzdGRpbgo=", "capture-output": True},
        {"path": "/bin/sh", "arg": ["-c", "echo out; echo err >&2; exit 3"],
         "capture-output": True},
        {"path": "/bin/sh", "arg": ["-c", "kill -9 $$"], "capture-output": True},
        {"path": "/bin/sh", "arg": ["-c", "kill -15 $$"]},
        {"path": "/usr/bin/env", "env": ["FOO=bar", "FOO=baz"], "capture-output": True},
        {"path": "echo", "arg": ["via-path"], "env": ["A=1"], "capture-output": True},
        {"path": "/bin/cat", "input-data": "", "capture-output": True},
        {"path": "/bin/sh", "arg": ["-c", "ls -l /proc/self/fd | wc -l"], "capture-output": True},
        {"path": "/no/such/program", "capture-output": True},
        {"path": "nosuchprogram-xyz"},
        {"path": "/bin/cat", "input-data": "@@@"},
        {"path": str(plain), "arg": ["x"], "capture-output": True},
        {"path": "plain-script", "env": [f"PATH={tmp_path}"]},
        {"path": "not-executable", "env": [f"PATH=/nonexistent:{tmp_path}"]},
    ]
    (tmp_path / "not-executable").write_text("echo\n")

    def session(call):
        results = []
        for case in cases:
            started = call("guest-exec", **case)
            if "error" in started:
                results.append(started)
                continue
            pid = started["return"]["pid"]
            deadline = time.monotonic() + 10
            while not (status := call("guest-exec-status", pid=pid))["return"]["exited"]:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            results.append(status)
            results.append(call("guest-exec-status", pid=pid))
        results.append(call("guest-exec-status", pid=999999))
        return results

    assert session(lambda n, **a: agent_call(ours, n, **a)) == session(reference_agent.request)
