"""Sparse kernels: N:M (2:4) matmul from a compressed weight, and the block sparse-delta
scatter / SDDMM / linear. Forward and gradients against the jnp references in interpret
mode (both kernel bodies), on a mesh, lowered for TPU ahead of time, and on a GPU if present.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft_kernels import common
from jaxft_kernels import nm_sparse as nm
from jaxft_kernels import sparse_delta as sd

P = jax.P


def close(got, want, rtol=1e-5):
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(want))))


def normal(seed, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


# --- N:M mask and compressed storage ----------------------------------------------------

def numpy_mask(w, n, m):
  """Brute force: per group of m inputs, keep the n largest |w|, lower index first on ties."""
  w = np.asarray(w)
  keep = np.zeros(w.shape, bool)
  for g in range(0, w.shape[0], m):
    for j in range(w.shape[1]):
      col = np.abs(w[g:g + m, j])
      order = sorted(range(len(col)), key=lambda i: (-col[i], i))
      keep[[g + i for i in order[:n]], j] = True
  return keep


def test_nm_mask_closed_form_and_ties():
  w = jnp.array([[1.0, -3.0], [1.0, 2.0], [1.0, 3.0], [1.0, 0.0]])
  np.testing.assert_array_equal(nm.nm_mask(w, 2, 4), [[1, 1], [1, 0], [0, 1], [0, 0]])


@pytest.mark.parametrize("n,m,d_in", [(2, 4, 22), (2, 8, 40)])
def test_nm_mask_and_compress_roundtrip(n, m, d_in):
  w = jnp.round(normal(n + m + d_in, (d_in, 12)) * 2) / 2   # rounding makes ties
  mask = jax.jit(nm.nm_mask, static_argnums=(1, 2))(w, n, m)
  np.testing.assert_array_equal(mask, numpy_mask(w, n, m))
  full_groups = (d_in // m) * m
  counts = np.asarray(mask[:full_groups]).reshape(-1, m, 12).sum(1)
  assert (counts == n).all()
  values, meta = jax.jit(nm.nm_compress, static_argnums=(1, 2))(w, n, m)
  assert values.shape == (n, -(-d_in // m), 12) and meta.dtype == jnp.uint8
  np.testing.assert_array_equal(nm.nm_decompress(values, meta, n, m, d_in=d_in), w * mask)


def test_nm_storage_is_0625_of_dense_bf16_and_bad_patterns_raise():
  w = normal(0, (64, 32), jnp.bfloat16)
  values, meta = nm.nm_compress(w)
  assert values.nbytes + meta.nbytes == 0.625 * w.nbytes
  with pytest.raises(ValueError, match="n=3, m=2"):
    nm.nm_mask(w, 3, 2)
  with pytest.raises(ValueError, match="index bits"):
    nm.nm_compress(w, 4, 8)          # a 4:8 mask is fine; its uint8 metadata is not


# --- N:M matmul -------------------------------------------------------------------------

def nm_operands(mrows, d_in, d_out, dtype=jnp.float32, seed=0):
  w = normal(seed, (d_in, d_out))
  values, meta = nm.nm_compress(w)
  return normal(seed + 1, (mrows, d_in), dtype), values.astype(dtype), meta, w * nm.nm_mask(w)


@pytest.mark.parametrize("variant,shape", [("grid_k", (20, 530, 140)), ("loop_k", (9, 70, 20))])
def test_nm_matmul_forward_and_gradients_match_reference(variant, shape):
  x, values, meta, w_masked = nm_operands(*shape)
  cot = normal(7, (shape[0], shape[2]))
  f = lambda x, v: nm.nm_sparse_matmul(x, v, meta, interpret=True, variant=variant)
  r = lambda x, v: nm.nm_sparse_matmul_reference(x, v, meta)
  y, grads = common.jit_value_and_vjp(f, (x, values), cot)
  y_ref, grads_ref = common.jit_value_and_vjp(r, (x, values), cot)
  close(y, x @ w_masked)  # = x·(W ⊙ mask)
  close(y, y_ref)
  for g, g_ref in zip(grads, grads_ref):
    close(g, g_ref)


def test_nm_matmul_bf16_within_rel_l2():
  x, values, meta, w_masked = nm_operands(24, 136, 130, jnp.bfloat16, seed=3)
  y = jax.jit(lambda x, v: nm.nm_sparse_matmul(x, v, meta, interpret=True))(x, values)
  assert y.dtype == jnp.bfloat16
  assert common.rel_l2(y, x.astype(jnp.float32) @ w_masked) <= 1e-2


@pytest.mark.parametrize("mesh_shape,out_axis", [((8,), None), ((4, 2), "tensor")])
def test_nm_matmul_shard_map(mesh_shape, out_axis):
  mesh = common.cpu_mesh(mesh_shape, ("data", "tensor")[:len(mesh_shape)])
  x, values, meta, w_masked = nm_operands(16, 40, 256)
  f = jax.jit(lambda x, v: nm.nm_sparse_matmul_sharded(x, v, meta, mesh=mesh, out_axis=out_axis,
                                                       interpret=True))
  close(f(x, values), x @ w_masked)


# --- block sparse delta -----------------------------------------------------------------

BS = (4, 8)
W_SHAPE = (16, 32)
COORDS = [[0, 1], [3, 3], [2, 0], [1, 2]]


def sd_operands(mrows=11, seed=0):
  blocks = sd.make_blocks(COORDS, W_SHAPE, BS)
  rows, cols = sd.expand_blocks(blocks, BS)
  return (normal(seed, (mrows, W_SHAPE[0])), normal(seed + 1, W_SHAPE), blocks,
          normal(seed + 2, (len(COORDS),) + BS), rows, cols)


def test_make_blocks_rejects_duplicates_and_bad_coordinates():
  with pytest.raises(ValueError, match="duplicate"):
    sd.make_blocks([[0, 1], [2, 2], [0, 1]], W_SHAPE, BS)
  with pytest.raises(ValueError, match="must lie in"):
    sd.make_blocks([[4, 0]], W_SHAPE, BS)
  with pytest.raises(ValueError, match="multiple of block_shape"):
    sd.make_blocks([[0, 0]], (10, 32), BS)


@pytest.mark.parametrize("variant", ("grid_k", "loop_k"))
def test_sparse_delta_scatter_and_sddmm_match_element_references(variant):
  x, w, blocks, phi, rows, cols = sd_operands(mrows=13)
  dy = normal(5, (13, W_SHAPE[1]))
  cot = normal(6, W_SHAPE)
  f = lambda w, phi: sd.sparse_delta_scatter(w, blocks, phi, interpret=True, variant=variant)
  r = lambda w, phi: sd.sparse_delta_scatter_reference(w, rows, cols, phi.reshape(-1)).reshape(W_SHAPE)
  out, grads = common.jit_value_and_vjp(f, (w, phi), cot)
  out_ref, grads_ref = common.jit_value_and_vjp(r, (w, phi), cot)
  close(out, out_ref)
  close(grads[0], grads_ref[0])
  close(grads[1], grads_ref[1])
  dphi = jax.jit(lambda x, dy: sd.sparse_delta_sddmm(x, dy, blocks, BS, interpret=True,
                                                     variant=variant))(x, dy)
  close(dphi.reshape(-1), (x.T @ dy)[rows, cols])  # the gathered full gradient
  close(dphi.reshape(-1), sd.sparse_delta_sddmm_reference(x, dy, rows, cols))


@pytest.mark.parametrize("variant", ("grid_k", "loop_k"))
def test_sparse_delta_matmul_forward_and_gradients(variant):
  x, w, blocks, phi, rows, cols = sd_operands()
  bias = normal(9, (W_SHAPE[1],))
  cot = normal(7, (x.shape[0], W_SHAPE[1]))
  f = lambda x, w, phi, bias: sd.sparse_delta_matmul(x, w, blocks, phi, bias=bias, interpret=True,
                                                     variant=variant)
  r = lambda x, w, phi, bias: sd.sparse_delta_matmul_reference(x, w, rows, cols, phi.reshape(-1),
                                                               bias=bias)
  y, grads = common.jit_value_and_vjp(f, (x, w, phi, bias), cot)
  y_ref, grads_ref = common.jit_value_and_vjp(r, (x, w, phi, bias), cot)
  close(y, y_ref)
  for g, g_ref in zip(grads, grads_ref):
    close(g, g_ref)


def test_sparse_delta_frozen_w_backward_has_no_dense_weight_gradient():
  x, w, blocks, phi, _, _ = sd_operands()
  loss = lambda x, w, phi: jnp.sum(sd.sparse_delta_matmul(x, w, blocks, phi, interpret=True) ** 2)
  assert W_SHAPE not in common.dot_output_shapes(jax.make_jaxpr(jax.grad(loss, (0, 2)))(x, w, phi).jaxpr)
  assert W_SHAPE in common.dot_output_shapes(jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(x, w, phi).jaxpr)


def test_sparse_delta_matmul_shard_map_gradients():
  mesh = common.cpu_mesh((8,), ("data",))
  x, w, blocks, phi, rows, cols = sd_operands(mrows=16)
  f = lambda x, phi: jnp.sum(sd.sparse_delta_matmul_sharded(x, w, blocks, phi, mesh=mesh,
                                                            interpret=True) ** 2)
  r = lambda x, phi: jnp.sum(sd.sparse_delta_matmul_reference(x, w, rows, cols, phi.reshape(-1)) ** 2)
  got = jax.jit(jax.value_and_grad(f, (0, 1)))(x, phi)
  jax.tree.map(close, got, jax.jit(jax.value_and_grad(r, (0, 1)))(x, phi))


# --- real lowerings ---------------------------------------------------------------------

@pytest.mark.skipif(not common.has_libtpu(), reason="needs libtpu (pip install 'jax[tpu]')")
def test_sparse_ops_lower_for_tpu_through_mosaic():
  bf16 = jnp.bfloat16
  nm_args = [jax.ShapeDtypeStruct((4 * 8, 1000), bf16), jax.ShapeDtypeStruct((2, 250, 300), bf16),
             jax.ShapeDtypeStruct((250, 300), jnp.uint8)]
  nm_fn = lambda x, v, meta: nm.nm_sparse_matmul(x, v, meta, interpret=False)
  compiled = common.tpu_aot_compile(nm_fn, nm_args, (P("data"), P(), P()), P("data"))
  assert "tpu_custom_call" in compiled.as_text()
  sd_args = [jax.ShapeDtypeStruct((4 * 40, 64), bf16), jax.ShapeDtypeStruct((64, 256), bf16),
             jax.ShapeDtypeStruct((3, 2), jnp.int32), jax.ShapeDtypeStruct((3, 16, 128), jnp.float32)]
  sd_fn = lambda x, w, blocks, phi: jax.grad(lambda x, phi: jnp.sum(sd.sparse_delta_matmul(
      x, w, blocks, phi, interpret=False).astype(jnp.float32)), (0, 1))(x, phi)
  compiled = common.tpu_aot_compile(sd_fn, sd_args, (P("data"), P(), P(), P()), (P("data"), P()))
  text = compiled.as_text()
  assert "sparse_delta_scatter" in text and "sparse_delta_sddmm" in text


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_sparse_ops_on_gpu_match_references():
  x, values, meta, w_masked = nm_operands(64, 512, 256, jnp.bfloat16)
  y = nm.nm_sparse_matmul(x, values, meta, interpret=False)
  assert common.rel_l2(y, x.astype(jnp.float32) @ w_masked) <= 1e-2
  w, bs = normal(1, (256, 512)), (16, 16)
  blocks = sd.make_blocks([[0, 1], [5, 7], [15, 31]], w.shape, bs)
  rows, cols = sd.expand_blocks(blocks, bs)
  phi, xs, dy = normal(2, (3,) + bs), normal(3, (100, 256)), normal(4, (100, 512))
  close(sd.sparse_delta_scatter(w, blocks, phi, interpret=False),
        sd.sparse_delta_scatter_reference(w, rows, cols, phi.reshape(-1)))
  close(sd.sparse_delta_sddmm(xs, dy, blocks, bs, interpret=False).reshape(-1),
        (xs.T @ dy)[rows, cols], rtol=1e-4)
