"""Argument validation: jsonschema, worded as qemu-ga's QAPI visitor.

The argument schemas (agent/schemas) are checked with jsonschema.  qemu-ga
reports only the first problem its input visitor meets: it walks the
members in schema order, depth first (a list element's members, then that
element's surplus keys, then the next element), and reports surplus keys
of an object after all its members.  Every jsonschema error is therefore
given that walk's position, and the earliest one is worded the way QAPI
words it:

    Parameter 'vcpus[0].logical-id' is missing
    Parameter 'foo' is unexpected
    Invalid parameter type for 'id', expected: integer
    Parameter 'mem-blks[0].phys-index' expects uint64
    Parameter 'whence' does not accept value 'middle'
    Invalid parameter type for 'whence', expected: GuestFileWhence
"""

from __future__ import annotations

import math
from typing import Any

from functools import lru_cache
from typing import TYPE_CHECKING

from agent.errors import AgentError
from agent.ghash import first_unconsumed
from agent.jsonwrite import qdict_items
from agent.modutf8 import to_c_bytes


def _is_integer(_checker: Any, instance: Any) -> bool:
    # QEMU never takes a double where an integer is wanted, not even 1.0
    return isinstance(instance, int) and not isinstance(instance, bool)


def _is_number(_checker: Any, instance: Any) -> bool:
    return isinstance(instance, (int, float)) and not isinstance(instance, bool)


if TYPE_CHECKING:
    from jsonschema.exceptions import ValidationError


@lru_cache(maxsize=1)
def validator_class():
    """jsonschema's draft 2020-12 validator with QEMU's idea of an integer.

    Imported on first use: valid requests never need it (see
    :func:`compile_predicate`), and the agent answers sooner after start.
    """
    from jsonschema import Draft202012Validator, validators
    checker = Draft202012Validator.TYPE_CHECKER.redefine_many(
        {"integer": _is_integer, "number": _is_number})
    return validators.extend(Draft202012Validator, type_checker=checker)


def QAPIValidator(schema: dict[str, Any]):
    return validator_class()(schema)

_EXPECTED = {"int": "integer", "int64": "integer", "str": "string", "bool": "boolean",
             "number": "number", "null": "null"}
_AFTER_MEMBERS = math.inf


def full_name(path: list[str | int]) -> str:
    """QAPI's name for a member: ``vcpus[0].logical-id``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def short_name(path: list[str | int]) -> str:
    """The bare member name some QAPI messages use (``null`` for list items)."""
    return path[-1] if path and isinstance(path[-1], str) else "null"


def type_message(schema: dict[str, Any], path: list[str | int]) -> str:
    """The error for a value of the wrong type (or range) at ``path``."""
    qtype = schema.get("x-qapi-type", "")
    kind = schema.get("x-qapi-kind", "")
    if kind == "alternate":
        return f"Invalid parameter type for '{short_name(path)}', expected: {qtype}"
    if qtype in _EXPECTED:
        return f"Invalid parameter type for '{full_name(path)}', expected: {_EXPECTED[qtype]}"
    if schema.get("type") == "integer":
        # uint64 and the sized integers are checked as values, not types
        return f"Parameter '{full_name(path)}' expects {qtype}"
    if kind == "enum":
        expected = "string"
    elif kind == "list":
        expected = "array"
    else:
        expected = "object"
    return f"Invalid parameter type for '{full_name(path)}', expected: {expected}"


def _qtype_branch(schema: dict[str, Any], instance: Any) -> dict[str, Any] | None:
    """The alternate's branch QEMU picks for ``instance`` (by its QType)."""
    for branch in schema["anyOf"]:
        json_type = branch.get("type")
        if isinstance(instance, bool):
            if json_type == "boolean":
                return branch
        elif isinstance(instance, (int, float)):
            if json_type in ("integer", "number"):
                return branch
        elif isinstance(instance, str):
            if json_type == "string":
                return branch
        elif isinstance(instance, dict):
            if json_type == "object":
                return branch
        elif isinstance(instance, list):
            if json_type == "array":
                return branch
        elif instance is None and json_type == "null":
            return branch
    return None


def compile_predicate(schema: dict[str, Any]):
    """A fast ``instance -> bool`` equal to jsonschema's verdict for ``schema``.

    Valid arguments -- nearly every request -- are accepted without going
    through jsonschema's machinery (tens of microseconds per request);
    anything this predicate rejects is handed to jsonschema, which finds
    and words the error.  It covers the keywords the generated schemas use
    and refuses (returns None) for anything else, and a test checks it
    against jsonschema on generated arguments for every command.
    """
    known = {"type", "properties", "required", "additionalProperties", "items", "enum",
             "anyOf", "minimum", "maximum", "x-qapi-type", "x-qapi-kind"}
    if set(schema) - known:
        return None
    checks = []
    kind = schema.get("type")
    if kind is not None:
        test = _TYPE_TESTS.get(kind)
        if test is None:
            return None
        checks.append(test)
    if "minimum" in schema or "maximum" in schema:
        low, high = schema.get("minimum", -math.inf), schema.get("maximum", math.inf)
        checks.append(lambda v: not _is_number(None, v) or low <= v <= high)
    if "enum" in schema:
        values = schema["enum"]
        checks.append(lambda v: any(v == e and type(v) is type(e) for e in values))
    if "anyOf" in schema:
        branches = [compile_predicate(b) for b in schema["anyOf"]]
        if any(b is None for b in branches):
            return None
        checks.append(lambda v: any(b(v) for b in branches))
    if "items" in schema:
        item = compile_predicate(schema["items"])
        if item is None:
            return None
        checks.append(lambda v: not isinstance(v, list) or all(item(x) for x in v))
    if "properties" in schema or "required" in schema or "additionalProperties" in schema:
        if schema.get("additionalProperties", False) is not False:
            return None
        members = {}
        for name, sub in schema.get("properties", {}).items():
            members[name] = compile_predicate(sub)
            if members[name] is None:
                return None
        required = tuple(schema.get("required", ()))

        def object_ok(v: Any) -> bool:
            if not isinstance(v, dict):
                return True
            for name in required:
                if name not in v:
                    return False
            for name, value in v.items():
                test = members.get(name)
                if test is None or not test(value):
                    return False
            return True
        checks.append(object_ok)
    if len(checks) == 1:
        return checks[0]
    return lambda v: all(check(v) for check in checks)


