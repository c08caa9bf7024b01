"""Feature-wise, bottleneck and prompt adapters: SSF, (IA)³, series / parallel adapters,
Compacter, prompt tuning, prefix tuning — the contract plus one property each that a
wrong implementation fails."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import adapters
from jaxft.adapters import base, bottleneck, compacter, prompt
from jaxft.models import DecoderConfig, decoder
from adapter_testlib import perturb

CFG = DecoderConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                    d_ff=48)
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 64)
L, D, F, KV = CFG.n_layers, CFG.d_model, CFG.d_ff, CFG.n_kv_heads * CFG.head_dim


@pytest.fixture(scope="module")
def params():
  return decoder.init(jax.random.PRNGKey(0), CFG)


_BASE = {}


def base_logits_of(params):
  if "logits" not in _BASE:
    _BASE["logits"] = jax.jit(lambda p: decoder.apply(p, TOKENS, CFG))(params)
  return _BASE["logits"]


def spec(name, **kw):
  return {**adapters.DEFAULTS[name], "name": name, **kw}


def run(adapter, frozen, trainable, s):
  fn = lambda f, t: decoder.apply(adapter.combine(f, t, s), TOKENS, CFG,
                                  linear=adapter.linear_hook(s))
  return jax.jit(fn)(frozen, trainable)


# name, overrides, identity at init, closed-form trainable count
MEMBERS = [
    ("ssf", {"init_std": 0.0}, True, 2 * L * (D + 2 * KV + D + F + F + D)),
    ("ssf", {"shift": False, "targets": ("mlp/up$",)}, False, L * F),
    ("ia3", {}, True, L * (2 * KV + F)),
    ("series_adapter", {"bottleneck": 8}, True, L * 8 * (D + D)),
    ("parallel_adapter", {"bottleneck": 8, "targets": ("attn/q$",)}, True, L * 8 * (D + D)),
    ("compacter", {"bottleneck": 8}, True, L * (D + 2 * 8 + D) + 2 * 4 ** 3),
    ("prompt_tuning", {"num_tokens": 4}, False, 4 * D),
    ("prefix_tuning", {"num_tokens": 3, "hidden": 0}, False, 2 * L * 3 * KV),
    ("prefix_tuning", {"num_tokens": 3, "hidden": 8}, False,
     3 * D + D * 8 + 8 + 8 * 2 * L * KV + 2 * L * KV),
]


@pytest.mark.parametrize("name,kw,identity,count", MEMBERS)
def test_contract(name, kw, identity, count, params):
  adapter, s = adapters.ADAPTERS[name], spec(name, **kw)
  frozen, trainable = adapter.init(jax.random.PRNGKey(2), params, s)
  base_logits = base_logits_of(params)
  out = run(adapter, frozen, trainable, s)
  if identity:
    np.testing.assert_allclose(out, base_logits, rtol=1e-6, atol=1e-6)
  assert base.count_params(trainable) == count
  moved = perturb(trainable, jax.random.PRNGKey(3))
  unmerged = run(adapter, frozen, moved, s)
  assert not np.allclose(unmerged, base_logits, atol=1e-4)
  if adapter.MERGEABLE:
    merged = jax.jit(lambda f, t: adapter.merge(f, t, s))(frozen, moved)
    np.testing.assert_allclose(decoder.apply(merged, TOKENS, CFG), unmerged, rtol=1e-5, atol=1e-5)
  else:  # cannot merge: says so; the unmerged path is what runs (and is tested here)
    with pytest.raises(ValueError, match="cannot be merged"):
      adapter.merge(frozen, moved, s)
  f_axes, t_axes = adapter.logical_axes(decoder.logical_axes(CFG), trainable, s)
  is_axes = lambda x: isinstance(x, tuple)
  assert jax.tree.structure(f_axes, is_leaf=is_axes) == jax.tree.structure(frozen)
  for axes, leaf in zip(jax.tree.leaves(t_axes, is_leaf=is_axes), jax.tree.leaves(trainable)):
    assert len(axes) == leaf.ndim
  grads = jax.grad(lambda t: jnp.mean(run(adapter, frozen, t, s) ** 2))(moved)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_ssf_is_scale_then_shift_and_merge_adds_a_bias(params):
  s = spec("ssf", targets=("mlp/up$",))
  frozen, trainable = adapters.ssf.init(jax.random.PRNGKey(2), params, s)
  p = {"kernel": params["layers"]["mlp"]["up"]["kernel"][0],
       "ssf_scale": trainable["layers"]["mlp"]["up"]["ssf_scale"][0],
       "ssf_shift": trainable["layers"]["mlp"]["up"]["ssf_shift"][0]}
  x = jax.random.normal(jax.random.PRNGKey(4), (3, D))
  expected = p["ssf_scale"][None] * (x @ p["kernel"]) + p["ssf_shift"][None]
  np.testing.assert_allclose(adapters.ssf.linear_hook(s)(p, x, "mlp/up", None), expected,
                             rtol=1e-6, atol=1e-6)
  merged = adapters.ssf.merge(frozen, trainable, s)["layers"]["mlp"]["up"]
  np.testing.assert_allclose(merged["bias"], trainable["layers"]["mlp"]["up"]["ssf_shift"])
  gamma = trainable["layers"]["mlp"]["up"]["ssf_scale"]
  assert float(jnp.std(gamma)) == pytest.approx(0.02, rel=0.2)


def test_ia3_scales_keys_values_and_the_ffn_activation(params):
  s = spec("ia3")
  frozen, trainable = adapters.ia3.init(jax.random.PRNGKey(2), params, s)
  t = jax.tree.map(lambda x: 2.0 * x, trainable)   # l = 2 everywhere
  merged = adapters.ia3.merge(frozen, t, s)["layers"]
  for name in ("k", "v"):
    np.testing.assert_allclose(merged["attn"][name]["kernel"],
                               2 * params["layers"]["attn"][name]["kernel"])
  w = params["layers"]
  np.testing.assert_allclose(merged["mlp"]["down"]["kernel"], 2 * w["mlp"]["down"]["kernel"])
  np.testing.assert_array_equal(merged["attn"]["q"]["kernel"], w["attn"]["q"]["kernel"])
  assert trainable["layers"]["mlp"]["down"]["ia3_in"].shape == (L, F)


@pytest.mark.parametrize("name", ["series_adapter", "parallel_adapter"])
def test_bottleneck_placement_with_a_linear_activation(name, params):
  """With σ = identity the adapter is linear: series = W0 (I + s D U), parallel = W0 + s D U
  (LoRA). Catches a wrong source (x vs y), scale or factor order."""
  s = spec(name, bottleneck=4, activation="identity", scaling=0.5)
  adapter = adapters.ADAPTERS[name]
  frozen, trainable = adapter.init(jax.random.PRNGKey(2), params, s)
  moved = perturb(trainable, jax.random.PRNGKey(3), 0.3)
  a = moved["layers"]["mlp"]["down"]
  w0 = params["layers"]["mlp"]["down"]["kernel"]
  du = 0.5 * a["adapter_down"] @ a["adapter_up"]
  w = w0 @ (jnp.eye(D)[None] + du) if name == "series_adapter" else w0 + du
  expected = decoder.apply({**params, "layers": {
      **params["layers"], "mlp": {**params["layers"]["mlp"], "down": {"kernel": w}}}}, TOKENS, CFG)
  np.testing.assert_allclose(run(adapter, frozen, moved, s), expected, rtol=2e-5, atol=2e-5)


def test_bottleneck_gradients_at_init(params):
  """W_up = 0: only W_up gets a gradient; W_down's is exactly zero."""
  s = spec("series_adapter", bottleneck=4)
  adapter = adapters.ADAPTERS["series_adapter"]
  frozen, trainable = adapter.init(jax.random.PRNGKey(2), params, s)
  g = jax.grad(lambda t: jnp.sum(run(adapter, frozen, t, s)[:, -1, :5]))(trainable)
  g = g["layers"]["mlp"]["down"]
  assert float(jnp.abs(g["adapter_down"]).max()) == 0.0
  assert float(jnp.abs(g["adapter_up"]).max()) > 0.0


