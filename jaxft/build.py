"""Building the parts of a run from a resolved config: model, tokenizer, data splits, task,
sharded train state; and loading a finished run's merged params back from its workdir.

Shared by the training loop (`jaxft.runner`), `jaxft export / generate / eval` and notebooks.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

import jax
import ml_collections

from jaxft import adapters, checkpoint, data, models, names, objectives, optimizers
from jaxft import extras, sharding, train


def section(cfg: ml_collections.ConfigDict, key: str) -> dict[str, Any]:
  return cfg[key].to_dict()


class Model(NamedTuple):
  """A model to train: its module, config, host params (None = init from scratch), tokenizer, meta."""
  module: Any
  cfg: Any
  params: Any
  tokenizer: Any
  meta: dict


def load_model(cfg) -> Model:
  """The config's model: built from `model.*` fields, or loaded from `model.pretrained`."""
  module = names.lookup(models.MODELS, cfg.model.name, "model")
  fields = {k: v for k, v in cfg.model.to_dict().items() if k not in ("name", "pretrained")}
  if not cfg.model.get("pretrained"):
    return Model(module, module.DecoderConfig.from_dict(fields), None, None, {})
  from jaxft.models import pretrained  # pylint: disable=g-import-not-at-top
  pcfg, params, tokenizer, meta = pretrained.load(cfg.model.pretrained, dtype=cfg.param_dtype)
  # Architecture comes from the checkpoint; how to run it (remat, scan unroll) from the config.
  pcfg = dataclasses.replace(pcfg, **{k: fields[k] for k in ("remat", "scan_unroll") if k in fields})
  return Model(module, pcfg, params, tokenizer, meta)


def tokenizer_for(cfg, model: Model):
  """data.tokenizer 'auto' = the pretrained model's own, else the built-in BPE."""
  name = cfg.data.tokenizer
  if model.tokenizer is not None:
    if name not in ("auto", "model"):
      raise ValueError(f"data.tokenizer={name!r} but model.pretrained={cfg.model.pretrained!r} "
                       "has its own tokenizer; set data.tokenizer='auto'")
    return model.tokenizer
  return data.load_tokenizer("shakespeare_bpe" if name in ("auto", "model") else name)


def special_ids(model: Model, tokenizer) -> dict:
  """{pad, bos, eos}: the checkpoint's own ids when it names them (GGUF metadata), else by name."""
  return model.meta.get("special_ids") or data.special_ids(tokenizer)


def stop_ids(model: Model, tokenizer) -> tuple[int, ...]:
  """Token ids that end a generation: the checkpoint's (eos, end-of-turn) or the eos."""
  return tuple(model.meta.get("stop_ids", ())) or (special_ids(model, tokenizer)["eos"],)


def renderer(cfg, model: Model):
  """(prompt, response) -> (prompt_text, full_text) through the model's chat template, or None."""
  template = model.meta.get("chat_template")
  if not cfg.data.get("chat_template", False) or not template:
    return None
  from jaxft.data import chat  # pylint: disable=g-import-not-at-top
  return lambda prompt, response: chat.sft_strings(template, prompt, response)


class Split(NamedTuple):
  rows: Any                 # data.PackedRows
  examples: Any             # the task examples (None for plain text)
  stats: Any                # data.SourceStats of the read (skipped rows)


def make_split(cfg, split: str, tokenizer, model: Model) -> Split:
  """Packed rows of a split: SFT examples (prompt masked) for tasks, documents for text."""
  if cfg.data.name in data.TASKS:
    examples = data.load_examples(cfg.data, split)
    render = renderer(cfg, model)
    eos = None if render else special_ids(model, tokenizer)["eos"]
    rows = data.pack_examples(examples, tokenizer, seq_len=cfg.seq_len, render=render,
                              eos_id=eos, packing=cfg.data.packing)
    return Split(rows, examples, getattr(examples, "stats", data.SourceStats()))
  docs = data.load_documents(cfg.data, split)
  rows = data.pack_documents(docs, tokenizer, seq_len=cfg.seq_len, packing=cfg.data.packing)
  return Split(rows, None, docs.stats)


