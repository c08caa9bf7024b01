"""Llama-3-8B-shaped fine-tuning on a TPU v5p-64 (32 chips, v5p:2x4x4): a planner config.

    jaxft compile llama3_8b_v5p:lora --topology v5p-64       # on any CPU, with libtpu
    jaxft compile llama3_8b_v5p:full --topology v5p-64

ARG: 'lora' (default; rank 16 on q/k/v/o/gate/up/down, frozen base in bf16) or
'full' (fp32 master weights and AdamW state). Needs no weights: the shapes are
Llama-3-8B's (configs/_arch.py). FSDP over all 32 chips, bf16 compute,
remat 'dots'; batch 128 x 4096 tokens in 2 microbatches (2 rows per chip each: with
4 rows, the dense attention's float32 scores, 8 GiB per layer, and the 7.8 GiB of
logits took LoRA 3 GiB past the 95.74 GiB of a v5p chip).
Expected: see experiments/bench/results/planner.md.
"""
from jaxft_configs import _arch, common


def get_config(arg=None):
  mode = arg or "lora"
  if mode not in ("lora", "full"):
    raise ValueError(f"llama3_8b_v5p:ARG must be 'lora' or 'full', got {mode!r}")
  c = common.base_config()
  c.batch_size = 128
  c.seq_len = 4096
  c.grad_accum = 2
  c.compute_dtype = "bfloat16"
  c.model.update(**_arch.LLAMA3_8B, remat="dots")
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  if mode == "lora":
    c.param_dtype = "bfloat16"  # the frozen base; LoRA factors follow it
    c.adapter.update(name="lora", rank=16, alpha=32.0)
    c.optimizer.update(lr=2e-4, warmup_steps=10)
  else:
    c.optimizer.update(lr=1e-5, warmup_steps=10)
  return c
