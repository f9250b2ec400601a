"""GNU getopt_long, as qemu-ga's command line behaves with glibc.

qemu-ga parses its options with getopt_long, and users meet its
behaviour: arguments are permuted (positional words are skipped, not
errors), long options may be abbreviated when unambiguous (aliases of the
same option are not ambiguous), ``-F`` takes an optional argument that must
be attached, ``--`` ends the options, and errors are glibc's messages.
"""

from __future__ import annotations

from dataclasses import dataclass

NO_ARGUMENT, REQUIRED, OPTIONAL = 0, 1, 2


@dataclass(frozen=True)
class LongOption:
    name: str
    has_arg: int
    key: str  # the short option letter (or a name) it stands for


class GetoptError(Exception):
    """``message`` is the line glibc prints, without the trailing newline."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _short_table(spec: str) -> dict[str, int]:
    table: dict[str, int] = {}
    i = 0
    while i < len(spec):
        letter = spec[i]
        i += 1
        kind = NO_ARGUMENT
        if spec[i:i + 2] == "::":
            kind, i = OPTIONAL, i + 2
        elif spec[i:i + 1] == ":":
            kind, i = REQUIRED, i + 1
        table[letter] = kind
    return table


def getopt_long(prog: str, argv: list[str], short: str,
                longs: list[LongOption]) -> list[tuple[str, str | None]]:
    """The (key, argument) pairs in order; raises GetoptError at the first bad option.

    Processing stops at the first error, as qemu-ga exits there; options
    before it have been returned by then in qemu-ga, which matters only for
    options that exit at once (-h, -V, -b help): the caller handles those as
    it iterates, so they are yielded lazily.
    """
    return list(iter_getopt_long(prog, argv, short, longs))


def iter_getopt_long(prog: str, argv: list[str], short: str, longs: list[LongOption]):
    shorts = _short_table(short)
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--":
            return
        if word.startswith("--"):
            key, arg, i = _long(prog, word[2:], argv, i, longs)
            yield key, arg
        elif word.startswith("-") and word != "-":
            pos = 1
            while pos < len(word):
                letter = word[pos]
                pos += 1
                kind = shorts.get(letter)
                if kind is None or letter == ":":
                    raise GetoptError(f"{prog}: invalid option -- '{_first_byte(letter)}'")
                if kind == NO_ARGUMENT:
                    yield letter, None
                    continue
                if pos < len(word):
                    yield letter, word[pos:]
                elif kind == OPTIONAL:
                    yield letter, None
                elif i < len(argv):
                    yield letter, argv[i]
                    i += 1
                else:
                    raise GetoptError(f"{prog}: option requires an argument -- '{letter}'")
                break
        # anything else is a positional word: permuted to the end, i.e. skipped


def _first_byte(letter: str) -> str:
    """glibc reads options byte by byte: of a multibyte character it names the
    first byte only (kept undecodable, as ``surrogateescape`` has it)."""
    return letter.encode("utf-8", "surrogateescape")[:1].decode("utf-8", "surrogateescape")


def _long(prog: str, text: str, argv: list[str], i: int,
          longs: list[LongOption]) -> tuple[str, str | None, int]:
    name, eq, value = text.partition("=")
    exact = [o for o in longs if o.name == name]
    if exact:
        option = exact[0]
    else:
        matches = [o for o in longs if o.name.startswith(name)]
        if not matches:
            raise GetoptError(f"{prog}: unrecognized option '--{text}'")
        first = matches[0]
        if any((o.has_arg, o.key) != (first.has_arg, first.key) for o in matches[1:]):
            shown = " ".join(f"'--{o.name}'" for o in matches)
            raise GetoptError(f"{prog}: option '--{name}' is ambiguous; possibilities: {shown}")
        option = first
    if eq:
        if option.has_arg == NO_ARGUMENT:
            raise GetoptError(f"{prog}: option '--{option.name}' doesn't allow an argument")
        return option.key, value, i
    if option.has_arg == REQUIRED:
        if i >= len(argv):
            raise GetoptError(f"{prog}: option '--{option.name}' requires an argument")
        return option.key, argv[i], i + 1
    return option.key, None, i
