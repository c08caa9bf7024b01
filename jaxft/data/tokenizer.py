"""Tokenizers (HF `tokenizers` library): built-in names or a tokenizer.json path.

  shakespeare_bpe  byte-level BPE, vocab 2048, trained on the train split of the
                   complete works (`experiments/make_tokenizer.py` regenerates
                   the shipped `assets/shakespeare_bpe.json` bit for bit)
  bytes            one token per byte (vocab 259), built in code

Both built-ins reserve the same special tokens at the start of the vocabulary:

  <|pad|> = 0    <|bos|> = 1    <|eos|> = 2

then (for `bytes`) byte value b is token 3 + b. Both are lossless:
`decode(encode(s)) == s` for any string (no normalizer, byte-level pre-tokenizer
without an added prefix space, byte-level decoder).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxft.names import close_matches

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2 in the built-in tokenizers
BPE_VOCAB_SIZE = 2048
BPE_FILE = Path(__file__).resolve().parent / "assets" / "shakespeare_bpe.json"

# For a user tokenizer.json: the first of these present in the vocabulary is
# used; pad falls back to eos when no pad token exists.
_CANDIDATES = {
    "pad": (PAD, "<pad>", "[PAD]", "<|finetune_right_pad_id|>"),
    "bos": (BOS, "<s>", "<bos>", "<|begin_of_text|>", "<|endoftext|>",
            "<|im_start|>", "[CLS]"),
    "eos": (EOS, "</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>",
            "<|im_end|>", "[SEP]"),
}


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from the 256 byte values to printable characters.

  This is the alphabet the `tokenizers` ByteLevel pre-tokenizer emits.
  """
  printable = (list(range(ord("!"), ord("~") + 1))
               + list(range(ord("\xa1"), ord("\xac") + 1))
               + list(range(ord("\xae"), ord("\xff") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _byte_level(tok: Tokenizer, *, use_regex: bool) -> Tokenizer:
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(
      add_prefix_space=False, use_regex=use_regex)
  tok.decoder = decoders.ByteLevel()
  return tok


def bytes_tokenizer() -> Tokenizer:
  """Byte-level tokenizer: specials 0..2, then byte b -> 3 + b (vocab 259)."""
  vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
  for b, char in bytes_to_unicode().items():
    vocab[char] = len(SPECIAL_TOKENS) + b
  tok = _byte_level(Tokenizer(models.BPE(vocab=vocab, merges=[])), use_regex=False)
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  return tok


def train_bpe(docs: Iterable[str], vocab_size: int = BPE_VOCAB_SIZE) -> Tokenizer:
  """Trains a byte-level BPE with the specials at ids 0..2 and all 256 bytes."""
  tok = _byte_level(Tokenizer(models.BPE()), use_regex=True)
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  docs = list(docs)
  tok.train_from_iterator(docs, trainer, length=len(docs))
  return tok


def shakespeare_bpe() -> Tokenizer:
  """The shipped byte-level BPE (vocab 2048)."""
  return Tokenizer.from_file(str(BPE_FILE))


TOKENIZERS = {"shakespeare_bpe": shakespeare_bpe, "bytes": bytes_tokenizer}


def load_tokenizer(name: str) -> Tokenizer:
  """A built-in tokenizer by name, or one read from a tokenizer.json path."""
  if isinstance(name, Tokenizer):
    return name
  if name in TOKENIZERS:
    return TOKENIZERS[name]()
  path = Path(str(name)).expanduser()
  if path.is_file():
    return Tokenizer.from_file(str(path))
  near = close_matches(str(name), TOKENIZERS)
  hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
  raise ValueError(
      f"unknown tokenizer {name!r}{hint} (valid: {', '.join(sorted(TOKENIZERS))},"
      " or a path to an existing tokenizer.json file)")


def vocab_size(tok: Tokenizer) -> int:
  """Number of token ids, added/special tokens included."""
  return tok.get_vocab_size(with_added_tokens=True)


def special_ids(tok: Tokenizer) -> dict[str, int]:
  """{'pad': id, 'bos': id, 'eos': id}: (0, 1, 2) for the built-in tokenizers.

  For other tokenizers the first known spelling present wins (see
  `_CANDIDATES`); pad falls back to eos. No bos or eos -> ValueError.
  """
  found = {}
  for role, names in _CANDIDATES.items():
    ids = [tok.token_to_id(n) for n in names]
    found[role] = next((i for i in ids if i is not None), None)
  if found["pad"] is None:
    found["pad"] = found["eos"]
  missing = [r for r in ("bos", "eos") if found[r] is None]
  if missing:
    raise ValueError(
        f"tokenizer has no {' or '.join(missing)} token (looked for "
        + "; ".join(f"{r}: {', '.join(_CANDIDATES[r])}" for r in missing) + ")")
  return found