def build_task(cfg, model: Model):
  """Task (apply + adapter + objective) from a resolved config and its model."""
  module, mcfg = model.module, model.cfg
  adapter = names.lookup(adapters.ADAPTERS, cfg.adapter.name, "adapter")
  objective = names.lookup(objectives.OBJECTIVES, cfg.objective.name, "objective")
  apply = lambda params, tokens, **kw: module.apply(params, tokens, mcfg, **kw)
  task = train.Task(apply, adapter, section(cfg, "adapter"), objective.loss_fn,
                    section(cfg, "objective"))
  # + the dense KD teacher, CAST weight scaling, the adapter's optimizer transform (CoDyRA).
  return extras.with_extras(task, cfg)


def needs_calibration(task: train.Task) -> int:
  """How many calibration batches the adapter wants (0 = not a data-driven initialiser)."""
  flag = getattr(task.adapter, "CALIBRATION", False)
  if not (flag(task.adapter_spec) if callable(flag) else flag):
    return 0
  n = int(task.adapter_spec.get("calib_batches", 0))
  if n < 1:
    raise ValueError(f"adapter {task.adapter_spec.get('name')!r} is initialised from data: "
                     f"adapter.calib_batches must be >= 1, got {n}")
  return n


def calibration_batches(cfg, model: Model, task: train.Task, mesh, train_rows=None):
  """The first `adapter.calib_batches` training batches (same pipeline and seed as the
  run, sharded like training), stacked to (k, B, L); None when the adapter needs none."""
  n = needs_calibration(task)
  if not n:
    return None
  import numpy as np  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizer_for(cfg, model)
  if train_rows is None:
    train_rows = make_split(cfg, "train", tokenizer, model).rows
  it = data.make_pipeline(
      train_rows, tokenizer, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
      vocab_size=model.cfg.vocab_size, shuffle=cfg.data.shuffle, packing=cfg.data.packing,
      process_index=jax.process_index(), process_count=jax.process_count())
  host = [next(it) for _ in range(n)]
  shard = jax.sharding.NamedSharding(mesh, jax.P(None, ("data", "fsdp")))
  return {k: jax.make_array_from_process_local_data(shard, np.stack([b[k] for b in host]))
          for k in host[0]}


def init_sharded_state(cfg, model: Model, task: train.Task, tx, mesh, *, train_rows=None):
  """(state, shardings, abstract state): the TrainState built directly in its shardings.

  Params come from `model.params` (pretrained, passed as a jit argument, never baked
  into the program) or are initialised from `cfg.seed` inside the jitted init.
  Data-driven adapters (EVA, CorDA, LoRA-GA, LoRA-SB) get a `Calibration` over the
  first `adapter.calib_batches` batches of the training pipeline (`train_rows`, built
  here when not given), also a jit argument, so the calibration pass runs sharded
  inside the same jitted init and is repeated exactly when a run is restored.
  """
  from jaxft.adapters import calibrate  # pylint: disable=g-import-not-at-top

  def init_fn(key, host_params, batches):
    init_params = ((lambda k: model.module.init(k, model.cfg)) if host_params is None
                   else (lambda k: host_params))
    calib = None if batches is None else calibrate.Calibration(
        task.apply, task.objective, task.objective_spec, batches)
    return train.init_state(key, init_params, task.adapter, task.adapter_spec, tx,
                            param_dtype=cfg.param_dtype, calib=calib,
                            frozen_dtype=cfg.get("frozen_dtype", ""))

  key = jax.random.PRNGKey(cfg.seed)
  batches = calibration_batches(cfg, model, task, mesh, train_rows)
  abstract = jax.eval_shape(init_fn, key, model.params, batches)
  shardings = state_shardings(abstract, model.module, model.cfg, task, tx, mesh)
  state = jax.jit(init_fn, out_shardings=shardings)(key, model.params, batches)
  return state, shardings, abstract


