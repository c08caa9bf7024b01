"""Evaluation: held-out perplexity and task accuracy with a verifier.

`task_accuracy` generates greedily (batched, KV cache) for held-out prompts and
scores each completion with the example's verifier (`score`): the math
answer checker for GSM8K-style references, reasoning-gym's own `score_answer` for
its generators. Results are plain dicts, written as JSON by the CLI.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np
import tqdm

from jaxft.data import verify
from jaxft.data.sources import math_tasks
from jaxft.models import decoder, generate


def score(example, text: str) -> float:
  """Verifier score in [0, 1] of a completion for an example.

  reasoning-gym examples use the generator's own `score_answer` on the extracted
  answer; examples with a numeric reference (GSM8K) use `verify.is_correct`.
  """
  meta = example.meta
  answer = verify.extract_answer(text)
  if "entry" in meta:
    return math_tasks.example_score(example, answer if answer is not None else text.strip())
  if "answer" in meta:
    return float(verify.is_correct(text, meta["answer"]))
  raise ValueError(f"no verifier for this example (meta keys: {sorted(meta)})")


def prompts_for(examples: Sequence[Any], tokenizer, render: Callable | None,
                fewshot: Sequence[Any] = ()) -> list[list[int]]:
  """Token ids of each example's prompt (chat-templated if `render` is given)."""
  prefix = "".join(f"{e.prompt}{e.response}\n\n" for e in fewshot)
  out = []
  for ex in examples:
    prompt = prefix + ex.prompt
    text = render(prompt, "")[0] if render is not None else prompt
    out.append(tokenizer.encode(text, add_special_tokens=False).ids)
  return out


def task_accuracy(params, cfg: decoder.DecoderConfig, tokenizer, examples: Sequence[Any], *,
                  render: Callable | None = None, stop_ids=(), linear=decoder.dense,
                  batch_size: int = 16, max_new_tokens: int = 64, fewshot: Sequence[Any] = (),
                  keep_samples: int = 5, progress: bool = False) -> dict:
  """Greedy accuracy of `params` on `examples` (each scored by `score`).

  Returns {'accuracy', 'correct', 'n', 'seconds', 'samples': [{prompt, output, reference, ok}]}.
  """
  if not examples:
    raise ValueError("task_accuracy got no examples")
  ids = prompts_for(examples, tokenizer, render, fewshot)
  correct, samples, t0 = 0.0, [], time.perf_counter()
  batches = range(0, len(ids), batch_size)
  for start in tqdm.tqdm(batches, desc="eval", disable=not progress, leave=False):
    chunk = ids[start:start + batch_size]
    out = generate.generate(params, cfg, chunk + [chunk[-1]] * (batch_size - len(chunk)),
                            max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids),
                            linear=linear)
    tokens, mask = np.asarray(out["tokens"]), np.asarray(out["mask"])
    for i, ex in enumerate(examples[start:start + len(chunk)]):
      kept = [int(t) for t, m in zip(tokens[i], mask[i]) if m and int(t) not in stop_ids]
      text = tokenizer.decode(kept, skip_special_tokens=True)
      ok = score(ex, text)
      correct += ok
      if len(samples) < keep_samples:
        samples.append({"prompt": ex.prompt, "output": text, "reference": ex.response, "ok": ok})
  n = len(examples)
  return {"accuracy": correct / n, "correct": correct, "n": n,
          "seconds": time.perf_counter() - t0, "samples": samples}
