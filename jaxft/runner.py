"""The training loop behind `jaxft train`: one readable top-to-bottom run.

    mesh -> data -> model + adapter -> optimizer -> sharded state (restored if the
    workdir holds checkpoints) -> jitted step -> loop (log, eval, checkpoint)

Call `run(config, workdir)` from Python or a notebook; `jaxft train` is a thin
wrapper. Multi-host: call `jax.distributed.initialize` first (the CLI does).
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxft import adapters, checkpoint, data, logbook, models, names, objectives, optimizers
from jaxft import sharding, train


class NonFiniteLossError(RuntimeError):
  """The loss or gradient became NaN/Inf; the run stopped with the last good state saved."""


def _section(cfg: ml_collections.ConfigDict, key: str) -> dict[str, Any]:
  return cfg[key].to_dict()


def build_task(cfg):
  """(model module, model config, Task) from a resolved config."""
  model = names.lookup(models.MODELS, cfg.model.name, "model")
  model_fields = {k: v for k, v in cfg.model.to_dict().items() if k != "name"}
  mcfg = model.DecoderConfig.from_dict(model_fields)
  adapter = names.lookup(adapters.ADAPTERS, cfg.adapter.name, "adapter")
  objective = names.lookup(objectives.OBJECTIVES, cfg.objective.name, "objective")
  apply = lambda params, tokens, **kw: model.apply(params, tokens, mcfg, **kw)
  task = train.Task(apply, adapter, _section(cfg, "adapter"), objective.loss_fn,
                    _section(cfg, "objective"))
  return model, mcfg, task


def state_shardings(abstract: train.TrainState, model, mcfg, task: train.Task, tx, mesh):
  """NamedShardings for every leaf of the train state, from the logical-axis rules."""
  frozen_axes, trainable_axes = task.adapter.logical_axes(
      model.logical_axes(mcfg), abstract.trainable, task.adapter_spec)
  frozen = sharding.tree_shardings(frozen_axes, abstract.frozen, mesh)
  trainable = sharding.tree_shardings(trainable_axes, abstract.trainable, mesh)
  rep = sharding.replicated(mesh)
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, trainable,
                              transform_non_params=lambda _: rep)
  return train.TrainState(rep, frozen, trainable, opt, rep)


def _checkpointed(state: train.TrainState) -> dict:
  """What a checkpoint holds of the state (frozen params are rebuilt from the config)."""
  return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state,
          "rng": state.rng}


def _config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key), current.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _config_diff(a, b, f"{prefix}{key}.")
    elif json.dumps(a) != json.dumps(b):
      out.append(f"{prefix}{key}: {a!r} -> {b!r}")
  return out


def _device_batch(batch: dict, shard: jax.sharding.NamedSharding) -> dict:
  return {k: jax.make_array_from_process_local_data(shard, v) for k, v in batch.items()}


def evaluate(eval_fn, state, cfg, rows, tokenizer, shard, vocab_size) -> dict:
  """Perplexity over up to `eval_batches` held-out batches (token-weighted)."""
  it = data.make_pipeline(rows, tokenizer, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                          seed=cfg.seed, vocab_size=vocab_size, shuffle=False, repeat=False,
                          process_index=jax.process_index(), process_count=jax.process_count())
  totals: dict[str, float] = {}
  for i, batch in enumerate(it):
    if i >= cfg.eval_batches:
      break
    sums = jax.device_get(eval_fn(state, _device_batch(batch, shard)))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  n = max(totals.get("num_tokens", 0.0), 1.0)
  out = {k: v / n for k, v in totals.items() if k != "num_tokens"}
  out["num_tokens"] = totals.get("num_tokens", 0.0)
  out["perplexity"] = float(np.exp(out.get("xent", out.get("loss", np.nan))))
  return out


def run(cfg: ml_collections.ConfigDict, workdir: str, *, progress: bool | None = None,
        devices=None) -> dict:
  """Trains `cfg` in `workdir`, resuming from its newest valid checkpoint.

  Args:
    cfg: a resolved config (`jaxft.config.load(name, overrides)`).
    workdir: run directory; holds metrics.jsonl, config.json and checkpoints/.
    progress: force the progress bar on/off (default: on when stderr is a terminal).
    devices: the devices of the mesh (default: all).

  Returns:
    {'step', 'final' (last logged metrics), 'workdir', 'state' (the final TrainState)}.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0

  # ---------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(cfg.mesh, devices)
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = cfg.batch_size // cfg.grad_accum
  if micro % dp:
    raise sharding.MeshError(
        f"batch_size/grad_accum = {micro} rows must divide over data*fsdp = {dp} devices")

  # ---------------------------------------------------------------- data
  data_cfg, vocab_size = cfg.data, cfg.model.vocab_size
  tokenizer = data.load_tokenizer(data_cfg.tokenizer)
  data.check_vocab(tokenizer, vocab_size)
  train_docs = data.load_documents(data_cfg, "train")
  train_rows = data.pack_documents(train_docs, tokenizer, seq_len=cfg.seq_len,
                                   packing=data_cfg.packing)
  eval_rows = None
  if cfg.eval_every > 0:
    eval_rows = data.pack_documents(data.load_documents(data_cfg, "eval"), tokenizer,
                                    seq_len=cfg.seq_len, packing=data_cfg.packing)
  train_iter = data.make_pipeline(
      train_rows, tokenizer, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
      vocab_size=vocab_size, shuffle=data_cfg.shuffle, packing=data_cfg.packing,
      process_index=jax.process_index(), process_count=jax.process_count())

  # ---------------------------------------------------------------- model + adapter + optimizer
  model, mcfg, task = build_task(cfg)
  tx, schedule = optimizers.build(_section(cfg, "optimizer"), cfg.steps)
  init_fn = lambda key: train.init_state(
      key, lambda k: model.init(k, mcfg), task.adapter, task.adapter_spec, tx,
      param_dtype=cfg.param_dtype)

  # ---------------------------------------------------------------- sharded state
  key = jax.random.PRNGKey(cfg.seed)
  abstract = jax.eval_shape(init_fn, key)
  shardings = state_shardings(abstract, model, mcfg, task, tx, mesh)
  state = jax.jit(init_fn, out_shardings=shardings)(key)

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
  abstract_ckpt = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      _checkpointed(abstract), _checkpointed(shardings))
  restored = ckpt.restore_latest(abstract_ckpt)
  config_dict = json.loads(cfg.to_json())
  start = 0
  book_msgs = []
  if restored is not None:
    start, saved, data_state, saved_config = restored
    state = train.TrainState(saved["step"], state.frozen, saved["trainable"],
                             saved["opt_state"], saved["rng"])
    train_iter.set_state(data_state)
    book_msgs.append(f"resumed from step {start} in {ckpt.directory}")
    for line in _config_diff(saved_config, config_dict):
      book_msgs.append(f"warning: config differs from the checkpoint's: {line}")

  # ---------------------------------------------------------------- jitted steps
  batch_shard = sharding.batch_sharding(mesh)
  step_fn = jax.jit(train.make_train_step(task, tx, grad_accum=cfg.grad_accum,
                                          compute_dtype=cfg.compute_dtype),
                    in_shardings=(shardings, batch_shard),
                    out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  eval_fn = jax.jit(train.make_eval_step(task, compute_dtype=cfg.compute_dtype),
                    in_shardings=(shardings, batch_shard), out_shardings=sharding.replicated(mesh))
  t0 = time.perf_counter()
  abstract_batch = {k: jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), v.dtype,
                                            sharding=batch_shard)
                    for k, v in train_rows.arrays.items()}
  step_fn = step_fn.lower(state, abstract_batch).compile()  # ahead of time: timed, not in step 1
  compile_s = time.perf_counter() - t0

  # ---------------------------------------------------------------- loop
  book = logbook.Logbook(workdir, total_steps=cfg.steps, start_step=start, enabled=is_main,
                         progress=progress)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config_dict, f, indent=1)
  n_train = adapters.count_params(state.trainable)
  n_total = n_train + adapters.count_params(state.frozen)
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
  book.message(
      f"jaxft: {cfg.adapter.name} on {cfg.model.name} | trainable params {n_train:,} of {n_total:,} "
      f"({100.0 * n_train / max(n_total, 1):.2f}%) | optimizer state {opt_bytes / 2**20:.2f} MiB | "
      f"mesh {dict(mesh.shape)} | {jax.device_count()} devices, {jax.process_count()} processes | "
      f"step compiled in {compile_s:.1f} s")
  stats = data.data_stats(train_rows)
  book.message(f"data: {data_cfg.name} train {stats['docs']:,} docs, {stats['tokens']:,} tokens, "
               f"{stats['rows']:,} rows of {cfg.seq_len} ({100 * stats['fill']:.1f}% filled)"
               + (f"; eval {eval_rows.num_docs:,} docs" if eval_rows is not None else ""))
  skipped = train_docs.stats
  if skipped.skipped:
    book.message(f"data: skipped {skipped.skipped} malformed rows (data.on_malformed='skip'), "
                 f"first: {'; '.join(skipped.skipped_at)}")
  for m in book_msgs:
    book.message(m)
  book.write({"step": start, "event": "start", "trainable_params": n_train, "total_params": n_total,
              "optimizer_state_bytes": opt_bytes, "resumed": restored is not None,
              "data": stats, "skipped_rows": skipped.skipped, "compile_time_s": compile_s})

  step = start
  saved_step = start if restored is not None else -1
  tokens_per_step = cfg.batch_size * cfg.seq_len
  last = {}
  try:
    while step < cfg.steps:
      t0 = time.perf_counter()
      data_state = train_iter.get_state()  # before this batch: what a save after a NaN keeps
      host_batch = next(train_iter)
      data.check_batch(host_batch, vocab_size)
      batch = _device_batch(host_batch, batch_shard)
      state, metrics = step_fn(state, batch)
      metrics = jax.device_get(metrics)
      dt = time.perf_counter() - t0
      if not metrics["finite"]:
        _stop_nonfinite(step + 1, metrics, state, ckpt, saved_step, data_state, config_dict, book,
                        cfg)
      step += 1
      last = {"step": step, "loss": float(metrics["loss"]),
              "learning_rate": float(schedule(step - 1)), "grad_norm": float(metrics["grad_norm"]),
              "tokens_per_s": tokens_per_step / dt, "step_time_s": dt,
              **{k: float(v) for k, v in metrics.items() if k not in ("loss", "grad_norm", "finite")}}
      book.progress(step, last["loss"], last["tokens_per_s"])
      if step % cfg.log_every == 0 or step == cfg.steps or step == start + 1:
        book.write(last)
        if not book.interactive:
          book.message(f"step {step:>6} | loss {last['loss']:.4f} | grad_norm {last['grad_norm']:.3f} "
                       f"| lr {last['learning_rate']:.2e} | {last['tokens_per_s']:,.0f} tok/s")
      if cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == cfg.steps):
        ev = evaluate(eval_fn, state, cfg, eval_rows, tokenizer, batch_shard, vocab_size)
        book.write({"step": step, "split": "eval", **ev})
        book.message(f"step {step:>6} | eval loss {ev.get('loss', float('nan')):.4f} | "
                     f"perplexity {ev['perplexity']:.2f}")
      if step % cfg.checkpoint_every == 0 or step == cfg.steps:
        ckpt.save(step, _checkpointed(state), data_state=train_iter.get_state(), config=config_dict)
        saved_step = step
    ckpt.wait()
  finally:
    ckpt.close()
    book.close()
  return {"step": step, "final": last, "workdir": workdir, "state": state}


def _stop_nonfinite(step, metrics, state, ckpt, saved_step, data_state, config_dict, book, cfg):
  """Saves the last good state (the step did not apply the update) and raises."""
  good = int(jax.device_get(state.step))
  if good != saved_step and good > 0:
    ckpt.save(good, _checkpointed(state), data_state=data_state, config=config_dict)
    ckpt.wait()
  where = f"saved at step {good}" if good > 0 else "nothing to save (no update had been applied)"
  msg = (f"non-finite loss at step {step}: loss={float(metrics['loss'])}, "
         f"grad_norm={float(metrics['grad_norm'])}; the update was not applied and the run stopped. "
         f"Last good state {where} in {ckpt.directory}. Try a lower optimizer.lr "
         f"(now {cfg.optimizer.lr}) or a smaller optimizer.clip_norm.")
  book.write({"step": step, "event": "nonfinite", "loss": float(metrics["loss"]),
              "grad_norm": float(metrics["grad_norm"])})
  book.message(msg)
  raise NonFiniteLossError(msg)
