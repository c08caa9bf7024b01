"""Low-rank adapters in PyTorch PEFT's adapter format (adapter_config.json + adapter_model.safetensors).

PEFT keeps W in (d_out, d_in) and computes y = x Wᵀ + scaling · (x A_pᵀ) B_pᵀ, so
with jaxft's x W convention lora_A.weight = Aᵀ (r, d_in), lora_B.weight = Bᵀ
(d_out, r), scaling = lora_alpha / r (or / sqrt(r) with use_rslora). DoRA adds
`lora_magnitude_vector` (d_out,) = jaxft's `dora_mag`.

Members whose frozen base is not W0 (PiSSA, MiLoRA, CorDA, LoRA-GA: W_res = W0 -
s A0 B0) are exported relative to the *original* base, as PEFT's own conversion of
its pissa / corda / lora_ga inits does (`save_pretrained(...,
path_initial_model_for_weight_conversion=...)` -> `subtract_mutated_init`):
W_res + s A B - W0 = s (A B - A0 B0), a rank-2r LoRA with A' = [A, A0] and
B' = [B; -B0] (A0, B0 = the factors at init, rebuilt from the run's config and
seed; for CorDA / LoRA-GA that includes the calibration pass), so
`PeftModel.from_pretrained(original base, DIR)` reproduces the run.

Q/K of a GGUF-imported model (interleaved RoPE layout) get the same output-row
permutation the HF weight export applies (to B and the magnitude; A's input
rows are not permuted).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from jaxft.adapters import base
from jaxft.models import gguf, hf

HF_NAMES = {"attn/q": "self_attn.q_proj", "attn/k": "self_attn.k_proj",
            "attn/v": "self_attn.v_proj", "attn/o": "self_attn.o_proj",
            "mlp/gate": "mlp.gate_proj", "mlp/up": "mlp.up_proj", "mlp/down": "mlp.down_proj"}
KINDS = ("lora", "dora", "lora_residual")
# Members that declare peft='lora' but freeze W_res = W0 - s A0 B0 (their adapter is
# non-zero at init): exported as 'lora_residual' whatever their module says.
RESIDUAL_BASE = ("corda", "lora_ga")


def export_kind(member) -> str | None:
  """The PEFT form of a member: 'lora', 'dora', 'lora_residual' or None (no PEFT form)."""
  kind = getattr(member, "peft", None)
  if kind == "lora" and getattr(member, "name", None) in RESIDUAL_BASE:
    return "lora_residual"
  return kind


def _permute(x: np.ndarray, path: str, cfg) -> np.ndarray:
  """Rows (output units) of q/k into HF's rotate-half order when the model is interleaved."""
  if cfg.pos != "rope" or cfg.rope_layout != "interleaved":
    return x
  heads = {"attn/q": cfg.n_heads, "attn/k": cfg.n_kv_heads}.get(path.removeprefix("layers/"))
  return gguf.interleave_to_half(x, heads) if heads else x


def _module_names(path: str, n_layers: int) -> list[str]:
  if path == "lm_head":
    return ["base_model.model.lm_head"]
  rel = path.removeprefix("layers/")
  if rel not in HF_NAMES:
    raise ValueError(f"adapter on {path!r} has no PEFT module name (valid: "
                     f"{', '.join('layers/' + k for k in HF_NAMES)}, lm_head)")
  return [f"base_model.model.model.layers.{i}.{HF_NAMES[rel]}" for i in range(n_layers)]


def peft_adapter(member, spec: Mapping[str, Any], trainable, frozen, init_trainable, cfg,
                 *, base_model: str = "") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """({tensor name: array}, adapter_config dict) of a trained low-rank member.

  Args:
    member: a `lowrank.Member` with `peft` in KINDS.
    spec: the adapter spec (rank, alpha, dropout, ...).
    trainable, frozen: the run's trees (host arrays or jax arrays).
    init_trainable: the trainable tree at init (only 'lora_residual' members use it:
      pissa, milora, corda, lora_ga).
    cfg: the model's DecoderConfig (layer count, RoPE layout).
    base_model: written as base_model_name_or_path.
  """
  kind = export_kind(member)
  if kind not in KINDS:
    name = getattr(member, "name", getattr(member, "__name__", str(member)))
    raise ValueError(f"adapter {name!r} has no PEFT form (PEFT export supports the members "
                     "with plain low-rank factors: lora, rslora, dora, pissa, milora, pego, eva, "
                     "corda, lora_ga)")
  flat = {k: np.asarray(v, np.float32) for k, v in base.flatten(trainable).items()}
  flat_init = {k: np.asarray(v, np.float32) for k, v in base.flatten(init_trainable).items()}
  del frozen  # members with a PEFT form keep no frozen factors; their base is W0 (or W_res)
  s, r_out = float(member.scale(spec)), int(spec["rank"])
  tensors, modules = {}, set()
  for path in sorted({p.rsplit("/", 1)[0] for p in flat}):
    a, b = flat[path + "/lora_a"], flat[path + "/lora_b"]
    if kind == "lora_residual":
      a = np.concatenate([a, flat_init[path + "/lora_a"]], axis=-1)
      b = np.concatenate([b, -flat_init[path + "/lora_b"]], axis=-2)
    if a.ndim == 2:
      a, b = a[None], b[None]
    names = _module_names(path, a.shape[0])
    for i, name in enumerate(names):
      tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
      tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(_permute(b[i].T, path, cfg))
      if kind == "dora":
        mag = flat[path + "/dora_mag"].reshape(len(names), -1)[i]
        tensors[f"{name}.lora_magnitude_vector"] = np.ascontiguousarray(_permute(mag, path, cfg))
    modules.add(names[0].rsplit(".", 1)[-1])
    r_out = a.shape[-1]  # 2r for 'lora_residual', K·r for PEGO's group
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
      "r": r_out, "lora_alpha": s * r_out, "use_rslora": False, "use_dora": kind == "dora",
      "lora_dropout": float(spec.get("dropout", 0.0)), "target_modules": sorted(modules),
      "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
      "modules_to_save": None,
  }
  return tensors, config


def save_peft(directory: str, tensors: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> str:
  """Writes adapter_config.json + adapter_model.safetensors into `directory`."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  hf.write_safetensors(os.path.join(directory, "adapter_model.safetensors"), dict(tensors))
  return directory
