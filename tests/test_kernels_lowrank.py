"""Fused low-rank matmul (kernels/lora_matmul): forward and gradients against the jnp reference.

Interpret mode on CPU (both kernel bodies), a mesh via shard_map, Mosaic TPU lowering
ahead of time (needs libtpu), a real GPU run (skipped without one), and a tiny decoder
whose LoRA linear hook runs through the op.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft_kernels import common
from jaxft_kernels.lora_matmul import ops
from jaxft_kernels.lora_matmul.reference import lora_matmul_reference

P = jax.P
VARIANTS = ("grid_k", "loop_k")
# (M, d_in, d_out, r): ragged everywhere; 300 rows and 150 inputs span two blocks on 'grid_k'.
SHAPES = [(1, 8, 16, 1), (300, 150, 140, 3), (7, 129, 9, 16), (13, 40, 72, 5)]


def operands(shape, dtype=jnp.float32, seed=0, bias=True):
  m, k, n, r = shape
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (m, k), dtype)
  w = (jax.random.normal(ks[1], (k, n)) / np.sqrt(k)).astype(dtype)
  a = (jax.random.normal(ks[2], (k, r)) / np.sqrt(k)).astype(dtype)
  b = jax.random.normal(ks[3], (r, n), dtype)
  return x, w, a, b, (jax.random.normal(ks[4], (n,), dtype) if bias else None)


def close(got, want, rtol=1e-5):
  """allclose with atol scaled to the array (f32 sums reordered across blocks)."""
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(want))))


def fused(variant, **kw):
  return lambda x, w, a, b, bias: ops.lora_matmul(x, w, a, b, scale=0.7, bias=bias,
                                                  interpret=True, variant=variant, **kw)


def ref(x, w, a, b, bias):
  return lora_matmul_reference(x, w, a, b, scale=0.7, bias=bias)


value_and_vjp = common.jit_value_and_vjp


# Each kernel body over ragged shapes (interpret mode compiles slowly: few cases).
CASES = [("grid_k", s) for s in SHAPES[:3]] + [("loop_k", s) for s in SHAPES[2:]]


@pytest.mark.parametrize("variant,shape", CASES)
def test_forward_and_gradients_f32_match_reference(variant, shape):
  args = operands(shape, bias=shape[0] != 1)
  cot = jax.random.normal(jax.random.key(9), (shape[0], shape[2]))
  y, grads = value_and_vjp(fused(variant), args, cot)
  y_ref, grads_ref = value_and_vjp(ref, args, cot)
  close(y, y_ref)
  for g, g_ref in zip(grads, grads_ref):
    if g_ref is not None:
      close(g, g_ref)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_within_rel_l2(variant):
  shape = (37, 136, 130, 8)
  args = operands(shape, jnp.bfloat16, seed=3)
  cot = jax.random.normal(jax.random.key(9), (shape[0], shape[2]))
  y, grads = value_and_vjp(fused(variant), args, cot)
  assert y.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  y32, grads32 = value_and_vjp(ref, [t.astype(jnp.float32) for t in args], cot)
  assert common.rel_l2(y, y32) <= 1e-2
  for g, g32 in zip(grads, grads32):
    assert common.rel_l2(g, g32) <= 2e-2


def test_frozen_w_backward_has_no_weight_gradient_gemm():
  x, w, a, b, bias = operands((16, 24, 40, 4))
  f = fused("grid_k")
  loss = lambda x, w, a, b: jnp.sum(f(x, w, a, b, bias) ** 2)
  lora_only = jax.make_jaxpr(jax.grad(loss, argnums=(0, 2, 3)))(x, w, a, b).jaxpr
  assert (24, 40) not in common.dot_output_shapes(lora_only)
  with_w = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, w, a, b).jaxpr
  assert (24, 40) in common.dot_output_shapes(with_w)  # the check can see a dW GEMM when there is one


def test_adapter_input_dropout_path_matches_reference():
  x, w, a, b, bias = operands((9, 20, 12, 3), seed=4)
  keep = jax.random.bernoulli(jax.random.key(5), 0.8, x.shape)
  drop = lambda x: jnp.where(keep, x / 0.8, 0.0)
  f = lambda x, w, a, b: jnp.sum(jnp.sin(ops.lora_matmul(
      x, w, a, b, scale=0.7, bias=bias, x_adapter=drop(x), interpret=True)))
  r = lambda x, w, a, b: jnp.sum(jnp.sin(lora_matmul_reference(
      x, w, a, b, scale=0.7, bias=bias, x_adapter=drop(x))))
  got = jax.jit(jax.value_and_grad(f, (0, 1, 2, 3)))(x, w, a, b)
  want = jax.jit(jax.value_and_grad(r, (0, 1, 2, 3)))(x, w, a, b)
  jax.tree.map(close, got, want)


def test_bad_shapes_raise():
  x, w, a, b, _ = operands((4, 8, 16, 2))
  with pytest.raises(ValueError, match="a \\(d_in, r\\)"):
    ops.lora_matmul(x, w, a.T, b, scale=1.0, interpret=True)
  with pytest.raises(ValueError, match="variant"):
    ops.lora_matmul(x, w, a, b, scale=1.0, interpret=True, variant="fast")


@pytest.mark.parametrize("mesh_shape,out_axis", [((8,), None), ((4, 2), "tensor")])
def test_shard_map_wrapper_matches_reference(mesh_shape, out_axis):
  mesh = common.cpu_mesh(mesh_shape, ("data", "tensor")[:len(mesh_shape)])
  x, w, a, b, bias = operands((16, 24, 32, 4), seed=2)
  f = lambda x, a, b: jnp.sum(ops.lora_matmul_sharded(
      x, w, a, b, scale=0.7, bias=bias, mesh=mesh, out_axis=out_axis, interpret=True) ** 2)
  r = lambda x, a, b: jnp.sum(ref(x, w, a, b, bias) ** 2)
  got = jax.jit(jax.value_and_grad(f, (0, 1, 2)))(x, a, b)
  jax.tree.map(close, got, jax.jit(jax.value_and_grad(r, (0, 1, 2)))(x, a, b))


@pytest.mark.skipif(not common.has_libtpu(), reason="needs libtpu (pip install 'jax[tpu]')")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowers_for_tpu_through_mosaic(dtype):
  shapes = [(4 * 40, 200), (200, 300), (200, 8), (8, 300), (300,)]  # ragged: padded to blocks
  args = [jax.ShapeDtypeStruct(s, dtype) for s in shapes]
  specs = (P("data"), P(), P(), P(), P())
  fwd = lambda x, w, a, b, bias: ops.lora_matmul(x, w, a, b, scale=2.0, bias=bias, interpret=False)
  compiled = common.tpu_aot_compile(fwd, args, specs, P("data"))
  assert "tpu_custom_call" in compiled.as_text()
  grad = lambda x, w, a, b, bias: jax.grad(
      lambda x, a, b: jnp.sum(fwd(x, w, a, b, bias).astype(jnp.float32)), (0, 1, 2))(x, a, b)
  compiled = common.tpu_aot_compile(grad, args, specs, (P("data"), P(), P()))
  assert "tpu_custom_call" in compiled.as_text()  # dx = dy Wᵀ + dS Aᵀ runs in the kernel


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowered_on_gpu_matches_reference(dtype):
  args = operands((300, 256, 384, 16), dtype)
  got = ops.lora_matmul(*args[:4], scale=0.7, bias=args[4], interpret=False)
  want = ref(*[t.astype(jnp.float32) for t in args])
  assert common.rel_l2(got, want) <= (1e-2 if dtype == jnp.bfloat16 else 1e-5)
  loss = lambda f: lambda x, a, b: jnp.sum(f(x, args[1], a, b, args[4]).astype(jnp.float32) ** 2)
  kern = lambda *p: ops.lora_matmul(*p[:4], scale=0.7, bias=p[4], interpret=False)
  for g, g_ref in zip(jax.grad(loss(kern), (0, 1, 2))(args[0], args[2], args[3]),
                      jax.grad(loss(ref), (0, 1, 2))(args[0], args[2], args[3])):
    assert common.rel_l2(g, g_ref) <= (2e-2 if dtype == jnp.bfloat16 else 1e-4)


# --- a tiny decoder whose LoRA linear hook runs through the op -------------------------

def lora_hook(kernel: str, scale: float):
  """jaxft's own LoRA hook with `adapter.kernel: 'reference' | 'pallas'` (rank 4, alpha 4*scale)."""
  from jaxft.adapters import lora
  return lora.linear_hook({**lora.DEFAULTS, "rank": 4, "alpha": 4 * scale, "dropout": 0.0,
                           "kernel": kernel})


