"""Foundation benchmark: tokens/s of the `tiny` and `shakespeare` configs, step time on 1 vs 8
(fake) CPU devices, and compile time cold vs with the persistent compilation cache.

    python experiments/bench/bench_foundation.py [--steps 60] [--out experiments/bench/results]

Every arm is a fresh `jaxft train` process (as a user runs it) in one invocation of this
script, so the ratios compare like with like on the same machine and load. Step times are
medians over the steps after the first 5 (compile happens ahead of time and is timed apart).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile


def run_arm(config: str, steps: int, devices: int, cache_dir: str, extra=()) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir)
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "jaxft.cli", "train", config, "--workdir", workdir,
           "--no_progress", "--cpu_devices", str(devices), f"--config.steps={steps}",
           "--config.log_every=1", "--config.eval_every=0", f"--config.checkpoint_every={10**6}",
           *extra]
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  start = next(r for r in rows if r.get("event") == "start")
  steps_rows = [r for r in rows if "step_time_s" in r][5:]
  step_time = statistics.median(r["step_time_s"] for r in steps_rows)
  tokens = statistics.median(r["tokens_per_s"] for r in steps_rows)
  return {"config": config, "devices": devices, "compile_time_s": start["compile_time_s"],
          "step_time_s": step_time, "tokens_per_s": tokens, "params": start["total_params"],
          "final_loss": rows[-1].get("loss")}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = p.parse_args()
  results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
             "arms": []}
  with tempfile.TemporaryDirectory() as cache:
    for devices in (1, 8):
      mesh = [] if devices == 1 else ["--config.mesh.data=8"]
      cold = run_arm("tiny", args.steps, devices, os.path.join(cache, str(devices)), mesh)
      warm = run_arm("tiny", args.steps, devices, os.path.join(cache, str(devices)), mesh)
      results["arms"].append({**cold, "compile_time_warm_s": warm["compile_time_s"]})
    cold = run_arm("shakespeare", min(args.steps, 30), 1, os.path.join(cache, "shk"))
    results["arms"].append(cold)
  one, eight, shk = results["arms"]
  results["ratios"] = {
      "step_time_8dev_over_1dev": eight["step_time_s"] / one["step_time_s"],
      "compile_cold_over_warm_1dev": one["compile_time_s"] / one["compile_time_warm_s"],
      "compile_cold_over_warm_8dev": eight["compile_time_s"] / eight["compile_time_warm_s"],
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "foundation.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(f"machine: {results['machine']}")
  print("| config | devices | params | step time (s) | tokens/s | compile cold (s) | compile cached (s) |")
  print("|---|---|---|---|---|---|---|")
  for r in results["arms"]:
    print(f"| {r['config']} | {r['devices']} | {r['params']:,} | {r['step_time_s']:.4f} | "
          f"{r['tokens_per_s']:,.0f} | {r['compile_time_s']:.2f} | "
          f"{r.get('compile_time_warm_s', float('nan')):.2f} |")
  for k, v in results["ratios"].items():
    print(f"{k}: {v:.2f}")


if __name__ == "__main__":
  main()
