"""A `tokenizers.Tokenizer` built from a GGUF file's tokenizer metadata.

  tok = tokenizer_from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")

Two GGUF tokenizer models:

  gpt2   byte-level BPE (SmolLM2, Llama 3): vocab + merges from the file; the
         pre-tokenizer follows `tokenizer.ggml.pre` (llama.cpp's names), e.g.
         'smollm' = each digit alone, then GPT-2's regex (as SmolLM2's own
         tokenizer.json: Digits(individual_digits=True) + ByteLevel).
  llama  SentencePiece BPE (Gemma 3): the file has no merges; they are rebuilt
         from the vocabulary, ranked by the merged token's position in the file
         (Gemma's scores do not follow merge order), with byte fallback and
         spaces written as '▁'. A token stored as a run of real spaces is
         respelled as '▁' * n, as in Gemma's tokenizer.json.

Control tokens (token_type 3) become special added tokens, user-defined ones (4)
plain added tokens, so both are matched whole. A bos is prepended when
`tokenizer.ggml.add_bos_token` is true, as HF does. Ids equal HF's tokenizer.json
for SmolLM2 and Gemma 3 (tests/test_pretrained.py). The Llama-3 split regex and
`add_space_prefix` (Llama-2 style, as HF's legacy Llama tokenizer) follow
transformers' GGUF converter but are not tested against a real file here.
"""
from __future__ import annotations

import os
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors

CONTROL, USER_DEFINED = 3, 4
SPACE = '\u2581'
_GPT2_PRE = 'gpt2'
_DIGITS_PRE = 'digits'
_LLAMA3_PRE = 'llama3'
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's `tokenizer.ggml.pre` names -> the pre-tokenizer family they use.
PRE_TOKENIZERS = {
    'default': _GPT2_PRE, 'gpt2': _GPT2_PRE, 'gpt-2': _GPT2_PRE,
    'smollm': _DIGITS_PRE, 'starcoder': _DIGITS_PRE, 'refact': _DIGITS_PRE,
    'command-r': _DIGITS_PRE, 'codeshell': _DIGITS_PRE, 'exaone': _DIGITS_PRE,
    'llama3': _LLAMA3_PRE, 'llama-v3': _LLAMA3_PRE, 'llama-bpe': _LLAMA3_PRE,
    'smaug-bpe': _LLAMA3_PRE, 'dbrx': _LLAMA3_PRE, 'falcon3': _LLAMA3_PRE,
}
_KEYS = ('model', 'pre', 'tokens', 'merges', 'token_type', 'scores', 'bos_token_id',
         'eos_token_id', 'unknown_token_id', 'padding_token_id', 'add_bos_token',
         'add_eos_token', 'add_space_prefix')


def read_tokenizer_metadata(reader) -> dict[str, Any]:
  """{short key: value} of the `tokenizer.ggml.*` fields of an open GGUFReader."""
  out = {}
  for key in _KEYS:
    field = reader.fields.get(f'tokenizer.ggml.{key}')
    if field is not None:
      out[key] = field.contents()
  return out


def _byte_level_pre(pre: str | None):
  family = PRE_TOKENIZERS.get(pre or 'default')
  if family is None:
    raise ValueError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported; supported: "
                     f"{', '.join(sorted(PRE_TOKENIZERS))}")
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=family != _LLAMA3_PRE)
  if family == _DIGITS_PRE:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  if family == _LLAMA3_PRE:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior='isolated'), byte_level])
  return byte_level


def byte_level_bpe(md: dict[str, Any]) -> Tokenizer:
  """A `gpt2` GGUF vocabulary: byte-level BPE with the file's merges."""
  vocab = {t: i for i, t in enumerate(md['tokens'])}
  merges = _checked_merges(md.get('merges', []), vocab)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
  tok.pre_tokenizer = _byte_level_pre(md.get('pre'))
  tok.decoder = decoders.ByteLevel()
  return tok


