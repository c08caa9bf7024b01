"""SmolLM2-135M-Instruct on CPU: jaxft vs PyTorch + PEFT (LoRA), full fine-tuning, greedy decoding.

    pip install peft==0.21.2   # benchmark only (fits transformers 5.23); not a jaxft dependency
    python experiments/bench/bench_smollm2_peft.py [--steps 10] [--warmup 3] [--rounds 5]

Same weights both sides: jaxft `pretrained.load` and transformers `from_pretrained(gguf_file=)`
dequantize one Q4_1 GGUF to fp32 (logits asserted equal). Each train arm: the same random 4 x 128
batch, AdamW + the lr schedule and clip of configs/smollm2_lora_math.py, loss read as a float.
jaxft = the step `jaxft train` builds (build.load_model / build_task, optimizers.build,
build.init_sharded_state, jit(make_train_step) donating the state, AOT-compiled), compute_dtype
fp32 / bf16 (the config's). torch = HF LlamaForCausalLM (sdpa, use_cache=False, train mode) +
peft.get_peft_model (r=8, alpha 16, dropout 0.05 on q,k,v,o,gate,up,down) for LoRA, fp32 / bf16
autocast, torch.optim.AdamW, clip_grad_norm_, 2 threads. Per group (LoRA, full FT) the arms are
built + warmed up, then timed interleaved in rounds (every other round reversed); step = median.
Generation: 4 prompts x 64 greedy tokens, fp32, jaxft `generate(stop_ids=())` (compiling first
call apart) vs HF `generate(do_sample=False, min_new_tokens=64)`, same left-padded ids. LoRA
profile: forward / fwd+bwd / step, LM head + xent alone, jax.profiler trace by XLA op kind,
GFLOP/s from analytic matmul FLOPs (cost_analysis counts the layer scan once), matmul GFLOP/s.
Writes results/smollm2_peft.json.
"""
from __future__ import annotations

import argparse, collections, copy, gc, glob, gzip, json, os, platform, re, shutil, statistics
import sys, tempfile, time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import peft
import torch
import torch.nn.functional as F
import transformers

from jaxft import build, config as config_lib, optimizers, sharding, train
from jaxft.models import decoder, generate, pretrained

NAME = "smollm2-135m-instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["The history of the Roman Empire begins with", "Photosynthesis is the process by which",
           "Here is a short story about a robot who learns to paint. Once upon a time,",
           "def fibonacci(n):"]


def timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def median_time(fn, reps):
  return statistics.median(timed(fn)[1] for _ in range(reps))


def jax_cfg(adapter, dtype):
  cfg = config_lib.load("smollm2_lora_math", [f"compute_dtype={dtype}"])
  if adapter == "full":  # the config's adapter fields are LoRA's: swap the whole section
    with cfg.unlocked():
      cfg.adapter = ml_collections.ConfigDict({"name": "full"})
    config_lib.complete_sections(cfg)
  return cfg


def jax_arm(cfg, model, batch, mesh):
  """`step() -> loss` over the runner's jitted, donated train step (compiled ahead of time)."""
  task = build.build_task(cfg, model)
  tx, _ = optimizers.build(build.section(cfg, "optimizer"), cfg.steps)
  state, shardings, _ = build.init_sharded_state(cfg, model, task, tx, mesh)
  fn = jax.jit(train.make_train_step(task, tx, grad_accum=cfg.grad_accum,
                                     compute_dtype=cfg.compute_dtype),
               in_shardings=(shardings, sharding.batch_sharding(mesh)),
               out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  compiled, box = fn.lower(state, batch).compile(), [state]

  def step():
    box[0], metrics = compiled(box[0], batch)
    return float(metrics["loss"])
  step.box, step.task, step.dtype = box, task, cfg.compute_dtype
  step.n_trainable = sum(x.size for x in jax.tree.leaves(state.trainable))
  return step


def torch_arm(base, cfg, lrs, tokens, targets, lora, bf16):
  """`step() -> loss`: HF model (+ PEFT LoRA), AdamW, clipping, the same lr schedule."""
  model, a, o = copy.deepcopy(base), cfg.adapter, cfg.optimizer
  if lora:
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=TARGETS,
        bias="none", task_type="CAUSAL_LM"))
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                          weight_decay=o.weight_decay)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lrs[min(s, len(lrs) - 1)] / o.lr)

  def loss_fn():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      logits = model(input_ids=tokens, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, o.clip_norm)
    opt.step()
    sched.step()
    return loss.item()
  step.loss_fn, step.params, step.n_trainable = loss_fn, params, sum(p.numel() for p in params)
  return step


