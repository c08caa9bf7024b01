"""SmolLM2-135M at batch 4 x 128: step time and peak memory of adapters side by side.

    python experiments/bench/bench_adapters.py [--members lora,dora,pissa,qlora,full]
        [--steps 5] [--warmup 2] [--dtype float32] [--out experiments/bench/results/adapters]

Each arm is the step `jaxft train smollm2_lora_math --config.adapter.name=NAME` builds
(build.load_model / build_task, optimizers.build, build.init_sharded_state, jit of
make_train_step donating the state, AOT-compiled) on the same random batch. Reported per
arm: trainable params, optimizer-state bytes, median step seconds over `--steps` timed
steps after `--warmup`, loss at the first and last step, and the compiled step's memory
(XLA memory_analysis: arguments + outputs + temporaries - aliased, i.e. the step's peak
device footprint; on CPU there is no allocator peak to read). Members not registered (e.g.
part B's qlora before it lands) are skipped with a note. Arms are timed one after another
(not interleaved): on a shared machine, note the load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import ml_collections
import numpy as np

from jaxft import adapters, build, config as config_lib, optimizers, sharding, train


def load_cfg(name: str, dtype: str):
  cfg = config_lib.load("smollm2_lora_math", [f"compute_dtype={dtype}"])
  with cfg.unlocked():
    cfg.adapter = ml_collections.ConfigDict({"name": name})
  config_lib.complete_sections(cfg)
  return cfg


def bench_arm(name: str, model, batch, steps: int, warmup: int, dtype: str) -> dict:
  cfg = load_cfg(name, dtype)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, [jax.devices()[0]])
  task = build.build_task(cfg, model)
  tx, _ = optimizers.build(build.section(cfg, "optimizer"), cfg.steps)
  t0 = time.perf_counter()
  state, shardings, _ = build.init_sharded_state(cfg, model, task, tx, mesh)
  init_s = time.perf_counter() - t0
  step = jax.jit(train.make_train_step(task, tx, compute_dtype=dtype),
                 in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes)
  n_train = adapters.count_params(state.trainable)
  opt_bytes = int(sum(x.nbytes for x in jax.tree.leaves(state.opt_state)))
  losses, times = [], []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    loss = float(metrics["loss"])
    dt = time.perf_counter() - t0
    losses.append(loss)
    if i >= warmup:
      times.append(dt)
  return {"member": name, "trainable_params": n_train, "optimizer_state_bytes": opt_bytes,
          "step_s_median": statistics.median(times), "step_s_all": times,
          "loss_first": losses[0], "loss_last": losses[-1], "compiled_peak_bytes": peak,
          "temp_bytes": None if mem is None else int(mem.temp_size_in_bytes),
          "init_s": init_s, "compile_s": compile_s}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--members", default="lora,dora,pissa,qlora,full")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--out", default="experiments/bench/results/adapters")
  args = ap.parse_args()
  cfg = load_cfg("lora", args.dtype)
  model = build.load_model(cfg)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, model.cfg.vocab_size, (cfg.batch_size, cfg.seq_len), dtype=np.int32)
  batch = {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1),
           "loss_mask": np.ones_like(tokens), "positions": np.tile(
               np.arange(cfg.seq_len, dtype=np.int32), (cfg.batch_size, 1)),
           "segment_ids": np.ones_like(tokens)}
  rows, skipped = [], []
  for name in args.members.split(","):
    if name not in adapters.ADAPTERS:
      skipped.append(name)
      print(f"skip {name}: not a registered adapter")
      continue
    row = bench_arm(name, model, batch, args.steps, args.warmup, args.dtype)
    rows.append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "step_s_all"}))
  meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
          "load_avg": os.getloadavg(), "backend": jax.default_backend(), "dtype": args.dtype,
          "batch": [cfg.batch_size, cfg.seq_len], "skipped": skipped}
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  lines = ["| member | trainable params | optimizer state MiB | step s (median) | "
           "compiled peak MiB | loss first -> last |", "|---|---:|---:|---:|---:|---|"]
  for r in rows:
    peak = "n/a" if r["compiled_peak_bytes"] is None else f"{r['compiled_peak_bytes'] / 2**20:.0f}"
    lines.append(f"| {r['member']} | {r['trainable_params']:,} | "
                 f"{r['optimizer_state_bytes'] / 2**20:.2f} | {r['step_s_median']:.2f} | {peak} | "
                 f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
  print("\n".join(lines))
  with open(args.out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n\n" + json.dumps(meta) + "\n")


if __name__ == "__main__":
  main()