def _checked_merges(merges: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
  """'a b' strings -> pairs; ValueError if a pair or its merge is not in the vocabulary."""
  pairs = [tuple(m.split(' ', 1)) for m in merges]
  for pair in pairs:
    if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab or ''.join(pair) not in vocab:
      raise ValueError(f"GGUF tokenizer merge {' '.join(pair)!r} names tokens not in the "
                       "vocabulary")
  return pairs


def respell_spaces(tokens: list[str]) -> list[str]:
  """Tokens stored as runs of real spaces -> runs of '▁' (what the normalizer emits)."""
  return [SPACE * len(t) if t and not t.strip(' ') else t for t in tokens]


def merges_from_vocab(tokens: list[str]) -> list[tuple[str, str]]:
  """BPE merges implied by a vocabulary, best first.

  Every split of a token into two tokens of the vocabulary is a merge; merges
  rank by the merged token's position (earlier = better), then longer left part,
  then the parts' ids, as HF's `generate_merges` does with Gemma files.
  """
  ids = {t: i for i, t in enumerate(tokens)}
  ranked = []
  for rank, token in enumerate(tokens):
    for cut in range(1, len(token)):
      left, right = token[:cut], token[cut:]
      if left in ids and right in ids:
        ranked.append((rank, -len(left), -len(right), ids[left], ids[right], left, right))
  ranked.sort()
  return [(r[5], r[6]) for r in ranked]


def sentencepiece_bpe(md: dict[str, Any]) -> Tokenizer:
  """A `llama` (SentencePiece) GGUF vocabulary as an HF BPE with byte fallback."""
  tokens = respell_spaces(md['tokens'])
  vocab = {t: i for i, t in enumerate(tokens)}
  merges = (_checked_merges(md['merges'], vocab) if md.get('merges')
            else merges_from_vocab(tokens))
  unk = md.get('unknown_token_id')
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges,
                             unk_token=tokens[unk] if unk is not None else None,
                             fuse_unk=True, byte_fallback=True))
  replace = normalizers.Replace(' ', SPACE)
  decode = [decoders.Replace(SPACE, ' '), decoders.ByteFallback(), decoders.Fuse()]
  if md.get('add_space_prefix', False):
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), replace])
    decode.append(decoders.Strip(' ', 1, 0))
  else:
    tok.normalizer = replace
  tok.pre_tokenizer = pre_tokenizers.Split(' ', behavior='merged_with_previous')
  tok.decoder = decoders.Sequence(decode)
  return tok


def add_special_tokens(tok: Tokenizer, md: dict[str, Any]) -> None:
  """Control tokens as special added tokens, user-defined ones as plain added tokens."""
  tokens, types = md['tokens'], md.get('token_type') or ()
  if md.get('model') == 'llama':
    tokens = respell_spaces(tokens)
  special = [AddedToken(t, special=True, normalized=False)
             for t, ty in zip(tokens, types) if ty == CONTROL]
  plain = [AddedToken(t, special=False, normalized=False)
           for t, ty in zip(tokens, types) if ty == USER_DEFINED]
  tok.add_special_tokens(special)
  tok.add_tokens(plain)


def _post_processor(tok: Tokenizer, md: dict[str, Any]) -> None:
  """Prepends bos / appends eos as the file's add_bos_token / add_eos_token flags say."""
  ends = [(md['tokens'][md[key]], md[key]) if md.get(flag) and md.get(key) is not None else None
          for flag, key in (('add_bos_token', 'bos_token_id'), ('add_eos_token', 'eos_token_id'))]
  if not any(ends):
    return
  bos, eos = ends
  template = lambda seq, t: ' '.join(
      ([f'{bos[0]}:{t}'] if bos else []) + [f'{seq}:{t}'] + ([f'{eos[0]}:{t}'] if eos else []))
  tok.post_processor = processors.TemplateProcessing(
      single=template('$A', 0), pair=template('$A', 0) + ' ' + template('$B', 1),
      special_tokens=list(dict.fromkeys(e for e in ends if e)))


def build_tokenizer(md: dict[str, Any]) -> Tokenizer:
  """Tokenizer from `read_tokenizer_metadata`'s dict (keys without 'tokenizer.ggml.')."""
  kind = md.get('model')
  builders = {'gpt2': byte_level_bpe, 'llama': sentencepiece_bpe}
  if kind not in builders:
    raise ValueError(f"GGUF tokenizer.ggml.model={kind!r} is not supported; supported: "
                     f"{', '.join(sorted(builders))}")
  tok = builders[kind](md)
  add_special_tokens(tok, md)
  _post_processor(tok, md)
  return tok


def tokenizer_from_gguf(path_or_reader) -> Tokenizer:
  """The tokenizer of a GGUF file (a path or an open `gguf.GGUFReader`)."""
  reader = path_or_reader
  if isinstance(path_or_reader, (str, os.PathLike)):
    from jaxft.models.gguf import open_reader  # pylint: disable=g-import-not-at-top
    reader = open_reader(path_or_reader)
  return build_tokenizer(read_tokenizer_metadata(reader))
