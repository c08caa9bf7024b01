"""Compiled backward cost of the sparse / masked-delta adapters vs full fine-tuning (CPU, XLA).

For one model, every member's jitted gradient step (loss of the model's logits w.r.t. the
trainable tree) is compiled; we print XLA's FLOP count, temp bytes from the memory analysis,
and how many dots in the optimized HLO produce a (d_in, d_out) weight gradient. Frozen weights
must get none (HFT: only inside its per-layer conditional). Usage:
  python experiments/bench/sparse_adapters_cost.py
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from jaxft import adapters
from jaxft.models import DecoderConfig, decoder

CFG = DecoderConfig(vocab_size=512, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4,
                    head_dim=64, d_ff=768)
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (4, 128), 0, 512)
MEMBERS = {"full": {"targets": (r"^layers/(attn|mlp)/.*/kernel$",)}, "spiel": {}, "lt_sft": {},
           "paca": {}, "s2ft": {"heads": 1}, "hft": {}}


def main():
  params = decoder.init(jax.random.PRNGKey(0), CFG)
  shapes = {(256, 256), (256, 768), (768, 256)}
  for name, kw in MEMBERS.items():
    adapter = adapters.ADAPTERS[name]
    spec = {**adapters.DEFAULTS[name], "name": name, **kw}
    if name == "lt_sft":  # its mask needs calibration data; a random one costs the same
      adapter, spec = adapters.ADAPTERS["spiel"], {**adapters.DEFAULTS["spiel"], "name": "spiel"}
    frozen, trainable = adapter.init(jax.random.PRNGKey(2), params, spec, None)

    def loss(t, f):
      y = decoder.apply(adapter.combine(f, t, spec), TOKENS, CFG, linear=adapter.linear_hook(spec))
      return jnp.mean(jax.nn.logsumexp(y, -1))

    compiled = jax.jit(jax.grad(loss)).lower(trainable, frozen).compile()
    hlo = compiled.as_text()
    dims = lambda m: tuple(int(d) for d in m.split(",")) if m else ()
    dw = [m for m in re.findall(r"= f32\[([\d,]*)\][^\n]*? dot\(", hlo) if dims(m) in shapes]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    print(f"{name:7s} trainable {adapters.count_params(trainable):>9,}  "
          f"GFLOP {cost.get('flops', 0) / 1e9:7.3f}  temp MiB {mem.temp_size_in_bytes / 2**20:7.2f}  "
          f"(d_in,d_out) dots in HLO: {len(dw)}")


if __name__ == "__main__":
  main()
