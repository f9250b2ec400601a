"""The dispatcher: request checks, lookup, block list, frozen gating, validation.

Runs on the real registry (all handlers loaded) with a plain Context; only
commands that change nothing are executed.
"""

from __future__ import annotations

import pytest

from agent.commands import load_all
from agent.context import Context
from agent.dispatcher import Dispatcher
from agent.errors import AgentError
from agent.platform import Platform
from agent.protocol import ParseError, Protocol, Request
from agent.registry import Command, command

load_all()


def make(blocked=(), frozen=False):
    ctx = Context(Platform(), frozen=frozen)
    return ctx, Dispatcher(ctx, blocked=blocked)


def ask(dispatcher, data: bytes) -> bytes:
    out = b""
    for event in Protocol().feed(data):
        out += dispatcher.handle(event) or b""
    return out


@pytest.mark.parametrize("request_bytes, response", [
    (b'{"execute":"guest-ping"}', b'{"return": {}}\n'),
    (b'{"execute":"guest-ping","id":{"a":[1,2]}}', b'{"return": {}, "id": {"a": [1, 2]}}\n'),
    (b'{"execute":"guest-ping","id":null}', b'{"return": {}, "id": null}\n'),
    (b'{"execute":"guest-sync","arguments":{"id":7},"id":99}', b'{"return": 7, "id": 99}\n'),
    (b'{"execute":"guest-no-such","id":"e1"}',
     b'{"id": "e1", "error": {"class": "CommandNotFound", "desc": "The command guest-no-such has not been found"}}\n'),
    (b'[1]', b'{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}\n'),
    (b'{"id":5}', b'{"id": 5, "error": {"class": "GenericError", "desc": "QMP input lacks member \'execute\'"}}\n'),
    (b'{"execute":1}', b'{"error": {"class": "GenericError", "desc": "QMP input member \'execute\' must be a string"}}\n'),
    (b'{"execute":"guest-ping","arguments":null}',
     b'{"error": {"class": "GenericError", "desc": "QMP input member \'arguments\' must be an object"}}\n'),
    (b'{"exec-oob":"guest-ping"}',
     b'{"error": {"class": "GenericError", "desc": "QMP input member \'exec-oob\' is unexpected"}}\n'),
    (b'{"execute":"guest-get-devices"}',
     b'{"error": {"class": "CommandNotFound", "desc": "Command guest-get-devices has been disabled"}}\n'),
])
def test_wire_bytes(request_bytes, response):
    _, dispatcher = make()
    assert ask(dispatcher, request_bytes) == response


@pytest.mark.parametrize("arguments, desc", [
    (b'{"execute":"guest-sync"}', "Parameter 'id' is missing"),
    (b'{"execute":"guest-sync","arguments":{"id":"x"}}', "Invalid parameter type for 'id', expected: integer"),
    (b'{"execute":"guest-sync","arguments":{"id":1.0}}', "Invalid parameter type for 'id', expected: integer"),
    (b'{"execute":"guest-sync","arguments":{"id":true}}', "Invalid parameter type for 'id', expected: integer"),
    (b'{"execute":"guest-sync","arguments":{"id":9223372036854775808}}',
     "Invalid parameter type for 'id', expected: integer"),
    (b'{"execute":"guest-ping","arguments":{"b":1,"a":2}}', "Parameter 'b' is unexpected"),
    (b'{"execute":"guest-ping","arguments":{"foo":1,"bar":2,"baz":3,"qux":4}}', "Parameter 'baz' is unexpected"),
    (b'{"execute":"guest-file-open","arguments":{"path":5}}', "Invalid parameter type for 'path', expected: string"),
    (b'{"execute":"guest-file-open","arguments":{"path":"x","mode":null}}',
     "Invalid parameter type for 'mode', expected: string"),
    (b'{"execute":"guest-exec","arguments":{"path":"/bin/true","arg":["a",1]}}',
     "Invalid parameter type for 'arg[1]', expected: string"),
    (b'{"execute":"guest-exec","arguments":{"path":"/bin/true","capture-output":"yes"}}',
     "Invalid parameter type for 'capture-output', expected: boolean"),
    (b'{"execute":"guest-set-vcpus","arguments":{"vcpus":[{"logical-id":0,"online":true},{"online":true}]}}',
     "Parameter 'vcpus[1].logical-id' is missing"),
    (b'{"execute":"guest-set-vcpus","arguments":{"vcpus":[5]}}', "Invalid parameter type for 'vcpus[0]', expected: object"),
    (b'{"execute":"guest-set-vcpus","arguments":{"vcpus":[{"logical-id":0,"online":true,"x":1},{"online":1}]}}',
     "Parameter 'vcpus[0].x' is unexpected"),
    (b'{"execute":"guest-set-memory-blocks","arguments":{"mem-blks":[{"phys-index":"x","online":true}]}}',
     "Parameter 'mem-blks[0].phys-index' expects uint64"),
    (b'{"execute":"guest-file-seek","arguments":{"handle":1,"offset":0,"whence":"middle"}}',
     "Parameter 'whence' does not accept value 'middle'"),
    (b'{"execute":"guest-file-seek","arguments":{"handle":1,"offset":0,"whence":true}}',
     "Invalid parameter type for 'whence', expected: GuestFileWhence"),
    (b'{"execute":"guest-file-seek","arguments":{"handle":1,"offset":0,"whence":1.5}}',
     "Invalid parameter type for 'whence', expected: integer"),
])
def test_argument_errors_worded_as_qapi(arguments, desc):
    _, dispatcher = make()
    out = ask(dispatcher, arguments)
    assert out == Protocol.encode({"error": {"class": "GenericError", "desc": desc}})


