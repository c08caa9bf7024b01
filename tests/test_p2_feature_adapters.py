"""P2 prompt / hypernetwork / side-network adapters: EPT, Polyhistor, LEVI — the contract
plus properties a wrong implementation fails (closed forms written out here)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.adapters import base, ept, levi, polyhistor, prompt
from jaxft.models import DecoderConfig, decoder, layers
from adapter_testlib import perturb

CFG = DecoderConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                    d_ff=48)
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 64)
L, D, F, V = CFG.n_layers, CFG.d_model, CFG.d_ff, CFG.vocab_size
MODULES = {"ept": ept, "polyhistor": polyhistor, "levi": levi}


@pytest.fixture(scope="module")
def params():
  return decoder.init(jax.random.PRNGKey(0), CFG)


def spec(name, **kw):
  return {**MODULES[name].DEFAULTS, "name": name, **kw}


def run(adapter, frozen, trainable, s, tokens=TOKENS):
  fn = lambda f, t: decoder.apply(adapter.combine(f, t, s), tokens, CFG,
                                  linear=adapter.linear_hook(s))
  return jax.jit(fn)(frozen, trainable)


def np_(x):
  return np.asarray(x, np.float64)


# name, overrides, closed-form trainable count
MEMBERS = [
    ("ept", {"max_len": 16}, 5 * D + 16 * 2 + 2 * D + 2 * (D * 2 + 2 * D) + D * 2 + 2),
    ("polyhistor", {"bottleneck": 8, "template": 4, "rank": 2, "embed_dim": 4},
     # shared: e_task + 4 heads (2e, t·r); per layer: e_ℓ + K_down (D/t, m/t) + K_up (m/t, D/t)
     4 + 4 * (8 * 4 * 2) + L * (4 + 8 * 2 + 2 * 8)),
    ("levi", {"side_dim": 8, "hidden": 16},
     L * D * 8 + L * (8 * 16 + 16 + 16 * 8) + 8 + 8 * D + D + D * 8),
]


@pytest.mark.parametrize("name,kw,count", MEMBERS)
def test_contract(name, kw, count, params):
  adapter, s = MODULES[name], spec(name, **kw)
  frozen, trainable = adapter.init(jax.random.PRNGKey(2), params, s)
  assert base.count_params(trainable) == count
  assert set(base.flatten(frozen)) == set(base.flatten(params))
  moved = perturb(trainable, jax.random.PRNGKey(3))
  base_logits = decoder.apply(params, TOKENS, CFG)
  assert not np.allclose(run(adapter, frozen, moved, s), base_logits, atol=1e-4)
  assert not adapter.MERGEABLE
  with pytest.raises(ValueError, match="cannot be merged"):
    adapter.merge(frozen, moved, s)
  f_axes, t_axes = adapter.logical_axes(decoder.logical_axes(CFG), trainable, s)
  is_axes = lambda x: isinstance(x, tuple)
  assert jax.tree.structure(f_axes, is_leaf=is_axes) == jax.tree.structure(frozen)
  for axes, leaf in zip(jax.tree.leaves(t_axes, is_leaf=is_axes), jax.tree.leaves(trainable)):
    assert len(axes) == leaf.ndim
  grads = jax.grad(lambda t: jnp.mean(run(adapter, frozen, t, s) ** 2))(moved)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  with pytest.raises(base.TargetError, match="nope"):
    adapter.init(jax.random.PRNGKey(0), params, spec(name, targets=("nope/.*",)))


@pytest.mark.parametrize("name,bad,msg", [
    ("ept", {"fusion": "mean"}, "fusion='mean'.*attention, none"),
    ("ept", {"rank": 0}, "rank must be >= 1"),
    ("polyhistor", {"placement": "side"}, "placement='side'.*series, parallel"),
    ("polyhistor", {"template": 5}, "not divisible by adapter.template=5"),
    ("levi", {"side_input": "pixels"}, "side_input='pixels'.*embed, none"),
    ("levi", {"targets": ("attn/q$",)}, "exactly one of layers/mlp/up")])
def test_bad_settings_name_the_valid_choices(name, bad, msg, params):
  with pytest.raises(ValueError, match=msg):
    s = spec(name, **bad)
    MODULES[name].init(jax.random.PRNGKey(0), params, s)
    MODULES[name].linear_hook(s)


# ------------------------------------------------------------------------------- EPT


def test_ept_at_init_is_prompt_tuning_with_the_short_prompt(params):
  """B = 0 and V_k = 0: A B = 0, every subspace = P_s, the gates sum to 1 -> prompt tuning."""
  for kw in ({}, {"num_spaces": 1, "fusion": "none", "input_update": False}):
    s = spec("ept", **kw)
    frozen, trainable = ept.init(jax.random.PRNGKey(2), params, s)
    pt = {"prompt": {"embedding": trainable["ept"]["prompt"]}}
    ref = decoder.apply(prompt.prompt_combine(params, pt, s), TOKENS, CFG)
    np.testing.assert_allclose(run(ept, frozen, trainable, s), ref, rtol=1e-6, atol=1e-6)


def test_ept_soft_prompt_is_its_closed_form(params):
  s = spec("ept", num_spaces=3, space_rank=2, max_len=16)
  _, trainable = ept.init(jax.random.PRNGKey(2), params, s)
  t = {k: np_(v) for k, v in perturb(trainable, jax.random.PRNGKey(3), 0.3)["ept"].items()}
  m = t["lr_a"] @ t["lr_b"]                                   # (S, D) low-rank knowledge
  logits = t["prompt"] @ m.T / np.sqrt(D)
  att = np.exp(logits - logits.max(1, keepdims=True))
  p_f = t["prompt"] + (att / att.sum(1, keepdims=True)) @ m   # prompt fusion
  gl = p_f @ t["gate_w"] + t["gate_b"]
  g = np.exp(gl - gl.max(1, keepdims=True))
  g /= g.sum(1, keepdims=True)                                # (n, K) gating network
  want = sum(g[:, k:k + 1] * (p_f + p_f @ t["space_u"][k] @ t["space_v"][k]) for k in range(3))
  got = ept.soft_prompt(jax.tree.map(jnp.asarray, {k: v.astype(np.float32) for k, v in t.items()}),
                        s)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  s_nf = {**s, "fusion": "none"}
  got_nf = ept.soft_prompt({k: jnp.asarray(v, jnp.float32) for k, v in t.items()}, s_nf)
  gl = t["prompt"] @ t["gate_w"] + t["gate_b"]
  g = np.exp(gl - gl.max(1, keepdims=True))
  g /= g.sum(1, keepdims=True)
  p = t["prompt"]
  want_nf = sum(g[:, k:k + 1] * (p + p @ t["space_u"][k] @ t["space_v"][k]) for k in range(3))
  np.testing.assert_allclose(got_nf, want_nf, rtol=1e-4, atol=1e-5)


def test_ept_input_update_adds_row_i_of_ab_to_token_i(params):
  """Reference: each (token, position) of row 0 as an extra vocabulary row E[x_i] + (A B)_i,
  the soft prompt prepended as prompt tuning; positions >= max_len get no update."""
  s = spec("ept", max_len=8)
  frozen, trainable = ept.init(jax.random.PRNGKey(2), params, s)
  moved = perturb(trainable, jax.random.PRNGKey(3), 0.3)
  p = ept.materialize(frozen, moved, s)
  delta = np.zeros((12, D), np.float32)
  delta[:8] = np.asarray(p["prompt"]["input_delta"])
  table = params["embed"]["embedding"]
  rows = table[TOKENS[0]] + delta
  ext = {**params, "embed": {"embedding": jnp.concatenate([table, rows])},
         "prompt": {"embedding": p["prompt"]["embedding"]}}
  ref = decoder.apply(ext, (V + jnp.arange(12))[None], CFG)[0, :, :V]
  out = run(ept, frozen, moved, s)
  np.testing.assert_allclose(out[0], ref, rtol=1e-5, atol=1e-5)
  # KV-cache decoding adds the same rows at the same positions.
  cache = decoder.init_cache(CFG, 2, 16)
  first, cache = decoder.apply(p, TOKENS[:, :9], CFG, cache=cache)
  nxt, cache = decoder.apply(p, TOKENS[:, 9:10], CFG, cache=cache)
  np.testing.assert_allclose(first, out[:, :9], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(nxt[:, 0], out[:, 9], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ Polyhistor


def test_polyhistor_weights_are_the_hypernetwork_formula(params):
  s = spec("polyhistor", bottleneck=8, template=4, rank=2, embed_dim=4,
           targets=(r"mlp/down$", r"attn/q$"), placement="parallel")
  frozen, trainable = polyhistor.init(jax.random.PRNGKey(2), params, s)
  moved = perturb(trainable, jax.random.PRNGKey(3), 0.3)
  hyper = {k: np_(v) for k, v in moved["polyhistor"].items()}
  got = base.flatten(polyhistor.combine(frozen, moved, s))
  flat = base.flatten(moved)
  for path, d_in, d_out in (("layers/mlp/down", F, D), ("layers/attn/q", D, 4 * 8)):
    for l in range(L):
      z = np.concatenate([hyper["task_embed"], np_(flat[f"{path}/poly_layer_embed"])[l]])
      for side, shape in (("down", (d_in, 8)), ("up", (8, d_out))):
        u = (z @ hyper[f"{side}_u"]).reshape(4, 2)
        v = (z @ hyper[f"{side}_v"]).reshape(2, 4)
        want = np.kron(u @ v, np_(flat[f"{path}/poly_kernel_{side}"])[l])
        assert want.shape == shape
        np.testing.assert_allclose(got[f"{path}/adapter_{side}"][l], want, rtol=1e-4, atol=1e-5)
  # The hypernetwork is shared by both targets and every layer: counted once.
  shared = 4 + 4 * (8 * 4 * 2)
  per_layer = L * ((4 + (F // 4) * 2 + 2 * (D // 4)) + (4 + (D // 4) * 2 + 2 * (32 // 4)))
  assert base.count_params(trainable) == shared + per_layer
  assert all(x.shape[0] != L for x in jax.tree.leaves(trainable["polyhistor"]))


def test_polyhistor_is_a_bottleneck_adapter_with_the_generated_weights(params):
  """Identity at init (K_up = 0); moved, it equals y + s·σ(y W_down) W_up written out."""
  s = spec("polyhistor", bottleneck=8, template=4, rank=2, embed_dim=4, activation="tanh",
           scaling=0.5)
  frozen, trainable = polyhistor.init(jax.random.PRNGKey(2), params, s)
  base_logits = decoder.apply(params, TOKENS, CFG)
  np.testing.assert_allclose(run(polyhistor, frozen, trainable, s), base_logits, atol=1e-6)
  assert float(jnp.abs(trainable["layers"]["mlp"]["down"]["poly_kernel_up"]).max()) == 0
  moved = perturb(trainable, jax.random.PRNGKey(3), 0.3)
  w = base.flatten(polyhistor.materialize(frozen, moved, s))

  def ref_linear(p, x, name, rng):
    y = decoder.dense(p, x, name, rng)
    if name != "mlp/down":
      return y
    return y + 0.5 * jnp.tanh(y @ p["adapter_down"]) @ p["adapter_up"]

  ref_params = base.unflatten(w)
  ref = decoder.apply(ref_params, TOKENS, CFG, linear=ref_linear)
  np.testing.assert_allclose(run(polyhistor, frozen, moved, s), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ LEVI


def test_levi_at_init_is_the_base_model_and_only_the_gate_learns_first(params):
  s = spec("levi", side_dim=8, hidden=16)
  frozen, trainable = levi.init(jax.random.PRNGKey(2), params, s)
  np.testing.assert_allclose(run(levi, frozen, trainable, s), decoder.apply(params, TOKENS, CFG),
                             rtol=1e-6, atol=1e-6)
  grads = base.flatten(jax.grad(lambda t: jnp.mean(run(levi, frozen, t, s)[..., :7] ** 2))(
      trainable))
  assert float(jnp.abs(grads["levi/gate"]).max()) > 0
  assert all(float(jnp.abs(g).max()) == 0 for k, g in grads.items() if k != "levi/gate")


def test_levi_logits_are_base_plus_the_side_network_written_out(params):
  """Taps (the MLP inputs, captured through the decoder's side hook) -> side network in numpy."""
  s = spec("levi", side_dim=8, hidden=16, activation="tanh")
  frozen, trainable = levi.init(jax.random.PRNGKey(2), params, s)
  moved = perturb(trainable, jax.random.PRNGKey(3), 0.3)
  p = levi.combine(frozen, moved, s)
  hook, seen = levi.linear_hook(s), {}

  def capture(params_, tokens, logits, aux):
    seen.update(aux)
    return logits, {}

  hook.mlp.side = capture
  decoder.apply(p, TOKENS, CFG, linear=hook)
  taps = np_(seen["levi_tap"])                          # (L, B, T, d_s) = h_ℓ A_ℓ
  t = {k: np_(v) for k, v in moved["levi"].items()}
  table = np_(params["embed"]["embedding"])
  sd = table[np.asarray(TOKENS)] @ t["w_in"]
  for l in range(L):
    sd = sd + np.tanh((sd + taps[l]) @ t["w1"][l] + t["b1"][l]) @ t["w2"][l]
  normed = sd / np.sqrt(np.mean(sd ** 2, -1, keepdims=True) + 1e-6) * t["norm"]
  want = np_(decoder.apply(params, TOKENS, CFG)) + ((normed @ t["w_out"]) * t["gate"]) @ table.T
  np.testing.assert_allclose(run(levi, frozen, moved, s), want, rtol=1e-4, atol=1e-4)
  # The taps are the frozen model's MLP inputs times A_ℓ: recompute layer 0's directly.
  x = table[np.asarray(TOKENS)]
  lay = jax.tree.map(lambda a: a[0], params["layers"])
  a = layers.attention(lay["attn"], layers.norm(lay["attn_norm"], jnp.asarray(x, jnp.float32), CFG),
                       CFG, positions_BxL=jnp.broadcast_to(jnp.arange(12)[None], (2, 12)),
                       mask_BxLxS=layers.attention_mask(None, 2, 12), window=jnp.int32(2**31 - 1),
                       rope_base=jnp.float32(CFG.rope_base), rng=None, linear=decoder.dense)
  h0 = np_(layers.norm(lay["mlp_norm"], jnp.asarray(x, jnp.float32) + a, CFG))
  np.testing.assert_allclose(taps[0], h0 @ np_(moved["layers"]["mlp"]["up"]["levi_adapt"][0]),
                             rtol=1e-4, atol=1e-5)


def test_levi_base_weights_get_no_gradient_through_the_side_network(params):
  """d logits / d frozen is the base model's alone (stop-gradient taps and heads);
  with stop_gradient=False the side path adds a gradient."""
  proj = jax.random.normal(jax.random.PRNGKey(7), (2, 12, V))
  base_grad = jax.grad(lambda f: jnp.sum(decoder.apply(f, TOKENS, CFG) * proj))(params)
  for stop in (True, False):
    s = spec("levi", side_dim=8, hidden=16, stop_gradient=stop)
    frozen, trainable = levi.init(jax.random.PRNGKey(2), params, s)
    moved = perturb(trainable, jax.random.PRNGKey(3), 0.3)
    g = jax.grad(lambda f: jnp.sum(run(levi, f, moved, s) * proj))(frozen)
    same = jax.tree.map(lambda a, b: bool(np.allclose(a, b, rtol=1e-4, atol=1e-6)), g, base_grad)
    assert all(jax.tree.leaves(same)) == stop
