"""Hyena-style long-convolution LM whose long convolutions run through the FlashFFTConv op.

"FlashFFTConv: Efficient Convolutions for Long Sequences with Tensor Cores" (the kernel,
`jaxft_kernels.fft_conv`) on the Hyena operator of order N (default 2): per block

    (v, x_1, ..., x_N) = shortconv_3(in(x)),           causal depthwise, kernel 3
    z_0 = v,   z_i = x_i ⊙ (h_i ∗ z_{i-1} + D_i ⊙ z_{i-1}),   y = out(z_N)

with causal long convolutions ∗ (FFT size 2L, the kernel's fused post-gate carries x_i)
and implicit filters h_i[t] = MLP_i(PE(t)) · exp(-|δ_c| t / max_len): a sine-activated
MLP on positional features PE(t) = (t / max_len, cos(2π f t / max_len), sin(...)) and a
per-channel exponential decay (δ from |log target| / decay_slow to / decay_fast).
Blocks are pre-norm residual, mixer then a gated MLP (as in the decoder), stacked on a
`layers` axis under `lax.scan`; embeddings tied by default.

Switches: `filter_len` (partial convolution: filters of that many taps, 0 = full),
`freq_keep` (frequency-sparse: keep that fraction of the spectrum's low-frequency
blocks), `conv_impl` ∈ {direct, jnp_fft, monarch, pallas}. Same `init / apply /
logical_axes` contract as the decoder; `apply` has no KV cache (generation re-runs the
prefix) and ignores `segment_ids`/`positions`: packed documents see their predecessors
in a row, as in Hyena's stream training (set `data.packing=False` to avoid it).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxft import names
from jaxft.models import layers
from jaxft.models.layers import dense

Params = dict[str, Any]
CONV_IMPLS = ('direct', 'jnp_fft', 'monarch', 'pallas')
CHOICES = {
    'norm': ('rms', 'layer'),
    'mlp': ('swiglu', 'geglu', 'gelu'),
    'conv_impl': CONV_IMPLS,
    'remat': ('none', 'full', 'dots'),
}
_MIXER_INDEX = {'mixer/in': 10, 'mixer/out': 11}


@dataclasses.dataclass(frozen=True)
class HyenaConfig:
  """Architecture of a Hyena LM; the defaults are a tiny model."""
  vocab_size: int = 256
  d_model: int = 64
  n_layers: int = 2
  d_ff: int = 256
  order: int = 2               # number of gated long convolutions per mixer
  short_conv: int = 3          # causal depthwise short-conv taps
  filter_dim: int = 32         # implicit-filter MLP width
  filter_emb: int = 9          # positional features: 1 + 2 * bands (odd)
  filter_layers: int = 2       # hidden sine layers of the filter MLP
  filter_freq: float = 1.0     # initial sine frequency
  decay_fast: float = 0.3      # fastest channel reaches decay_target at t = decay_fast * max_len
  decay_slow: float = 1.5
  decay_target: float = 1e-2
  max_len: int = 2048          # positions are normalised by it; sequences must fit
  filter_len: int = 0          # partial convolution: filter taps (0 = the sequence length)
  freq_keep: float = 1.0       # frequency-sparse: kept fraction of spectrum blocks (1 = dense)
  conv_impl: str = 'pallas'    # 'direct' | 'jnp_fft' | 'monarch' | 'pallas'
  conv_n2: int = 0             # inner FFT factor (0 = automatic)
  norm: str = 'rms'
  norm_eps: float = 1e-5
  norm_offset: float = 0.0
  mlp: str = 'swiglu'
  gelu_approximate: bool = True
  tie_embeddings: bool = True
  remat: str = 'none'
  param_dtype: str = 'float32'
  init_std: float = 0.02

  def __post_init__(self):
    for field, choices in CHOICES.items():
      value = getattr(self, field)
      if value not in choices:
        raise ValueError(f"HyenaConfig.{field}={value!r} is invalid; valid choices: "
                         f"{', '.join(repr(c) for c in choices)}")
    if self.order < 1 or self.short_conv < 1 or self.filter_emb < 3 or self.filter_emb % 2 == 0:
      raise ValueError(f"HyenaConfig: need order >= 1, short_conv >= 1 and an odd filter_emb >= 3, "
                       f"got {self.order}, {self.short_conv}, {self.filter_emb}")
    if not 0.0 < self.freq_keep <= 1.0:
      raise ValueError(f"HyenaConfig.freq_keep={self.freq_keep} must be in (0, 1]")
    if self.freq_keep < 1.0 and self.conv_impl == 'direct':
      raise ValueError("HyenaConfig: freq_keep < 1 needs an FFT conv_impl "
                       "('jnp_fft', 'monarch' or 'pallas'), not 'direct'")
    if self.filter_len < 0 or self.filter_len > self.max_len:
      raise ValueError(f"HyenaConfig.filter_len={self.filter_len} must be in [0, max_len={self.max_len}]")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'HyenaConfig':
    """Builds a config from a dict or ConfigDict; unknown keys raise ValueError."""
    d = dict(d.to_dict() if hasattr(d, 'to_dict') else d)
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in d:
      if key not in valid:
        raise ValueError(names.unknown_message('HyenaConfig field', key, valid))
    return cls(**d)

  def num_params(self) -> int:
    return sum(math.prod(s.shape) for s in jax.tree.leaves(_specs(self), is_leaf=_is_spec))


DecoderConfig = HyenaConfig  # the name `jaxft.build.load_model` looks up on a model module
DEFAULTS: dict[str, Any] = dataclasses.asdict(HyenaConfig())


class _Spec(NamedTuple):
  shape: tuple[int, ...]
  axes: tuple[Optional[str], ...]
  init: str    # 'normal' | 'normal_out' | 'scale' | 'zeros' | 'unit' | 'freq' | 'fan_in:<n>'


def _specs(cfg: HyenaConfig) -> Params:
  l, d, f, n = cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.order
  e, w, s = cfg.filter_emb, cfg.filter_dim, cfg.filter_layers
  lin = lambda din, dout, ax, init='normal': {'kernel': _Spec((l, din, dout), ('layers',) + ax, init)}
  norm = lambda: {'scale': _Spec((l, d), ('layers', 'norm'), 'scale')}
  mixer = {
      'in': lin(d, (n + 1) * d, ('embed', None)),
      'short': {'kernel': _Spec((l, cfg.short_conv, (n + 1) * d), ('layers', None, None),
                                f'fan_in:{cfg.short_conv}')},
      'filter': {
          'w0': _Spec((l, e, w), ('layers', None, None), f'fan_in:{e}'),
          'b0': _Spec((l, w), ('layers', None), f'fan_in:{e}'),
          'w': _Spec((l, s, w, w), ('layers', None, None, None), f'fan_in:{w}'),
          'b': _Spec((l, s, w), ('layers', None, None), f'fan_in:{w}'),
          'freq': _Spec((l, s + 1, w), ('layers', None, None), 'freq'),
          'w_out': _Spec((l, w, n * d), ('layers', None, None), f'fan_in:{w}'),
      },
      'skip': _Spec((l, n, d), ('layers', None, 'norm'), 'unit'),
      'out': lin(d, d, (None, 'embed'), 'normal_out'),
  }
  mlp = {'up': lin(d, f, ('embed', 'mlp')), 'down': lin(f, d, ('mlp', 'embed'), 'normal_out')}
  if cfg.mlp != 'gelu':
    mlp['gate'] = lin(d, f, ('embed', 'mlp'))
  tree = {'embed': {'embedding': _Spec((cfg.vocab_size, d), ('vocab', 'embed'), 'normal')},
          'layers': {'mixer_norm': norm(), 'mixer': mixer, 'mlp_norm': norm(), 'mlp': mlp},
          'final_norm': {'scale': _Spec((d,), ('norm',), 'scale')}}
  if not cfg.tie_embeddings:
    tree['lm_head'] = {'kernel': _Spec((d, cfg.vocab_size), ('embed', 'vocab'), 'normal')}
  return tree


def _is_spec(x) -> bool:
  return isinstance(x, _Spec)


def init(key: jax.Array, cfg: HyenaConfig) -> Params:
  """Random params: projections ~ normal(init_std) (out / down scaled by 1/sqrt(2·layers)),
  filter MLP and short conv ~ uniform(±1/sqrt(fan_in)) (PyTorch's default), sine
  frequencies = filter_freq, skips D ~ normal(0, 1), norm scales 1."""
  leaves, treedef = jax.tree.flatten(_specs(cfg), is_leaf=_is_spec)
  keys = jax.random.split(key, len(leaves))
  dtype = jnp.dtype(cfg.param_dtype)

  def make(k, s: _Spec):
    if s.init == 'zeros':
      return jnp.zeros(s.shape, dtype)
    if s.init == 'scale':
      return jnp.full(s.shape, 1.0 - cfg.norm_offset, dtype)
    if s.init == 'freq':
      return jnp.full(s.shape, cfg.filter_freq, dtype)
    if s.init.startswith('fan_in:'):
      bound = 1.0 / math.sqrt(int(s.init.split(':')[1]))
      return jax.random.uniform(k, s.shape, jnp.float32, -bound, bound).astype(dtype)
    std = {'unit': 1.0, 'normal': cfg.init_std,
           'normal_out': cfg.init_std / math.sqrt(2 * cfg.n_layers)}[s.init]
    return (std * jax.random.normal(k, s.shape, jnp.float32)).astype(dtype)

  return jax.tree.unflatten(treedef, [make(k, s) for k, s in zip(keys, leaves)])


def logical_axes(cfg: HyenaConfig) -> Params:
  """Same tree as `init(key, cfg)`; each leaf is a tuple of logical axis names."""
  return jax.tree.map(lambda s: s.axes, _specs(cfg), is_leaf=_is_spec)


# ---------------------------------------------------------------------------
# Forward pass.


def implicit_filters(fp: Params, cfg: HyenaConfig, length: int) -> jax.Array:
  """(order, D, length) float32 filters h_i[t] = MLP(PE(t)) · exp(-|δ_c| t / max_len)."""
  t = jnp.arange(length, dtype=jnp.float32)
  bands = (cfg.filter_emb - 1) // 2
  freqs = jnp.linspace(1e-4, bands - 1, bands, dtype=jnp.float32)
  angle = 2 * math.pi * t[:, None] * freqs[None, :] / cfg.max_len
  pe = jnp.concatenate([t[:, None] / cfg.max_len, jnp.cos(angle), jnp.sin(angle)], axis=-1)
  f32 = lambda name: fp[name].astype(jnp.float32)
  freq = f32('freq')
  h = jnp.sin(freq[0][None] * (pe @ f32('w0') + f32('b0')[None]))
  for i in range(cfg.filter_layers):
    h = jnp.sin(freq[i + 1][None] * (h @ f32('w')[i] + f32('b')[i][None]))
  h = h @ f32('w_out')                                        # (T, order * D)
  target = abs(math.log(cfg.decay_target))
  deltas = jnp.linspace(target / cfg.decay_slow, target / cfg.decay_fast,
                        cfg.order * cfg.d_model, dtype=jnp.float32)
  h = h * jnp.exp(-(t / cfg.max_len)[:, None] * deltas[None, :])
  return h.reshape(length, cfg.order, cfg.d_model).transpose(1, 2, 0)


def long_conv(v_BxDxL: jax.Array, h_DxT: jax.Array, gate_BxDxL: jax.Array,
              cfg: HyenaConfig) -> jax.Array:
  """gate ⊙ (h ∗ v) with the configured implementation (all exact up to float error)."""
  from jaxft_kernels import fft_conv as fc  # pylint: disable=g-import-not-at-top
  n2 = cfg.conv_n2 or None
  if cfg.conv_impl == 'direct':
    return fc.direct_conv_reference(v_BxDxL, h_DxT, None, gate_BxDxL)
  if cfg.conv_impl == 'jnp_fft':
    return fc.fft_conv_reference(v_BxDxL, h_DxT, None, gate_BxDxL, n2=n2, freq_keep=cfg.freq_keep)
  if cfg.conv_impl == 'monarch':
    return fc.fft_conv_monarch(v_BxDxL, h_DxT, None, gate_BxDxL, n2=n2, freq_keep=cfg.freq_keep)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    return fc.fft_conv_sharded(v_BxDxL, h_DxT, None, gate_BxDxL, mesh=mesh, n2=n2,
                               freq_keep=cfg.freq_keep)
  return fc.fft_conv(v_BxDxL, h_DxT, None, gate_BxDxL, n2=n2, freq_keep=cfg.freq_keep)


def short_conv(w_SxC: jax.Array, z_BxLxC: jax.Array) -> jax.Array:
  """Causal depthwise convolution y[t] = Σ_j w[j] z[t - j] (zero before the row)."""
  s, l = w_SxC.shape[0], z_BxLxC.shape[1]
  zp = jnp.pad(z_BxLxC, ((0, 0), (s - 1, 0), (0, 0)))
  return sum(zp[:, s - 1 - j: s - 1 - j + l] * w_SxC[j][None, None] for j in range(s))


def mixer(p: Params, x_BxLxD: jax.Array, cfg: HyenaConfig, *, rng: Optional[jax.Array],
          linear: layers.Linear) -> jax.Array:
  """The Hyena operator of one layer on normed input; (B, L, D) after the out projection."""
  b, l, d = x_BxLxD.shape
  key = lambda name: None if rng is None else jax.random.fold_in(rng, _MIXER_INDEX[name])
  z_BxLxC = linear(p['in'], x_BxLxD, 'mixer/in', key('mixer/in'))
  z_BxLxC = short_conv(p['short']['kernel'].astype(z_BxLxC.dtype), z_BxLxC)
  z_BxCxL = jnp.swapaxes(z_BxLxC, 1, 2).reshape(b, cfg.order + 1, d, l)
  taps = min(cfg.filter_len or l, l)
  h_NxDxT = implicit_filters(p['filter'], cfg, taps)
  v_BxDxL = z_BxCxL[:, 0]
  for i in range(cfg.order):
    gate_BxDxL = z_BxCxL[:, i + 1]
    skip = p['skip'][i].astype(v_BxDxL.dtype)[None, :, None]
    v_BxDxL = long_conv(v_BxDxL, h_NxDxT[i], gate_BxDxL, cfg) + gate_BxDxL * skip * v_BxDxL
  return linear(p['out'], jnp.swapaxes(v_BxDxL, 1, 2), 'mixer/out', key('mixer/out'))


def _block(cfg: HyenaConfig, linear):
  def body(x_BxLxD, xs):
    p, rng = xs
    x_BxLxD = x_BxLxD + mixer(p['mixer'], layers.norm(p['mixer_norm'], x_BxLxD, cfg), cfg,
                              rng=rng, linear=linear)
    h_BxLxD = layers.norm(p['mlp_norm'], x_BxLxD, cfg)
    return x_BxLxD + layers.mlp(p['mlp'], h_BxLxD, cfg, rng=rng, linear=linear), None

  if cfg.remat == 'full':
    return jax.checkpoint(body, prevent_cse=False)
  if cfg.remat == 'dots':
    return jax.checkpoint(body, prevent_cse=False,
                          policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  return body


def apply(params: Params, tokens_BxL: jax.Array, cfg: HyenaConfig, *,
          positions: Optional[jax.Array] = None, segment_ids: Optional[jax.Array] = None,
          cache: Optional[Params] = None, cache_index: Optional[jax.Array] = None,
          linear: layers.Linear = dense, rng: Optional[jax.Array] = None) -> jax.Array:
  """(B, L, V) float32 next-token logits (causal: logits at t see tokens <= t only).

  `positions` and `segment_ids` are accepted for the model contract and ignored;
  `cache` is not supported (raises).
  """
  del positions, segment_ids, cache_index
  if cache is not None:
    raise ValueError("the hyena model has no KV cache; call apply without cache=")
  b, l = tokens_BxL.shape
  if l > cfg.max_len:
    raise ValueError(f"hyena: sequence length {l} exceeds max_len={cfg.max_len}")
  x_BxLxD = params['embed']['embedding'][tokens_BxL]
  layer_rngs, head_rng = None, None
  if rng is not None:
    keys = jax.random.split(rng, cfg.n_layers + 1)
    layer_rngs, head_rng = keys[:cfg.n_layers], keys[cfg.n_layers]
  x_BxLxD, _ = jax.lax.scan(_block(cfg, linear), x_BxLxD, (params['layers'], layer_rngs))
  x_BxLxD = layers.norm(params['final_norm'], x_BxLxD, cfg)
  if cfg.tie_embeddings:
    return jnp.einsum('BLD,VD->BLV', x_BxLxD, params['embed']['embedding'],
                      preferred_element_type=jnp.float32)
  return linear(params['lm_head'], x_BxLxD, 'lm_head', head_rng).astype(jnp.float32)
