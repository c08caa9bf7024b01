"""QLoRA: "QLoRA: Efficient Finetuning of Quantized LLMs" (Dettmers et al., 2023).

LoRA on a frozen 4-bit base (x W layout):

    W_eff = dequant(NF4(W0)) + s A B,   s = alpha / r,   A kaiming-uniform, B = 0,

where NF4 stores blockwise (64) codes into the 4-bit NormalFloat table and the block
absmax constants are double-quantized to 8 bits (blocks of 256), see
`jaxft/adapters/quant.py`: 4 + 8/64 + 32/(64*256) ~= 4.127 bits per base parameter.
The full-precision kernel is dropped from the frozen tree; the base is dequantized on
the fly inside the scanned layer, in the compute dtype. Only A and B train. Merge
gives dequant(NF4(W0)) + s A B. Paged optimizers are out of scope.

The shared pieces (`QUANT_LEAVES`, `quant_axes`, `dequant_base`, `quantized_leaves`)
also serve LQ-LoRA.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxft.adapters import lowrank, quant

QUANT_LEAVES = ("quant_codes", "quant_absmax_q", "quant_absmax_scale", "quant_absmax_offset",
                "quant_book")
QUANT_DEFAULTS = {"bits": 4, "block": 64, "dq_block": 256}
DEFAULTS = {**lowrank.COMMON, **QUANT_DEFAULTS}


def quantized_leaves(w, spec) -> dict:
  """The frozen leaves of NF-k(w) with double-quantized scales and the codebook."""
  bits = int(spec["bits"])
  q = quant.quantize(w, bits=bits, block=int(spec["block"]), dq_block=int(spec["dq_block"]))
  book = jnp.broadcast_to(jnp.asarray(quant.nf_codebook(bits)), (*w.shape[:-2], 2 ** bits))
  return {**{"quant_" + k: v for k, v in q.items()}, "quant_book": book}


def stored(p) -> dict:
  return {k[len("quant_"):]: v for k, v in p.items() if k.startswith("quant_")}


def dequant_base(p):
  """T(W0) = the dequantized base, float32 (the hook casts it to the compute dtype)."""
  q = stored(p)
  return quant.dequantize(q, book=q.pop("book"))


def quant_axes(leaf, lead_ax, ax_in, ax_out):
  """Codes and block scales shard like the kernel; per-matrix constants replicate."""
  if leaf == "quant_book":
    return (*lead_ax, None)
  name = leaf[len("quant_"):]
  return quant.logical_axes((*lead_ax, ax_in, ax_out), {name: None})[name]


def init_matrix(key, w, spec, stats=None):
  del stats
  rank = lowrank.check_rank(spec, w)
  *lead, _, d_out = w.shape
  return {"lora_a": lowrank.kaiming_a(key, w, rank),
          "lora_b": jnp.zeros((*lead, rank, d_out), jnp.float32),
          **quantized_leaves(w, spec)}


def quantized_member(name, doc, defaults, init_fn, **kw) -> lowrank.Member:
  """A low-rank member on a quantized base (the kernel replaced by QUANT_LEAVES)."""
  return lowrank.Member(
      name=name, doc=doc, defaults=defaults, init_matrix=init_fn,
      leaves=("lora_a", "lora_b") + QUANT_LEAVES, base_fn=dequant_base, drops_kernel=True,
      extra_axes=quant_axes, **kw)


MEMBER = quantized_member("qlora", __doc__, DEFAULTS, init_matrix)
init, logical_axes, combine, linear_hook, materialize, merge = MEMBER.functions()
