"""From a parsed request to the response bytes: qemu-ga's qmp_dispatch.

The dispatcher checks the request object (members, ``execute``,
``arguments``), finds the command in the registry, refuses disabled ones,
validates the arguments against the command's JSON Schema, calls the
handler and builds ``{"return": ...}`` or ``{"error": {"class", "desc"}}``
with the request's ``id``.  It is the only place where exceptions become
wire errors.

Enabling and disabling follows qemu-ga's own bookkeeping, quirks included,
because hosts see the difference in the error text:

* commands named by ``-b``/``block-rpcs`` (and guest-get-devices, which
  qemu-ga disables on Linux) are disabled without a reason:
  ``Command X has been disabled``;
* entering the frozen state disables every command not allowed while
  frozen with the reason ``the agent is in frozen state``;
* leaving it re-enables only the commands that are not blocked, so a
  blocked command keeps the frozen reason afterwards, as in qemu-ga.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from agent import registry, schemas
from agent.context import Context
from agent.errors import AgentError
from agent.jsonwrite import qdict_items
from agent.protocol import Event, ParseError, Protocol
from agent.validation import ArgumentChecker

#: commands qemu-ga 7.2 disables on Linux, as if blocked
PLATFORM_DISABLED = ("guest-get-devices",)
FROZEN_REASON = "the agent is in frozen state"

log = logging.getLogger("qga.dispatch")

_ABSENT = object()


def error_payload(desc: str, error_class: str = "GenericError") -> dict[str, Any]:
    return {"error": {"class": error_class, "desc": desc}}


def registration_order(commands: dict[str, registry.Command]) -> list[str]:
    """Registered commands in qemu-ga's order (the schema's), extras last."""
    known = [name for name in schemas.command_order() if name in commands]
    extra = [name for name in commands if name not in schemas.commands()]
    return known + extra


class Dispatcher:
    def __init__(self, ctx: Context, blocked: Iterable[str] = (),
                 commands: dict[str, registry.Command] | None = None,
                 listen: bool = True) -> None:
        """``listen=False``: the caller forwards frozen-state changes itself
        (the daemon does, to keep qemu-ga's order of log lines)."""
        self.ctx = ctx
        self.commands = registry.COMMANDS if commands is None else commands
        self.order = registration_order(self.commands)
        self.blocked = list(blocked) + list(PLATFORM_DISABLED)
        self._checkers: dict[str, ArgumentChecker] = {}
        self.enabled = {name: True for name in self.order}
        self.reason: dict[str, str | None] = {name: None for name in self.order}
        # an agent that starts frozen restricts first and then blocks, so a
        # blocked command reports no reason (observed with qemu-ga 7.2)
        if ctx.frozen:
            self._restrict()
        for name in self.blocked:
            if name in self.enabled:
                log.debug("disabling command: %s", name)
                self._disable(name, None)
        ctx.services["dispatcher"] = self
        if listen:
            ctx.frozen_listeners.append(self.frozen_changed)

    # ------------------------------------------------------------ state

    def _disable(self, name: str, reason: str | None) -> None:
        self.enabled[name] = False
        self.reason[name] = reason

    def _restrict(self) -> None:
        for name in self.order:
            if not self.commands[name].while_frozen:
                log.debug("disabling command: %s", name)
                self._disable(name, FROZEN_REASON)

    def frozen_changed(self, frozen: bool) -> None:
        if frozen:
            self._restrict()
            return
        for name in self.order:
            if name not in self.blocked and not self.enabled[name]:
                log.debug("enabling command: %s", name)
                self.enabled[name] = True
                self.reason[name] = None

    def info(self) -> list[dict[str, Any]]:
        """guest-info's command table: newest registration first."""
        return [{"name": name, "enabled": self.enabled[name],
                 "success-response": self.commands[name].success_response}
                for name in reversed(self.order)]

    # ------------------------------------------------------------ dispatch

    def handle(self, event: Event) -> bytes | None:
        """The response bytes for one protocol event, or None (no reply)."""
        chunks = self.reply(event)
        return None if chunks is None else b"".join(chunks)

    def reply(self, event: Event) -> list[bytes] | None:
        """Like :meth:`handle`, as chunks to write in turn (what the daemon uses)."""
        if isinstance(event, ParseError):
            return Protocol.encode_chunks(error_payload(event.desc))
        payload, request_id = self.dispatch(event.value)
        if payload is None:
            return None
        delimited, self.ctx.delimit_response = self.ctx.delimit_response, False
        try:
            return Protocol.encode_chunks(payload, delimited and "return" in payload)
        except (TypeError, ValueError) as exc:
            log.error("cannot encode the response: %s", exc)
            payload = error_payload(f"internal error: the response cannot be encoded: {exc}")
            if request_id is not _ABSENT:
                payload["id"] = request_id
            return Protocol.encode_chunks(payload)

    def dispatch(self, request: Any) -> tuple[dict[str, Any] | None, Any]:
        """(response payload or None for no reply, the request's id or _ABSENT)."""
        if not isinstance(request, dict):
            return error_payload("QMP input must be a JSON object"), _ABSENT
        request_id = request.get("id", _ABSENT)
        try:
            value = self._execute(request)
        except AgentError as exc:
            payload = error_payload(exc.desc, exc.error_class)
        except Exception as exc:  # a handler bug must not take the agent down
            log.exception("command failed unexpectedly")
            payload = error_payload(f"internal error: {type(exc).__name__}: {exc}")
        else:
            if value is _NO_RESPONSE:
                return None, request_id
            payload = {"return": {} if value is None else value}
        if request_id is not _ABSENT:
            payload["id"] = request_id
        return payload, request_id

    def _execute(self, request: dict[str, Any]) -> Any:
        name = self._check_request(request)
        command = self.commands.get(name)
        if command is None:
            raise AgentError(f"The command {name} has not been found", "CommandNotFound")
        if not self.enabled.get(name, True):
            reason = self.reason.get(name)
            raise AgentError(f"Command {name} has been disabled" + (f": {reason}" if reason else ""),
                             "CommandNotFound")
        args = self._checker(name).check(request.get("arguments", _EMPTY))
        log.debug("processing command %s", name)
        if args:
            value = command.handler(self.ctx, **{k.replace("-", "_"): v for k, v in args.items()})
        else:
            value = command.handler(self.ctx)
        if not command.success_response:
            return _NO_RESPONSE
        return value

    @staticmethod
    def _check_request(request: dict[str, Any]) -> str:
        name = request.get("execute")
        if isinstance(name, str) and isinstance(request.get("arguments", _EMPTY), dict) \
                and _REQUEST_KEYS.issuperset(request):
            return name  # the usual, well-formed request
        # otherwise the first problem in qemu-ga's (QDict) order is reported
        for key, value in qdict_items(request):
            if key == "execute":
                if not isinstance(value, str):
                    raise AgentError("QMP input member 'execute' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise AgentError("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise AgentError(f"QMP input member '{key}' is unexpected")
        if "execute" not in request:
            raise AgentError("QMP input lacks member 'execute'")
        return request["execute"]

    def _checker(self, name: str) -> ArgumentChecker:
        checker = self._checkers.get(name)
        if checker is None:
            spec = schemas.commands().get(name)
            schema = spec["arguments"] if spec else {"type": "object"}
            checker = self._checkers[name] = ArgumentChecker(schema)
        return checker


_NO_RESPONSE = object()
_EMPTY: dict[str, Any] = {}
_REQUEST_KEYS = frozenset(("execute", "arguments", "id"))
