"""Supervised fine-tuning rows: prompt in context, loss on the response only.

    rows = pack_examples(examples, tok, seq_len=256, render=chatml, eos_id=2)
    it = make_pipeline(rows, tok, batch_size=8, seq_len=256, seed=0,
                       vocab_size=49152)   # unchanged: rows are PackedRows

An example becomes the token sequence `[bos] + prompt + response + [eos]`
(bos / eos only when their ids are given) and packs like a document
(`packing.pack`: segment ids, positions restarting per example, best-fit
rows), except that `loss_mask` is 1 only on pairs whose target is a response
token or the eos, and 0 on pairs predicting prompt tokens.

Lengths: an example needs `n - 1 <= seq_len` pairs for n tokens. A longer one
is cut at the end of the response (the eos goes too); one whose prompt alone
leaves no room for a single response target (bos + prompt > seq_len tokens) is
dropped. Both are counted in `rows.report` and logged, never silent.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np

from jaxft.data import packing as packing_lib
from jaxft.data import tokenizer as tok_lib

Render = Callable[[str, str], tuple[str, str]]


def plain_render(prompt: str, response: str) -> tuple[str, str]:
  """The default template: prompt_text = prompt, full_text = prompt + response."""
  return prompt, prompt + response


def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
  encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
  out = []
  for i in range(0, len(texts), packing_lib.ENCODE_BATCH):
    batch = encode(list(texts[i:i + packing_lib.ENCODE_BATCH]),
                   add_special_tokens=False)
    out.extend(e.ids for e in batch)
  return out


def render_all(examples, render: Render) -> tuple[list[str], list[str]]:
  """(prompt texts, full texts); ValueError if a full text lacks its prompt."""
  prompts, fulls = [], []
  for i, ex in enumerate(examples):
    prompt_text, full_text = render(ex.prompt, ex.response)
    if not full_text.startswith(prompt_text):
      raise ValueError(
          f"example {i}: the rendered full text does not start with the "
          f"rendered prompt ({prompt_text[-40:]!r} vs {full_text[:80]!r}...); "
          "render(prompt, response) must return (p, p + completion)")
    prompts.append(prompt_text)
    fulls.append(full_text)
  return prompts, fulls


def tokenize_examples(examples, tokenizer, render: Render):
  """(prompt ids, response ids, how many were tokenised in two parts) per example.

  The full text is tokenised once; if its tokens start with the prompt's own
  tokens, the rest are the response tokens. Otherwise (a token merges across
  the prompt/response boundary, e.g. a prompt ending in a space) the prompt and
  the remaining text are tokenised separately and concatenated, so the prompt
  tokens the model is trained on are exactly those it is prompted with.
  """
  prompts, fulls = render_all(examples, render)
  prompt_ids, full_ids = _encode(tokenizer, prompts), _encode(tokenizer, fulls)
  response_ids, split = [], []
  for i, (p, f) in enumerate(zip(prompt_ids, full_ids)):
    if f[:len(p)] == p:
      response_ids.append(f[len(p):])
    else:
      response_ids.append(None)
      split.append(i)
  rests = _encode(tokenizer, [fulls[i][len(prompts[i]):] for i in split])
  for i, ids in zip(split, rests):
    response_ids[i] = ids
  return prompt_ids, response_ids, len(split)


def build_sequence(prompt: Sequence[int], response: Sequence[int], *,
                   seq_len: int, bos_id: int | None, eos_id: int | None):
  """(tokens, target mask, status) of one example; status in
  'ok', 'truncated', 'prompt_too_long', 'no_target'.

  The mask is 1 on response tokens and the eos, 0 on bos and prompt tokens;
  tokens is None when the example is dropped.
  """
  head = ([bos_id] if bos_id is not None else []) + list(prompt)
  tail = list(response) + ([eos_id] if eos_id is not None else [])
  if len(head) > seq_len:
    return None, None, "prompt_too_long"
  tokens = np.asarray(head + tail, np.int32)
  mask = np.concatenate([np.zeros(len(head), np.float32),
                         np.ones(len(tail), np.float32)])
  status = "ok"
  if len(tokens) > seq_len + 1:
    tokens, mask, status = tokens[:seq_len + 1], mask[:seq_len + 1], "truncated"
  if len(tokens) < 2 or not mask[1:].any():
    return None, None, "no_target"
  return tokens, mask, status


def describe(examples) -> str:
  """Where examples came from, for error messages."""
  source = getattr(examples, "source", "")
  return repr(source) if source else "the examples passed in"


def pack_examples(examples, tokenizer, *, seq_len: int, render: Render | None = None,
                  eos_id: int | None = None, bos_id: int | None = None,
                  packing: bool = True, pad_id: int | None = None
                  ) -> packing_lib.PackedRows:
  """Tokenises and packs SFT examples with the prompt masked out of the loss.

  Args:
    examples: `Example`s (anything with `.prompt` and `.response`), e.g. from
      `jaxft.data.load_examples`; its `.source` names them in errors.
    tokenizer: a `tokenizers.Tokenizer`, a built-in name or a tokenizer.json path.
    seq_len: row length (pairs per row).
    render: `render(prompt, response) -> (prompt_text, full_text)`, the chat
      template; full_text must start with prompt_text. Default `plain_render`.
    eos_id: appended after the response (and trained on) when given.
    bos_id: put before the prompt (never a target) when given.
    packing: several examples per row (best fit); else one per padded row.
    pad_id: the padding id; default the tokenizer's (`special_ids`).

  Returns:
    `PackedRows` (fields as `packing.pack`) with `report`: examples, packed,
    truncated, dropped_prompt_too_long, dropped_no_target, split_tokenized,
    source, target_tokens.

  Raises:
    ValueError: no examples (naming their source), or none left after drops.
  """
  tokenizer = tok_lib.load_tokenizer(tokenizer)
  if seq_len <= 0:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  if not len(examples):
    raise ValueError(f"no examples to pack: {describe(examples)} produced none "
                     "(check its split, size and filters)")
  if pad_id is None:
    pad_id = tok_lib.special_ids(tokenizer)["pad"]
  prompt_ids, response_ids, split = tokenize_examples(
      examples, tokenizer, render or plain_render)
  counts = {"ok": 0, "truncated": 0, "prompt_too_long": 0, "no_target": 0}
  seqs, masks = [], []
  for p, r in zip(prompt_ids, response_ids):
    tokens, mask, status = build_sequence(p, r, seq_len=seq_len, bos_id=bos_id,
                                          eos_id=eos_id)
    counts[status] += 1
    if tokens is not None:
      seqs.append(tokens)
      masks.append(mask)
  report = make_report(examples, counts, split, masks)
  if not seqs:
    raise ValueError(
        f"all {len(examples)} examples of {describe(examples)} were dropped at "
        f"seq_len={seq_len}: {counts['prompt_too_long']} with a prompt longer "
        f"than seq_len, {counts['no_target']} with nothing to train on; raise "
        "seq_len or shorten the prompts")
  arrays = packing_lib.pack(seqs, seq_len, pad_id, packing, target_masks=masks)
  return packing_lib.PackedRows(arrays, len(seqs), int(sum(map(len, seqs))),
                                len(seqs), pad_id, report)


def make_report(examples, counts: dict, split: int, masks) -> dict:
  """The counts of a `pack_examples` call; logs a warning for any cut or drop."""
  report = {
      "source": getattr(examples, "source", ""),
      "examples": len(examples),
      "packed": counts["ok"] + counts["truncated"],
      "truncated": counts["truncated"],
      "dropped_prompt_too_long": counts["prompt_too_long"],
      "dropped_no_target": counts["no_target"],
      "split_tokenized": split,
      "target_tokens": int(sum(m[1:].sum() for m in masks)),
  }
  if counts["truncated"] or counts["prompt_too_long"] or counts["no_target"]:
    logging.warning(
        "SFT packing of %s: %d of %d examples truncated at the response end, "
        "%d dropped (prompt longer than seq_len), %d dropped (no target)",
        describe(examples), counts["truncated"], len(examples),
        counts["prompt_too_long"], counts["no_target"])
  return report
