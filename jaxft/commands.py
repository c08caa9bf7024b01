"""The `jaxft export`, `jaxft generate` and `jaxft eval` commands (the CLI parses, these act).

Each takes either a run directory (the run's config, its newest valid checkpoint, the
adapter merged into the base weights) or a model name / path.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np

from jaxft import build, config as config_lib, data, evaluate, objectives, train as train_lib
from jaxft.models import decoder, generate as generate_lib


def _is_run(target: str) -> bool:
  return os.path.isdir(target) and os.path.exists(os.path.join(target, "config.json"))


def load_target(target: str, config_name: str = "", overrides=()):
  """(cfg or None, build.Model with params, tokenizer, step) for a run dir or a model name/path."""
  if _is_run(target):
    cfg, model, tokenizer, step = build.restore_params(target)
    for item in overrides:  # eval-time fields (eval_examples, data.*) may change
      key, value = item.split("=", 1)
      config_lib.set_value(cfg, key.removeprefix("--").removeprefix("config."), value)
    return cfg, model, tokenizer, step
  from jaxft.models import pretrained  # pylint: disable=g-import-not-at-top
  cfg = None
  if config_name:
    cfg = config_lib.load(config_name, [f"model.pretrained={target}", *overrides])
  mcfg, params, tokenizer, meta = pretrained.load(target)
  return cfg, build.Model(decoder, mcfg, params, tokenizer, meta), tokenizer, 0


EXPORT_FORMATS = ("hf", "peft", "peft+base")


def export(workdir: str, *, fmt: str, out: str) -> int:
  """Writes the run's model for other libraries.

  hf: the model with the adapter merged (config.json + model.safetensors).
  peft: a low-rank adapter in PyTorch PEFT's format (adapter_config.json +
    adapter_model.safetensors) for the run's original base model.
  peft+base: the same plus the unadapted base model as HF under OUT/base (for bases
    that have no HF checkpoint of their own: GGUF imports, from-scratch models).
  """
  if fmt not in EXPORT_FORMATS:
    raise ValueError(f"unknown export format {fmt!r} (valid: {', '.join(EXPORT_FORMATS)})")
  if not _is_run(workdir):
    raise FileNotFoundError(f"{workdir} is not a jaxft run directory (no config.json)")
  from jaxft.models import hf  # pylint: disable=g-import-not-at-top
  if fmt.startswith("peft"):
    return _export_peft(workdir, out, with_base=fmt == "peft+base")
  _, model, tokenizer, step = build.restore_params(workdir)
  hf.save_hf(out, model.cfg, jax.device_get(model.params),
             architecture=model.meta.get("architecture", "llama"), tokenizer=tokenizer,
             chat_template=model.meta.get("chat_template"),
             special_ids=build.special_ids(model, tokenizer))
  print(f"exported step {step} of {workdir} to {out} (HF format, adapter merged)")
  return 0


def restore_unmerged(workdir: str):
  """(cfg, build.Model with the base params, task, state at init (its mutable frozen leaves
  as saved), trained trainable, step)."""
  from jaxft import checkpoint, optimizers, sharding  # pylint: disable=g-import-not-at-top
  cfg = build.config_of_run(workdir)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, [jax.devices()[0]])
  model = build.load_model(cfg)
  task = build.build_task(cfg, model)
  tx, _ = optimizers.build(build.section(cfg, "optimizer"), cfg.steps)
  state, shardings, abstract = build.init_sharded_state(cfg, model, task, tx, mesh)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
  try:
    restored = ckpt.restore_latest(build.abstract_checkpoint(abstract, shardings, task.adapter))
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint to load")
  step, saved, _, _ = restored
  # frozen leaves a periodic update changed (e.g. SpIEL's indices) come from the checkpoint
  state = state._replace(frozen=build.restored_state(state, saved).frozen)
  return cfg, model, task, state, saved["trainable"], step


def _export_peft(workdir: str, out: str, *, with_base: bool) -> int:
  from jaxft.adapters import peft_format  # pylint: disable=g-import-not-at-top
  from jaxft.models import hf  # pylint: disable=g-import-not-at-top
  cfg, model, task, init_state, trainable, step = restore_unmerged(workdir)
  member = getattr(task.adapter, "MEMBER", task.adapter)
  arch = model.meta.get("architecture", "llama")
  if arch == "gpt2":
    raise ValueError("PEFT export supports Llama/Qwen2/Gemma3 layouts, not gpt2 (fused c_attn)")
  tensors, config = peft_format.peft_adapter(
      member, task.adapter_spec, jax.device_get(trainable), init_state.frozen,
      jax.device_get(init_state.trainable), model.cfg,
      base_model=cfg.model.get("pretrained") or "")
  peft_format.save_peft(out, tensors, config)
  if with_base:
    tokenizer = build.tokenizer_for(cfg, model)
    base_params = model.params
    if base_params is None:  # from scratch: the run's own initial params, rebuilt from its seed
      key = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)[0]
      base_params = train_lib.cast_floating(model.module.init(key, model.cfg),
                                            train_lib.DTYPES[cfg.param_dtype])
    hf.save_hf(os.path.join(out, "base"), model.cfg, jax.device_get(base_params),
               architecture=arch, tokenizer=tokenizer, chat_template=model.meta.get("chat_template"),
               special_ids=build.special_ids(model, tokenizer))
  print(f"exported step {step} of {workdir} to {out} (PEFT {config['peft_type']} adapter, "
        f"r={config['r']}{', base in ' + os.path.join(out, 'base') if with_base else ''})")
  return 0


def generate(target: str, prompts: list[str], *, max_new_tokens: int, temperature: float,
             top_k: int, top_p: float, seed: int, raw: bool) -> int:
  """Prints one completion per prompt (chat-templated unless `raw` or the model has none)."""
  _, model, tokenizer, _ = load_target(target)
  template = model.meta.get("chat_template")
  if template and not raw:
    from jaxft.data import chat  # pylint: disable=g-import-not-at-top
    texts = [chat.render(template, [{"role": "user", "content": p}], add_generation_prompt=True)
             for p in prompts]
  else:
    texts = prompts
  stop_ids = build.stop_ids(model, tokenizer)
  outs = generate_lib.generate_text(
      model.params, model.cfg, tokenizer, texts, max_new_tokens=max_new_tokens,
      temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=stop_ids,
      rng=jax.random.PRNGKey(seed))
  for prompt, out in zip(prompts, outs):
    if len(prompts) > 1:
      print(f"### {prompt}")
    print(out)
  return 0


def perplexity(params, mcfg, rows, tokenizer, *, batch_size: int, max_batches: int,
               module=decoder) -> dict:
  """Token-weighted held-out cross entropy and perplexity of plain params (`module`: the
  model family's module, e.g. `build.Model.module`: decoder or hyena)."""
  step = jax.jit(lambda p, b: objectives.xent.loss_fn(
      module.apply(p, b["tokens"], mcfg, positions=b["positions"],
                   segment_ids=b["segment_ids"]), b)[1])
  it = data.make_pipeline(rows, tokenizer, batch_size=batch_size, seq_len=rows.arrays[
      "tokens"].shape[1], seed=0, vocab_size=mcfg.vocab_size, shuffle=False, repeat=False)
  loss_sum = tokens = 0.0
  for i, batch in enumerate(it):
    if i >= max_batches:
      break
    m = jax.device_get(step(params, batch))
    loss_sum += float(m["xent"]) * float(m["num_tokens"])
    tokens += float(m["num_tokens"])
  xent = loss_sum / max(tokens, 1.0)
  return {"xent": xent, "perplexity": float(np.exp(xent)), "num_tokens": tokens}


def eval_command(target: str, *, config_name: str, overrides, out: str) -> int:
  """Perplexity on the config's eval split and, for tasks, verifier accuracy; JSON out."""
  if not _is_run(target) and not config_name:
    raise ValueError(f"{target!r} is a model, not a run directory: name a config for its data "
                     "with --config NAME (e.g. --config smollm2_lora_math)")
  cfg, model, tokenizer, step = load_target(target, config_name, overrides)
  split = build.make_split(cfg, "eval", tokenizer, model)
  result = {"target": target, "step": step, "data": cfg.data.name,
            **perplexity(model.params, model.cfg, split.rows, tokenizer,
                         batch_size=cfg.batch_size, max_batches=cfg.eval_batches,
                         module=model.module)}
  if split.examples is not None and cfg.eval_examples > 0:
    stop_ids = build.stop_ids(model, tokenizer)
    result["task"] = evaluate.task_accuracy(
        model.params, model.cfg, tokenizer, list(split.examples)[:cfg.eval_examples],
        render=build.renderer(cfg, model), stop_ids=stop_ids,
        max_new_tokens=cfg.eval_max_new_tokens, progress=sys.stderr.isatty())
  text = json.dumps(result, indent=1)
  if out:
    with open(out, "w") as f:
      f.write(text + "\n")
  print(text)
  return 0
