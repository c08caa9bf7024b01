"""jaxft's built-in default model (`shakespeare`) vs. the same model in plain PyTorch: train-step speed.

    pip install torch==2.13.0   # CPU wheel; benchmark-only, not a jaxft dependency
    python experiments/bench/bench_vs_torch.py [--steps 30] [--warmup 5] [--no_compile]

One process, one machine, arms run back to back on the same random (16, 128) token batch
(full-length single-segment rows), each from the same initial weights (jaxft's init, copied
into the torch module; the fp32 forward of both is checked to agree):

  1. jaxft fp32 compute   2. jaxft bf16 compute (the config's default)
     -- exactly the step `jaxft train shakespeare` runs: runner.build_task + optimizers.build
        (AdamW, warmup-cosine lr, global-norm clip 1.0) + train.init_state +
        jax.jit(make_train_step(...), donate_argnums=0), on one CPU device.
  3. torch eager fp32     4. torch eager bf16 (CPU autocast)
  5. torch.compile fp32 (model compiled with inductor; optimizer eager), if it works here.
     -- a plain Llama-style nn.Module, torch.optim.AdamW (default implementation),
        clip_grad_norm_(1.0), the same lr schedule, F.cross_entropy; torch.set_num_threads(2).

Step time = median wall clock over `--steps` steps after `--warmup` steps, each step ending
with the loss fetched as a Python float (the sync). Ratios are torch-eager-fp32 step time over
the arm's step time (> 1 = faster than torch eager fp32). Writes results/vs_torch.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jaxft import adapters, config as config_lib, optimizers, runner, train


# ----------------------------------------------------------------------------- torch model
class Attention(nn.Module):
  def __init__(self, d, n_heads, n_kv, head_dim):
    super().__init__()
    self.n, self.k, self.h = n_heads, n_kv, head_dim
    self.q = nn.Linear(d, n_heads * head_dim, bias=False)
    self.k_proj = nn.Linear(d, n_kv * head_dim, bias=False)
    self.v = nn.Linear(d, n_kv * head_dim, bias=False)
    self.o = nn.Linear(n_heads * head_dim, d, bias=False)

  def forward(self, x, cos, sin):
    b, l, _ = x.shape
    q = self.q(x).view(b, l, self.n, self.h).transpose(1, 2)
    k = self.k_proj(x).view(b, l, self.k, self.h).transpose(1, 2)
    v = self.v(x).view(b, l, self.k, self.h).transpose(1, 2)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n != self.k)
    return self.o(out.transpose(1, 2).reshape(b, l, self.n * self.h))


def rope(x, cos, sin):  # rotate-half layout (HF Llama)
  x1, x2 = x.chunk(2, dim=-1)
  return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class Block(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.attn_norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
    self.attn = Attention(c.d_model, c.n_heads, c.n_kv_heads, c.head_dim)
    self.mlp_norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
    self.gate = nn.Linear(c.d_model, c.d_ff, bias=False)
    self.up = nn.Linear(c.d_model, c.d_ff, bias=False)
    self.down = nn.Linear(c.d_ff, c.d_model, bias=False)

  def forward(self, x, cos, sin):
    x = x + self.attn(self.attn_norm(x), cos, sin)
    h = self.mlp_norm(x)
    return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Decoder(nn.Module):
  """Llama-style decoder LM: RMSNorm, rotate-half RoPE, SwiGLU, tied embeddings, no biases."""

  def __init__(self, c, max_len):
    super().__init__()
    self.embed = nn.Embedding(c.vocab_size, c.d_model)
    self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
    self.norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
    inv_freq = c.rope_base ** -(torch.arange(0, c.head_dim, 2).float() / c.head_dim)
    angle = torch.outer(torch.arange(max_len).float(), inv_freq)
    self.register_buffer("cos", torch.cat((angle, angle), -1).cos(), persistent=False)
    self.register_buffer("sin", torch.cat((angle, angle), -1).sin(), persistent=False)

  def forward(self, tokens):
    l = tokens.shape[1]
    cos, sin = self.cos[:l], self.sin[:l]
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x, cos, sin)
    return F.linear(self.norm(x), self.embed.weight)  # tied lm_head

  @torch.no_grad()
  def load_jaxft(self, params):
    """Copies a jaxft decoder params tree (kernels are (in, out), stacked on `layers`)."""
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32).copy())
    lay = params["layers"]
    self.embed.weight.copy_(t(params["embed"]["embedding"]))
    self.norm.weight.copy_(t(params["final_norm"]["scale"]))
    for i, b in enumerate(self.blocks):
      b.attn_norm.weight.copy_(t(lay["attn_norm"]["scale"][i]))
      b.mlp_norm.weight.copy_(t(lay["mlp_norm"]["scale"][i]))
      for mod, (grp, name) in [(b.attn.q, ("attn", "q")), (b.attn.k_proj, ("attn", "k")),
                               (b.attn.v, ("attn", "v")), (b.attn.o, ("attn", "o")),
                               (b.gate, ("mlp", "gate")), (b.up, ("mlp", "up")),
                               (b.down, ("mlp", "down"))]:
        mod.weight.copy_(t(lay[grp][name]["kernel"][i]).T)


# ----------------------------------------------------------------------------- arms
def timed(step, warmup, steps):
  """(first-step seconds, median step seconds, losses of every step)."""
  losses, times = [], []
  for _ in range(warmup + steps):
    t0 = time.perf_counter()
    losses.append(step())
    times.append(time.perf_counter() - t0)
  return times[0], statistics.median(times[warmup:]), losses


def build(cfg):
  """(model, model config, task, tx, lr schedule, init_fn), as `jaxft train` assembles them."""
  model, mcfg, task = runner.build_task(cfg)
  tx, sched = optimizers.build(cfg.optimizer.to_dict(), cfg.steps)
  init_fn = lambda key: train.init_state(key, lambda k: model.init(k, mcfg), task.adapter,
                                         task.adapter_spec, tx, param_dtype=cfg.param_dtype)
  return model, mcfg, task, tx, sched, init_fn


def jax_arm(cfg, compute_dtype, batch, warmup, steps):
  _, _, task, tx, _, init_fn = build(cfg)
  state = jax.jit(init_fn)(jax.random.PRNGKey(cfg.seed))
  step_fn = jax.jit(train.make_train_step(task, tx, grad_accum=cfg.grad_accum,
                                          compute_dtype=compute_dtype), donate_argnums=0)
  t0 = time.perf_counter()
  step_fn = step_fn.lower(state, batch).compile()  # ahead of time, as the runner does
  compile_s = time.perf_counter() - t0
  box = [state]

  def step():
    box[0], metrics = step_fn(box[0], batch)
    return float(metrics["loss"])

  first, med, losses = timed(step, warmup, steps)
  return {"compile_s": compile_s, "first_step_s": first, "step_time_s": med, "losses": losses}


def torch_arm(cfg, mcfg, params, lrs, tokens, targets, warmup, steps, bf16=False, compile=False):
  torch.manual_seed(0)
  model = Decoder(mcfg, cfg.seq_len)
  model.load_jaxft(params)
  o = cfg.optimizer
  opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                          weight_decay=o.weight_decay)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lrs[s] / o.lr)
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

  first, med, losses = timed(step, warmup, steps)
  return {"first_step_s": first, "step_time_s": med, "losses": losses}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--no_compile", action="store_true", help="skip the torch.compile arm")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = p.parse_args()
  torch.set_num_threads(2)
  cfg = config_lib.load("shakespeare")
  model, mcfg, _, _, sched, init_fn = build(cfg)
  b, l, v = cfg.batch_size, cfg.seq_len, mcfg.vocab_size
  rows = np.random.default_rng(0).integers(0, v, (b, l + 1), dtype=np.int32)
  host = {"tokens": rows[:, :-1], "targets": rows[:, 1:],
          "segment_ids": np.ones((b, l), np.int32),
          "positions": np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy(),
          "loss_mask": np.ones((b, l), np.float32)}
  batch = jax.device_put(host)
  tokens, targets = (torch.from_numpy(host[k].astype(np.int64)) for k in ("tokens", "targets"))

  # Same initial weights for both sides: jaxft's init (what init_state builds), copied over.
  params = jax.jit(init_fn)(jax.random.PRNGKey(cfg.seed)).trainable
  n_jax = mcfg.num_params()
  assert n_jax == adapters.count_params(params)
  ref = Decoder(mcfg, l)
  ref.load_jaxft(params)
  n_torch = sum(q.numel() for q in ref.parameters())
  assert n_torch == n_jax, (n_torch, n_jax)
  with torch.no_grad():
    logits_t = ref(tokens).numpy()
  logits_j = np.asarray(model.apply(params, batch["tokens"], mcfg, positions=batch["positions"],
                                   segment_ids=batch["segment_ids"]))
  fwd_diff = float(np.max(np.abs(logits_t - logits_j)))
  assert fwd_diff < 1e-3, f"torch and jaxft forward differ by {fwd_diff}"
  lrs = [float(sched(i)) for i in range(cfg.steps + 1)]

  w, s = args.warmup, args.steps
  arms = {}
  for dt in ("float32", "bfloat16"):
    print(f"jaxft {dt} ...", flush=True)
    arms[f"jaxft {dt}"] = jax_arm(cfg, dt, batch, w, s)
  print("torch eager ...", flush=True)
  arms["torch eager fp32"] = torch_arm(cfg, mcfg, params, lrs, tokens, targets, w, s)
  arms["torch eager bf16 autocast"] = torch_arm(cfg, mcfg, params, lrs, tokens, targets, w, s,
                                                bf16=True)
  compile_note = "skipped (--no_compile)"
  if not args.no_compile:
    print("torch.compile ...", flush=True)
    try:
      arms["torch.compile fp32"] = torch_arm(cfg, mcfg, params, lrs, tokens, targets, w, s,
                                             compile=True)
      compile_note = ("inductor on the model (first step includes compilation: "
                      f"{arms['torch.compile fp32']['first_step_s']:.1f} s); optimizer eager")
    except Exception as e:  # no compiler, offline, ... : record why
      compile_note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"

  base = arms["torch eager fp32"]["step_time_s"]
  for k, a in arms.items():
    a["tokens_per_s"] = b * l / a["step_time_s"]
    a["ratio_vs_torch_eager_fp32"] = base / a["step_time_s"]
    a["loss_first"], a["loss_last"] = a["losses"][0], a["losses"][-1]
    assert abs(a["loss_first"] - math.log(v)) < 0.2 and a["loss_last"] < a["loss_first"], (k, a["losses"])
  table = ["| arm | step time (s) | tokens/s | ratio vs torch eager fp32 | loss first -> last |",
           "|---|---|---|---|---|"]
  table += [f"| {k} | {a['step_time_s']:.4f} | {a['tokens_per_s']:,.0f} | "
            f"{a['ratio_vs_torch_eager_fp32']:.2f}x | {a['loss_first']:.3f} -> {a['loss_last']:.3f} |"
            for k, a in arms.items()]
  machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
             "cores": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
             "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
             "jax_devices": [str(d) for d in jax.devices()]}
  command = " ".join(["python", os.path.relpath(__file__)] + sys.argv[1:])
  results = {"command": command, "machine": machine, "config": "shakespeare", "params": n_jax,
             "batch": [b, l], "warmup_steps": w, "timed_steps": s,
             "forward_max_abs_diff_fp32": fwd_diff, "torch_compile": compile_note,
             "arms": arms, "table": "\n".join(table)}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "vs_torch.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(f"\ncommand: {command}\nmachine: {machine['platform']}, {machine['processor']}, "
        f"{machine['cores']} cores; torch threads {machine['torch_threads']}; jax {jax.__version__}, "
        f"torch {torch.__version__}")
  print(f"model: shakespeare, {n_jax:,} params (both); batch {b} x {l}; median of {s} steps after "
        f"{w} warmup; fp32 forward max |diff| {fwd_diff:.1e}; torch.compile: {compile_note}\n")
  print("\n".join(table))


if __name__ == "__main__":
  main()
