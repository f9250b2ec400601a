"""Derive qga's JSON Schemas from QEMU's QAPI schema for the guest agent.

Usage: python -m agent.schemas.generate [QAPI_SCHEMA] [OUTPUT]

QAPI_SCHEMA defaults to the 7.2 ``qga/qapi-schema.json`` kept beside the
project (../shared/spec/qga-qapi-schema.json), OUTPUT to
agent/schemas/qga-commands.json.  The output is a catalogue: for every
command, in the schema's (= qemu-ga's registration) order, a JSON Schema
(draft 2020-12) for its arguments and one for its return value, plus
``success-response``.  Schemas are inlined (the qga types are not
recursive), so each validates on its own.

Annotations the dispatcher needs to word errors as qemu-ga does:
``x-qapi-type`` (the QAPI type name: int, uint64, str, bool, number, any,
an enum, struct or alternate name, or ``[T]`` for a list) and
``x-qapi-kind`` (builtin, enum, struct, union, alternate, list).

Argument integers accept exactly what QEMU's input visitor accepts
(``uint64`` also takes negative int64, as QEMU does for backward
compatibility); return integers are held to their real range.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parents[2] / "shared" / "spec" / "qga-qapi-schema.json"
DEFAULT_OUTPUT = HERE / "qga-commands.json"

INT64 = (-(1 << 63), (1 << 63) - 1)
BUILTIN_INTS = {
    "int": INT64, "int64": INT64,
    "int8": (-(1 << 7), (1 << 7) - 1), "int16": (-(1 << 15), (1 << 15) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
    "uint8": (0, (1 << 8) - 1), "uint16": (0, (1 << 16) - 1),
    "uint32": (0, (1 << 32) - 1), "uint64": (0, (1 << 64) - 1), "size": (0, (1 << 64) - 1),
}
BUILTIN_OTHER = {
    "str": {"type": "string"},
    "bool": {"type": "boolean"},
    "number": {"type": "number"},
    "any": {},
    "null": {"type": "null"},
}


# ------------------------------------------------------------ QAPI reader

def read_qapi(text: str) -> list[dict[str, Any]]:
    """The top-level expressions of a QAPI schema file (comments dropped)."""
    tokens = list(_qapi_tokens(text))
    exprs = []
    pos = 0
    while pos < len(tokens):
        value, pos = _qapi_value(tokens, pos)
        exprs.append(value)
    return exprs


def _qapi_tokens(text: str):
    pos = 0
    n = len(text)
    while pos < n:
        ch = text[pos]
        if ch == "#":
            pos = text.find("\n", pos)
            pos = n if pos < 0 else pos
        elif ch.isspace():
            pos += 1
        elif ch in "{}[]:,":
            yield ch
            pos += 1
        elif ch == "'":
            end = text.index("'", pos + 1)
            yield ("str", text[pos + 1:end])
            pos = end + 1
        elif text.startswith("true", pos):
            yield ("lit", True)
            pos += 4
        elif text.startswith("false", pos):
            yield ("lit", False)
            pos += 5
        else:
            raise ValueError(f"unexpected {ch!r} at offset {pos}")


def _qapi_value(tokens: list, pos: int) -> tuple[Any, int]:
    tok = tokens[pos]
    if tok == "{":
        out: dict[str, Any] = {}
        pos += 1
        while tokens[pos] != "}":
            key = tokens[pos][1]
            assert tokens[pos + 1] == ":"
            out[key], pos = _qapi_value(tokens, pos + 2)
            if tokens[pos] == ",":
                pos += 1
        return out, pos + 1
    if tok == "[":
        items = []
        pos += 1
        while tokens[pos] != "]":
            item, pos = _qapi_value(tokens, pos)
            items.append(item)
            if tokens[pos] == ",":
                pos += 1
        return items, pos + 1
    return tok[1], pos + 1


# ------------------------------------------------------------ translation

class Translator:
    def __init__(self, exprs: list[dict[str, Any]]) -> None:
        self.types: dict[str, tuple[str, dict[str, Any]]] = {}
        self.commands: list[dict[str, Any]] = []
        for expr in exprs:
            for kind in ("struct", "enum", "union", "alternate"):
                if kind in expr:
                    self.types[expr[kind]] = (kind, expr)
            if "command" in expr:
                self.commands.append(expr)

    def schema(self, qtype: Any, output: bool) -> dict[str, Any]:
        if isinstance(qtype, list):
            return {"type": "array", "items": self.schema(qtype[0], output),
                    "x-qapi-type": f"[{_type_name(qtype[0])}]", "x-qapi-kind": "list"}
        if isinstance(qtype, dict):  # anonymous members (command data)
            return self.members_schema(qtype, output, None)
        if qtype in BUILTIN_INTS:
            low, high = BUILTIN_INTS[qtype]
            if not output and qtype == "uint64":
                low = INT64[0]  # the input visitor takes negative int64 too
            return {"type": "integer", "minimum": low, "maximum": high,
                    "x-qapi-type": qtype, "x-qapi-kind": "builtin"}
        if qtype in BUILTIN_OTHER:
            return {**BUILTIN_OTHER[qtype], "x-qapi-type": qtype, "x-qapi-kind": "builtin"}
        kind, expr = self.types[qtype]
        if kind == "enum":
            values = [v if isinstance(v, str) else v["name"] for v in expr["data"]]
            return {"type": "string", "enum": values, "x-qapi-type": qtype, "x-qapi-kind": "enum"}
        if kind == "struct":
            members = dict(self.base_members(expr))
            members.update(expr["data"])
            return self.members_schema(members, output, qtype)
        if kind == "alternate":
            branches = [self.schema(t, output) for t in expr["data"].values()]
            return {"anyOf": branches, "x-qapi-type": qtype, "x-qapi-kind": "alternate"}
        return self.union_schema(qtype, expr, output)

    def base_members(self, expr: dict[str, Any]) -> dict[str, Any]:
        base = expr.get("base")
        if base is None:
            return {}
        if isinstance(base, dict):
            return base
        return dict(self.types[base][1]["data"])

    def members_schema(self, members: dict[str, Any], output: bool,
                       name: str | None) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        required: list[str] = []
        for raw, qtype in members.items():
            if isinstance(qtype, dict):  # {'type': T, 'if': ...} member form
                qtype = qtype["type"]
            optional = raw.startswith("*")
            member = raw[1:] if optional else raw
            properties[member] = self.schema(qtype, output)
            if not optional:
                required.append(member)
        out: dict[str, Any] = {"type": "object", "properties": properties,
                               "required": required, "additionalProperties": False,
                               "x-qapi-kind": "struct"}
        if name:
            out["x-qapi-type"] = name
        return out

    def union_schema(self, name: str, expr: dict[str, Any], output: bool) -> dict[str, Any]:
        base = self.base_members(expr)
        out = self.members_schema(base, output, name)
        out["x-qapi-kind"] = "union"
        discriminator = expr["discriminator"]
        branches = []
        for value, variant in expr["data"].items():
            variant_type = variant["type"] if isinstance(variant, dict) else variant
            variant_schema = self.schema(variant_type, output)
            out["properties"].update(variant_schema["properties"])
            branches.append({
                "if": {"properties": {discriminator: {"const": value}}},
                "then": {"required": variant_schema["required"]},
            })
        out["allOf"] = branches
        return out

    def catalogue(self) -> dict[str, Any]:
        commands = {}
        for expr in self.commands:
            name = expr["command"]
            data = expr.get("data", {})
            arguments = self.members_schema(data, False, None) if isinstance(data, dict) \
                else self.schema(data, False)
            returns = self.schema(expr["returns"], True) if "returns" in expr \
                else {"type": "object", "maxProperties": 0}
            commands[name] = {
                "success-response": expr.get("success-response", True),
                "arguments": arguments,
                "returns": returns,
            }
        return {
            "$comment": "Generated by agent/schemas/generate.py from QEMU 7.2's "
                        "qga/qapi-schema.json; do not edit by hand.",
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "commands": commands,
        }


def _type_name(qtype: Any) -> str:
    return f"[{_type_name(qtype[0])}]" if isinstance(qtype, list) else str(qtype)


def render(source: Path) -> str:
    catalogue = Translator(read_qapi(source.read_text(encoding="utf-8"))).catalogue()
    return json.dumps(catalogue, indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    source = Path(args[0]) if args else DEFAULT_SOURCE
    output = Path(args[1]) if len(args) > 1 else DEFAULT_OUTPUT
    output.write_text(render(source), encoding="utf-8")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
