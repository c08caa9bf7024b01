"""Data sources: documents for language modelling, examples for fine-tuning.

Document sources, `loader(split, **options) -> Documents` (a list of str):

  shakespeare        the complete works (downloaded once: `corpus.py`)
  tiny_shakespeare   a ~190 KB excerpt shipped in the package
  text, jsonl        user plain-text / jsonl files

Task sources, `loader(split, **options) -> Examples` (a list of
`Example(prompt, response, meta)`):

  gsm8k_task           GSM8K test (eval-only)           `math_tasks`
  reasoning_gym_task   reasoning-gym generators         `math_tasks`
  bigbench_hhh         HHH preference pairs             `bigbench`
  natural_instructions Natural-Instructions v1          `bigbench`
  humaneval            HumanEval prompts + tests        `code_tasks`
  jsonl_examples, parquet_examples   user files         `examples`

The registries (`SOURCES`, `TASKS`) are the explicit dicts in `jaxft.data`.
Importing this package imports no optional dependency and does no I/O.
"""
from jaxft.data.sources.bigbench import bigbench_hhh, natural_instructions
from jaxft.data.sources.code_tasks import humaneval
from jaxft.data.sources.documents import (
    ASSETS, MAX_REPORTED, ON_MALFORMED, SAMPLE_EVAL_FRACTION, SAMPLE_FILE,
    SAMPLE_WORKS, SPLITS, Documents, MalformedRowError, SourceStats,
    check_split, expand_paths, hold_out, jsonl, read_jsonl, row_problem,
    shakespeare, split_documents, split_files, text, tiny_shakespeare)
from jaxft.data.sources.examples import (
    Example, Examples, jsonl_examples, parquet_examples)
from jaxft.data.sources.math_tasks import (
    gsm8k, gsm8k_task, reasoning_gym, reasoning_gym_task, reward, rg_splits,
    score)

__all__ = [
    "ASSETS", "MAX_REPORTED", "ON_MALFORMED", "SAMPLE_EVAL_FRACTION",
    "SAMPLE_FILE", "SAMPLE_WORKS", "SPLITS", "Documents", "MalformedRowError",
    "SourceStats", "check_split", "expand_paths", "hold_out", "jsonl",
    "read_jsonl", "row_problem", "shakespeare", "split_documents",
    "split_files", "text", "tiny_shakespeare",
    "Example", "Examples", "jsonl_examples", "parquet_examples",
    "gsm8k", "gsm8k_task", "reasoning_gym", "reasoning_gym_task", "reward",
    "rg_splits", "score", "bigbench_hhh", "natural_instructions", "humaneval",
]
