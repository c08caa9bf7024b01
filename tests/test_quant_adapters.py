"""Quantized-base members: NF4 + double quantization, QLoRA, LQ-LoRA, L4Q, QALoRA.

The shared low-rank properties (merge == unmerged, counts, loss falls, 8-device mesh
== one device) run for these members in tests/test_lowrank.py; here: each one's own.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import adapters, sharding
from jaxft.adapters import base, l4q, lq_lora, qalora, qlora, quant
from jaxft.models import DecoderConfig, decoder

CFG = DecoderConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                    d_ff=64)
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (4, 12), 0, 64)


@pytest.fixture(scope="module")
def params():
  return decoder.init(jax.random.PRNGKey(0), CFG)


def spec(name, **kw):
  return {**adapters.DEFAULTS[name], "name": name, "rank": 4, "dropout": 0.0, **kw}


def test_nf4_codebook_is_the_published_table():
  book = quant.nf_codebook(4)
  np.testing.assert_allclose(book, np.array(quant.NF4_TABLE), atol=1e-6)
  assert len(book) == 16 and np.all(np.diff(book) > 0)
  assert 0.0 in book and book[0] == -1.0 and book[-1] == 1.0
  assert np.sum(book > 0) == 8 and np.sum(book < 0) == 7


def test_nf4_roundtrip_within_the_format_bound():
  w = jax.random.normal(jax.random.PRNGKey(0), (2, 128, 512)) * 0.02
  w = w.at[0, 3, 5].set(0.5)  # an outlier block
  q = quant.quantize(w)
  got = quant.dequantize(q)
  c = jnp.max(jnp.abs(w.reshape(2, 2, 64, 512)), axis=2)            # true block absmax
  c_hat = quant.absmax_of(q)
  # Double quantization: absmax error <= half an int8 step of its group scale (+ fp slack).
  step = jnp.repeat(q["absmax_scale"], 256, axis=-1) / 127
  assert bool(jnp.all(jnp.abs(c - c_hat) <= step / 2 + 1e-7))
  # Elementwise: nearest-level error (half the widest NF4 gap) at the true scale plus
  # the scale error (levels are within [-1, 1]).
  half_gap = float(np.max(np.diff(quant.nf_codebook(4)))) / 2
  bound = half_gap * c + jnp.abs(c - c_hat)
  err = jnp.abs(w - got).reshape(2, 2, 64, 512)
  assert bool(jnp.all(err <= bound[:, :, None, :] + 1e-7))
  # ... and the codes are the nearest levels (a tighter check than the bound).
  v = (w.reshape(2, 2, 64, 512) / c[:, :, None, :]).reshape(-1)
  nearest = jnp.argmin(jnp.abs(v.reshape(-1, 1) - jnp.asarray(quant.nf_codebook(4)).reshape(1, -1)),
                       axis=1)
  codes = quant._unpack(q["codes"]).reshape(-1)
  assert float(jnp.mean(codes == nearest)) > 0.999   # ties at exact midpoints may differ
  # Idempotent: re-quantizing the result picks the same codes; without double
  # quantization (exact absmax) the values come back unchanged.
  np.testing.assert_array_equal(quant.quantize(got)["codes"], q["codes"])
  single = quant.roundtrip(w, double=False)
  np.testing.assert_allclose(quant.roundtrip(single, double=False), single, rtol=1e-6, atol=0)


def test_nf4_storage_bits_per_parameter():
  d_in, d_out = 128, 512
  q = quant.quantize(jnp.ones((d_in, d_out)))
  expected = 4 + 8 / 64 + 32 / (64 * 256) + 32 / (d_in * d_out)   # + one offset per matrix
  assert quant.bits_per_param(q, d_in, d_out) == pytest.approx(expected)
  assert q["codes"].dtype == jnp.uint8 and q["codes"].shape == (d_in // 2, d_out)


def test_qlora_drops_the_kernel_and_equals_lora_on_the_dequantized_base(params):
  s = spec("qlora")
  frozen, trainable = qlora.init(jax.random.PRNGKey(2), params, s)
  up = frozen["layers"]["mlp"]["up"]
  assert "kernel" not in up and up["quant_codes"].dtype == jnp.uint8
  trainable = jax.tree.map(lambda x: x + 0.05, trainable)
  # LoRA on a base whose kernels are the dequantized NF4 weights: the same forward.
  deq = base.flatten(params)
  for path in adapters.lora.targets(params, s):
    deq[path + "/kernel"] = quant.roundtrip(deq[path + "/kernel"])
  lo = adapters.lora
  lo_logits = decoder.apply(lo.combine(base.unflatten(deq), trainable, s), TOKENS, CFG,
                            linear=lo.linear_hook(s))
  q_logits = decoder.apply(qlora.combine(frozen, trainable, s), TOKENS, CFG,
                           linear=qlora.linear_hook(s))
  np.testing.assert_allclose(q_logits, lo_logits, rtol=1e-6, atol=1e-6)


def test_quantized_arrays_shard_like_the_weight(params):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  s = spec("qlora")
  frozen, trainable = qlora.init(jax.random.PRNGKey(2), params, s)
  f_axes, _ = qlora.logical_axes(decoder.logical_axes(CFG), trainable, s)
  shard = sharding.tree_shardings(f_axes, frozen, mesh)
  up = shard["layers"]["mlp"]["up"]            # kernel axes (layers, embed, mlp)
  assert up["quant_codes"].spec == jax.P(None, "fsdp", "tensor")
  assert up["quant_absmax_q"].spec == jax.P(None, None, "tensor")  # 1 block along d_in=32
  placed = jax.device_put(frozen, shard)
  np.testing.assert_array_equal(placed["layers"]["mlp"]["up"]["quant_codes"],
                                frozen["layers"]["mlp"]["up"]["quant_codes"])


def test_lq_lora_beats_plain_nf4_and_improves_with_iterations(params):
  w = params["layers"]["mlp"]["up"]["kernel"]
  nf4 = float(jnp.linalg.norm(w - quant.roundtrip(w)))
  one = float(lq_lora.decomposition_error(w, spec("lq_lora", iters=1)))
  four = float(lq_lora.decomposition_error(w, spec("lq_lora", iters=4)))
  assert four <= one + 1e-6 and one < nf4


def test_lsq_forward_levels_and_gradients():
  w = jnp.array([[-1.3, 0.2, 0.7], [0.05, 2.9, -0.4], [0.6, -0.1, 0.3], [-3.5, 0.9, 0.0]])
  step = jnp.array([[0.5, 0.5, 0.5]])       # one group of 4 rows per column
  qn, qp = l4q.q_range(3)                   # -4 .. 3
  wq = l4q.lsq(w, step, qn, qp)
  np.testing.assert_allclose(wq, 0.5 * np.clip(np.round(np.asarray(w) / 0.5), -4, 3))
  gw, gs = jax.grad(lambda w, s: jnp.sum(l4q.lsq(w, s, qn, qp) * 1.0), argnums=(0, 1))(w, step)
  v = np.asarray(w) / 0.5
  inside = (v >= -4) & (v <= 3)
  np.testing.assert_array_equal(gw, inside.astype(np.float32))
  per = np.where(inside, np.round(v) - v, np.clip(v, -4, 3))
  np.testing.assert_allclose(gs, per.sum(0, keepdims=True) / np.sqrt(4 * 3), rtol=1e-6)


def test_l4q_levels_per_group_and_export_reproduces_training(params):
  s = spec("l4q", bits=3, group=16)
  frozen, trainable = l4q.init(jax.random.PRNGKey(2), params, s)
  trainable = jax.tree.map(lambda x: x + 0.01 * jnp.ones_like(x), trainable)
  merged = l4q.merge(frozen, trainable, s)
  w = merged["layers"]["mlp"]["up"]["kernel"]          # (2, 32, 64), groups of 16 rows
  groups = np.asarray(w).reshape(2, 2, 16, 64).transpose(0, 1, 3, 2).reshape(-1, 16)
  assert max(len(np.unique(g)) for g in groups) <= 2 ** 3
  codes, steps = l4q.export(frozen, trainable, s)["layers/mlp/up"]
  assert codes.dtype == jnp.int8 and int(codes.min()) >= -4 and int(codes.max()) <= 3
  np.testing.assert_array_equal(codes.astype(jnp.float32) * jnp.repeat(steps, 16, axis=-2), w)
  unmerged = decoder.apply(l4q.combine(frozen, trainable, s), TOKENS, CFG, linear=l4q.linear_hook(s))
  np.testing.assert_allclose(decoder.apply(merged, TOKENS, CFG), unmerged, rtol=1e-5, atol=1e-5)


def test_qalora_quantizes_layer_inputs(params):
  s = spec("qalora", act_bits=4, act_init=0.1)
  frozen, trainable = qalora.init(jax.random.PRNGKey(2), params, s)   # no calib: act_init
  np.testing.assert_allclose(trainable["layers"]["attn"]["q"]["act_step"], [0.1, 0.1])
  x = jax.random.normal(jax.random.PRNGKey(4), (3, 5, 32))
  xq = qalora.lsq_act(x, jnp.float32(0.1), 4)
  assert len(np.unique(np.asarray(xq))) <= 16
  np.testing.assert_allclose(xq, 0.1 * np.clip(np.round(np.asarray(x) / 0.1), -8, 7), atol=1e-6)
  g = jax.grad(lambda st: jnp.sum(qalora.lsq_act(x, st, 4)))(jnp.float32(0.1))
  v = np.asarray(x) / 0.1
  inside = (v >= -8) & (v <= 7)
  expect = np.sum(np.where(inside, np.round(v) - v, np.clip(v, -8, 7))) / np.sqrt(32 * 7)
  np.testing.assert_allclose(g, expect, rtol=1e-4)
