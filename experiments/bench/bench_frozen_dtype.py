"""A/B: the SmolLM2 LoRA step with the frozen base stored in bf16 (`frozen_dtype=bfloat16`).

The same step, batch and weights as `bench_smollm2_peft.py` (whose helpers this reuses),
LoRA group only, arms timed interleaved in one run: jaxft fp32; jaxft bf16 compute with the
f32 base cast every step (the default); jaxft bf16 compute with a bf16 base; PyTorch + PEFT
bf16 autocast (the peer).

    python experiments/bench/bench_frozen_dtype.py
"""
import argparse
import json
import os
import platform

import torch

import bench_smollm2_peft as peer  # pylint: disable=import-error
from jaxft import build, optimizers


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                               "frozen_dtype.json"))
  args = p.parse_args()
  torch.set_num_threads(2)
  c32 = peer.jax_cfg("lora", "float32")
  c16 = peer.jax_cfg("lora", "bfloat16")
  c16b = peer.jax_cfg("lora", "bfloat16")
  with c16b.unlocked():
    c16b.frozen_dtype = "bfloat16"
  model = build.load_model(c32)
  hf, _, mesh, batch, tokens, targets = peer.shared_setup(c32, model)
  _, sched = optimizers.build(build.section(c32, "optimizer"), c32.steps)
  lrs = [float(sched(i)) for i in range(c32.steps + 1)]
  arm = lambda c: lambda: peer.jax_arm(c, model, batch, mesh)
  stats, _ = peer.run_group({
      "jaxft fp32": arm(c32), "jaxft bf16, f32 base (default)": arm(c16),
      "jaxft bf16, bf16 base": arm(c16b),
      "torch + PEFT bf16 autocast": lambda: peer.torch_arm(hf, c32, lrs, tokens, targets, True, True)},
      args.warmup, args.steps, args.rounds)
  peer_t = stats["torch + PEFT bf16 autocast"]["step_time_s"]
  print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, load {os.getloadavg()}")
  print("| arm | step s (median) [min] | vs torch bf16 autocast | loss first -> last |")
  print("|---|---|---|---|")
  for k, a in stats.items():
    print(f"| {k} | {a['step_time_s']:.3f} [{min(a['times']):.3f}] | "
          f"{peer_t / a['step_time_s']:.2f}x | {a['losses'][0]:.3f} -> {a['losses'][-1]:.3f} |")
  with open(args.out, "w") as f:
    json.dump({"load_avg": os.getloadavg(), "arms": stats}, f, indent=1, default=float)


if __name__ == "__main__":
  main()
