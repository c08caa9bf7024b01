"""HF safetensors import / export (jaxft.models.hf) against transformers itself.

For each layout a tiny random transformers model is saved, imported with
`load_hf`, compared logit for logit, exported with `save_hf`, reloaded by
transformers and compared again. Those need torch + transformers (skipped
without); the error-path tests do not.
"""
import dataclasses
import importlib.util
import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxft.models import decoder, gguf, hf

try:
  import torch
  import transformers
except ImportError:
  torch = transformers = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch + transformers")

TOL = 1e-4
VOCAB = 97


def _tiny(arch: str):
  """(config, model class) of a tiny transformers model exercising the layout's options."""
  t = transformers
  if arch == "llama":
    return t.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                         vocab_size=VOCAB, rope_theta=5000.0, attention_bias=True, mlp_bias=True,
                         tie_word_embeddings=False, rms_norm_eps=1e-5), t.LlamaForCausalLM
  if arch == "qwen2":
    return t.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, vocab_size=VOCAB,
                         tie_word_embeddings=True, rope_theta=20000.0), t.Qwen2ForCausalLM
  if arch == "gemma3":
    return t.Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              vocab_size=VOCAB, sliding_window=4, sliding_window_pattern=3,
                              query_pre_attn_scalar=24, rope_theta=50000.0,
                              rope_local_base_freq=500.0, final_logit_softcapping=20.0,
                              # transformers' Gemma 3 ignores it; so must the import
                              attn_logit_softcapping=30.0), t.Gemma3ForCausalLM
  return t.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                      activation_function="gelu_new"), t.GPT2LMHeadModel


def _random_model(arch: str, seed: int = 0):
  config, cls = _tiny(arch)
  torch.manual_seed(seed)
  model = cls(config)
  with torch.no_grad():
    for p in model.parameters():  # every weight random, norms and biases included
      p.copy_(torch.randn_like(p) * 0.2)
  return model.eval()


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def _jaxft_logits(cfg, params, tokens: np.ndarray) -> np.ndarray:
  return np.asarray(decoder.apply(params, jnp.asarray(tokens), cfg))


def _reload(directory):
  return transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32, attn_implementation="eager").eval()


TOKENS = np.random.RandomState(0).randint(0, VOCAB, size=(2, 12))


@needs_torch
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gpt2"])
def test_import_export_roundtrip(arch, tmp_path):
  model = _random_model(arch)
  model.save_pretrained(tmp_path / "hf")
  ref = _hf_logits(model, TOKENS)

  cfg, params, meta = hf.load_hf(tmp_path / "hf")
  assert meta["architecture"] == arch
  got = _jaxft_logits(cfg, params, TOKENS)
  assert np.abs(got - ref).max() <= TOL, np.abs(got - ref).max()

  hf.save_hf(tmp_path / "out", cfg, params, architecture=type(model).__name__)
  again = _hf_logits(_reload(tmp_path / "out"), TOKENS)
  assert np.abs(again - got).max() <= TOL, np.abs(again - got).max()
  assert np.abs(again - ref).max() <= 1e-5


@needs_torch
def test_interleaved_params_export_as_rotate_half(tmp_path):
  """GGUF-style (interleaved RoPE) params must be permuted on export."""
  model = _random_model("llama", seed=1)
  model.save_pretrained(tmp_path / "hf")
  ref = _hf_logits(model, TOKENS)
  cfg, params, _ = hf.load_hf(tmp_path / "hf")
  icfg = dataclasses.replace(cfg, rope_layout="interleaved")
  attn = dict(params["layers"]["attn"])
  for name, heads in (("q", cfg.n_heads), ("k", cfg.n_kv_heads)):
    attn[name] = {
        "kernel": np.stack([gguf.half_to_interleave(k.T, heads).T for k in attn[name]["kernel"]]),
        "bias": np.stack([gguf.half_to_interleave(b, heads) for b in attn[name]["bias"]])}
  iparams = {**params, "layers": {**params["layers"], "attn": attn}}
  assert np.abs(_jaxft_logits(icfg, iparams, TOKENS) - ref).max() <= TOL
  hf.save_hf(tmp_path / "out", icfg, iparams, architecture="LlamaForCausalLM")
  assert np.abs(_hf_logits(_reload(tmp_path / "out"), TOKENS) - ref).max() <= TOL


@needs_torch
def test_bfloat16_roundtrip(tmp_path):
  model = _random_model("qwen2")
  model.save_pretrained(tmp_path / "hf")
  cfg, params, _ = hf.load_hf(tmp_path / "hf", dtype="bfloat16")
  assert cfg.param_dtype == "bfloat16"
  assert params["embed"]["embedding"].dtype == jnp.bfloat16
  hf.save_hf(tmp_path / "out", cfg, params, architecture="qwen2")
  cfg2, params2, _ = hf.load_hf(tmp_path / "out", dtype="bfloat16")
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


@needs_torch
def test_sharded_checkpoint(tmp_path):
  model = _random_model("llama")
  model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
  assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
  cfg, params, _ = hf.load_hf(tmp_path / "hf")
  assert np.abs(_jaxft_logits(cfg, params, TOKENS) - _hf_logits(model, TOKENS)).max() <= TOL


