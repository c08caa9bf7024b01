"""Train-step speed of jaxft's built-in default model (`shakespeare`) vs the same model in PyTorch.

    pip install torch==2.13.0   # CPU wheel; for this benchmark only, not a jaxft dependency
    python experiments/bench/bench_vs_torch.py [--steps 30] [--warmup 5] [--rounds 3] [--no_compile]

One process; every arm trains on the same random 16 x 128 token batch (full single-segment rows)
from the same initial weights (jaxft's init copied into the torch module; equal param counts and
agreeing fp32 forwards are asserted). Arms: jaxft fp32 / bf16 compute (bf16 is the config's
default) -- the step `jaxft train shakespeare` runs (runner.build_task + optimizers.build +
train.init_state + jax.jit(make_train_step(...), donate_argnums=0), one CPU device); torch eager
fp32 / bf16 CPU autocast / torch.compile fp32 (inductor on the model, cold cache, optimizer
eager; skipped with the reason if it fails) -- a Llama-style nn.Module, default torch.optim.AdamW,
clip_grad_norm_(1.0), the same lr schedule, F.cross_entropy, torch.set_num_threads(2).
Each arm is built and warmed up (`setup` = build + compile + warmup), then the arms are timed
interleaved (`--rounds` rounds) so machine noise lands on all alike. Step time = median wall clock
per step, each ending with the loss as a Python float; ratio = torch eager fp32 step time / the
arm's (> 1: faster). Writes results/vs_torch.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jaxft import adapters, config as config_lib, optimizers, runner, train


# ----------------------------------------------------------------------------- torch model
def rope(x, cos, sin):  # rotate-half layout (HF Llama)
  x1, x2 = x.chunk(2, dim=-1)
  return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.heads, self.kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
    self.q = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=False)
    self.k = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
    self.v = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
    self.o = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=False)

  def forward(self, x, cos, sin):
    b, l, _ = x.shape
    split = lambda y, n: y.view(b, l, n, self.head_dim).transpose(1, 2)  # (B, heads, L, H)
    q = rope(split(self.q(x), self.heads), cos, sin)
    k = rope(split(self.k(x), self.kv_heads), cos, sin)
    out = F.scaled_dot_product_attention(q, k, split(self.v(x), self.kv_heads), is_causal=True,
                                         enable_gqa=self.heads != self.kv_heads)
    return self.o(out.transpose(1, 2).reshape(b, l, -1))


class SwiGLU(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.gate = nn.Linear(c.d_model, c.d_ff, bias=False)
    self.up = nn.Linear(c.d_model, c.d_ff, bias=False)
    self.down = nn.Linear(c.d_ff, c.d_model, bias=False)

  def forward(self, x):
    return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.attn_norm, self.attn = nn.RMSNorm(c.d_model, eps=c.norm_eps), Attention(c)
    self.mlp_norm, self.mlp = nn.RMSNorm(c.d_model, eps=c.norm_eps), SwiGLU(c)

  def forward(self, x, cos, sin):
    x = x + self.attn(self.attn_norm(x), cos, sin)
    return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
  """Llama-style decoder LM: RMSNorm, rotate-half RoPE, SwiGLU, tied embeddings, no biases."""

  def __init__(self, c, max_len):
    super().__init__()
    self.embed = nn.Embedding(c.vocab_size, c.d_model)
    self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
    self.norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
    inv_freq = c.rope_base ** -(torch.arange(0, c.head_dim, 2).float() / c.head_dim)
    angle = torch.outer(torch.arange(max_len).float(), inv_freq).repeat(1, 2)
    self.register_buffer("cos", angle.cos(), persistent=False)
    self.register_buffer("sin", angle.sin(), persistent=False)

  def forward(self, tokens):
    cos, sin = self.cos[:tokens.shape[1]], self.sin[:tokens.shape[1]]
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x, cos, sin)
    return F.linear(self.norm(x), self.embed.weight)  # tied lm_head

  @torch.no_grad()
  def load_jaxft(self, params):
    """Copies a jaxft decoder params tree in (kernels are (in, out), stacked on `layers`)."""
    t = lambda a: torch.from_numpy(np.array(a, np.float32))
    lay = params["layers"]
    self.embed.weight.copy_(t(params["embed"]["embedding"]))
    self.norm.weight.copy_(t(params["final_norm"]["scale"]))
    for i, b in enumerate(self.blocks):
      b.attn_norm.weight.copy_(t(lay["attn_norm"]["scale"][i]))
      b.mlp_norm.weight.copy_(t(lay["mlp_norm"]["scale"][i]))
      for group in ("attn", "mlp"):
        for name, linear in getattr(b, group).named_children():
          linear.weight.copy_(t(lay[group][name]["kernel"][i]).T)


# ----------------------------------------------------------------------------- arms
def build(cfg):
  """(model, model config, task, tx, lr schedule, init_fn), as `jaxft train` assembles them."""
  model, mcfg, task = runner.build_task(cfg)
  tx, sched = optimizers.build(cfg.optimizer.to_dict(), cfg.steps)
  init_fn = lambda key: train.init_state(key, lambda k: model.init(k, mcfg), task.adapter,
                                         task.adapter_spec, tx, param_dtype=cfg.param_dtype)
  return model, mcfg, task, tx, sched, init_fn


def jax_arm(cfg, compute_dtype, batch):
  """A `step() -> loss` closure over jaxft's jitted, donated train step (compiled ahead of time)."""
  _, _, task, tx, _, init_fn = build(cfg)
  state = jax.jit(init_fn)(jax.random.PRNGKey(cfg.seed))
  step_fn = jax.jit(train.make_train_step(task, tx, grad_accum=cfg.grad_accum,
                                          compute_dtype=compute_dtype), donate_argnums=0)
  step_fn = step_fn.lower(state, batch).compile()  # ahead of time, as the runner does
  box = [state]

  def step():
    box[0], metrics = step_fn(box[0], batch)
    return float(metrics["loss"])
  return step


