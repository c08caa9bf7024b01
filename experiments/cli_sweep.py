"""`jaxft train tiny --config.adapter.name=NAME` for every registered adapter, with its defaults.

    python experiments/cli_sweep.py [--names a,b,...] [--steps 6] [--timeout 300]
        [--out experiments/bench/results/cli_sweep] [--missing]

`--missing` runs only the registered adapters that OUT.json does not list yet and
merges them into it (for members registered after the last sweep).

Each member runs as its own `python -m jaxft.cli train tiny` process (so one crash or
hang cannot take the sweep down) with `--config.steps=STEPS --config.log_every=1
--config.eval_every=0 --config.checkpoint_every=STEPS`; nothing else is overridden,
so every member runs with its own DEFAULTS on the `tiny` config (the optimizer's
warmup is 2 steps: step 1 runs at lr 0). Pass = exit status 0 and a finite loss at
the last step. Reported per member: pass/fail, trainable params, loss at the first
and last step, wall seconds, and the last error line of a failure. Writes OUT.md and
OUT.json. Runs one member at a time; on a shared machine the wall times are only a
rough guide.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

from jaxft import adapters


def run_one(name: str, steps: int, timeout: float) -> dict:
  work = tempfile.mkdtemp(prefix=f"cli_sweep_{name}_")
  cmd = [sys.executable, "-m", "jaxft.cli", "train", "tiny", "--workdir", work,
         f"--config.adapter.name={name}", f"--config.steps={steps}", "--config.log_every=1",
         "--config.eval_every=0", f"--config.checkpoint_every={steps}", "--no_progress"]
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    rc, out = proc.returncode, proc.stdout + proc.stderr
  except subprocess.TimeoutExpired as e:
    out = e.stdout or ""
    rc, out = "timeout", out.decode(errors="replace") if isinstance(out, bytes) else out
    out += f"\ntimed out after {timeout:.0f} s"
  wall = time.perf_counter() - t0
  rows, start = [], {}
  path = os.path.join(work, "metrics.jsonl")
  if os.path.exists(path):
    for line in open(path):
      rec = json.loads(line)
      if rec.get("event") == "start":
        start = rec
      elif "loss" in rec and "step" in rec:
        rows.append(rec)
  losses = {r["step"]: r["loss"] for r in rows}
  first = losses[min(losses)] if losses else None
  last = losses[max(losses)] if losses else None
  ok = rc == 0 and last is not None and math.isfinite(last)
  err = ""
  if not ok:
    lines = [l for l in out.strip().splitlines() if l.strip()]
    err = lines[-1][:300] if lines else f"rc={rc}"
  return {"name": name, "ok": ok, "rc": rc, "trainable_params": start.get("trainable_params"),
          "loss_first": first, "loss_last": last, "last_step": max(losses) if losses else None,
          "wall_s": round(wall, 1), "error": err, "workdir": work}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--names", default="", help="comma-separated (default: all registered)")
  ap.add_argument("--steps", type=int, default=6)
  ap.add_argument("--timeout", type=float, default=300.0)
  ap.add_argument("--out", default="experiments/bench/results/cli_sweep")
  ap.add_argument("--missing", action="store_true", help="only members OUT.json lacks; merge")
  args = ap.parse_args()
  names = args.names.split(",") if args.names else sorted(adapters.ADAPTERS)
  results = []
  if args.missing and os.path.exists(args.out + ".json"):
    with open(args.out + ".json") as f:
      results = [r for r in json.load(f)["results"] if r["name"] in adapters.ADAPTERS]
    names = [n for n in names if n not in {r["name"] for r in results}]
  for name in names:
    r = run_one(name, args.steps, args.timeout)
    results.append(r)
    print(json.dumps({k: v for k, v in r.items() if k != "workdir"}), flush=True)
  results.sort(key=lambda r: r["name"])
  meta = {"steps": args.steps, "load_avg_end": os.getloadavg(), "cpus": os.cpu_count(),
          "registered": len(adapters.ADAPTERS), "run": len(results),
          "passed": sum(r["ok"] for r in results)}
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump({"meta": meta, "results": results}, f, indent=1)
  fmt = lambda x: "—" if x is None else f"{x:.4f}"
  lines = [f"`jaxft train tiny --config.adapter.name=NAME --config.steps={args.steps}` "
           f"(each member's defaults): {meta['passed']}/{meta['run']} pass.", "",
           "| adapter | result | trainable params | loss step 1 | loss last step | wall s | error |",
           "|---|---|---:|---:|---:|---:|---|"]
  for r in results:
    params = "—" if r["trainable_params"] is None else f"{r['trainable_params']:,}"
    err = r["error"].replace("|", "\\|")
    lines.append(f"| {r['name']} | {'pass' if r['ok'] else 'FAIL'} | {params} | "
                 f"{fmt(r['loss_first'])} | {fmt(r['loss_last'])} | {r['wall_s']} | {err} |")
  with open(args.out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n\n" + json.dumps(meta) + "\n")
  print("\n".join(lines))
  return 0 if meta["passed"] == meta["run"] else 1


if __name__ == "__main__":
  sys.exit(main())
