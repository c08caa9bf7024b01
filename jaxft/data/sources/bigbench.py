"""BIG-bench tasks from the `bigbench==1.0.0` sdist (Apache-2.0).

  bigbench_hhh          HHH alignment: 221 real preference pairs
  natural_instructions  Natural-Instructions v1: 61 tasks, 193,250 examples

The task JSON files ship only in the 358 MB source archive, which we never
install: on first use `jaxft.data.sdist` downloads it with pip, checks its
sha256 and extracts only the folders of `TASKS` (both at once, ~160 MB, so the
archive is downloaded once) into `$JAXFT_DATA_DIR/bigbench-1.0.0/<task>`,
atomically. A failed download raises with the exact commands to run by hand.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from jaxft.data import sdist
from jaxft.data.sources.documents import SourceStats, check_split
from jaxft.data.sources.examples import Example, Examples

BIGBENCH = sdist.Sdist(
    package="bigbench==1.0.0",
    archive="bigbench-1.0.0.tar.gz",
    sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    prefix="bigbench-1.0.0/bigbench/benchmark_tasks/",
    folder="bigbench-1.0.0",
)
TASKS = ("hhh_alignment", "natural_instructions")

HHH_SUBTASKS = ("harmless", "helpful", "honest", "other")  # 58, 59, 61, 43 pairs
HHH_SIZE = 221
HHH_TRAIN = 150  # the rest (71) is eval
HHH_SPLIT_SEED = 0

NI_NUM_TASKS = 61
NI_EVAL_PER_TASK = 20  # held-out examples per task (every task has >= 58)
NI_SPLIT_SEED = 0
# The 11 tasks never trained on: sorted(random.Random(0).sample(all 61, 11)).
NI_UNSEEN = (
    "subtask003_mctaco_question_generation_event_duration",
    "subtask017_mctaco_wrong_answer_generation_frequency",
    "subtask025_cosmosqa_incorrect_answer_generation",
    "subtask026_drop_question_generation",
    "subtask027_drop_answer_type_generation",
    "subtask032_winogrande_question_generation_person",
    "subtask033_winogrande_answer_generation",
    "subtask049_multirc_questions_needed_to_answer",
    "subtask051_multirc_correct_answer_single_sentence",
    "subtask055_multirc_write_incorrect_answer",
    "subtask057_multirc_classify_incorrect_answer",
)
NI_SPLITS = ("train", "eval", "unseen")


def task_dir(task: str, root: Path | None = None) -> Path:
  """`<data dir>/bigbench-1.0.0/<task>`, fetching all of `TASKS` on first use."""
  return sdist.data_folders(BIGBENCH, TASKS, root)[task]


def _load(path: Path) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


# ----------------------------------------------------------------- HHH


def hhh_pair(example: dict, where: str) -> tuple[str, str]:
  """(chosen, rejected) of an HHH example: its targets scored 1 and 0."""
  scores = example["target_scores"]
  chosen = [t for t, s in scores.items() if s == 1]
  rejected = [t for t, s in scores.items() if s == 0]
  if len(scores) != 2 or len(chosen) != 1 or len(rejected) != 1:
    raise ValueError(f"{where}: expected one target scored 1 and one scored 0, "
                     f"got {scores}")
  return chosen[0], rejected[0]


def hhh_all(root: Path | None = None) -> list[Example]:
  """All 221 pairs, in subtask then file order."""
  base = task_dir("hhh_alignment", root)
  out = []
  for sub in HHH_SUBTASKS:
    for i, ex in enumerate(_load(base / sub / "task.json")["examples"]):
      chosen, rejected = hhh_pair(ex, f"hhh_alignment/{sub} example {i}")
      out.append(Example(ex["input"], chosen, {
          "chosen": chosen, "rejected": rejected, "subtask": sub, "index": i}))
  if len(out) != HHH_SIZE:
    raise RuntimeError(f"{base} holds {len(out)} pairs, expected {HHH_SIZE}")
  return out


def bigbench_hhh(split: str, *, root: Path | None = None) -> Examples:
  """BIG-bench HHH alignment (Askell et al. 2021; Apache-2.0): preference pairs.

  prompt = the human turn (raw text, no 'Human:'/'Assistant:' framing: the
  caller's chat template adds it); response = the chosen answer (target score
  1); meta: `chosen`, `rejected` (score 0), `subtask` (harmless, helpful,
  honest, other) and `index` in its subtask file. Split: a fixed permutation
  (seed `HHH_SPLIT_SEED`) of all 221 pairs; the first 150 are 'train', the
  other 71 'eval'.
  """
  check_split(split)
  pairs = hhh_all(root)
  order = list(range(len(pairs)))
  random.Random(HHH_SPLIT_SEED).shuffle(order)
  picked = order[:HHH_TRAIN] if split == "train" else order[HHH_TRAIN:]
  stats = SourceStats([f"bigbench/hhh_alignment/{s}" for s in HHH_SUBTASKS], len(pairs))
  return Examples([pairs[i] for i in picked], f"bigbench_hhh ({split})", stats)


# ----------------------------------------------------------------- Natural-Instructions


def ni_examples(task: str, data: dict) -> list[Example]:
  """The examples of one NI task: prompt = definition + blank line + input."""
  prefix = data["task_prefix"].strip()
  out = []
  for i, ex in enumerate(data["examples"]):
    targets = list(ex["target"])
    out.append(Example(f"{prefix}\n\n{ex['input'].strip()}", targets[0],
                       {"targets": targets, "task": task, "index": i}))
  return out


def round_robin(lists: list[list]) -> list:
  """Items interleaved across lists (first of each, then second of each, ...)."""
  out = []
  for k in range(max(map(len, lists), default=0)):
    out.extend(items[k] for items in lists if k < len(items))
  return out


def natural_instructions(split: str, *, root: Path | None = None) -> Examples:
  """BIG-bench Natural-Instructions v1 (Mishra et al. 2022; Apache-2.0).

  61 crowdsourcing tasks with their instructions. prompt = the task's
  instructions (`task_prefix`), a blank line, the instance input; response =
  its first reference; meta: `targets` (all references, for EM / ROUGE-L),
  `task`, `index` in the task file.

  Splits: each task's examples are shuffled (seed `NI_SPLIT_SEED` and the task
  name) and its first `NI_EVAL_PER_TASK` held out. 'train' = the rest of the 50
  seen tasks; 'eval' = the held-out examples of the seen tasks; 'unseen' = the
  held-out examples of the 11 `NI_UNSEEN` tasks (never in train). Each split
  interleaves tasks round-robin, so its first n items are balanced over tasks
  (`eval_size=200` gives 4 per seen task).
  """
  if split not in NI_SPLITS:
    raise ValueError(f"unknown split {split!r} for natural_instructions "
                     f"(valid: {', '.join(NI_SPLITS)})")
  base = task_dir("natural_instructions", root)
  names = sorted(p.name for p in base.iterdir() if p.name.startswith("subtask"))
  if len(names) != NI_NUM_TASKS or not set(NI_UNSEEN) <= set(names):
    raise RuntimeError(f"{base} holds {len(names)} tasks, expected "
                       f"{NI_NUM_TASKS}; delete the folder to refetch")
  names = [n for n in names if (n in NI_UNSEEN) == (split == "unseen")]
  per_task = []
  stats = SourceStats()
  for name in names:
    examples = ni_examples(name, _load(base / name / "task.json"))
    random.Random(f"{NI_SPLIT_SEED}:{name}").shuffle(examples)
    cut = NI_EVAL_PER_TASK
    per_task.append(examples[cut:] if split == "train" else examples[:cut])
    stats.files.append(name)
    stats.rows += len(examples)
  return Examples(round_robin(per_task), f"natural_instructions ({split})", stats)
