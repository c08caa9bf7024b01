"""Optimizer benchmark: state bytes per parameter and update time on a ~100M-parameter pytree.

    python experiments/bench/bench_optimizers.py [--steps 5] [--out experiments/bench/results]

All optimizers run in one process, one after the other, on the same pytree (a
GPT-2-small-like stack: embedding 32768 x 768, 12 stacked layers of q/k/v/o
768 x 768 and up/down 768 x 3072, norm gains; fp32). Each uses its registry
defaults (`jaxft list`) with a constant lr. State bytes are exact (from the
abstract state). Update time is the median of `--steps` jitted, state-donating
`tx.update` calls after one warm-up call (which holds the compile and CAST's
first mask computation; CAST refreshes its mask every 10 steps, outside the timed
window). Fira / GaLore start at step 1 so no SVD refresh (every 200 steps) falls in
the timed window: XLA:CPU's SVD takes seconds per 768 x 3072 matrix, so a refresh of
the whole pytree is timed apart, on one matrix (`svd_refresh_one_matrix_s`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from jaxft import optimizers

SVD_ARMS = ("fira", "galore")
ARMS = ("adamw", "lion", "lion_bf16", "signum", "signsgd", "adams_cast", "sm3", "fira", "galore")


def pytree(key, d=768, ff=3072, layers=12, vocab=32768):
  shapes = {"embed": {"embedding": (vocab, d)},
            "layers": {"attn": {n: {"kernel": (layers, d, d)} for n in "qkvo"},
                       "mlp": {"up": {"kernel": (layers, d, ff)}, "down": {"kernel": (layers, ff, d)}},
                       "attn_norm": {"scale": (layers, d)}, "mlp_norm": {"scale": (layers, d)}},
            "final_norm": {"scale": (d,)}}
  leaves, tree = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [jax.random.normal(k, s, jnp.float32) * 0.02
                                   for k, s in zip(keys, leaves)])


def make(arm: str):
  name = "lion" if arm == "lion_bf16" else arm
  factory, _ = optimizers.OPTIMIZERS[name]
  spec = {**optimizers.DEFAULTS[name], "name": name, "total_steps": 10**6}
  if arm == "lion_bf16":
    spec["mu_dtype"] = "bfloat16"
  return factory(1e-4, spec)


def bench(arm: str, params, grads, steps: int) -> dict:
  tx = make(arm)
  n = sum(p.size for p in jax.tree.leaves(params))
  abstract = jax.eval_shape(tx.init, params)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  update = jax.jit(tx.update, donate_argnums=1)
  state = jax.jit(tx.init)(params)
  if arm in SVD_ARMS:  # start past step 0: time the steady state, not a full-pytree SVD refresh
    state = optax.tree_utils.tree_set(state, count=jnp.ones([], jnp.int32))
  t0 = time.perf_counter()
  updates, state = update(grads, state, params)
  jax.block_until_ready(updates)
  first = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    updates, state = update(grads, state, params)
    jax.block_until_ready(updates)
    times.append(time.perf_counter() - t0)
  out = {"optimizer": arm, "params": n, "state_bytes": state_bytes,
         "state_bytes_per_param": state_bytes / n, "update_median_s": statistics.median(times),
         "first_call_s": first}
  if arm in SVD_ARMS:
    from jaxft.optimizers import lowrank_projection  # pylint: disable=g-import-not-at-top
    g = grads["layers"]["mlp"]["up"]["kernel"][0]
    refresh = jax.jit(lambda x: lowrank_projection.projector(x, 64))
    jax.block_until_ready(refresh(g))
    t0 = time.perf_counter()
    jax.block_until_ready(refresh(g))
    out["svd_refresh_one_matrix_s"] = time.perf_counter() - t0
    out["matrices_refreshed"] = sum(
        int(x.size // (x.shape[-1] * x.shape[-2])) for x in jax.tree.leaves(params)
        if x.ndim >= 2)
  del updates, state
  return out


def write_markdown(results: dict, path: str):
  lines = [f"Machine: {results['machine']}; load average at start {results['load_start']}; "
           f"pytree {results['params']:,} fp32 params; median of {results['steps']} updates.", "",
           "| optimizer | state bytes / param | update (median, s) | first call incl. compile (s) |",
           "|---|---:|---:|---:|"]
  for r in results["arms"]:
    lines.append(f"| {r['optimizer']} | {r['state_bytes_per_param']:.3f} | "
                 f"{r['update_median_s']:.3f} | {r['first_call_s']:.1f} |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--arms", default=",".join(ARMS))
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = p.parse_args()
  params = pytree(jax.random.PRNGKey(0))
  grads = jax.tree.map(lambda x: x * 0.5 + 1e-3, params)
  results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                        f"jax {jax.__version__}",
             "load_start": os.getloadavg()[0], "steps": args.steps,
             "params": sum(x.size for x in jax.tree.leaves(params)), "arms": []}
  os.makedirs(args.out, exist_ok=True)
  for arm in args.arms.split(","):
    r = bench(arm, params, grads, args.steps)
    print(json.dumps(r), flush=True)
    results["arms"].append(r)
    results["load_end"] = os.getloadavg()[0]
    with open(os.path.join(args.out, "optimizers.json"), "w") as f:   # after every arm
      json.dump(results, f, indent=1)
    write_markdown(results, os.path.join(args.out, "optimizers_table.md"))


if __name__ == "__main__":
  main()
