"""SmolLM2-135M at batch 4 x 128: step time and peak memory of adapters side by side.

    python experiments/bench/bench_adapters.py [--members lora,dora,pissa,qlora,full]
        [--steps 5] [--warmup 2] [--dtype float32] [--out experiments/bench/results/adapters]
    # issue 5's sparse / structured set against LoRA and full fine-tuning:
    python experiments/bench/bench_adapters.py --members spiel,s2ft,paca,hft,ssf,lora,full \
        --out experiments/bench/results/adapters_sparse
    # the same arms timed interleaved (one step of each per round; robust to load changes):
    python experiments/bench/bench_adapters.py --members paca,s2ft,lora,full --interleave 6 \
        --out experiments/bench/results/adapters_sparse

Each arm is the step `jaxft train smollm2_lora_math --config.adapter.name=NAME` builds
(build.load_model / build_task, optimizers.build, build.init_sharded_state, jit of
make_train_step donating the state, AOT-compiled) on the same random batch. Reported per
arm: trainable params, optimizer-state bytes, median step seconds over `--steps` timed
steps after `--warmup` (and the fastest: on a shared 2-core box a step that loses a core
to another job takes ~2x, so the minimum is the better estimate of the uncontended
cost), loss at the first and last step, and the compiled step's memory
(XLA memory_analysis: arguments + outputs + temporaries - aliased, i.e. the step's peak
device footprint; on CPU there is no allocator peak to read). Members not registered (e.g.
part B's qlora before it lands) are skipped with a note. Arms are timed one after another
(not interleaved): on a shared machine, note the load (each row records the 1-minute load
average at its start). When `lora` / `full` are among the members the table adds each
arm's median step time and compiled peak relative to them. Periodic adapter updates that
run outside the train step (SpIEL's drop-and-regrow) are not part of the timed step.
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


def compiled_arm(name: str, model, batch, dtype: str):
  """(compiled step, state) of one member (for `interleaved`)."""
  cfg = load_cfg(name, dtype)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, [jax.devices()[0]])
  task = build.build_task(cfg, model)
  tx, _ = optimizers.build(build.section(cfg, "optimizer"), cfg.steps)
  state, shardings, _ = build.init_sharded_state(cfg, model, task, tx, mesh)
  step = jax.jit(train.make_train_step(task, tx, compute_dtype=dtype),
                 in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  return step.lower(state, batch).compile(), state


def interleaved(names, model, batch, rounds: int, dtype: str) -> dict:
  """One warm-up step per arm, then `rounds` rounds of one step of each arm in turn, so
  every arm sees the same load: {member: {median, min, all}} step seconds + load trace."""
  arms = {n: list(compiled_arm(n, model, batch, dtype)) for n in names}
  for arm in arms.values():
    arm[1], metrics = arm[0](arm[1], batch)
    float(metrics["loss"])
  times, loads = {n: [] for n in names}, [os.getloadavg()[0]]
  for _ in range(rounds):
    for n, arm in arms.items():
      t0 = time.perf_counter()
      arm[1], metrics = arm[0](arm[1], batch)
      float(metrics["loss"])
      times[n].append(time.perf_counter() - t0)
    loads.append(os.getloadavg()[0])
  return {"rounds": rounds, "load_avg": loads, "arms": {
      n: {"median": statistics.median(t), "min": min(t), "all": t} for n, t in times.items()}}


def bench_arm(name: str, model, batch, steps: int, warmup: int, dtype: str) -> dict:
  load_start = os.getloadavg()[0]
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
          "init_s": init_s, "compile_s": compile_s, "load_avg_start": load_start,
          "load_avg_end": os.getloadavg()[0]}


def relative(rows: list[dict], key: str, ref: str):
  """{member: row[key] / ref row's key - 1} (empty when `ref` was not run or lacks the value)."""
  base_row = next((r for r in rows if r["member"] == ref), None)
  if base_row is None or not base_row.get(key):
    return {}
  return {r["member"]: r[key] / base_row[key] - 1 for r in rows if r.get(key) is not None}


def table(rows: list[dict]) -> list[str]:
  refs = [m for m in ("lora", "full") if any(r["member"] == m for r in rows)]
  rel = {(k, m): relative(rows, k, m) for k in ("step_s_median", "compiled_peak_bytes") for m in refs}
  head = ["member", "trainable params", "optimizer state MiB", "step s (median)", "step s (min)",
          "compiled peak MiB", "loss first -> last", "load avg"]
  head += [f"{w} vs {m}" for m in refs for w in ("time", "peak")]
  lines = ["| " + " | ".join(head) + " |",
           "|---|---:|---:|---:|---:|---:|---|---:|" + "---:|" * (len(head) - 8)]
  pct = lambda d, m: "n/a" if m not in d else f"{100 * d[m]:+.0f}%"
  for r in rows:
    peak = "n/a" if r["compiled_peak_bytes"] is None else f"{r['compiled_peak_bytes'] / 2**20:.0f}"
    cells = [r["member"], f"{r['trainable_params']:,}", f"{r['optimizer_state_bytes'] / 2**20:.2f}",
             f"{r['step_s_median']:.2f}", f"{min(r['step_s_all']):.2f}", peak, f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}",
             f"{r['load_avg_start']:.1f}"]
    for m in refs:
      cells += [pct(rel[("step_s_median", m)], r["member"]),
                pct(rel[("compiled_peak_bytes", m)], r["member"])]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--members", default="lora,dora,pissa,qlora,full")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--out", default="experiments/bench/results/adapters")
  ap.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
  ap.add_argument("--interleave", type=int, default=0,
                  help="R > 0: time the members interleaved, R rounds -> OUT_interleaved.json")
  args = ap.parse_args()
  if args.render:
    with open(args.out + ".json") as f:
      saved = json.load(f)
    with open(args.out + ".md", "w") as f:
      f.write("\n".join(table(saved["rows"])) + "\n\n" + json.dumps(saved["meta"]) + "\n")
    return
  cfg = load_cfg("lora", args.dtype)
  model = build.load_model(cfg)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, model.cfg.vocab_size, (cfg.batch_size, cfg.seq_len), dtype=np.int32)
  batch = {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1),
           "loss_mask": np.ones_like(tokens), "positions": np.tile(
               np.arange(cfg.seq_len, dtype=np.int32), (cfg.batch_size, 1)),
           "segment_ids": np.ones_like(tokens)}
  if args.interleave:
    names = [n for n in args.members.split(",") if n in adapters.ADAPTERS]
    result = interleaved(names, model, batch, args.interleave, args.dtype)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + "_interleaved.json", "w") as f:
      json.dump(result, f, indent=1)
    for n, a in result["arms"].items():
      print(f"{n}: median {a['median']:.2f} s, min {a['min']:.2f} s")
    return
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
  lines = table(rows)
  print("\n".join(lines))
  with open(args.out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n\n" + json.dumps(meta) + "\n")


if __name__ == "__main__":
  main()
