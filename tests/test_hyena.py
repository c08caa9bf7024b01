"""Hyena long-convolution LM: every conv_impl agrees, causality, partial filters, the kernel
path gives the reference path's loss and gradients, and a CLI run learns."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import cli, logbook, models
from jaxft.models import hyena

CFG = hyena.HyenaConfig(vocab_size=64, d_model=16, n_layers=1, d_ff=32, filter_dim=8,
                        max_len=32, conv_impl="jnp_fft")


def _tokens(l=24, seed=1):
  return jax.random.randint(jax.random.PRNGKey(seed), (2, l), 0, CFG.vocab_size)


def _loss(params, tokens, cfg):
  logits = hyena.apply(params, tokens[:, :-1], cfg)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def test_every_conv_impl_matches_float64_direct_convolution():
  with jax.enable_x64(True):
    r = np.random.default_rng(0)
    v, gate = (jnp.asarray(r.normal(size=(2, 3, 20))) for _ in range(2))
    h = jnp.asarray(r.normal(size=(3, 20)))
    want = np.stack([np.convolve(h[c], v[b, c])[:20] for b in range(2) for c in range(3)])
    want = want.reshape(2, 3, 20) * np.asarray(gate)
    for impl in hyena.CONV_IMPLS:
      got = hyena.long_conv(v, h, gate, dataclasses.replace(CFG, conv_impl=impl))
      np.testing.assert_allclose(np.asarray(got), want, atol=1e-10, err_msg=impl)


def test_kernel_path_gives_the_reference_loss_and_gradients():
  params = hyena.init(jax.random.PRNGKey(0), CFG)
  tokens = _tokens()
  cfgs = {impl: dataclasses.replace(CFG, conv_impl=impl) for impl in hyena.CONV_IMPLS}
  vg = lambda cfg: jax.jit(jax.value_and_grad(lambda p, t: _loss(p, t, cfg)))
  want_loss, want_grad = vg(cfgs["jnp_fft"])(params, tokens)
  assert 3.5 < float(want_loss) < 5.0   # ~ln(64) at init
  loss, grad = vg(cfgs["pallas"])(params, tokens)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-5)
  for impl in ("monarch", "direct"):
    np.testing.assert_allclose(_loss(params, tokens, cfgs[impl]), want_loss, rtol=1e-5, err_msg=impl)


def test_causal_changing_token_t_leaves_earlier_logits_unchanged():
  cfg = dataclasses.replace(CFG, conv_impl="pallas")
  params = hyena.init(jax.random.PRNGKey(0), cfg)
  tokens = _tokens()
  changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % cfg.vocab_size)
  a, b = hyena.apply(params, tokens, cfg), hyena.apply(params, changed, cfg)
  np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)
  assert float(jnp.max(jnp.abs(a[:, 10:] - b[:, 10:]))) > 1e-4


def test_partial_filter_equals_full_model_with_filters_zeroed(monkeypatch):
  params = hyena.init(jax.random.PRNGKey(0), CFG)
  tokens = _tokens(l=24)
  partial = hyena.apply(params, tokens, dataclasses.replace(CFG, filter_len=6))
  full_filters = hyena.implicit_filters

  def zeroed(fp, cfg, length):
    h = full_filters(fp, cfg, length)
    return h * (jnp.arange(length) < 6)[None, None, :]

  monkeypatch.setattr(hyena, "implicit_filters", zeroed)
  np.testing.assert_allclose(partial, hyena.apply(params, tokens, CFG), rtol=1e-5, atol=1e-6)


def test_frequency_sparse_kernel_equals_masked_reference_model():
  params = hyena.init(jax.random.PRNGKey(0), CFG)
  tokens = _tokens()
  sparse = lambda impl: hyena.apply(params, tokens, dataclasses.replace(
      CFG, conv_impl=impl, freq_keep=0.5, conv_n2=8))
  np.testing.assert_allclose(sparse("pallas"), sparse("jnp_fft"), rtol=1e-4, atol=1e-5)


def test_under_a_mesh_the_kernel_runs_inside_shard_map():
  from jaxft import sharding  # pylint: disable=g-import-not-at-top
  cfg = dataclasses.replace(CFG, conv_impl="pallas")
  params = hyena.init(jax.random.PRNGKey(0), cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 24), 0, cfg.vocab_size)
  want = hyena.apply(params, tokens, CFG)
  with jax.set_mesh(sharding.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})):
    fn = jax.jit(lambda p, t: hyena.apply(p, t, cfg))
    assert "manual_computation" in fn.lower(params, tokens).as_text()
    got = fn(params, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_registry_axes_and_bad_config():
  assert models.MODELS["hyena"] is hyena and "freq_keep" in models.DEFAULTS["hyena"]
  params = hyena.init(jax.random.PRNGKey(0), CFG)
  axes = hyena.logical_axes(CFG)
  assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple))
  for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
    assert p.ndim == len(a)
  assert CFG.num_params() == sum(p.size for p in jax.tree.leaves(params))
  with pytest.raises(ValueError, match="conv_impl"):
    hyena.HyenaConfig(conv_impl="fft")
  with pytest.raises(ValueError, match="HyenaConfig field 'ordr'"):
    hyena.HyenaConfig.from_dict({"ordr": 2})
  with pytest.raises(ValueError, match="max_len"):
    hyena.apply(params, _tokens(l=40), CFG)


@pytest.mark.slow   # ~60 s on 2 shared cores (interpret-mode kernels in a full train step)
def test_cli_trains_the_kernel_path(tmp_path):
  args = ["train", "hyena_shakespeare", "--workdir", str(tmp_path), "--no_progress",
          "--config.steps=10", "--config.log_every=1", "--config.eval_every=0",
          "--config.checkpoint_every=12", "--config.batch_size=8", "--config.seq_len=32",
          "--config.data.name=tiny_shakespeare", "--config.model.d_model=32",
          "--config.model.n_layers=1", "--config.model.d_ff=64", "--config.model.max_len=32",
          "--config.model.filter_dim=16", "--config.optimizer.warmup_steps=2",
          "--config.optimizer.lr=1e-2"]
  assert cli.main(args) == 0
  rows = [r for r in logbook.read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
          if "loss" in r and r.get("split") is None and "event" not in r]
  losses = [r["loss"] for r in rows]
  assert len(losses) == 10 and np.mean(losses[-3:]) < losses[0] - 0.3, losses
  # `jaxft eval` on the run: perplexity goes through the run's own model family (hyena)
  out = os.path.join(tmp_path, "eval.json")
  assert cli.main(["eval", str(tmp_path), "--out", out]) == 0
  with open(out) as f:
    res = json.load(f)
  assert res["num_tokens"] > 0 and np.isfinite(res["perplexity"])
  assert abs(np.log(res["perplexity"]) - res["xent"]) < 1e-6
