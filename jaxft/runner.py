"""The training loop behind `jaxft train`: one readable top-to-bottom run.

    mesh -> data -> model + adapter -> optimizer -> sharded state (restored if the
    workdir holds checkpoints) -> jitted step -> loop (log, eval, checkpoint)

Call `run(config, workdir)` from Python or a notebook; `jaxft train` is a thin
wrapper. Multi-host: call `jax.distributed.initialize` first (the CLI does).
"""
from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np

from jaxft import adapters, build, checkpoint, data, logbook, optimizers, sharding, train


class NonFiniteLossError(RuntimeError):
  """The loss or gradient became NaN/Inf; the run stopped with the last good state saved."""


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

  # ---------------------------------------------------------------- model + data
  model = build.load_model(cfg)
  vocab_size = model.cfg.vocab_size
  tokenizer = build.tokenizer_for(cfg, model)
  data.check_vocab(tokenizer, vocab_size)
  train_split = build.make_split(cfg, "train", tokenizer, model)
  eval_split = build.make_split(cfg, "eval", tokenizer, model) if cfg.eval_every > 0 else None
  train_rows = train_split.rows
  eval_rows = eval_split.rows if eval_split else None
  train_iter = data.make_pipeline(
      train_rows, tokenizer, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
      vocab_size=vocab_size, shuffle=cfg.data.shuffle, packing=cfg.data.packing,
      process_index=jax.process_index(), process_count=jax.process_count())

  # ---------------------------------------------------------------- adapter + optimizer
  task = build.build_task(cfg, model)
  # Keep activations split by rows under FSDP (else XLA may gather the batch, not the weights).
  task = task._replace(apply=sharding.constrain_activations(task.apply, mesh))
  tx, schedule = optimizers.build(build.section(cfg, "optimizer"), cfg.steps)

  # ---------------------------------------------------------------- sharded state
  state, shardings, abstract = build.init_sharded_state(cfg, model, task, tx, mesh,
                                                         train_rows=train_rows)

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
  restored = ckpt.restore_latest(build.abstract_checkpoint(abstract, shardings, task.adapter))
  config_dict = json.loads(cfg.to_json())
  start = 0
  book_msgs = []
  if restored is not None:
    start, saved, data_state, saved_config = restored
    state = build.restored_state(state, saved)  # incl. frozen leaves an update changed
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
  update = periodic_update(cfg, task, shardings)

  # ---------------------------------------------------------------- loop
  book = logbook.Logbook(workdir, total_steps=cfg.steps, start_step=start, enabled=is_main,
                         progress=progress)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config_dict, f, indent=1)
  n_train = adapters.count_params(state.trainable)
  n_total = n_train + adapters.count_params(  # the KD teacher copy is not part of the model
      {k: v for k, v in state.frozen.items() if k != train.TEACHER})
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
  book.message(
      f"jaxft: {cfg.adapter.name} on {cfg.model.get('pretrained') or cfg.model.name} | trainable params {n_train:,} of {n_total:,} "
      f"({100.0 * n_train / max(n_total, 1):.2f}%) | optimizer state {opt_bytes / 2**20:.2f} MiB | "
      f"mesh {dict(mesh.shape)} | {jax.device_count()} devices, {jax.process_count()} processes | "
      f"step compiled in {compile_s:.1f} s")
  stats = data.data_stats(train_rows)
  book.message(f"data: {cfg.data.name} train {stats['docs']:,} docs, {stats['tokens']:,} tokens, "
               f"{stats['rows']:,} rows of {cfg.seq_len} ({100 * stats['fill']:.1f}% filled)"
               + (f"; eval {eval_rows.num_docs:,} docs" if eval_rows is not None else ""))
  skipped = train_split.stats
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
  accuracy = _accuracy_fn(cfg, model, task, tokenizer, eval_split, book)
  try:
    if accuracy is not None and restored is None:
      accuracy(state, 0)  # the "before" number of every fine-tuning table
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
                        cfg, task.adapter)
      step += 1
      if update is not None and step % update.every == 0:
        t1 = time.perf_counter()
        state = jax.block_until_ready(update(state, step, batch))
        book.write({"step": step, "event": "adapter_update",
                    "seconds": time.perf_counter() - t1})
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
        if accuracy is not None:
          accuracy(state, step)
      if step % cfg.checkpoint_every == 0 or step == cfg.steps:
        ckpt.save(step, build.checkpointed(state, task.adapter), data_state=train_iter.get_state(),
                  config=config_dict)
        saved_step = step
    ckpt.wait()
  finally:
    ckpt.close()
    book.close()
  return {"step": step, "final": last, "workdir": workdir, "state": state}