def test_missing_tensor_names_it(tmp_path):
  cfg = decoder.DecoderConfig()
  hf.save_hf(tmp_path, cfg, decoder.init(jax.random.PRNGKey(0), cfg), architecture="llama")
  weights = dict(hf.read_safetensors(tmp_path / "model.safetensors"))
  del weights["model.layers.1.mlp.up_proj.weight"]
  hf.write_safetensors(tmp_path / "model.safetensors", weights)
  with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight") as err:
    hf.load_hf(tmp_path)
  assert str(tmp_path) in str(err.value)


def test_unsupported_architecture(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(
      {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}))
  with pytest.raises(ValueError, match="MistralForCausalLM.*LlamaForCausalLM.*GPT2LMHeadModel"):
    hf.load_hf(tmp_path)
  cfg = decoder.DecoderConfig()
  with pytest.raises(ValueError, match="supported: LlamaForCausalLM"):
    hf.save_hf(tmp_path / "x", cfg, decoder.init(jax.random.PRNGKey(0), cfg),
               architecture="Mistral")


def test_export_rejects_inexpressible_config(tmp_path):
  cfg = decoder.DecoderConfig(post_norms=True, qk_norm=True)
  with pytest.raises(ValueError, match="post_norms=True.*qk_norm=True"):
    hf.save_hf(tmp_path, cfg, decoder.init(jax.random.PRNGKey(0), cfg), architecture="llama")


@needs_torch
def test_gguf_smollm2_export_loads_in_transformers(tmp_path):
  """GGUF (interleaved q/k) -> save_hf -> transformers: same logits, tokenizer and template."""
  from jaxft.data import chat  # pylint: disable=g-import-not-at-top
  from jaxft.models import pretrained  # pylint: disable=g-import-not-at-top
  entry = pretrained.PRETRAINED["smollm2-135m-instruct"]
  if importlib.util.find_spec(entry.package) is None:
    pytest.skip(f"needs {entry.install}")
  pytest.importorskip("gguf")
  cfg, params, tok, meta = pretrained.load("smollm2-135m-instruct")
  assert cfg.rope_layout == "interleaved"
  messages = [{"role": "user", "content": "What is 12 + 7?"}]
  text = chat.render(meta["chat_template"], messages, add_generation_prompt=True)
  tokens = np.array([tok.encode(text).ids])
  got = _jaxft_logits(cfg, params, tokens)
  hf.save_hf(tmp_path, cfg, params, architecture="LlamaForCausalLM", tokenizer=tok,
             chat_template=meta["chat_template"], special_ids=meta["special_ids"])
  del params

  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  ref = _hf_logits(model, tokens)
  assert np.abs(got - ref).max() <= 1e-3, np.abs(got - ref).max()
  assert (got.argmax(-1) == ref.argmax(-1)).all()
  hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
  assert hf_tok(text)["input_ids"] == tokens[0].tolist()
  assert (hf_tok.bos_token, hf_tok.eos_token) == ("<|im_start|>", "<|im_end|>")
  cfg2, params2, meta2 = hf.load_hf(tmp_path)  # and back: rotate-half layout, same logits
  assert cfg2.rope_layout == "half" and meta2["special_ids"] == meta["special_ids"]
  assert np.abs(_jaxft_logits(cfg2, params2, tokens) - got).max() <= 1e-4


@needs_torch
def test_merged_ssf_biases_are_exported_not_dropped(tmp_path):
  """SSF's shift merges into a bias the base had none of: the export turns on Llama's
  attention_bias / mlp_bias flags (zero biases where needed) and transformers agrees."""
  from jaxft import adapters
  config, cls = _tiny("llama")
  config.attention_bias = config.mlp_bias = False
  torch.manual_seed(1)
  cls(config).eval().save_pretrained(tmp_path / "hf")
  cfg, params, _ = hf.load_hf(tmp_path / "hf")
  assert not cfg.attn_bias and not cfg.mlp_bias
  spec = {**adapters.ssf.DEFAULTS, "targets": ("attn/v$", "mlp/down$")}
  frozen, trainable = adapters.ssf.init(jax.random.PRNGKey(0), params, spec)
  trainable = jax.tree.map(lambda t: t + 0.3 * jax.random.normal(jax.random.PRNGKey(2), t.shape),
                           trainable)
  merged = adapters.ssf.merge(frozen, trainable, spec)
  want = _jaxft_logits(cfg, merged, TOKENS)
  assert np.abs(want - _jaxft_logits(cfg, params, TOKENS)).max() > 1e-2  # the shift matters
  hf.save_hf(tmp_path / "out", cfg, merged, architecture="llama")
  saved = json.loads((tmp_path / "out" / "config.json").read_text())
  assert saved["attention_bias"] and saved["mlp_bias"]
  got = _hf_logits(_reload(tmp_path / "out"), TOKENS)
  assert np.abs(got - want).max() <= TOL, np.abs(got - want).max()
  with pytest.raises(ValueError, match="mlp/down"):
    hf.promote_biases(dataclasses.replace(cfg), merged, "gemma3")
