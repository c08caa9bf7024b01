"""Explicit name resolution: every named thing lives in a plain dict.

A lookup error names the bad value, the closest matches and every valid choice,
so a typo in a config or on the command line is a one-line fix.
"""
from __future__ import annotations

import difflib
from typing import Iterable, Mapping, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
  """A name that is not in the table it was looked up in."""

  def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
    return str(self.args[0])


def close_matches(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
  choices = sorted(choices)
  found = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
  return found or [c for c in choices if name.lower() in c.lower()][:n]


def unknown_message(kind: str, name: str, choices: Iterable[str]) -> str:
  choices = sorted(choices)
  near = close_matches(name, choices)
  hint = f"; did you mean {', '.join(repr(c) for c in near)}?" if near else ""
  return f"unknown {kind} {name!r}{hint} (valid: {', '.join(choices)})"


def lookup(table: Mapping[str, T], name: str, kind: str) -> T:
  """Returns `table[name]`, or raises UnknownNameError listing close matches."""
  try:
    return table[name]
  except KeyError:
    raise UnknownNameError(unknown_message(kind, name, table)) from None
