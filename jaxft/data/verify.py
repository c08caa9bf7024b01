"""Math answer extraction and checking (GSM8K-style numeric answers).

    extract_answer("... so she pays $1,080.00.")    # '1080'
    is_correct("The answer is \\boxed{3/4}", "0.75")  # True

`extract_answer` tries, in order: the number after the last `####`, the number
in the last `\\boxed{...}` (`\\frac{a}{b}` read as a/b), then the last number in
the text. Numbers are normalised: thousands commas, `$`, `%`, trailing `.`
and zero decimals (`18.00` -> `18`) are dropped; fractions `a/b` stay as
written but compare numerically (`3/4` equals `0.75`), exactly, via `Fraction`.
"""
from __future__ import annotations

import re
from fractions import Fraction

# A number: optional '-' and '$', digits with proper thousands commas or plain
# digits, optional decimals, optional '/denominator'. Not preceded by a letter,
# digit or '.': in '10-3' the number is '3', not '-3'; 'x2' holds none.
_NUM = (r"(?<![\w.])-?\$?\s?"
        r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+(?:\.\d+)?)?"
        r"|(?<![\w.])-?\$?\.\d+")
NUMBER = re.compile(_NUM)
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def normalize_number(text: str) -> str | None:
  """Canonical string of one number ('1,600.00' -> '1600', '-$5' -> '-5').

  None if `text` is not a single number (after removing `$`, `%`, commas,
  spaces and a trailing period). Fractions keep their form ('3/4').
  """
  s = text.strip().rstrip(".").replace(",", "").replace("$", "").replace("%", "")
  s = re.sub(r"\s+", "", s)
  if s.startswith("+"):
    s = s[1:]
  if not re.fullmatch(r"-?(\d+\.?\d*|\.\d+)(/(\d+\.?\d*|\.\d+))?", s):
    return None
  if "/" in s:
    num, den = s.split("/")
    return f"{_decimal(num)}/{_decimal(den)}"
  return _decimal(s)


def _decimal(s: str) -> str:
  """'018.500' -> '18.5', '-0.0' -> '0', '.5' -> '0.5'."""
  neg = s.startswith("-")
  whole, _, frac = s.lstrip("-").partition(".")
  whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
  out = f"{whole}.{frac}" if frac else whole
  return "-" + out if neg and out != "0" else out


def to_fraction(text: str | None) -> Fraction | None:
  """The exact value of a number string (normalised first); None if not one."""
  s = normalize_number(text) if text is not None else None
  if s is None:
    return None
  num, _, den = s.partition("/")
  try:
    return Fraction(num) / Fraction(den) if den else Fraction(num)
  except ZeroDivisionError:
    return None


def last_number(text: str) -> str | None:
  """The normalised last number in `text`, or None."""
  for match in reversed(NUMBER.findall(text)):
    value = normalize_number(match)
    if value is not None:
      return value
  return None


def boxed_contents(text: str) -> str | None:
  """The contents of the last `\\boxed{...}` (balanced braces), or None."""
  starts = [m.end() for m in _BOXED.finditer(text)]
  if not starts:
    return None
  depth, i = 1, starts[-1]
  while i < len(text) and depth:
    depth += {"{": 1, "}": -1}.get(text[i], 0)
    i += 1
  return text[starts[-1]:i - 1] if depth == 0 else text[starts[-1]:]


def extract_answer(text: str | None) -> str | None:
  """The final numeric answer of a solution: `####`, `\\boxed{}`, last number.

  Each strategy applies only if it yields a number; returns the normalised
  number string (see `normalize_number`) or None when the text has no number.
  """
  if not text:
    return None
  if "####" in text:
    match = NUMBER.search(text.rsplit("####", 1)[1])
    found = normalize_number(match.group()) if match else None
    if found is not None:
      return found
  boxed = boxed_contents(text)
  if boxed is not None:
    found = last_number(_latex_plain(boxed))
    if found is not None:
      return found
  return last_number(text)


def _latex_plain(tex: str) -> str:
  """`\\frac{a}{b}` -> a/b; `{,}` and `\\,` thousands separators -> ','."""
  return _FRAC.sub(r"\1/\2", tex).replace("{,}", ",").replace("\\,", ",")


def is_correct(prediction_text: str | None, reference: str) -> bool:
  """Whether the prediction's extracted answer equals the reference numerically.

  `reference` is a number ('72', '1,600', '3/4') or a whole reference solution
  (its answer is extracted the same way). False when either has no number.
  """
  ref = to_fraction(reference)
  if ref is None:
    ref = to_fraction(extract_answer(reference))
  pred = to_fraction(extract_answer(prediction_text))
  return ref is not None and pred is not None and pred == ref
