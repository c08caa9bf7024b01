"""Low-rank adapters exported in PEFT's format load in PyTorch PEFT and reproduce jaxft.

A tiny Llama base is saved as HF, each member's (moved) factors are exported with
`peft_format`, and `PeftModel.from_pretrained(base, DIR)` must give jaxft's logits
and greedy generations; one run goes through `jaxft train` + `jaxft export --format
peft+base`. Needs CPU torch + transformers + peft (skipped without).
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import adapters, cli
from jaxft.adapters import base, peft_format
from jaxft.models import DecoderConfig, decoder, hf

try:
  import peft
  import torch
  import transformers
except ImportError:
  peft = torch = transformers = None
pytestmark = pytest.mark.skipif(peft is None, reason="needs torch + transformers + peft")

CFG = DecoderConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                    d_ff=48, rope_base=10000.0)
TOKENS = np.array([[5, 17, 3, 44, 9, 71, 2, 30], [1, 2, 3, 4, 5, 6, 7, 8]], np.int32)


def _torch_model(base_dir, adapter_dir):
  model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
  return peft.PeftModel.from_pretrained(model, adapter_dir).eval()


def _jaxft_greedy(adapter, frozen, trainable, s, cfg, prompt, n):
  params = adapter.combine(frozen, trainable, s)
  hook = adapter.linear_hook(s)
  f = jax.jit(lambda p, t: decoder.apply(p, t, cfg, linear=hook))  # causal: pad on the right
  toks = list(prompt)
  for _ in range(n):
    row = jnp.asarray([toks + [0] * (len(prompt) + n - len(toks))])
    toks.append(int(jnp.argmax(f(params, row)[0, len(toks) - 1])))
  return toks


@pytest.mark.parametrize("name,layout", [("lora", "half"), ("rslora", "half"), ("dora", "half"),
                                         ("pissa", "half"), ("milora", "half"),
                                         ("lora", "interleaved")])
def test_peft_loads_and_reproduces_logits_and_generations(name, layout, tmp_path):
  cfg = dataclasses.replace(CFG, rope_layout=layout)
  params = decoder.init(jax.random.PRNGKey(0), cfg)
  params = jax.tree.map(lambda x: x * 4.0 if x.ndim == 3 else x, params)  # peakier logits
  hf.save_hf(tmp_path / "base", cfg, jax.device_get(params), architecture="llama")
  adapter = adapters.ADAPTERS[name]
  s = {**adapters.DEFAULTS[name], "name": name, "rank": 4, "dropout": 0.0}
  frozen, init_t = adapter.init(jax.random.PRNGKey(1), params, s)
  leaves, treedef = jax.tree.flatten(init_t)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  trained = jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape)
                                         for x, k in zip(leaves, keys)])
  tensors, config = peft_format.peft_adapter(adapter.MEMBER, s, trained, frozen, init_t, cfg)
  peft_format.save_peft(str(tmp_path / "adapter"), tensors, config)
  ours = np.asarray(decoder.apply(adapter.combine(frozen, trained, s), jnp.asarray(TOKENS), cfg,
                                  linear=adapter.linear_hook(s)))
  model = _torch_model(str(tmp_path / "base"), str(tmp_path / "adapter"))
  with torch.no_grad():
    theirs = model(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
  assert not np.allclose(ours, np.asarray(decoder.apply(params, jnp.asarray(TOKENS), cfg)),
                         atol=1e-3)
  prompt = [5, 17, 3]
  with torch.no_grad():
    gen = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                         pad_token_id=0)[0].tolist()
  assert gen == _jaxft_greedy(adapter, frozen, trained, s, cfg, prompt, 6)


def test_pissa_exports_as_rank_2r_against_the_original_base(tmp_path):
  params = decoder.init(jax.random.PRNGKey(0), CFG)
  s = {**adapters.DEFAULTS["pissa"], "name": "pissa", "rank": 4}
  frozen, init_t = adapters.pissa.init(jax.random.PRNGKey(1), params, s)
  _, config = peft_format.peft_adapter(adapters.pissa.MEMBER, s, init_t, frozen, init_t, CFG)
  assert config["r"] == 8 and config["lora_alpha"] / config["r"] == adapters.lora.scale(s)


def test_members_without_a_peft_form_say_so():
  with pytest.raises(ValueError, match="no PEFT form"):
    peft_format.peft_adapter(adapters.full, {}, {}, {}, {}, CFG)


@pytest.mark.slow
def test_cli_train_then_export_peft_with_base(tmp_path, capsys):
  work = tmp_path / "run"
  assert cli.main(["train", "tiny", "--workdir", str(work), "--config.steps=2",
                   "--config.eval_every=0", "--config.adapter.name=lora",
                   "--config.adapter.dropout=0.0", "--no_progress"]) == 0
  out = tmp_path / "peft"
  assert cli.main(["export", str(work), "--format", "peft+base", "--out", str(out)]) == 0
  assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
  merged = tmp_path / "hf"
  assert cli.main(["export", str(work), "--format", "hf", "--out", str(merged)]) == 0
  model = _torch_model(str(out / "base"), str(out))
  ref = transformers.AutoModelForCausalLM.from_pretrained(str(merged), torch_dtype=torch.float32)
  tokens = torch.tensor(TOKENS, dtype=torch.long)
  with torch.no_grad():
    np.testing.assert_allclose(model(tokens).logits.numpy(), ref(tokens).logits.numpy(),
                               rtol=1e-4, atol=1e-4)
  assert cli.main(["export", str(work), "--format", "onnx", "--out", str(out)]) == 1
  assert "valid: hf, peft, peft+base" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["corda", "lora_ga"])
def test_residual_base_members_export_against_the_original_base(name, tmp_path):
  """CorDA and LoRA-GA freeze W_res = W0 - s A0 B0: a plain LoRA of the moved (A, B) on the
  original base would give W0 + s A B; the export must give W_res + s A B (rank 2r)."""
  from jaxft import objectives  # pylint: disable=g-import-not-at-top
  from jaxft.adapters import calibrate  # pylint: disable=g-import-not-at-top
  params = decoder.init(jax.random.PRNGKey(0), CFG)
  params = jax.tree.map(lambda x: x * 4.0 if x.ndim == 3 else x, params)
  hf.save_hf(tmp_path / "base", CFG, jax.device_get(params), architecture="llama")
  tok = jax.random.randint(jax.random.PRNGKey(3), (2, 4, 9), 0, CFG.vocab_size)
  batches = {"tokens": tok[..., :-1], "targets": tok[..., 1:],
             "loss_mask": jnp.ones((2, 4, 8), jnp.float32),
             "segment_ids": jnp.ones((2, 4, 8), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 4, 8))}
  calib = calibrate.Calibration(lambda p, t, **kw: decoder.apply(p, t, CFG, **kw),
                                objectives.xent.loss_fn, objectives.xent.DEFAULTS, batches)
  adapter = adapters.ADAPTERS[name]
  s = {**adapters.DEFAULTS[name], "name": name, "rank": 4, "dropout": 0.0}
  frozen, init_t = adapter.init(jax.random.PRNGKey(1), params, s, calib)
  flat_f, flat_p = base.flatten(frozen), base.flatten(params)
  assert not np.allclose(flat_f["layers/attn/q/kernel"], flat_p["layers/attn/q/kernel"])
  leaves, treedef = jax.tree.flatten(init_t)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  trained = jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape)
                                         for x, k in zip(leaves, keys)])
  tensors, config = peft_format.peft_adapter(adapter.MEMBER, s, trained, frozen, init_t, CFG)
  assert config["r"] == 8 and config["lora_alpha"] / config["r"] == adapter.MEMBER.scale(s)
  peft_format.save_peft(str(tmp_path / "adapter"), tensors, config)
  ours = np.asarray(decoder.apply(adapter.combine(frozen, trained, s), jnp.asarray(TOKENS), CFG,
                                  linear=adapter.linear_hook(s)))
  model = _torch_model(str(tmp_path / "base"), str(tmp_path / "adapter"))
  with torch.no_grad():
    theirs = model(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
  assert not np.allclose(ours, np.asarray(decoder.apply(params, jnp.asarray(TOKENS), CFG)),
                         atol=1e-3)
