"""FLOP counts, collective traffic and roofline step time for the planner (`jaxft.plan`).

Analytic model FLOPs per token (the convention of MFU tables, MaxText's included:
no recomputation, causal attention counted at half the square):

    matmul params  N = L * (attention + MLP kernels) + V * D          (lm head; tied or not)
    forward        2 N + 2 * L * S * H * Dh                           (QK^T and PV, causal / 2 * 2)
    train          forward + backward; backward = 2 N (input grads) + 2 N_w (weight grads of
                   the trained matrices: N for full fine-tuning, the adapter's for LoRA)
                   + 2 * attention forward

so full fine-tuning gives the familiar 6 N per token plus attention.

Roofline step time per device: max(FLOPs / peak, bytes accessed / HBM bandwidth,
collective bytes / ICI bandwidth), i.e. perfect overlap of compute, memory traffic and
communication; MFU = model FLOPs / (chips * peak * step time).
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional

from jaxft import chips as chips_lib

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_COLLECTIVE = re.compile(
    r"=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
    r"(-done)?\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"\b(body|calls|to_apply|condition)=%?([\w.\-]+)")
_TRIP = re.compile(r'known_trip_count[^0-9]*"?(\d+)')


def matmul_params(mcfg) -> int:
  """Weights that enter a matmul per token (embedding lookup is a gather: not counted)."""
  d, f, h = mcfg.d_model, mcfg.d_ff, mcfg.head_dim
  qd, kvd = mcfg.n_heads * h, mcfg.n_kv_heads * h
  n_in = 1 if mcfg.mlp == "gelu" else 2
  layer = d * qd + 2 * d * kvd + qd * d + n_in * d * f + f * d
  return int(mcfg.n_layers * layer + mcfg.vocab_size * d)


def model_flops(mcfg, *, batch: int, seq_len: int, adapter_params: int, full: bool) -> dict:
  """Analytic FLOPs of one train step (whole batch, all devices) and the classic 6 N T.

  'hardware' is what the chips execute: attention as the full (masked) square, plus
  the forward pass again under remat 'full' (the attention forward under the 'dots'
  policies, which keep matmuls without batch dims).
  """
  tokens = batch * seq_len
  n = matmul_params(mcfg)
  attn_fwd = 2 * mcfg.n_layers * seq_len * mcfg.n_heads * mcfg.head_dim  # per token, causal
  adapter = 0 if full else adapter_params
  fwd = 2 * (n + adapter) + attn_fwd
  bwd = 2 * (n + adapter) + 2 * (n if full else adapter) + 2 * attn_fwd
  square = 2 * attn_fwd  # what a dense masked attention computes
  remat = {"none": 0, "full": fwd + attn_fwd}.get(mcfg.remat, square)
  hardware = fwd + bwd + 3 * (square - attn_fwd) + remat
  return {"matmul_params": n, "tokens": tokens, "forward": fwd * tokens,
          "train": (fwd + bwd) * tokens, "hardware": hardware * tokens,
          "six_n_tokens": 6 * mcfg.num_params() * tokens}


# ----------------------------------------------------------------------------- HLO traffic


def _array_bytes(type_text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(type_text):
    total += _DTYPE_BYTES[dtype] * math.prod(int(x) for x in dims.split(",") if x)
  return total


def _group_size(line: str) -> int:
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)  # mesh['a'=4,'b'=2] {'a'}
  if m:
    sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
    return math.prod(sizes.get(a, 1) for a in re.findall(r"'([^']+)'", m.group(2)))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)  # iota form [groups, size]<=[n]
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  return len(m.group(1).split(",")) if m and m.group(1) else 1


def _computations(hlo: str) -> dict[str, list[str]]:
  comps, name = {}, None
  for line in hlo.splitlines():
    m = _COMPUTATION.match(line)
    if m and not line.startswith(" "):
      name = m.group(1)
      comps[name] = []
      if line.startswith("ENTRY"):
        comps["__entry__"] = name
    elif name and line.strip() and line.strip() != "}":
      comps[name].append(line)
  return comps


def _trip_count(while_line: str, comps: dict, default: int) -> int:
  m = _TRIP.search(while_line)
  if m:
    return int(m.group(1))
  cond = re.search(r"condition=%?([\w.\-]+)", while_line)
  consts = [int(c) for line in comps.get(cond.group(1) if cond else "", [])
            for c in re.findall(r"constant\((\d+)\)", line)]
  return max(consts) if consts else default


def collective_bytes(hlo: str) -> dict[str, float]:
  """Bytes each device moves over the interconnect per step, by collective kind.

  Reads the compiled (per-device, SPMD-partitioned) HLO text; collectives inside
  `while` bodies (the layer scan, the microbatch scan) count once per trip. Traffic
  per op: all-gather and all-to-all the result size, reduce-scatter the result times
  (group - 1), all-reduce 2 (group - 1) / group times its size (ring algorithms).
  """
  comps = _computations(hlo)
  entry = comps.pop("__entry__", None)
  mult: dict[str, float] = {}

  def visit(name: str, m: float, depth: int = 0):
    if name not in comps or depth > 50 or mult.get(name, 0) >= m:
      return
    mult[name] = m
    for line in comps[name]:
      trips = _trip_count(line, comps, 1) if " while(" in line else 1
      for kind, child in _CALLS.findall(line):
        visit(child, m * (trips if kind == "body" else 1), depth + 1)

  if entry:
    visit(entry, 1.0)
  out: dict[str, float] = {}
  for name, lines in comps.items():
    for line in lines:
      m = _COLLECTIVE.search(line)
      if not m or ("-start(" in line):
        continue
      kind, size, g = m.group(2), _array_bytes(m.group(1)), _group_size(line)
      factor = {"reduce-scatter": g - 1, "all-reduce": 2 * (g - 1) / max(g, 1)}.get(kind, 1)
      out[kind] = out.get(kind, 0.0) + mult.get(name, 1.0) * size * factor
  return out


# ----------------------------------------------------------------------------- step time


def step_time(*, flops: float, bytes_accessed: float, comm_bytes: float,
              chip: chips_lib.Chip, model_flops_total: float, num_chips: int,
              devices_per_chip: float = 1.0) -> dict[str, Any]:
  """Roofline seconds per step (per-device numbers in, whole-job MFU out)."""
  peak = chip.peak_flops / devices_per_chip
  terms = {"compute_s": flops / peak,
           "memory_s": bytes_accessed / (chip.hbm_bytes_s / devices_per_chip),
           "comm_s": comm_bytes / chip.ici_bytes_s if chip.ici_bytes_s else 0.0}
  step = max(terms.values())
  bound = max(terms, key=terms.get).replace("_s", "")
  mfu = model_flops_total / (num_chips * chip.peak_flops * step) if step > 0 else 0.0
  return {**terms, "step_s": step, "bound": bound, "mfu": mfu}


def fmt_bytes(n: Optional[float]) -> str:
  return "n/a" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB"


def fmt_flops(n: Optional[float]) -> str:
  if n is None:
    return "n/a"
  for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
    if abs(n) >= scale:
      return f"{n / scale:.3g} {unit}"
  return f"{n:.3g} FLOP"


def fmt_seconds(s: Optional[float]) -> str:
  if s is None:
    return "n/a"
  return f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} us"


def format_report(rep: dict) -> str:
  """The planner's report as a readable table (the JSON has every number)."""
  mem, fl, chip = rep["memory"], rep["flops"], rep.get("chip")
  per = "chip" if rep["num_devices"] == rep["num_chips"] else "device"
  hbm = mem.get("hbm_per_device")
  fits = {True: "yes", False: "NO", None: "unknown"}[mem.get("fits")]
  lines = [f"jaxft compile {rep.get('config', '')} --topology {rep['topology']}: "
           f"{rep['num_chips']} x {chip['name'] if chip else rep['device_kind']} "
           f"({rep['num_devices']} devices), mesh {rep['mesh']}",
           f"  model: {rep['params']['total']:,} params, {rep['params']['trainable']:,} trainable "
           f"({rep['adapter']}), remat={rep['remat']}, compute {rep['compute_dtype']}; "
           f"batch {rep['batch']['batch_size']} x {rep['batch']['seq_len']} = "
           f"{rep['batch']['tokens']:,} tokens (grad_accum {rep['batch']['grad_accum']})",
           f"  compiled in {rep['compile_s']:.1f} s"
           + (f" (+{fl['probe_compile_s']:.1f} s for the 0-layer FLOP probe)"
              if "probe_compile_s" in fl else ""),
           f"  memory per {per}:"]
  for key, label in (("argument", "arguments (state + batch)"), ("output", "outputs"),
                     ("alias", "aliased (donated)"), ("temp", "temporaries"), ("peak", "peak")):
    if mem.get(key) is not None:
      lines.append(f"    {label:<28} {fmt_bytes(mem[key])}")
  lines.append(f"    {'HBM':<28} {fmt_bytes(hbm)}   fits: {fits}"
               + (f" (over by {fmt_bytes(mem['over_by'])})" if mem.get("over_by") else ""))
  if mem.get("compiler_message"):
    lines.append(f"    XLA: {mem['compiler_message'].splitlines()[0][:300]}")
  st = rep["state"]
  lines.append("    state: " + ", ".join(f"{k} {fmt_bytes(v)}"
                                         for k, v in st["bytes_per_device"].items()))
  if mem.get("fits") is False:
    lines.append("    largest arrays per device:")
    for a in st["largest"]:
      lines.append(f"      {fmt_bytes(a['bytes_per_device']):>11}  {a['array']} "
                   f"{a['dtype']}{a['shape']} spec {a['spec']}")
    if mem.get("activations"):
      lines.append("    largest activations per device (estimated):")
      for name, b in sorted(mem["activations"].items(), key=lambda kv: -kv[1]):
        lines.append(f"      {fmt_bytes(b):>11}  {name}")
  lines.append(f"  FLOPs per step (per {per}):")
  nd = rep["num_devices"]
  if "xla_raw" in fl:
    lines.append(f"    {'XLA cost analysis, raw':<34} {fmt_flops(fl['xla_raw'])}  (scan body counted once)")
  if "xla_flops" in fl:
    lines.append(f"    {'XLA, scan-corrected':<34} {fmt_flops(fl['xla_flops'])}  "
                 f"({fmt_flops(fl['xla_per_layer_flops'])} per layer)")
  if fl.get("xla_undercounts"):
    lines.append(f"    {'analytic hardware FLOPs (used)':<34} {fmt_flops(fl['hardware_per_device'])}  "
                 "(XLA's count is lower: loops inside the layer, e.g. tensor-parallel "
                 "collective matmuls, are counted once too)")
  if fl.get("probe_error"):
    lines.append(f"    (no scan correction: {fl['probe_error']})")
  lines.append(f"    {'analytic model FLOPs':<34} {fmt_flops(fl['model_per_device'])}")
  lines.append(f"    {'6 * N * tokens':<34} {fmt_flops(fl['six_n_tokens_total'] / nd)}")
  if "collectives" in rep:
    lines.append(f"    {'collective traffic':<34} {fmt_bytes(rep['collectives']['total'])}")
  rl = rep.get("roofline")
  if rl:
    lines.append(f"  roofline ({chip['name']}: {chip['peak_tflops']:.0f} TFLOP/s, "
                 f"{chip['hbm_bytes_s'] / 1e9:.0f} GB/s HBM per chip):")
    lines.append(f"    compute {fmt_seconds(rl['compute_s'])} | memory {fmt_seconds(rl['memory_s'])}"
                 f" | comm {fmt_seconds(rl['comm_s'])} -> step {fmt_seconds(rl['step_s'])} "
                 f"({rl['bound']}-bound), {rl['tokens_per_s']:,.0f} tokens/s, MFU {100 * rl['mfu']:.1f}%")
  if rep.get("measured"):
    ms = rep["measured"]
    lines.append(f"  measured here: step {fmt_seconds(ms['step_s'])} (median of {ms['steps']}), "
                 f"MFU {100 * ms['mfu']:.1f}%; predicted/measured = {ms['predicted_over_measured']:.2f}")
  return "\n".join(lines)


def format_remat_table(reports: list[dict]) -> str:
  """One row per remat policy: what it costs in memory and what it saves in FLOPs."""
  lines = ["remat policy   temporaries    peak/device   fits   XLA FLOPs/device   step       MFU",
           "-" * 84]
  for r in reports:
    mem, rl = r["memory"], r.get("roofline") or {}
    fits = {True: "yes", False: "NO", None: "?"}[mem.get("fits")]
    lines.append(f"{r['remat']:<14} {fmt_bytes(mem.get('temp')):>12} {fmt_bytes(mem.get('peak')):>13}"
                 f"   {fits:<5} {fmt_flops(r['flops'].get('xla_flops')):>16}   "
                 f"{fmt_seconds(rl.get('step_s')):>8}   "
                 f"{(100 * rl['mfu']) if rl else float('nan'):5.1f}%")
  return "\n".join(lines)