def torch_arm(cfg, mcfg, params, lrs, tokens, targets, bf16=False, compile=False):
  """A `step() -> loss` closure: eager (or compiled) forward, AdamW, clipping, lr schedule."""
  model = Decoder(mcfg, cfg.seq_len)
  model.load_jaxft(params)
  o = cfg.optimizer
  opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                          weight_decay=o.weight_decay)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lrs[min(s, len(lrs) - 1)] / o.lr)
  fwd = torch.compile(model) if compile else model

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      logits = fwd(tokens)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
    opt.step()
    sched.step()
    return loss.item()
  return step


def cpu_steal():
  """(steal, total) jiffies from /proc/stat: time the hypervisor gave our vCPUs to others."""
  f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
  return f[7], sum(f)


def run_arms(makers, warmup, steps, rounds):
  """Builds and warms each arm, then times them interleaved: `rounds` rounds of steps/rounds
  steps per arm, so machine noise lands on every arm alike. -> {name: stats}."""
  arms, out = {}, {}
  for name, make in makers.items():
    print(f"{name}: build + {warmup} warmup steps ...", flush=True)
    try:
      t0 = time.perf_counter()
      arms[name] = make()
      losses = [arms[name]() for _ in range(warmup)]
      out[name] = {"setup_and_warmup_s": time.perf_counter() - t0, "losses": losses, "times": []}
    except Exception as e:  # torch.compile without a compiler, ...: recorded, not fatal
      if "compile" not in name:
        raise
      arms.pop(name, None)
      out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
  per = -(-steps // rounds)
  for _ in range(rounds):
    for name, step in arms.items():
      for _ in range(per):
        t0 = time.perf_counter()
        out[name]["losses"].append(step())
        out[name]["times"].append(time.perf_counter() - t0)
  for a in out.values():
    if "times" in a:
      a["step_time_s"] = statistics.median(a["times"])
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
  p.add_argument("--no_compile", action="store_true", help="skip the torch.compile arm")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = p.parse_args()
  torch.set_num_threads(2)
  os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp())  # cold torch.compile
  cfg = config_lib.load("shakespeare")
  model, mcfg, _, _, sched, init_fn = build(cfg)
  b, l, v = cfg.batch_size, cfg.seq_len, mcfg.vocab_size
  rows = np.random.default_rng(0).integers(0, v, (b, l + 1), dtype=np.int32)
  host = {"tokens": rows[:, :-1], "targets": rows[:, 1:], "segment_ids": np.ones((b, l), np.int32),
          "positions": np.tile(np.arange(l, dtype=np.int32), (b, 1)),
          "loss_mask": np.ones((b, l), np.float32)}
  batch = jax.device_put(host)
  tokens, targets = (torch.from_numpy(host[k].astype(np.int64)) for k in ("tokens", "targets"))

  # Same initial weights for both sides: jaxft's init (what init_state builds), copied over.
  params = jax.jit(init_fn)(jax.random.PRNGKey(cfg.seed)).trainable
  n_jax, ref = adapters.count_params(params), Decoder(mcfg, l)
  ref.load_jaxft(params)
  n_torch = sum(q.numel() for q in ref.parameters())
  assert n_torch == n_jax == mcfg.num_params(), (n_torch, n_jax)
  with torch.no_grad():
    logits_t = ref(tokens).numpy()
  logits_j = np.asarray(model.apply(params, batch["tokens"], mcfg, positions=batch["positions"],
                                   segment_ids=batch["segment_ids"]))
  fwd_diff = float(np.max(np.abs(logits_t - logits_j)))
  assert fwd_diff < 1e-3, f"torch and jaxft forward differ by {fwd_diff}"
  lrs = [float(sched(i)) for i in range(cfg.steps + 1)]

  w, s = args.warmup, args.steps
  t_arm = lambda **kw: lambda: torch_arm(cfg, mcfg, params, lrs, tokens, targets, **kw)
  makers = {"jaxft fp32": lambda: jax_arm(cfg, "float32", batch),
            "jaxft bf16 (config default)": lambda: jax_arm(cfg, "bfloat16", batch),
            "torch eager fp32": t_arm(), "torch eager bf16 autocast": t_arm(bf16=True)}
  if not args.no_compile:
    makers["torch.compile fp32"] = t_arm(compile=True)
  steal0, arms, steal1 = cpu_steal(), run_arms(makers, w, s, args.rounds), cpu_steal()
  steal_pct = 100.0 * (steal1[0] - steal0[0]) / max(steal1[1] - steal0[1], 1)

  base = arms["torch eager fp32"]["step_time_s"]
  table = ["| arm | step time (s), median [min] | tokens/s | ratio vs torch eager fp32 | "
           "setup (s) | loss first -> last |", "|---|---|---|---|---|---|"]
  for k, a in arms.items():
    if "error" in a:
      table.append(f"| {k} | failed: {a['error']} | | | | |")
      continue
    a["tokens_per_s"] = b * l / a["step_time_s"]
    a["ratio_vs_torch_eager_fp32"] = base / a["step_time_s"]
    a["loss_first"], a["loss_last"] = a["losses"][0], a["losses"][-1]
    assert abs(a["loss_first"] - math.log(v)) < 0.2, (k, a["loss_first"])  # same init: ~ln V
    assert a["loss_last"] < a["loss_first"] - 1.0, (k, a["losses"])        # and it trains
    table.append(f"| {k} | {a['step_time_s']:.4f} [{min(a['times']):.4f}] | "
                 f"{a['tokens_per_s']:,.0f} | {a['ratio_vs_torch_eager_fp32']:.2f}x | "
                 f"{a['setup_and_warmup_s']:.1f} | {a['loss_first']:.3f} -> {a['loss_last']:.3f} |")
  cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
              if ln.startswith("model name")), platform.machine())
  machine = {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
             "python": platform.python_version(), "jax": jax.__version__, "torch": torch.__version__,
             "torch_threads": torch.get_num_threads(), "jax_threads": "XLA CPU default (all cores)",
             "jax_devices": [str(d) for d in jax.devices()], "cpu_steal_pct_during_run": steal_pct}
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  command = " ".join(["python", os.path.relpath(os.path.abspath(__file__), repo)] + sys.argv[1:])
  results = {"command": command, "machine": machine, "config": "shakespeare", "params": n_jax,
             "batch": [b, l], "warmup_steps": w, "timed_steps": s, "rounds": args.rounds,
             "forward_max_abs_diff_fp32": fwd_diff, "arms": arms, "table": "\n".join(table)}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "vs_torch.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(f"\ncommand: {command}\nmachine: {machine['platform']}, {cpu}, "
        f"{machine['cores']} cores (cpu steal during run {steal_pct:.1f}%); torch threads "
        f"{machine['torch_threads']}; jax {jax.__version__}, torch {torch.__version__}\n"
        f"model: shakespeare, {n_jax:,} params (both); batch {b} x {l}; median of {s} steps "
        f"after {w} warmup, arms interleaved in {args.rounds} rounds; fp32 forward max |diff| "
        f"{fwd_diff:.1e}\n\n" + "\n".join(table))


if __name__ == "__main__":
  main()