def test_sync_delimited_prefixes_only_its_success():
    _, dispatcher = make()
    assert ask(dispatcher, b'{"execute":"guest-sync-delimited","arguments":{"id":3}}') == b'\xff{"return": 3}\n'
    assert not ask(dispatcher, b'{"execute":"guest-sync-delimited"}').startswith(b"\xff")
    assert ask(dispatcher, b'{"execute":"guest-ping"}') == b'{"return": {}}\n'


def test_blocked_and_frozen_reasons_follow_qemu_ga():
    ctx, dispatcher = make(blocked=["guest-ping", "guest-get-osinfo", "no-such-name"])
    assert b"Command guest-ping has been disabled\"" in ask(dispatcher, b'{"execute":"guest-ping"}')
    ctx.set_frozen(True)
    frozen = b"has been disabled: the agent is in frozen state"
    assert frozen in ask(dispatcher, b'{"execute":"guest-get-host-name"}')
    assert frozen in ask(dispatcher, b'{"execute":"guest-get-osinfo"}')
    # allowed while frozen, but blocked: no reason
    assert b"Command guest-ping has been disabled\"" in ask(dispatcher, b'{"execute":"guest-ping"}')
    assert ask(dispatcher, b'{"execute":"guest-sync","arguments":{"id":1}}') == b'{"return": 1}\n'
    ctx.set_frozen(False)
    assert b'"return"' in ask(dispatcher, b'{"execute":"guest-get-host-name"}')
    # a blocked command keeps the frozen reason after the thaw, as in qemu-ga
    assert frozen in ask(dispatcher, b'{"execute":"guest-get-osinfo"}')


def test_guest_info_lists_newest_first_with_enabled_flags():
    ctx, dispatcher = make(frozen=True)
    info = dispatcher.info()
    assert info[-1] == {"name": "guest-sync-delimited", "enabled": True, "success-response": True}
    enabled = {e["name"] for e in info if e["enabled"]}
    assert enabled <= {"guest-ping", "guest-info", "guest-sync", "guest-sync-delimited",
                       "guest-fsfreeze-status", "guest-fsfreeze-thaw"}


def test_handler_errors_and_bugs_become_wire_errors():
    @command("test-raises-agent-error")
    def raises(ctx):
        raise AgentError("nope", "CommandNotFound")

    @command("test-crashes")
    def crashes(ctx):
        raise RuntimeError("boom")

    @command("test-bad-return")
    def bad(ctx):
        return object()

    try:
        _, dispatcher = make()
        assert ask(dispatcher, b'{"execute":"test-raises-agent-error"}') == \
            b'{"error": {"class": "CommandNotFound", "desc": "nope"}}\n'
        assert b"internal error: RuntimeError: boom" in ask(dispatcher, b'{"execute":"test-crashes","id":1}')
        out = ask(dispatcher, b'{"execute":"test-bad-return","id":2}')
        assert b"cannot be encoded" in out and b'"id": 2' in out
    finally:
        from agent.registry import COMMANDS
        for name in ("test-raises-agent-error", "test-crashes", "test-bad-return"):
            COMMANDS.pop(name, None)


def test_no_response_commands_send_nothing_on_success():
    calls = []
    commands = {"guest-sync": Command("guest-sync", lambda ctx, id: id, while_frozen=True),
                "guest-shutdown": Command("guest-shutdown", lambda ctx, mode=None: calls.append(mode),
                                          success_response=False)}
    ctx = Context(Platform())
    dispatcher = Dispatcher(ctx, commands=commands)
    assert ask(dispatcher, b'{"execute":"guest-shutdown","arguments":{"mode":"halt"}}') == b""
    assert calls == ["halt"]


def test_parse_error_event():
    _, dispatcher = make()
    assert dispatcher.handle(ParseError("JSON parse error, x")) == \
        b'{"error": {"class": "GenericError", "desc": "JSON parse error, x"}}\n'
    assert dispatcher.handle(Request([])) == \
        b'{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}\n'


# ---------------------------------------------------------------- fast predicate

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from agent import schemas  # noqa: E402
from agent.validation import QAPIValidator, compile_predicate  # noqa: E402

_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**65), max_value=2**65),
                  st.floats(allow_nan=False), st.sampled_from(["set", "cur", "end", "x", ""]))
_json = st.recursive(_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["id", "path", "mode", "handle", "count", "offset", "whence",
                                     "vcpus", "logical-id", "online", "can-offline", "mem-blks",
                                     "phys-index", "arg", "env", "keys", "username", "x"]),
                    inner, max_size=4)), max_leaves=10)


@pytest.mark.parametrize("name", schemas.command_order())
def test_fast_predicate_agrees_with_jsonschema(name):
    schema = schemas.commands()[name]["arguments"]
    predicate = compile_predicate(schema)
    assert predicate is not None, "every generated schema must have a fast predicate"
    validator = QAPIValidator(schema)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(args=st.dictionaries(st.sampled_from(list(schema.get("properties", {})) + ["zz"]),
                                _json, max_size=4))
    def check(args):
        assert predicate(args) == validator.is_valid(args)

    check()


def test_negative_uint64_arguments_reach_the_handler_wrapped_as_in_qemu():
    seen = []
    commands = {"guest-set-memory-blocks": Command(
        "guest-set-memory-blocks", lambda ctx, mem_blks: seen.append(mem_blks) or [])}
    dispatcher = Dispatcher(Context(Platform()), commands=commands)
    ask(dispatcher, b'{"execute":"guest-set-memory-blocks","arguments":'
                    b'{"mem-blks":[{"phys-index":-1,"online":true},{"phys-index":5,"online":false}]}}')
    assert seen == [[{"phys-index": 2**64 - 1, "online": True}, {"phys-index": 5, "online": False}]]