def shared_setup(cfg, model):
  """What every arm shares: the HF model on the same GGUF, one random batch (host numpy, jax
  on the config's mesh, torch tokens/targets). -> (hf, host, mesh, batch, tokens, targets)."""
  path = pretrained.gguf_path(NAME)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  b, l, v = cfg.batch_size, cfg.seq_len, model.cfg.vocab_size
  rows = np.random.default_rng(0).integers(0, v, (b, l + 1), dtype=np.int32)
  host = {"tokens": rows[:, :-1], "targets": rows[:, 1:], "segment_ids": np.ones((b, l), np.int32),
          "positions": np.tile(np.arange(l, dtype=np.int32), (b, 1)),
          "loss_mask": np.ones((b, l), np.float32)}
  mesh = sharding.make_mesh(cfg.mesh)
  batch = jax.device_put(host, sharding.batch_sharding(mesh))
  tokens, targets = (torch.from_numpy(host[k].astype(np.int64)) for k in ("tokens", "targets"))
  return hf, host, mesh, batch, tokens, targets


def cpu_stat():
  """(steal, total, busy not by this process) jiffies: hypervisor steal and other processes' CPU."""
  f, t = [int(x) for x in open("/proc/stat").readline().split()[1:]], os.times()
  return f[7], sum(f), sum(f[:3]) + sum(f[5:7]) - (t.user + t.system) * os.sysconf("SC_CLK_TCK")


