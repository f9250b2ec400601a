"""Command-line scanning exactly as qemu-img 7.2 does it (glibc ``getopt_long``).

qemu-img parses every command with ``getopt_long`` and an option string that
starts with ``:``, then reports problems itself as ``missing argument for
option 'X'`` / ``unrecognized option 'X'`` where X is ``argv[optind - 1]``.
To give the same messages for the same command lines (including clustered
short options, ``--opt=value``, ``--opt value``, unambiguous abbreviations
such as ``--out=json``, and options after file names), this module
reimplements glibc's scanner, argument permutation included.

Usage::

    scan = Getopt(argv, ":hf:U", LONG_INFO)   # argv[0] is the command name
    for opt, arg in scan:
        ...
    files = scan.operands                      # what is left, in order
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterator, Sequence

from imagetools.errors import UsageError

NO_ARG = 0
REQUIRED = 1

#: A long option: (name, has_arg, value returned).  The value is a short
#: option letter ("f") or a long option's own name ("output").
LongOption = tuple[str, int, str]


def show_help() -> int:
    """``-h`` after any command prints the whole help, as qemu-img does."""
    from imagetools.cli import print_help
    from imagetools.output import prog
    return print_help(prog())


def usage_error(message: str) -> UsageError:
    """A command-line mistake: the CLI adds qemu-img's "Try ... --help" line."""
    return UsageError(message)


class Getopt:
    """Iterate over ``(option, argument)`` pairs of one command line.

    Options with no argument yield ``None`` as argument.  Errors raise
    :class:`UsageError` with qemu-img's wording.  After iteration,
    :attr:`operands` holds the non-option arguments in their order.
    """

    def __init__(self, argv: Sequence[str], shortopts: str,
                 longopts: Sequence[LongOption] = ()) -> None:
        self.argv = list(argv)
        self.permute = not shortopts.startswith("+")
        self.shortopts = shortopts.lstrip("+")
        self.longopts = list(longopts)
        self.optind = 1
        self._first_nonopt = 1
        self._last_nonopt = 1
        self._nextchar = ""
        self._done = False

    # -- the public face -----------------------------------------------

    def __iter__(self) -> Iterator[tuple[str, str | None]]:
        while True:
            item = self._next()
            if item is None:
                return
            yield item

    @property
    def operands(self) -> list[str]:
        return self.argv[self.optind:]

    # -- glibc's algorithm ----------------------------------------------

    def _nonoption(self, index: int) -> bool:
        arg = self.argv[index]
        return not arg.startswith("-") or arg == "-"

    def _exchange(self) -> None:
        bottom, middle, top = self._first_nonopt, self._last_nonopt, self.optind
        argv = self.argv
        argv[bottom:top] = argv[middle:top] + argv[bottom:middle]
        self._first_nonopt += self.optind - self._last_nonopt
        self._last_nonopt = self.optind

    def _next(self) -> tuple[str, str | None] | None:
        argc = len(self.argv)
        if not self._nextchar:
            if self._last_nonopt > self.optind:
                self._last_nonopt = self.optind
            if self._first_nonopt > self.optind:
                self._first_nonopt = self.optind
            if self.permute:
                if self._first_nonopt != self._last_nonopt and self._last_nonopt != self.optind:
                    self._exchange()
                elif self._last_nonopt != self.optind:
                    self._first_nonopt = self.optind
                while self.optind < argc and self._nonoption(self.optind):
                    self.optind += 1
                self._last_nonopt = self.optind
            if self.optind != argc and self.argv[self.optind] == "--":
                self.optind += 1
                if self._first_nonopt != self._last_nonopt and self._last_nonopt != self.optind:
                    self._exchange()
                elif self._first_nonopt == self._last_nonopt:
                    self._first_nonopt = self.optind
                self._last_nonopt = argc
                self.optind = argc
            if self.optind == argc:
                if self._first_nonopt != self._last_nonopt:
                    self.optind = self._first_nonopt
                return None
            if self._nonoption(self.optind):
                # only reached without permutation ("+" option strings)
                return None
            arg = self.argv[self.optind]
            if self.longopts and arg[1] == "-":
                self._nextchar = arg[2:]
                return self._long_option()
            self._nextchar = arg[1:]
        return self._short_option()

    def _short_option(self) -> tuple[str, str | None]:
        c, self._nextchar = self._nextchar[0], self._nextchar[1:]
        if not self._nextchar:
            self.optind += 1
        pos = self.shortopts.find(c)
        if pos < 0 or c in ":;":
            raise usage_error(f"unrecognized option '{self.argv[self.optind - 1]}'")
        if pos + 1 < len(self.shortopts) and self.shortopts[pos + 1] == ":":
            if self._nextchar:
                optarg = self._nextchar
                self.optind += 1
            elif self.optind == len(self.argv):
                self._nextchar = ""
                raise usage_error(f"missing argument for option '{self.argv[self.optind - 1]}'")
            else:
                optarg = self.argv[self.optind]
                self.optind += 1
            self._nextchar = ""
            return c, optarg
        return c, None

    def _long_option(self) -> tuple[str, str | None]:
        text = self._nextchar
        name, eq, value = text.partition("=")
        found = None
        for option in self.longopts:
            if option[0] == name:
                found = option
                break
        if found is None:
            candidates = [o for o in self.longopts if o[0].startswith(name)]
            if candidates:
                first = candidates[0]
                if any(o[1:] != first[1:] for o in candidates[1:]):
                    self._nextchar = ""
                    self.optind += 1
                    raise usage_error(f"unrecognized option '{self.argv[self.optind - 1]}'")
                found = first
        self._nextchar = ""
        self.optind += 1
        if found is None:
            raise usage_error(f"unrecognized option '{self.argv[self.optind - 1]}'")
        _, has_arg, val = found
        if eq:
            if not has_arg:
                raise usage_error(f"unrecognized option '{self.argv[self.optind - 1]}'")
            return val, value
        if has_arg == REQUIRED:
            if self.optind < len(self.argv):
                optarg = self.argv[self.optind]
                self.optind += 1
                return val, optarg
            raise usage_error(f"missing argument for option '{self.argv[self.optind - 1]}'")
        return val, None