def test_compacter_phm_is_a_kronecker_sum():
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  n, a, b = 2, 3, 5
  rule, s_, t_ = (jax.random.normal(k[0], (n, n, n)), jax.random.normal(k[1], (n, a)),
                  jax.random.normal(k[2], (n, b)))
  expected = sum(np.kron(np.asarray(rule[i]), np.outer(s_[i], t_[i])) for i in range(n))
  w = compacter.phm_matrix(rule, s_, t_)
  assert w.shape == (n * a, n * b)
  np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)


def test_compacter_equals_a_series_adapter_with_the_dense_phm_weights(params):
  s = spec("compacter", bottleneck=8, phm_dim=2)
  frozen, trainable = compacter.init(jax.random.PRNGKey(2), params, s)
  moved = perturb(trainable, jax.random.PRNGKey(3), 0.3)
  a, rule = moved["layers"]["mlp"]["down"], moved[bottleneck.RULE]
  dense = {"adapter_down": compacter.phm_matrix(rule["down"], a["phm_down_s"], a["phm_down_t"]),
           "adapter_up": compacter.phm_matrix(rule["up"], a["phm_up_s"], a["phm_up_t"])}
  ss = spec("series_adapter", bottleneck=8, activation="gelu")
  series = run(bottleneck.series, params, {"layers": {"mlp": {"down": dense}}}, ss)
  np.testing.assert_allclose(run(compacter, frozen, moved, s), series, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="not divisible by adapter.phm_dim=5"):
    compacter.init(jax.random.PRNGKey(2), params, spec("compacter", phm_dim=5))


