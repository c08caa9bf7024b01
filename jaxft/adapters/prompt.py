"""Soft prompts: prompt tuning and prefix tuning (the decoder runs both; see `decoder.prefix_kv`).

Prompt tuning — "The Power of Scale for Parameter-Efficient Prompt Tuning" (Lester et
al., 2021): n trainable embeddings P ∈ R^{n×D} are prepended to the input
embeddings, [P; E(x)]; real tokens sit at positions n, n+1, ... . Initialised from
the embeddings of random vocabulary tokens (`init='vocab'`) or N(0, std(E)²).

Prefix tuning — "Prefix-Tuning: Optimizing Continuous Prompts for Generation" (Li &
Liang, 2021): every layer ℓ attends over [K_ℓ^prefix; K_ℓ] and [V_ℓ^prefix; V_ℓ],
with n trainable key/value slots per layer, visible to every token (no RoPE on the
prefix; real tokens keep positions 0..T-1). During training the prefix is
reparameterised through a 2-layer MLP, [K; V] = tanh(E W1 + b1) W2 + b2 with E
(n, D) initialised from random token embeddings (`hidden` > 0; `hidden=0` trains
K, V directly); `materialize` computes it once, leaving the plain prefix.

Neither merges into the base weights: the merged model would need extra tokens or
key/value slots. Both run unmerged (`combine` + the decoder), with and without a
KV cache; `materialize` gives params the decoder runs (with 'prompt' / 'prefix').
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxft.adapters import base, featurewise
from jaxft.models import decoder

PROMPT_DEFAULTS = {"targets": (r"embed/embedding$",), "num_tokens": 20, "init": "vocab"}
PREFIX_DEFAULTS = {"targets": (r"attn/k/kernel$",), "num_tokens": 10, "hidden": 512,
                   "init_std": 0.02}
INITS = ("vocab", "normal")


def _tokens(spec) -> int:
  n = int(spec["num_tokens"])
  if n < 1:
    raise ValueError(f"adapter.num_tokens must be >= 1, got {n}")
  return n


def _random_rows(key, table, n: int):
  ids = jax.random.randint(key, (n,), 0, table.shape[0])
  return table[ids]


def prompt_init(key, frozen, spec: Mapping[str, Any], calib=None):
  """-> (frozen unchanged, {'prompt': {'embedding': (n, D)}})."""
  del calib
  n, how = _tokens(spec), spec["init"]
  if how not in INITS:
    raise ValueError(f"adapter.init={how!r} is invalid; valid choices: {', '.join(INITS)}")
  flat = base.flatten(frozen)
  table = flat[base.match(flat, spec["targets"])[0]]
  if table.ndim != 2:
    raise ValueError(f"prompt_tuning targets must match the (vocab, d_model) embedding table, "
                     f"got shape {table.shape}")
  if how == "vocab":
    soft = _random_rows(key, table, n)
  else:
    soft = jnp.std(table) * jax.random.normal(key, (n, table.shape[1]), table.dtype)
  return frozen, {"prompt": {"embedding": soft.astype(table.dtype)}}


def _kv_shape(frozen, spec):
  flat = base.flatten(frozen)
  w = flat[base.match(flat, spec["targets"])[0]]
  if w.ndim != 3:
    raise ValueError(f"prefix_tuning targets must match the stacked key kernels "
                     f"(n_layers, d_model, kv_dim), got shape {w.shape}")
  return w.shape[0], w.shape[1], w.shape[2], flat["embed/embedding"]


def prefix_init(key, frozen, spec: Mapping[str, Any], calib=None):
  """-> (frozen unchanged, {'prefix': MLP leaves (hidden > 0) or {'k', 'v'}})."""
  del calib
  n, hidden, std = _tokens(spec), int(spec["hidden"]), float(spec["init_std"])
  n_layers, d, kv, table = _kv_shape(frozen, spec)
  k1, k2, k3 = jax.random.split(key, 3)
  dtype = table.dtype
  if hidden <= 0:
    return frozen, {"prefix": {"k": std * jax.random.normal(k1, (n_layers, n, kv), dtype),
                               "v": std * jax.random.normal(k2, (n_layers, n, kv), dtype)}}
  return frozen, {"prefix": {
      "embed": _random_rows(k1, table, n).astype(dtype),
      "w1": featurewise.kaiming_uniform(k2, (d, hidden), d, dtype),
      "b1": jnp.zeros((hidden,), dtype),
      "w2": std * jax.random.normal(k3, (hidden, n_layers * 2 * kv), dtype),
      "b2": jnp.zeros((n_layers * 2 * kv,), dtype)}}


def prefix_values(prefix, n_layers: int):
  """{'k', 'v'}: (n_layers, n, kv) from the MLP reparameterisation (or as stored)."""
  if "k" in prefix:
    return prefix
  h = jnp.tanh(prefix["embed"] @ prefix["w1"] + prefix["b1"][None])
  kv_flat = h @ prefix["w2"] + prefix["b2"][None]
  n = kv_flat.shape[0]
  kv_Nx2xLxC = kv_flat.reshape(n, n_layers, 2, -1)
  kv = jnp.transpose(kv_Nx2xLxC, (2, 1, 0, 3))  # (2, n_layers, n, kv)
  return {"k": kv[0], "v": kv[1]}


def prefix_combine(frozen, trainable, spec):
  """Model params with params['prefix'] = {'k', 'v'} (n_layers, n, kv)."""
  n_layers = _kv_shape(frozen, spec)[0]
  return {**frozen, "prefix": prefix_values(trainable["prefix"], n_layers)}


def prompt_combine(frozen, trainable, spec):
  del spec
  return {**frozen, "prompt": trainable["prompt"]}


def linear_hook(spec):
  del spec
  return decoder.dense


def _all_replicated(model_axes, trainable, spec):
  del spec
  return model_axes, jax.tree.map(lambda x: (None,) * x.ndim, trainable)


prompt_tuning = featurewise.member(
    "prompt_tuning",
    'Prompt tuning: "The Power of Scale for Parameter-Efficient Prompt Tuning" — n soft '
    'embeddings prepended to the input, [P; E(x)].',
    DEFAULTS=dict(PROMPT_DEFAULTS), init=prompt_init, logical_axes=_all_replicated,
    combine=prompt_combine, linear_hook=linear_hook, materialize=prompt_combine,
    merge=featurewise.not_mergeable("prompt_tuning", "the soft prompt is extra input tokens"),
    MERGEABLE=False)
prefix_tuning = featurewise.member(
    "prefix_tuning",
    'Prefix tuning: "Prefix-Tuning: Optimizing Continuous Prompts for Generation" — n '
    'trainable key/value slots per layer, via a 2-layer MLP during training.',
    DEFAULTS=dict(PREFIX_DEFAULTS), init=prefix_init, logical_axes=_all_replicated,
    combine=prefix_combine, linear_hook=linear_hook, materialize=prefix_combine,
    merge=featurewise.not_mergeable("prefix_tuning", "the prefix is extra key/value slots"),
    MERGEABLE=False)
