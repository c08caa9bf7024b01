"""Regenerates the data assets shipped in jaxft/data/assets/, deterministically.

  python experiments/make_tokenizer.py            # rewrite both assets
  python experiments/make_tokenizer.py --check    # rebuild in memory, compare

Writes
  shakespeare_bpe.json      byte-level BPE, vocab 2048, specials <|pad|>=0,
                            <|bos|>=1, <|eos|>=2, trained on the train split of
                            the complete works (`jaxft.data.sources.shakespeare`)
  shakespeare_sample.txt    the `tiny_shakespeare` text: The Comedy of Errors and
                            Macbeth (both train-split works), joined by blank lines

The corpus is downloaded on first use (see jaxft/data/corpus.py). Training takes
~10 s on 2 CPU cores and gives the same bytes on every run: the BPE trainer has no
randomness and breaks count ties by token id (checked by running twice; `--check`
compares a fresh build against the shipped files).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxft.data import corpus, sources, tokenizer  # noqa: E402


def sample_text() -> str:
  """The tiny_shakespeare asset: its works' texts, each ending in one newline."""
  works = corpus.load_works()
  assert not set(sources.SAMPLE_WORKS) & set(corpus.EVAL_WORKS)
  return "\n\n\n".join(works[w].strip("\n") for w in sources.SAMPLE_WORKS) + "\n"


def bpe_json() -> str:
  """The shipped tokenizer, serialised (pretty-printed, stable key order)."""
  tok = tokenizer.train_bpe(sources.shakespeare("train"), tokenizer.BPE_VOCAB_SIZE)
  ids = tokenizer.special_ids(tok)
  assert ids == {"pad": 0, "bos": 1, "eos": 2}, ids
  assert tokenizer.vocab_size(tok) == tokenizer.BPE_VOCAB_SIZE
  return tok.to_str(pretty=True) + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true",
                      help="compare fresh builds with the shipped files, write nothing")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  built = {
      tokenizer.BPE_FILE: bpe_json(),
      sources.SAMPLE_FILE: sample_text(),
  }
  status = 0
  for path, content in built.items():
    if args.check:
      same = path.is_file() and path.read_text(encoding="utf-8") == content
      print(f"{'same' if same else 'DIFFERENT'}: {path}")
      status |= not same
    else:
      Path(path).write_text(content, encoding="utf-8")
      print(f"wrote {path} ({len(content.encode()):,} bytes)")
  print(f"done in {time.perf_counter() - start:.1f} s")
  return status


if __name__ == "__main__":
  sys.exit(main())