def abstract_checkpoint(abstract: train.TrainState, shardings: train.TrainState, adapter=None):
  """The restore target: checkpointed leaves as ShapeDtypeStructs carrying their shardings."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      checkpointed(abstract, adapter), checkpointed(shardings, adapter))


def state_shardings(abstract: train.TrainState, model, mcfg, task: train.Task, tx, mesh):
  """NamedShardings for every leaf of the train state, from the logical-axis rules."""
  frozen_axes, trainable_axes = task.adapter.logical_axes(
      model.logical_axes(mcfg), abstract.trainable, task.adapter_spec)
  frozen = sharding.tree_shardings(frozen_axes, abstract.frozen, mesh)
  trainable = sharding.tree_shardings(trainable_axes, abstract.trainable, mesh)
  rep = sharding.replicated(mesh)
  # Params-shaped state leaves follow their param; other shapes (SM3, Fira, ...) replicate.
  opt = optimizers.state_shardings(tx, abstract.opt_state, abstract.trainable, trainable, rep)
  return train.TrainState(rep, frozen, trainable, opt, rep)


def mutable_paths(adapter, frozen, trainable) -> list[str]:
  """Frozen leaves a periodic adapter update changes (saved in checkpoints).

  An adapter declares leaf names in `MUTABLE` (e.g. SpIEL's ('sd_idx',)); a frozen
  leaf `<linear>/<name>` is mutable when its name is listed and the adapter trains
  something under the same `<linear>`.
  """
  names_ = tuple(getattr(adapter, "MUTABLE", ()) if adapter is not None else ())
  if not names_:
    return []
  trained = {p.rpartition("/")[0] for p in adapters.base.flatten(trainable)}
  return [p for p in adapters.base.flatten(frozen)
          if p.rpartition("/")[2] in names_ and p.rpartition("/")[0] in trained]


def checkpointed(state: train.TrainState, adapter=None) -> dict:
  """What a checkpoint holds of the state: frozen params are rebuilt from the config,
  except the adapter's `MUTABLE` leaves (`mutable_paths`), saved under 'mutable'."""
  out = {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state,
         "rng": state.rng}
  paths = mutable_paths(adapter, state.frozen, state.trainable)
  if paths:
    flat = adapters.base.flatten(state.frozen)
    out["mutable"] = adapters.base.unflatten({p: flat[p] for p in paths})
  return out


def restored_state(state: train.TrainState, saved: dict) -> train.TrainState:
  """`state` with a checkpoint's leaves put back (its saved mutable frozen leaves included)."""
  frozen = state.frozen
  if "mutable" in saved:
    flat = dict(adapters.base.flatten(frozen))
    flat.update(adapters.base.flatten(saved["mutable"]))
    frozen = adapters.base.unflatten(flat)
  return train.TrainState(saved["step"], frozen, saved["trainable"], saved["opt_state"],
                          saved["rng"])


def config_of_run(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run saved in `workdir/config.json`."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} holds no config.json: not a jaxft run directory")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_params(workdir: str, devices=None):
  """(cfg, Model with merged params of the newest valid checkpoint, tokenizer, step).

  The adapter is merged into the base weights, so the result runs (and exports)
  as a plain model.
  """
  cfg = config_of_run(workdir)
  devices = devices or [jax.devices()[0]]
  mesh = sharding.make_mesh({"data": len(devices), "fsdp": 1, "tensor": 1}, devices)
  model = load_model(cfg)
  task = build_task(cfg, model)
  tx, _ = optimizers.build(section(cfg, "optimizer"), cfg.steps)
  state, shardings, abstract = init_sharded_state(cfg, model, task, tx, mesh)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
  try:
    restored = ckpt.restore_latest(abstract_checkpoint(abstract, shardings, task.adapter))
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint to load")
  step, saved, _, _ = restored
  state = restored_state(state, saved)
  params = jax.jit(lambda f, t: task.adapter.merge(f, t, task.adapter_spec))(
      state.frozen, state.trainable)
  return cfg, model._replace(params=params), tokenizer_for(cfg, model), step
