"""Plan a run without running it: compile the real sharded train step for a TPU
topology (or the local devices) and report memory, FLOPs and roofline step time.

    report = plan.plan(config_lib.load("llama3_8b_v5p:lora"), "v5p:2x4x4")
    print(plan.format_report(report))          # `jaxft compile NAME --topology v5p:2x4x4`

The train state is built abstractly (`jax.eval_shape`: no weight exists anywhere)
and `jax.jit(step, in/out shardings, donate).lower(abstract args).compile()` builds
the exact program `jaxft train` runs. TPU topologies need libtpu
(`pip install "jax[tpu]==<jax version>"`); no TPU is needed.

XLA's cost analysis counts a `lax.scan` body once, and the decoder's layers run
under a scan, so FLOPs and bytes are corrected with one small probe compile of
the same step with 0 layers:

    per_layer = C_raw - C(0);   step = grad_accum * (C(0) + n_layers * per_layer)

(the microbatch scan is also counted once, hence the grad_accum factor; the
optimizer update is then counted grad_accum times: O(params) against
O(params * tokens), negligible). Both the raw and the corrected numbers are reported.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from typing import Any, NamedTuple, Optional

import jax
import numpy as np

from jaxft import build, chips as chips_lib, optimizers, roofline, sharding, train
from jaxft.plan_target import Target, TopologyError, target, FORMS  # noqa: F401  (re-exported)

format_report = roofline.format_report
format_remat_table = roofline.format_remat_table

BATCH_FIELDS = {"tokens": np.int32, "targets": np.int32, "segment_ids": np.int32,
                "positions": np.int32, "loss_mask": np.float32}


class Compiled(NamedTuple):
  executable: Any            # jax.stages.Compiled, or None when XLA ran out of memory
  state: Any                 # abstract TrainState (ShapeDtypeStructs with shardings)
  seconds: float
  oom: Optional[str]         # the compiler's out-of-memory message
  init: Any                  # key -> TrainState (random weights), to measure a local run


def plan_model(cfg) -> build.Model:
  """The config's model without weights (pretrained: the architecture from file metadata)."""
  if not cfg.model.get("pretrained"):
    return build.load_model(cfg)
  from jaxft import models  # pylint: disable=g-import-not-at-top
  from jaxft.models import pretrained  # pylint: disable=g-import-not-at-top
  kind, path = pretrained.resolve(cfg.model.pretrained)
  if kind == "hf":
    import json  # pylint: disable=g-import-not-at-top
    from jaxft.models import hf  # pylint: disable=g-import-not-at-top
    with open(path / "config.json") as f:
      arch = hf.config_from_hf(json.load(f), cfg.param_dtype)
  else:
    from jaxft.models import gguf  # pylint: disable=g-import-not-at-top
    reader = gguf.open_reader(path)
    md = gguf.read_metadata(reader, skip=tuple(k for k in reader.fields if k.startswith("tokenizer.")))
    name = md["general.architecture"]
    gguf.check_architecture(name, path)
    arch = gguf._config(md, name, {t.name: t for t in reader.tensors}, cfg.param_dtype)  # pylint: disable=protected-access
  arch = dataclasses.replace(arch, remat=cfg.model.remat)
  return build.Model(models.MODELS[cfg.model.name], arch, None, None, {})


def abstract_batch(cfg, mesh, rows: int, lead: tuple[int, ...] = ()) -> dict:
  shard = sharding.batch_sharding(mesh) if not lead else None
  return {k: jax.ShapeDtypeStruct(lead + (rows, cfg.seq_len), v, sharding=shard)
          for k, v in BATCH_FIELDS.items()}


def abstract_state(cfg, model: build.Model, task: train.Task, tx, mesh):
  """(TrainState of ShapeDtypeStructs carrying their shardings, its init function)."""
  n_layers = model.cfg.n_layers
  mcfg = dataclasses.replace(model.cfg, n_layers=max(n_layers, 1))  # init divides by n_layers
  calib = None
  n_calib = build.needs_calibration(task) if hasattr(build, "needs_calibration") else 0
  if n_calib:
    from jaxft.adapters import calibrate  # pylint: disable=g-import-not-at-top
    calib = calibrate.Calibration(task.apply, task.objective, task.objective_spec,
                                  abstract_batch(cfg, mesh, cfg.batch_size, (n_calib,)))

  def init_fn(key):
    kw = {"calib": calib} if calib is not None else {}
    return train.init_state(key, lambda k: model.module.init(k, mcfg), task.adapter,
                            task.adapter_spec, tx, param_dtype=cfg.param_dtype,
                            frozen_dtype=cfg.get("frozen_dtype", ""), **kw)

  abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(cfg.seed))
  if n_layers == 0:  # probe: the 1-layer shapes with an empty layer axis
    abstract = jax.tree_util.tree_map_with_path(_empty_layers, abstract)
  shardings = build.state_shardings(abstract, model.module, model.cfg, task, tx, mesh)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings), (None if calib is not None else init_fn)