def test_decoder_lora_hook_same_loss_and_gradients():
  from jaxft.models import DecoderConfig, decoder
  cfg = DecoderConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=8,
                      d_ff=24, attn_bias=True)
  params = decoder.init(jax.random.key(0), cfg)
  keys = iter(jax.random.split(jax.random.key(1), 8))
  lora = {}
  for group, name in (("attn", "q"),):
    n_layers, d_in, d_out = params["layers"][group][name]["kernel"].shape
    lora.setdefault(group, {})[name] = {
        "lora_a": 0.3 * jax.random.normal(next(keys), (n_layers, d_in, 4)),
        "lora_b": 0.3 * jax.random.normal(next(keys), (n_layers, 4, d_out))}
  tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, cfg.vocab_size)

  def loss(lora, kernel):
    p = jax.tree.map(lambda x: x, params)
    for group, by_name in lora.items():
      for name, leaves in by_name.items():
        p["layers"][group][name] = {**p["layers"][group][name], **leaves}
    logits = decoder.apply(p, tokens[:, :-1], cfg, linear=lora_hook(kernel, 2.0))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  l_ref, g_ref = jax.jit(jax.value_and_grad(lambda t: loss(t, "reference")))(lora)
  l_pal, g_pal = jax.jit(jax.value_and_grad(lambda t: loss(t, "pallas")))(lora)
  np.testing.assert_allclose(l_pal, l_ref, rtol=1e-5)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6), g_pal, g_ref)