def test_prompt_tuning_equals_soft_tokens_prepended(params):
  """Reference: the soft prompt as extra vocabulary rows, prepended as tokens."""
  s = spec("prompt_tuning", num_tokens=5)
  frozen, trainable = prompt.prompt_tuning.init(jax.random.PRNGKey(2), params, s)
  moved = perturb(trainable, jax.random.PRNGKey(3), 0.1)
  table = jnp.concatenate([params["embed"]["embedding"], moved["prompt"]["embedding"]])
  ids = jnp.concatenate([jnp.broadcast_to(64 + jnp.arange(5), (2, 5)), TOKENS], 1)
  ref = decoder.apply({**params, "embed": {"embedding": table}}, ids, CFG)[:, 5:, :64]
  out = run(prompt.prompt_tuning, frozen, moved, s)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # init='vocab' draws rows of the embedding table
  rows = np.asarray(params["embed"]["embedding"])
  soft = np.asarray(trainable["prompt"]["embedding"])
  assert all(any(np.array_equal(r, e) for e in rows) for r in soft)


def test_prefix_of_length_zero_is_the_base_model(params):
  empty = {**params, "prefix": {"k": jnp.zeros((L, 0, KV)), "v": jnp.zeros((L, 0, KV))}}
  np.testing.assert_allclose(decoder.apply(empty, TOKENS, CFG), decoder.apply(params, TOKENS, CFG),
                             rtol=1e-6, atol=1e-6)


def test_prefix_attention_equals_attention_over_the_concatenated_keys(params):
  """Keys/values of a first chunk `a`, given as the prefix, make chunk `b` behave exactly
  as the tail of the full sequence [a; b]; in a packed row every segment sees the prefix."""
  a, b = TOKENS[:, :5], TOKENS[:, 5:]
  _, cache = decoder.apply(params, a, CFG, cache=decoder.init_cache(CFG, 2, 5))
  flat = lambda x: x.reshape(L, 2, 5, KV)
  full = decoder.apply(params, TOKENS, CFG)
  for row in range(2):
    pre = {**params, "prefix": {"k": flat(cache["k"])[:, row], "v": flat(cache["v"])[:, row]}}
    out = decoder.apply(pre, b[row:row + 1], CFG, positions=5 + jnp.arange(7)[None])
    np.testing.assert_allclose(out[0], full[row, 5:], rtol=1e-5, atol=1e-5)
    # Packed: segment 2 starts at index 3 with positions restarted; it still sees the prefix.
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2]])
    pos = jnp.asarray([[5, 6, 7, 5, 6, 7, 8]])
    packed = decoder.apply(pre, jnp.concatenate([b[row:row + 1, :3], b[row:row + 1, :4]], 1),
                           CFG, positions=pos, segment_ids=seg)
    np.testing.assert_allclose(packed[0, 3:], full[row, 5:9], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,kw", [("prefix_tuning", {"num_tokens": 3, "hidden": 8}),
                                     ("prompt_tuning", {"num_tokens": 4})])