def periodic_update(cfg, task: train.Task, shardings: train.TrainState):
  """`fn(state, step, batch) -> state` running the adapter's periodic update, or None.

  Contract (SpIEL reselection, HFT stages, SST rounds): an adapter module may define
  `periodic(spec) -> k` (steps; 0 = never) and `update(key, state, step, task, batch)
  -> TrainState`, called outside the compiled step after every step with step % k == 0
  (`batch`: that step's device batch, `key`: fold_in(PRNGKey(seed), step)). The new
  state must keep every leaf's shape and dtype; it is put back onto the step's
  shardings, so the ahead-of-time compiled step is reused as is. Frozen leaves it
  changes are named in the module's `MUTABLE` (saved in checkpoints, see
  `build.checkpointed`).
  """
  adapter, spec = task.adapter, task.adapter_spec
  if not hasattr(adapter, "update"):
    return None
  if not hasattr(adapter, "periodic"):
    raise ValueError(f"adapter {spec.get('name')!r} defines update() but not periodic(spec)")
  every = int(adapter.periodic(spec))
  if every <= 0:
    return None
  base_key = jax.random.PRNGKey(cfg.seed)

  def fn(state, step, batch):
    if step % every:
      return state
    new = adapter.update(jax.random.fold_in(base_key, step), state, step, task, batch)
    before = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    after = jax.tree.map(lambda x: (x.shape, x.dtype), new)
    if before != after:
      raise ValueError(f"adapter {spec.get('name')!r}: update() changed the state's structure, "
                       "shapes or dtypes; it must keep them (the compiled step is reused)")
    return jax.device_put(new, shardings)

  fn.every = every
  return fn


def _accuracy_fn(cfg, model: build.Model, task: train.Task, tokenizer, eval_split, book):
  """`fn(state, step)` that logs held-out task accuracy (greedy + verifier), or None."""
  if eval_split is None or eval_split.examples is None or cfg.eval_examples <= 0:
    return None
  from jaxft import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  examples = list(eval_split.examples)[:cfg.eval_examples]
  stop_ids = build.stop_ids(model, tokenizer)
  # Adapters that cannot merge (bottlenecks, prompts, ...) generate unmerged through their hook.
  mergeable = getattr(task.adapter, "MERGEABLE", True)
  merge = jax.jit(lambda frozen, trainable: (task.adapter.merge if mergeable else
                                             task.adapter.combine)(frozen, trainable,
                                                                   task.adapter_spec))
  linear = {} if mergeable else {"linear": task.adapter.linear_hook(task.adapter_spec)}

  def fn(state, step):
    params = merge(state.frozen, state.trainable)
    res = evaluate_lib.task_accuracy(
        params, model.cfg, tokenizer, examples, render=build.renderer(cfg, model),
        stop_ids=stop_ids, **linear,
        batch_size=min(len(examples), 32), max_new_tokens=cfg.eval_max_new_tokens,
        progress=book.interactive)
    book.write({"step": step, "split": "eval", "task_accuracy": res["accuracy"], "n": res["n"],
                "eval_seconds": res["seconds"], "samples": res["samples"][:3]})
    book.message(f"step {step:>6} | task accuracy {res['accuracy']:.3f} on {res['n']} held-out "
                 f"examples ({res['seconds']:.0f} s)")
    return res

  return fn


def _stop_nonfinite(step, metrics, state, ckpt, saved_step, data_state, config_dict, book, cfg,
                    adapter=None):
  """Saves the last good state (the step did not apply the update) and raises."""
  good = int(jax.device_get(state.step))
  if good != saved_step and good > 0:
    ckpt.save(good, build.checkpointed(state, adapter), data_state=data_state, config=config_dict)
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
