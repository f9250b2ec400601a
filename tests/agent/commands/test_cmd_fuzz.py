"""Any valid arguments: every handler answers with a qemu-ga error or a value of
the shape the QAPI schema promises, never with a Python exception.

Arguments are generated from the command's JSON Schema (the one the
dispatcher validates against); the handlers run against the fake guest
tree on a platform that records or refuses everything that could touch
this machine (helpers, the clock, FITRIM, spawning, files outside the tree).
"""

from __future__ import annotations

import errno
import os

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import schemas
from agent.errors import AgentError
from agent.registry import COMMANDS
from qga_helpers import RecordingPlatform, guest_sysfs, make_ctx, make_tree

CORE = {"guest-sync", "guest-sync-delimited", "guest-ping", "guest-info", "guest-fsfreeze-status",
        "guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list", "guest-fsfreeze-thaw"}
CATALOGUE = sorted(name for name in COMMANDS if name not in CORE)


class FuzzPlatform(RecordingPlatform):
    """The fake tree for everything; nothing reaches this machine."""

    def open_file(self, path, flags, mode=0o666):
        inside = os.path.join(self.root, path.lstrip("/")) or self.root
        return os.open(inside, flags | os.O_CLOEXEC, mode)

    def fitrim(self, fd, minimum):
        self.calls.append(("fitrim", minimum))
        if minimum < 0 or minimum > 1 << 40:
            raise OSError(errno.EINVAL, "Invalid argument")
        return max(minimum, 512), 4096

    def spawn(self, argv, **kwargs):
        self.calls.append(("spawn", argv))
        raise FileNotFoundError(errno.ENOENT, "not here")

    def find_program(self, name, search_path=None):
        found = super().find_program(name, search_path)
        # only programs of the fake tree: run_helper is recorded anyway
        return found if found and os.path.exists(self.path(found)) else None


def strategy(schema: dict) -> st.SearchStrategy:
    """Values that satisfy ``schema`` (the subset of JSON Schema the QAPI generator uses)."""
    if "anyOf" in schema:
        return st.one_of([strategy(s) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "integer":
        low, high = schema.get("minimum"), schema.get("maximum")
        edges = [v for v in (low, high, 0, -1, 1, 1000, 4096, 1 << 40) if
                 (low is None or v >= low) and (high is None or v <= high)]
        return st.one_of(st.sampled_from(edges), st.integers(low, high))
    if kind == "number":
        return st.floats(allow_nan=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "string":
        return st.one_of(st.text(max_size=12),
                         st.sampled_from(["", "/", "/proc/self/status", "root", "aGk=",
                                          "x\n", "# c", "a:b", "set", "/sys/block"]))
    if kind == "array":
        return st.lists(strategy(schema["items"]), max_size=3)
    if kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        return st.fixed_dictionaries(
            {k: strategy(v) for k, v in props.items() if k in required},
            optional={k: strategy(v) for k, v in props.items() if k not in required})
    return st.nothing()


@pytest.fixture(scope="module")
def guest_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("guest")
    spec = guest_sysfs()
    spec.update({"/proc/self/mountinfo": "21 1 254:1 / / rw - ext4 /dev/vda1 rw\n",
                 "/proc/stat": "cpu0 1 2 3 4 5 6 7 8 9 10\n",
                 "/proc/diskstats": " 254 0 vda 1 2 3 4 5 6 7 8 9 10 11\n",
                 "/sys/power/state": "freeze mem disk\n",
                 "/etc/passwd": "alice:x:4242:4242::/home/alice:/bin/sh\n",
                 "/home/alice": None, "/sbin/shutdown": "", "/sbin/hwclock": "",
                 "/usr/sbin/chpasswd": "", "/usr/bin/systemctl": ""})
    make_tree(root, spec)
    for program in ("sbin/shutdown", "sbin/hwclock", "usr/sbin/chpasswd", "usr/bin/systemctl"):
        (root / program).chmod(0o755)
    return root


@pytest.mark.parametrize("name", CATALOGUE)
def test_any_valid_arguments_get_a_proper_answer(name, guest_tree, tmp_path_factory):
    spec = schemas.commands()[name]
    returns = spec.get("returns")
    state = tmp_path_factory.mktemp("state")

    @settings(max_examples=25, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(strategy(spec["arguments"]))
    def check(arguments):
        platform = FuzzPlatform(root=str(guest_tree), env={"PATH": "/usr/sbin:/usr/bin",
                                                           "QGA_OS_RELEASE": "/nonexistent"})
        ctx = make_ctx(platform, state)
        args = {key.replace("-", "_"): value for key, value in arguments.items()}
        try:
            value = COMMANDS[name].handler(ctx, **args)
        except AgentError as err:
            assert err.error_class == "GenericError" and err.desc
            return
        if returns is not None:
            jsonschema.validate(value, returns)
        assert all(call[0] != "spawn" or name == "guest-exec" for call in platform.calls)

    check()
