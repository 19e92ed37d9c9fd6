"""How a side command (``rgsd demo``, ``pipeline``, ``report``, ``audit``, ``import-synthetic``,
``make-toy``) is parsed: its typed function becomes a jsonargparse parser, as the stages' constructors do
for ``rgsd fit``. Types are checked, and ``--help`` shows each parameter's line of the ``Args:`` docstring
with its type and default.

jsonargparse spells options as the parameters are named (``--dry_run true``, ``--set+ A`` to append to a
list, ``--only [a,b]``); the spellings of the earlier argparse commands are accepted as well: dashes
(``--dry-run``), a bool option without a value (``--dry-run``), a list option repeated or followed by
several values (``--set A --set B``, ``--only a b``).
"""

from __future__ import annotations

import inspect
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any

from jsonargparse import ArgumentParser


def run_command(
    function: Callable[..., int | None], argv: Sequence[str] | None, prog: str, positional: bool = False
) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) into ``function``'s parameters, call it; its exit code.

    Args:
        function: the command; its signature is the command line, its docstring the help.
        argv: the arguments after the command name.
        prog: the command as typed (``"rgsd audit"``), for usage and error messages.
        positional: required parameters are positional arguments (else required ``--options``).
    """
    parser = ArgumentParser(prog=prog, description=_description(function))
    parser.add_function_arguments(function, as_group=False, as_positional=positional)
    args = list(sys.argv[1:] if argv is None else argv)
    config = parser.parse_args(_native_spelling(args, function))
    return int(function(**config.as_dict()) or 0)


def _description(function: Callable[..., Any]) -> str:
    """The docstring up to its ``Args:`` section."""
    return (inspect.getdoc(function) or "").split("\nArgs:")[0].strip()


def _native_spelling(argv: list[str], function: Callable[..., Any]) -> list[str]:
    """Rewrite argparse-style options (see the module docstring) into jsonargparse's spelling."""
    hints = typing.get_type_hints(function)
    flags = {name for name, hint in hints.items() if hint is bool}
    lists = {name for name, hint in hints.items() if _is_list(hint)}
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("--") or token == "--":
            out.append(token)
            continue
        name, eq, value = token[2:].partition("=")
        name = name.replace("-", "_")
        if eq or (name not in flags and name not in lists):
            out.append(f"--{name}{eq}{value}")
        elif name in flags:
            given = i < len(argv) and argv[i].lower() in ("true", "false")
            out.append(f"--{name}" if given else f"--{name}=true")
        else:  # a list option: each value up to the next option is appended ([a,b] is jsonargparse's own)
            values = []
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            if not values:
                out.append(f"--{name}=[]")
            elif len(values) == 1 and values[0].startswith("["):
                out += [f"--{name}", values[0]]
            else:
                for v in values:
                    out += [f"--{name}+", v]
    return out


def _is_list(hint: Any) -> bool:
    if typing.get_origin(hint) is list:
        return True
    return any(typing.get_origin(arg) is list for arg in typing.get_args(hint))