def _empty_layers(path, x):
  in_layers = any(getattr(k, "key", None) == "layers" for k in path)
  return jax.ShapeDtypeStruct((0,) + x.shape[1:], x.dtype) if in_layers and x.ndim else x


def compile_step(cfg, model: build.Model, mesh, *, batch_size: int, grad_accum: int) -> Compiled:
  """Lowers and compiles the sharded, donating train step on abstract arguments."""
  task = build.build_task(cfg, model)
  # Keep activations split by rows (sharding.constrain_activations; runner.py needs the same).
  task = task._replace(apply=sharding.constrain_activations(task.apply, mesh))
  tx, _ = optimizers.build(build.section(cfg, "optimizer"), cfg.steps)
  state, init = abstract_state(cfg, model, task, tx, mesh)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  batch_shard = sharding.batch_sharding(mesh)
  step = jax.jit(train.make_train_step(task, tx, grad_accum=grad_accum,
                                       compute_dtype=cfg.compute_dtype),
                 in_shardings=(shardings, batch_shard),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  t0 = time.perf_counter()
  lowered = step.lower(state, abstract_batch(cfg, mesh, batch_size))
  try:
    with _no_cache_writes(mesh):
      executable, oom = lowered.compile(), None
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
      raise
    executable, oom = None, str(e).strip()
  return Compiled(executable, state, time.perf_counter() - t0, oom, init)


@contextlib.contextmanager
def _no_cache_writes(mesh):
  """Keeps executables for devices that are not here out of the persistent cache: jax
  writes them but cannot read them back without a client (a warning on every hit)."""
  local = mesh.devices.flat[0] in jax.devices()
  key = "jax_persistent_cache_min_compile_time_secs"
  old = getattr(jax.config, key)
  if not local:
    jax.config.update(key, 1e12)
  try:
    yield
  finally:
    jax.config.update(key, old)


def _costs(executable) -> dict[str, float]:
  ca = executable.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return {"flops": float(ca.get("flops", 0.0)), "bytes": float(ca.get("bytes accessed", 0.0))}


def memory(executable) -> dict[str, float]:
  """Per-device bytes from XLA's buffer assignment; peak = args + outputs - aliased + temps."""
  m = executable.memory_analysis()
  out = {k: float(getattr(m, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "alias", "temp", "generated_code")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def _shard_bytes(x) -> int:
  shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
  return math.prod(shape) * np.dtype(x.dtype).itemsize


def state_breakdown(state, top: int = 6) -> dict[str, Any]:
  """Bytes per device of frozen / trainable / optimizer state, and the largest arrays."""
  groups = {g: sum(_shard_bytes(x) for x in jax.tree.leaves(getattr(state, g)))
            for g in ("frozen", "trainable", "opt_state")}
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  rows = sorted(((jax.tree_util.keystr(p), x) for p, x in leaves), key=lambda r: -_shard_bytes(r[1]))
  largest = [{"array": name, "shape": list(x.shape), "dtype": str(x.dtype),
              "spec": str(x.sharding.spec), "bytes_per_device": _shard_bytes(x)}
             for name, x in rows[:top]]
  return {"bytes_per_device": groups, "largest": largest}


def activation_estimates(cfg, mcfg, mesh) -> dict[str, float]:
  """Bytes per device of the big activations (estimates, to say what fills the temporaries)."""
  rows = cfg.batch_size // cfg.grad_accum / (mesh.shape["data"] * mesh.shape["fsdp"])
  tp, s = mesh.shape["tensor"], cfg.seq_len
  act = np.dtype(cfg.compute_dtype).itemsize if cfg.compute_dtype != "bfloat16" else 2
  heads = mcfg.n_heads / tp if mcfg.n_heads % tp == 0 else mcfg.n_heads
  vocab = mcfg.vocab_size / tp if mcfg.vocab_size % tp == 0 else mcfg.vocab_size
  return {"logits (float32, one copy)": rows * s * vocab * 4,
          "attention scores, one layer (float32)": rows * heads * s * s * 4,
          "layer inputs kept for backward, all layers": mcfg.n_layers * rows * s * mcfg.d_model * act}


def _oom_numbers(message: str) -> dict[str, float]:
  """(required, available) bytes from XLA:TPU's out-of-memory message, when it states them."""
  units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
  found = [float(v) * units[u] for v, u in re.findall(r"([\d.]+)\s*([KMGT])i?B?\b", message)]
  return {"required": found[0], "available": found[1]} if len(found) >= 2 else {}


def probe_flops(cfg, model: build.Model, mesh, raw: dict[str, float],
                hardware: float) -> dict[str, float]:
  """Scan-corrected per-device FLOPs and bytes: the real step's raw counts and a 0-layer probe.

  raw = C(0) + one layer body (the scan body is counted once), so the body is
  raw - C(0). A 1-layer probe would not do: with the loop gone XLA merges a remat
  recomputation with the forward pass and the count loses it. XLA may also unroll
  a short microbatch loop (grad_accum 2 is), so of the counts with and without the
  grad_accum factor the one nearer the analytic `hardware` FLOPs is taken.
  """
  m = model._replace(cfg=dataclasses.replace(model.cfg, n_layers=0))
  c = compile_step(cfg, m, mesh, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum)
  if c.executable is None:
    raise RuntimeError(f"the 0-layer probe ran out of memory: {c.oom.splitlines()[0][:300]}")
  c0 = _costs(c.executable)
  per_layer = {k: raw[k] - c0[k] for k in c0}
  once = {k: c0[k] + model.cfg.n_layers * per_layer[k] for k in c0}
  accum = min((1, cfg.grad_accum), key=lambda a: abs(math.log(a * once["flops"] / hardware)))
  return {"flops": accum * once["flops"], "bytes": accum * once["bytes"],
          "per_layer_flops": per_layer["flops"], "outside_layers_flops": c0["flops"],
          "microbatch_factor": accum, "probe_compile_s": c.seconds}


def plan(cfg, topology: str = "local", *, name: str = "", chip: Optional[chips_lib.Chip] = None,
         probes: bool = True, measure_steps: int = 0, tgt: Optional[Target] = None) -> dict[str, Any]:
  """Compiles `cfg`'s train step for `topology` and returns the report (a JSON-able dict).

  Args:
    cfg: a resolved config (`jaxft.config.load`).
    topology: 'local' or a TPU topology (`plan_target.FORMS`).
    name: the config's name, for the report.
    chip: peaks to use instead of the table's (or the measured CPU's).
    probes: also compile the 0-layer probe for scan-corrected FLOPs (needed for
      the roofline).
    measure_steps: local only: run this many steps with random weights and report the
      measured step time beside the prediction.
  """
  from jaxft import adapters  # pylint: disable=g-import-not-at-top
  tgt = tgt or target(topology)
  chip = chip or tgt.chip
  mesh = sharding.make_mesh(cfg.mesh, tgt.devices)
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = cfg.batch_size // cfg.grad_accum
  if micro % dp:
    raise sharding.MeshError(f"batch_size/grad_accum = {micro} rows must divide over "
                             f"data*fsdp = {dp} devices of {tgt.name}")
  model = plan_model(cfg)
  c = compile_step(cfg, model, mesh, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum)
  n_total = sum(math.prod(x.shape) for x in jax.tree.leaves((c.state.frozen, c.state.trainable)))
  n_train = adapters.count_params(c.state.trainable)
  hbm = tgt.hbm_bytes_per_device(chip)
  rep: dict[str, Any] = {
      "config": name, "topology": tgt.name, "device_kind": tgt.devices[0].device_kind,
      "num_devices": len(tgt.devices), "num_chips": tgt.num_chips, "mesh": dict(mesh.shape),
      "chip": None if chip is None else {**chip._asdict(), "peak_tflops": chip.peak_flops / 1e12},
      "adapter": cfg.adapter.name, "remat": model.cfg.remat, "compute_dtype": cfg.compute_dtype,
      "params": {"total": int(n_total), "trainable": int(n_train)},
      "batch": {"batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "grad_accum": cfg.grad_accum,
                "tokens": cfg.batch_size * cfg.seq_len},
      "compile_s": c.seconds, "state": state_breakdown(c.state)}
  mem: dict[str, Any] = {"hbm_per_device": hbm}
  if c.executable is not None:
    mem.update(memory(c.executable))
    mem["fits"] = None if hbm is None else bool(mem["peak"] <= hbm)
  else:
    nums = _oom_numbers(c.oom)
    mem.update(fits=False, compiler_message=c.oom[:2000], peak=nums.get("required"),
               activations=activation_estimates(cfg, model.cfg, mesh))
    if nums.get("available"):
      mem["hbm_per_device"] = hbm = nums["available"]
  if mem.get("peak") is not None and hbm:
    mem["over_by"] = max(mem["peak"] - hbm, 0.0)
  rep["memory"] = mem
  mf = roofline.model_flops(model.cfg, batch=cfg.batch_size, seq_len=cfg.seq_len,
                            adapter_params=n_train, full=cfg.adapter.name == "full")
  flops: dict[str, Any] = {"model_total": mf["train"], "six_n_tokens_total": mf["six_n_tokens"],
                           "model_per_device": mf["train"] / len(tgt.devices),
                           "hardware_per_device": mf["hardware"] / len(tgt.devices)}
  if c.executable is not None:
    raw = _costs(c.executable)
    flops.update(xla_raw=raw["flops"], xla_raw_bytes=raw["bytes"])
    comm = roofline.collective_bytes(c.executable.as_text())
    rep["collectives"] = {"bytes_per_device": comm, "total": sum(comm.values())}
  if probes and c.executable is not None:
    try:
      flops.update({f"xla_{k}" if not k.endswith("_s") else k: v
                    for k, v in probe_flops(cfg, model, mesh, raw,
                                            flops["hardware_per_device"]).items()})
    except RuntimeError as e:  # no scan correction: no roofline, but the rest of the report
      flops["probe_error"] = str(e)
  rep["flops"] = flops
  if "xla_flops" in flops:
    # Below the model's own FLOPs XLA missed work (nested loops): trust the analytic count.
    flops["xla_undercounts"] = bool(flops["xla_flops"] < 0.95 * flops["model_per_device"])
  if chip is not None and "xla_flops" in flops:
    used = (flops["hardware_per_device"] if flops["xla_undercounts"] else flops["xla_flops"])
    rep["roofline"] = roofline.step_time(
        flops=used, bytes_accessed=flops["xla_bytes"],
        comm_bytes=rep.get("collectives", {}).get("total", 0.0), chip=chip,
        model_flops_total=mf["train"], num_chips=tgt.num_chips,
        devices_per_chip=tgt.devices_per_chip)
    rep["roofline"]["tokens_per_s"] = rep["batch"]["tokens"] / rep["roofline"]["step_s"]
  if measure_steps:
    rep["measured"] = measure(c, cfg, mesh, tgt, chip, mf["train"], measure_steps,
                              rep.get("roofline", {}).get("step_s"))
  return rep


def measure(c: Compiled, cfg, mesh, tgt: Target, chip, model_flops_total: float, steps: int,
            predicted_s: Optional[float]) -> dict[str, Any]:
  """Runs the compiled step `steps` times on random weights and tokens (local devices only)."""
  if tgt.name != "local":
    raise ValueError(f"--measure runs the step, so it needs --topology local, not {tgt.name!r}")
  if c.executable is None or c.init is None:
    raise ValueError("cannot measure: the step did not fit, or the adapter needs calibration data")
  shardings = jax.tree.map(lambda x: x.sharding, c.state)
  state = jax.jit(c.init, out_shardings=shardings)(jax.random.PRNGKey(cfg.seed))
  rng = np.random.default_rng(cfg.seed)
  host = {k: np.zeros((cfg.batch_size, cfg.seq_len), v) for k, v in BATCH_FIELDS.items()}
  host["tokens"] = rng.integers(0, 100, host["tokens"].shape, dtype=np.int32)
  host["targets"] = np.roll(host["tokens"], -1, axis=1)
  host.update(segment_ids=np.ones_like(host["tokens"]), loss_mask=np.ones_like(host["loss_mask"]),
              positions=np.broadcast_to(np.arange(cfg.seq_len, dtype=np.int32), host["tokens"].shape))
  batch = jax.device_put(host, sharding.batch_sharding(mesh))
  times = []
  for _ in range(steps + 1):  # the first call also transfers and warms up: not counted
    t0 = time.perf_counter()
    state, metrics = c.executable(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times[1:]))
  mfu = model_flops_total / (tgt.num_chips * chip.peak_flops * step_s) if chip else None
  return {"steps": steps, "step_s": step_s, "mfu": mfu, "loss": float(metrics["loss"]),
          "predicted_over_measured": (predicted_s / step_s) if predicted_s else None}
