"""The `jaxft` command.

    jaxft train NAME[:ARG] --workdir DIR [--config.a.b=VALUE ...]
    jaxft list
    jaxft export WORKDIR --format hf --out DIR
    jaxft generate --model NAME | --adapter WORKDIR --prompt TEXT [--max_new_tokens N ...]
    jaxft eval WORKDIR | MODEL [--config NAME] [--config.a.b=VALUE ...] [--out FILE]
    jaxft compile NAME[:ARG] --topology v5p:4x4x4 | local [--remat all] [--json] [--out FILE]

Errors a user can fix (unknown names or keys, bad values, a mesh that does not fit
the devices, a bad data row, a NaN loss) print one `jaxft: error: ...` message
and exit with status 1 (2 for a malformed command line).
"""
from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxft", description="Fine-tune language models in JAX.")
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="train a named config; resumes if WORKDIR holds checkpoints",
                     epilog="Override any config field with --config.a.b=VALUE.")
  t.add_argument("config", help="config name (see `jaxft list`), NAME:ARG, or a path to a .py file")
  t.add_argument("--workdir", required=True, help="run directory: metrics.jsonl, checkpoints/")
  t.add_argument("--cpu_devices", type=int, default=0,
                 help="split the CPU into this many fake devices (to try meshes without accelerators)")
  t.add_argument("--no_progress", action="store_true", help="plain log lines instead of a progress bar")
  g = t.add_argument_group("multi-host (jax.distributed)")
  g.add_argument("--coordinator", default="", help="host:port of process 0")
  g.add_argument("--num_processes", type=int, default=0)
  g.add_argument("--process_id", type=int, default=-1)
  g.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() with the cluster's auto-detected settings; "
                      "done without this flag when a TPU pod's or SLURM's environment is found")
  sub.add_parser("list", help="list configs, models, adapters, objectives and optimizers by name")
  e = sub.add_parser("export", help="write a run's model (adapter merged) for other libraries")
  e.add_argument("workdir")
  e.add_argument("--format", default="hf", help="hf: config.json + model.safetensors")
  e.add_argument("--out", required=True)
  g = sub.add_parser("generate", help="complete prompts with a model or a trained run")
  g.add_argument("--model", default="", help="model name (see `jaxft list`), .gguf file or HF dir")
  g.add_argument("--adapter", default="", help="a run directory: generate with its trained weights")
  g.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
  g.add_argument("--max_new_tokens", type=int, default=64)
  g.add_argument("--temperature", type=float, default=0.0)
  g.add_argument("--top_k", type=int, default=0)
  g.add_argument("--top_p", type=float, default=1.0)
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--raw", action="store_true", help="no chat template")
  v = sub.add_parser("eval", help="perplexity and task accuracy of a run or a model, as JSON",
                     epilog="Override eval fields with --config.a.b=VALUE (e.g. eval_examples).")
  v.add_argument("target", help="a run directory or a model name / path")
  v.add_argument("--config", default="", help="config whose data to use (needed for a model)")
  v.add_argument("--out", default="", help="also write the JSON here")
  c = sub.add_parser(
      "compile", help="compile a config's sharded train step for a TPU topology (on this CPU) "
      "or the local devices; report memory per chip, FLOPs, roofline step time and MFU",
      epilog="Override config fields (mesh, batch, remat) with --config.a.b=VALUE. TPU "
      "topologies need libtpu: pip install \"jax[tpu]==<jax version>\".")
  c.add_argument("config", help="config name, NAME:ARG, or a path to a .py file")
  c.add_argument("--topology", default="local",
                 help="local | v5e:AxB | v6e:AxB | v4:AxBxC | v5p:AxBxC | v5e-8 | v5p-256 ...")
  c.add_argument("--remat", default="",
                 help="compare remat policies: comma-separated names or 'all' (one compile each)")
  c.add_argument("--measure", type=int, default=0,
                 help="with --topology local: also run N steps on random weights and time them")
  c.add_argument("--no_probes", action="store_true",
                 help="skip the 0-layer compile that corrects FLOPs for the layer scan")
  c.add_argument("--peak_tflops", type=float, default=0.0, help="override the chip's peak")
  c.add_argument("--hbm_gbs", type=float, default=0.0, help="override the chip's HBM GB/s")
  c.add_argument("--cpu_devices", type=int, default=0, help="fake CPU devices for --topology local")
  c.add_argument("--json", action="store_true", help="print the report as JSON")
  c.add_argument("--out", default="", help="also write the JSON report here")
  return p


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.a.b=v` / `--config.a.b v` items from the rest of argv."""
  rest, overrides, i = [], [], 0
  while i < len(argv):
    item = argv[i]
    if item.startswith("--config."):
      if "=" in item:
        overrides.append(item[len("--"):])
      elif i + 1 < len(argv):
        overrides.append(f"{item[len('--'):]}={argv[i + 1]}")
        i += 1
      else:
        raise SystemExit(f"jaxft: error: {item} needs a value (--config.a.b=VALUE)")
    else:
      rest.append(item)
    i += 1
  return rest, overrides


def cluster_detected(env=None) -> str:
  """Names the multi-host environment JAX can initialise from by itself, or ''.

  A TPU pod slice sets TPU_WORKER_HOSTNAMES (several hosts, comma-separated); SLURM sets
  SLURM_NTASKS; an explicit JAX_COORDINATOR_ADDRESS works anywhere.
  """
  env = os.environ if env is None else env
  if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
    return "TPU pod (TPU_WORKER_HOSTNAMES)"
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return "SLURM (SLURM_NTASKS)"
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  return ""


def _setup_cache() -> None:
  """The persistent compilation cache (repeat compiles take a fraction of the time)."""
  import jax  # pylint: disable=g-import-not-at-top
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR",
                         os.path.join(os.path.expanduser("~"), ".cache", "jaxft", "jax"))
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _setup_jax(args) -> None:
  """Backend options that must be set before JAX starts; then multi-host init if asked."""
  import jax  # pylint: disable=g-import-not-at-top
  _setup_cache()
  if args.cpu_devices:
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  if args.coordinator or args.num_processes:
    if not (args.coordinator and args.num_processes > 0 and args.process_id >= 0):
      raise ValueError("--coordinator, --num_processes and --process_id go together")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
  elif args.distributed or cluster_detected():
    jax.distributed.initialize()  # reads the cluster's environment


def _train(args, overrides) -> int:
  from jaxft import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.load(args.config, overrides)  # fail on bad config before starting JAX
  _setup_jax(args)
  from jaxft import runner  # pylint: disable=g-import-not-at-top
  runner.run(cfg, args.workdir, progress=False if args.no_progress else None)
  return 0


def _compile(args, overrides) -> int:
  """`jaxft compile`: the planner (jaxft.plan) over one or several remat policies."""
  import copy  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  from jaxft import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.load(args.config, overrides)
  from jaxft import plan_target  # pylint: disable=g-import-not-at-top
  plan_target.parse(args.topology)  # a bad topology fails before JAX starts
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  _setup_cache()
  import jax  # pylint: disable=g-import-not-at-top
  if args.cpu_devices:
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  from jaxft import plan, roofline  # pylint: disable=g-import-not-at-top
  from jaxft.models import decoder  # pylint: disable=g-import-not-at-top
  tgt = plan_target.target(args.topology)
  chip = tgt.chip
  if chip is not None and (args.peak_tflops or args.hbm_gbs):
    chip = chip._replace(peak_flops=args.peak_tflops * 1e12 or chip.peak_flops,
                         hbm_bytes_s=args.hbm_gbs * 1e9 or chip.hbm_bytes_s)
  policies = ([cfg.model.remat] if not args.remat else list(decoder.CHOICES["remat"])
              if args.remat == "all" else [p.strip() for p in args.remat.split(",")])
  reports = []
  for policy in policies:
    if policy not in decoder.CHOICES["remat"]:
      raise ValueError(f"unknown remat policy {policy!r} (valid: {', '.join(decoder.CHOICES['remat'])})")
    c = copy.deepcopy(cfg)
    c.model.remat = policy
    rep = plan.plan(c, tgt.name, name=args.config, chip=chip, probes=not args.no_probes,
                    measure_steps=args.measure, tgt=tgt)
    reports.append(rep)
    if not args.json:
      print(roofline.format_report(rep), flush=True)
  if len(reports) > 1 and not args.json:
    print(roofline.format_remat_table(reports))
  out = reports[0] if len(reports) == 1 else {"remat_sweep": reports}
  if args.json:
    print(json.dumps(out, indent=1, default=str))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1, default=str)
  return 0


def _first_line(obj) -> str:
  doc = (getattr(obj, "__doc__", None) or "").strip()
  return doc.splitlines()[0] if doc else ""


def _list() -> int:
  import importlib  # pylint: disable=g-import-not-at-top
  from jaxft import adapters, config as config_lib, models, objectives, optimizers  # pylint: disable=g-import-not-at-top
  print("configs (jaxft train NAME):")
  for name in config_lib.config_names():
    module = importlib.import_module(f"{config_lib.CONFIG_PACKAGE}.{name}")
    print(f"  {name:<24} {_first_line(module)}")
  from jaxft.models import pretrained  # pylint: disable=g-import-not-at-top
  print("pretrained models (model.pretrained=NAME, jaxft generate --model NAME; or a path):")
  for name, entry in sorted(pretrained.PRETRAINED.items()):
    print(f"  {name:<24} {entry.description}")
    print(f"  {'':<24} install: {entry.install}")
  tables = [("models", models.MODELS, models.DEFAULTS), ("adapters", adapters.ADAPTERS, adapters.DEFAULTS),
            ("objectives", objectives.OBJECTIVES, objectives.DEFAULTS),
            ("optimizers", optimizers.OPTIMIZERS, optimizers.DEFAULTS)]
  for title, table, defaults in tables:
    print(f"{title}:")
    for name in sorted(table):
      fields = ", ".join(f"{k}={v!r}" for k, v in defaults[name].items())
      entry = table[name]
      doc = _first_line(entry[0] if isinstance(entry, tuple) else entry)
      print(f"  {name:<24} {doc}")
      print(f"  {'':<24} fields: {fields}")
  return 0


def _user_errors() -> tuple[type[BaseException], ...]:
  from jaxft import checkpoint, runner  # pylint: disable=g-import-not-at-top
  return (ValueError, KeyError, FileNotFoundError, runner.NonFiniteLossError,
          checkpoint.CheckpointCorruptError)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, overrides = _split_overrides(argv)
  args = _parser().parse_args(rest)
  if args.command == "list":
    return _list()
  USER_ERRORS = _user_errors()  # pylint: disable=invalid-name
  try:
    if args.command == "train":
      return _train(args, overrides)
    if args.command == "compile":
      return _compile(args, overrides)
    _setup_cache()
    from jaxft import commands  # pylint: disable=g-import-not-at-top
    if args.command == "export":
      return commands.export(args.workdir, fmt=args.format, out=args.out)
    if args.command == "generate":
      if bool(args.model) == bool(args.adapter):
        raise ValueError("give exactly one of --model NAME and --adapter WORKDIR")
      return commands.generate(args.model or args.adapter, args.prompt,
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, seed=args.seed, raw=args.raw)
    return commands.eval_command(args.target, config_name=args.config, overrides=overrides,
                                 out=args.out)
  except KeyboardInterrupt:
    print("jaxft: interrupted; the newest checkpoint in the workdir resumes the run", file=sys.stderr)
    return 130
  except USER_ERRORS as e:
    if os.environ.get("JAXFT_TRACEBACK"):
      raise
    print(f"jaxft: error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