def test_prompt_and_prefix_kv_cache_path_agrees_with_the_full_forward(name, kw, params):
  adapter, s = adapters.ADAPTERS[name], spec(name, **kw)
  frozen, trainable = adapter.init(jax.random.PRNGKey(2), params, s)
  p = adapter.materialize(frozen, perturb(trainable, jax.random.PRNGKey(3), 0.1), s)
  full = decoder.apply(p, TOKENS, CFG)
  cache = decoder.init_cache(CFG, 2, 16)
  first, cache = decoder.apply(p, TOKENS[:, :8], CFG, cache=cache)
  nxt, cache = decoder.apply(p, TOKENS[:, 8:9], CFG, cache=cache)
  np.testing.assert_allclose(first, full[:, :8], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(nxt[:, 0], full[:, 8], rtol=1e-5, atol=1e-5)


def test_prefix_reparameterisation_is_the_two_layer_mlp(params):
  s = spec("prefix_tuning", num_tokens=3, hidden=8)
  frozen, trainable = prompt.prefix_tuning.init(jax.random.PRNGKey(2), params, s)
  t = perturb(trainable, jax.random.PRNGKey(3), 0.1)["prefix"]
  kv = np.tanh(np.asarray(t["embed"]) @ np.asarray(t["w1"]) + np.asarray(t["b1"])) @ np.asarray(
      t["w2"]) + np.asarray(t["b2"])
  kv = kv.reshape(3, L, 2, KV)
  got = prompt.prefix_tuning.materialize(frozen, {"prefix": t}, s)["prefix"]
  np.testing.assert_allclose(got["k"], np.transpose(kv[:, :, 0], (1, 0, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["v"], np.transpose(kv[:, :, 1], (1, 0, 2)), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ real runs (slow)

PART2 = ["ssf", "ia3", "series_adapter", "parallel_adapter", "compacter", "prompt_tuning",
         "prefix_tuning", "loca", "fourierft", "said", "monarch", "ept", "polyhistor", "levi"]
SMOLLM2_CONFIG = '''
import ml_collections
from jaxft_configs import smollm2_lora_math


def get_config(arg):
  c = smollm2_lora_math.get_config()
  c.adapter = ml_collections.ConfigDict({"name": arg})   # the member's own defaults
  return c
'''


def _train(args):
  from jaxft import cli, logbook  # pylint: disable=g-import-not-at-top
  assert cli.main(["train", *args, "--no_progress"]) == 0
  workdir = args[args.index("--workdir") + 1]
  return logbook.read_metrics(f"{workdir}/metrics.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("name", PART2)
def test_tiny_run_with_defaults_learns(name, tmp_path):
  rows = _train(["tiny", "--workdir", str(tmp_path / name), f"--config.adapter.name={name}",
                 "--config.steps=10", "--config.eval_every=0"])
  losses = [r["loss"] for r in rows if "loss" in r and "split" not in r]
  assert losses[-1] < losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", PART2)
def test_smollm2_short_run_loss_falls(name, tmp_path):
  """8 steps of the main job (SmolLM2-135M, arithmetic SFT) with the member's defaults;
  docs/adapters_part2.md records the measured numbers."""
  config = tmp_path / "smollm2_part2.py"
  config.write_text(SMOLLM2_CONFIG)
  rows = _train([f"{config}:{name}", "--workdir", str(tmp_path / name), "--config.steps=8",
                 "--config.eval_examples=0", "--config.eval_every=0", "--config.log_every=1"])
  start = next(r for r in rows if r.get("event") == "start")
  losses = [r["loss"] for r in rows if "loss" in r and "split" not in r]
  assert start["trainable_params"] > 0 and len(losses) == 8
  assert min(losses[-3:]) < losses[0]