_TYPE_TESTS = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "null": lambda v: v is None,
}


def compile_coercion(schema: dict[str, Any]):
    """``value -> value`` applying what QEMU's input visitor does to valid
    input beyond checking it: a negative int64 given for a ``uint64``
    becomes its 64-bit two's complement (``-1`` -> 18446744073709551615).
    None when the schema has no such member."""
    qtype = schema.get("x-qapi-type")
    if qtype in ("uint64", "size"):
        return lambda v: v + (1 << 64) if isinstance(v, int) and v < 0 else v
    if "items" in schema:
        item = compile_coercion(schema["items"])
        if item is not None:
            return lambda v: [item(x) for x in v] if isinstance(v, list) else v
        return None
    if "anyOf" in schema:
        return None  # qga's only alternate has no uint64 branch
    members = {name: compile_coercion(sub) for name, sub in schema.get("properties", {}).items()}
    members = {name: fix for name, fix in members.items() if fix is not None}
    if not members:
        return None
    return lambda v: {k: (members[k](x) if k in members else x) for k, x in v.items()} \
        if isinstance(v, dict) else v


class ArgumentChecker:
    """Validates one command's arguments; raises AgentError as qemu-ga words it."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema
        self._validator = None
        self._fast = compile_predicate(schema)
        self._coerce = compile_coercion(schema)

    def check(self, args: dict[str, Any]) -> dict[str, Any]:
        """The arguments as the handler gets them; AgentError when invalid."""
        if self._fast is None or not self._fast(args):
            self._raise_first_error(args)
        return self._coerce(args) if self._coerce is not None else args

    def _raise_first_error(self, args: dict[str, Any]) -> None:
        if self._validator is None:
            self._validator = QAPIValidator(self.schema)
        best: tuple[tuple, str] | None = None
        for error in self._validator.iter_errors(args):
            candidate = self._describe(error, self.schema, [])
            if best is None or candidate[0] < best[0]:
                best = candidate
        if best is not None:
            raise AgentError(best[1])

    def _describe(self, error: "ValidationError", root: dict[str, Any],
                  prefix: list[str | int]) -> tuple[tuple, str]:
        path = prefix + list(error.absolute_path)
        node = error.schema
        where = self._position(root, list(error.absolute_path), prefix)
        keyword = error.validator
        if keyword == "required":
            properties = list(node.get("properties", {}))
            missing = [m for m in node["required"] if m not in error.instance]
            first = min(missing, key=properties.index)
            return where + (properties.index(first),), \
                f"Parameter '{full_name(path + [first])}' is missing"
        if keyword == "additionalProperties":
            properties = node.get("properties", {})
            keys = [k for k, _ in qdict_items(error.instance)]
            consumed = [k for k in properties if k in error.instance]
            extra = first_unconsumed([to_c_bytes(k) for k in keys],
                                     [to_c_bytes(k) for k in consumed])
            name = next(k for k in keys if to_c_bytes(k) == extra)
            return where + (_AFTER_MEMBERS,), f"Parameter '{full_name(path + [name])}' is unexpected"
        if keyword == "enum":
            return where, (f"Parameter '{short_name(path)}' does not accept value "
                           f"'{error.instance}'")
        if keyword == "anyOf" and node.get("x-qapi-kind") == "alternate":
            branch = _qtype_branch(node, error.instance)
            if branch is not None:
                sub = next(QAPIValidator(branch).iter_errors(error.instance), None)
                if sub is not None:
                    key, message = self._describe(sub, branch, path)
                    return where + key, message
            return where, type_message(node, path)
        return where, type_message(node, path)

    def _position(self, root: dict[str, Any], rel: list[str | int],
                  prefix: list[str | int]) -> tuple:
        """Where the visitor meets ``rel``: member indices and list indices."""
        out: list[float] = []
        schema = root
        for part in rel:
            if isinstance(part, int):
                out.append(part)
                schema = schema.get("items", {})
            else:
                properties = schema.get("properties", {})
                names = list(properties)
                out.append(names.index(part) if part in properties else _AFTER_MEMBERS)
                schema = properties.get(part, {})
        return tuple(out)