def run_group(makers, warmup, steps, rounds):
  """Build + warm each arm, then time them interleaved in rounds. -> ({name: stats}, arms)."""
  arms, out = {}, {}
  for name, make in makers.items():
    print(f"{name}: build + {warmup} warmup steps ...", flush=True)
    arms[name], t = timed(make)
    losses, tw = timed(lambda: [arms[name]() for _ in range(warmup)])
    out[name] = {"setup_and_warmup_s": t + tw, "losses": losses, "times": []}
  for r in range(rounds):  # every other round in reverse, so drift lands on no arm in particular
    for name in list(arms)[::1 if r % 2 == 0 else -1]:
      for _ in range(-(-steps // rounds)):
        loss, t = timed(arms[name])
        out[name]["losses"].append(loss)
        out[name]["times"].append(t)
  for a in out.values():
    a["step_time_s"] = statistics.median(a["times"])
  return out, arms


def model_gflop(c, tokens, seq, full):
  """Analytic matmul GFLOP of a step: forward, plus dX (LoRA: frozen W) or dX + dW (full)."""
  qd, kvd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
  per_tok = c.n_layers * (2 * c.d_model * qd + 2 * c.d_model * kvd + 3 * c.d_model * c.d_ff)
  fwd = 2 * tokens * (per_tok + c.vocab_size * c.d_model) + 4 * tokens * seq * qd * c.n_layers
  return fwd * (3 if full else 2) / 1e9


def trace_ops(step, n=1, top=10):
  """({XLA op kind: ms per step}, total op ms) from a jax.profiler trace of n steps."""
  d = tempfile.mkdtemp()
  with jax.profiler.trace(d, create_perfetto_trace=True):
    for _ in range(n):
      step()
  ev = json.load(gzip.open(glob.glob(d + "/**/*.trace.json.gz", recursive=True)[0]))
  shutil.rmtree(d)
  agg = collections.Counter()
  for e in (ev["traceEvents"] if isinstance(ev, dict) else ev):
    name = e.get("name", "")
    if e.get("ph") == "X" and not re.match(r"\$|.*(Execute|Await|PjitFunction|asarray)", name):
      agg[re.sub(r"\.\d+$", "", name)] += e["dur"] / 1e3 / n  # ynn_fusion.12 -> ynn_fusion
  return {k: round(v, 1) for k, v in agg.most_common(top)}, sum(agg.values())


def torch_fwd_bwd(step):
  step.loss_fn().backward()
  for p in step.params:
    p.grad = None


def torch_head(w, x0, tt, bf16):
  x = torch.from_numpy(x0).requires_grad_()
  with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
    logits = F.linear(x, w)
  F.cross_entropy(logits.float().flatten(0, 1), tt).backward()


def profile_lora(arms, batch, host, emb, reps):
  """Where a LoRA step's time goes, timed back to back: forward, fwd+bwd, the step (step - fwd+bwd
  = optimizer and the rest), the tied LM head + xent alone (fwd + dX); jaxft: a trace by op kind."""
  out, (b, l), tgt = {}, host["tokens"].shape, host["targets"]
  x0 = np.random.default_rng(1).normal(size=(b, l, emb.shape[1])).astype(np.float32)
  for name, step in arms.items():
    if name.startswith("jaxft"):
      task, st, dt = step.task, step.box[0], train.DTYPES[step.dtype]
      loss = lambda tr, fr, bt, k: train.loss_and_metrics(task, tr, fr, bt, k, dt)[0]
      args = (st.trainable, st.frozen, batch, jax.random.PRNGKey(1))
      e, hb = jnp.asarray(emb, dt), {"targets": jnp.asarray(tgt), "loss_mask": jnp.ones((b, l))}
      head = lambda x: task.objective(jnp.einsum("BLD,VD->BLV", x, e,
                                                  preferred_element_type=jnp.float32), hb, {})[0]
      fns = {"forward": (jax.jit(loss), args), "forward_backward": (jax.jit(jax.grad(loss)), args),
             "lm_head_xent_fwd_bwd": (jax.jit(jax.grad(head)), (jnp.asarray(x0, dt),))}
      fns = {k: (lambda f=f, a=a: jax.block_until_ready(f(*a))) for k, (f, a) in fns.items()}
    else:
      w, tt = torch.from_numpy(np.asarray(emb, np.float32)), torch.from_numpy(tgt.astype(np.int64))
      fns = {"forward": lambda: step.loss_fn().item(),
             "forward_backward": lambda: torch_fwd_bwd(step),
             "lm_head_xent_fwd_bwd": lambda: torch_head(w, x0, tt.flatten(), "bf16" in name)}
    out[name] = r = {}
    fns["step"] = step  # the real step, timed here beside its parts
    for k, fn in fns.items():
      fn()  # compile / warm
      r[f"{k}_s"] = median_time(fn, reps)
    if name.startswith("jaxft"):
      r["trace_ms_per_step"], r["trace_total_op_ms"] = trace_ops(step)
  return out


def matmul_gflops(reps=5):
  """Achieved GFLOP/s of one (M, K) x (K, N) matmul, jax vs torch, at the model's shapes."""
  out = {}
  for m, k, n in [(512, 576, 1536), (512, 576, 49152)]:
    a, c = np.random.rand(m, k).astype(np.float32), np.random.rand(k, n).astype(np.float32)
    for dn, jd, td in [("fp32", jnp.float32, torch.float32),
                       ("bf16", jnp.bfloat16, torch.bfloat16)]:
      ja, jc = jnp.asarray(a, jd), jnp.asarray(c, jd)
      ta, tc = torch.from_numpy(a).to(td), torch.from_numpy(c).to(td)
      f = jax.jit(lambda x, y: x @ y)
      jf, tf = lambda: jax.block_until_ready(f(ja, jc)), lambda: ta @ tc
      jf(), tf()
      out[f"{m}x{k}x{n} {dn}"] = {"jax": 2e-9 * m * k * n / median_time(jf, reps),
                                  "torch": 2e-9 * m * k * n / median_time(tf, reps)}
  return out


def bench_generate(params, mcfg, hf, ids, pad, new, calls):
  """Greedy decode: jaxft generate vs HF generate on the same ids, calls interleaved."""
  p = max(len(x) for x in ids)
  hf_ids = torch.tensor([[pad] * (p - len(x)) + x for x in ids])
  hf_mask = torch.tensor([[0] * (p - len(x)) + [1] * len(x) for x in ids])
  fns = {"jaxft": lambda: np.asarray(generate.generate(
             params, mcfg, ids, max_new_tokens=new, stop_ids=(), pad_id=pad)["tokens"]),
         "torch": lambda: hf.generate(input_ids=hf_ids, attention_mask=hf_mask, do_sample=False,
                                      max_new_tokens=new, min_new_tokens=new,
                                      pad_token_id=pad)[:, p:].numpy()}
  res = {k: {"first_call_s": median_time(fn, 1), "times": []} for k, fn in fns.items()}
  toks = {}
  for _ in range(calls):
    for k, fn in fns.items():
      toks[k], t = timed(fn)
      res[k]["times"].append(t)
  for r in res.values():
    r["call_s"] = statistics.median(r["times"])
    r["tokens_per_s"] = len(ids) * new / r["call_s"]
  same = toks["jaxft"] == toks["torch"]
  res["greedy_agreement"] = {"token_fraction": float(same.mean()), "common_prefix_per_row":
                             [int(np.argmin(np.append(r, False))) for r in same]}
  return res


def md(header, rows):
  return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                   + ["| " + " | ".join(r) + " |" for r in rows])


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
  p.add_argument("--gen_calls", type=int, default=2)
  p.add_argument("--profile_reps", type=int, default=2)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = p.parse_args()
  torch.set_num_threads(2)
  t_start, cpu0 = time.perf_counter(), cpu_stat()
  cfg = jax_cfg("lora", "float32")
  model = build.load_model(cfg)  # host fp32 params, shared by every jaxft arm
  mcfg = model.cfg
  b, l = cfg.batch_size, cfg.seq_len
  hf, host, mesh, batch, tokens, targets = shared_setup(cfg, model)
  with torch.no_grad():
    lt = hf(input_ids=tokens).logits.numpy()
  lj = np.asarray(jax.jit(lambda pr, t: decoder.apply(pr, t, mcfg))(model.params, host["tokens"]))
  fwd_diff = float(np.max(np.abs(lt - lj)))
  assert fwd_diff < 5e-3, f"torch and jaxft fp32 forwards differ by {fwd_diff}"
  _, sched = optimizers.build(build.section(cfg, "optimizer"), cfg.steps)
  lrs = [float(sched(i)) for i in range(cfg.steps + 1)]

  res, table, ratios = {}, [], []
  row = lambda name, j, t: ratios.append([name, f"{j:.3f}", f"{t:.3f}", f"{j / t:.2f}",
                                          f"{t / j:.2f}x"])
  for g, label in {"lora": "LoRA r=8", "full": "full FT"}.items():
    c32, c16 = jax_cfg(g, "float32"), jax_cfg(g, "bfloat16")
    j_arm = lambda c: lambda: jax_arm(c, model, batch, mesh)
    t_arm = lambda bf16, g=g: lambda: torch_arm(hf, c32, lrs, tokens, targets, g == "lora", bf16)
    tn = "torch" + " + PEFT" * (g == "lora")
    stats, arms = run_group({"jaxft fp32": j_arm(c32), "jaxft bf16 (config default)": j_arm(c16),
                             f"{tn} fp32": t_arm(False), f"{tn} bf16 autocast": t_arm(True)},
                            args.warmup, args.steps, args.rounds)
    n = {k: s.n_trainable for k, s in arms.items()}
    assert len(set(n.values())) == 1, n  # the same trainable params on both sides
    gflop, ref = model_gflop(mcfg, b * l, l, g == "full"), stats["jaxft fp32"]["losses"][0]
    res[g] = {"trainable_params": n["jaxft fp32"], "step_gflop_analytic": gflop, "arms": stats}
    for k, a in stats.items():  # same weights, LoRA B = 0 at init: the first losses must agree
      a.update(loss_first=a["losses"][0], loss_last=a["losses"][-1],
               tokens_per_s=b * l / a["step_time_s"], gflops=gflop / a["step_time_s"])
      assert abs(a["loss_first"] - ref) < (2e-3 if "fp32" in k else 0.15), (g, k, a["loss_first"])
      table.append([label, k, f"{a['step_time_s']:.3f} [{min(a['times']):.3f}]",
                    f"{a['tokens_per_s']:,.0f}", f"{a['gflops']:.0f}",
                    f"{a['setup_and_warmup_s']:.1f}",
                    f"{a['loss_first']:.3f} -> {a['loss_last']:.3f}"])
    j32, j16, t32, t16 = list(stats)
    res[g]["speedup"] = {}
    for j, t in [(j32, t32), (j16, t16), (j16, t32)]:
      jt, tt = stats[j]["step_time_s"], stats[t]["step_time_s"]
      res[g]["speedup"][f"{j} vs {t}"] = tt / jt
      row(f"{label}: {j} vs {t}", jt, tt)
    if g == "lora":
      print("profiling the LoRA step ...", flush=True)
      res[g]["profile"] = profile_lora(arms, batch, host, model.params["embed"]["embedding"],
                                       args.profile_reps)
    del arms
    gc.collect()
  print("generation, matmuls ...", flush=True)
  ids = [model.tokenizer.encode(t, add_special_tokens=False).ids for t in PROMPTS]
  gen = bench_generate(jax.device_put(model.params), mcfg, hf, ids,
                       model.meta["special_ids"]["pad"], 64, args.gen_calls)
  res["generate"] = {"prompt_lengths": [len(x) for x in ids], "new_tokens": 64, **gen}
  for k, r in [("jaxft generate", gen["jaxft"]), ("HF generate", gen["torch"])]:
    table.append(["greedy 4 x 64, fp32", f"{k} (per call)",
                  f"{r['call_s']:.3f} [{min(r['times']):.3f}]",
                  f"{r['tokens_per_s']:.1f}", "", f"first call {r['first_call_s']:.1f}", ""])
  row("greedy generate fp32 (per call)", gen["jaxft"]["call_s"], gen["torch"]["call_s"])
  res["matmul_gflops"], cpu1 = matmul_gflops(), cpu_stat()
  steal_pct, other_pct = (100.0 * (cpu1[i] - cpu0[i]) / max(cpu1[1] - cpu0[1], 1) for i in (0, 2))

  sp = res["lora"]["speedup"]
  fp32, bf16 = list(sp.values())[:2]  # jaxft vs torch at the same precision
  res["goal"] = {"target_speedup": 1.5, "fp32_speedup": fp32, "bf16_speedup": bf16,
                 "met_fp32": fp32 >= 1.5, "met_bf16": bf16 >= 1.5}
  prof = [[k] + [f"{r[f'{x}_s']:.3f}" for x in ("forward", "forward_backward", "step")]
          + [f"{r['step_s'] - r['forward_backward_s']:.3f}", f"{r['lm_head_xent_fwd_bwd_s']:.3f}"]
          for k, r in res["lora"]["profile"].items()]
  traces = "\n".join(f"{k}: trace ms/step by XLA op kind (all ops {r['trace_total_op_ms']:.0f} ms, "
                     f"2 threads, 1 step): {r['trace_ms_per_step']}"
                     for k, r in res["lora"]["profile"].items() if "trace_ms_per_step" in r)
  tables = {
      "table": md(["group", "arm", "step (s), median [min]", "tokens/s", "GFLOP/s (analytic)",
                   "setup+warmup (s)", "loss first -> last"], table),
      "ratios_table": md(["pair", "jaxft (s)", "torch (s)", "jaxft / torch time", "jaxft speedup"],
                         ratios),
      "profile_table": md(["LoRA arm", "forward (s)", "fwd+bwd (s)", "step (s)",
                           "step - fwd+bwd (s)", "LM head+xent fwd+bwd (s)"], prof),
      "matmul_table": md(["matmul M x K x N", "jax GFLOP/s", "torch GFLOP/s"], [
          [k, f"{r['jax']:.0f}", f"{r['torch']:.0f}"] for k, r in res["matmul_gflops"].items()])}
  cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
              if ln.startswith("model name")), platform.machine())
  versions = {m.__name__: m.__version__ for m in (jax, torch, transformers, peft)}
  machine = {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), **versions,
             "torch_threads": torch.get_num_threads(), "jax_threads": "XLA CPU default (all cores)",
             "hf_attn": hf.config._attn_implementation, "cpu_steal_pct_during_run": steal_pct,
             "other_processes_cpu_pct_during_run": other_pct}
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  command = " ".join(["python", os.path.relpath(os.path.abspath(__file__), repo)] + sys.argv[1:])
  out = {"command": command, "machine": machine, "model": NAME, "batch": [b, l], **vars(args),
         "forward_max_abs_diff_fp32": fwd_diff, "total_wall_s": time.perf_counter() - t_start,
         **res, **tables}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "smollm2_peft.json"), "w") as f:
    json.dump(out, f, indent=1)
  print(f"\ncommand: {command}\nmachine: {machine['platform']}, {cpu}, {os.cpu_count()} cores "
        f"(cpu steal {steal_pct:.1f}%, other processes {other_pct:.1f}% of all CPU); {versions}; "
        f"torch 2 threads\nmodel: {NAME} (Q4_1 GGUF "
        f"-> fp32, both); batch {b} x {l}; median of {args.steps} steps after {args.warmup} "
        f"warmup, interleaved in {args.rounds} rounds; fp32 logits max |diff| {fwd_diff:.1e}; "
        f"total {out['total_wall_s']:.0f} s\n\n{tables['table']}\n\n{tables['ratios_table']}\n\n"
        f"LoRA goal (jaxft >= 1.5x faster than torch + PEFT at equal precision): fp32 "
        f"{fp32:.2f}x {'MET' if fp32 >= 1.5 else 'NOT MET'}; bf16 {bf16:.2f}x "
        f"{'MET' if bf16 >= 1.5 else 'NOT MET'}\ngreedy agreement: "
        f"{gen['greedy_agreement']}\n\n{tables['profile_table']}\n{traces}\n\n"
        f"{tables['matmul_table']}")


if __name__ == "__main__":
  main()
