"""Llama-2-70B-shaped full fine-tuning on a TPU v5p-256 (128 chips, v5p:4x4x8): a planner config.

    jaxft compile llama2_70b_fsdp_tp_v5p --topology v5p-256   # on any CPU, with libtpu

FSDP 32 x tensor parallel 4 over the 128 chips (heads and MLP split 4 ways, weights
and batch split 32 ways), bf16 compute, fp32 master weights and AdamW state,
remat 'full'; batch 256 x 4096 tokens (1M tokens per step). The shapes are
Llama-2-70B's (configs/_arch.py), the model of MaxText's published 70B MFU.
Expected: see experiments/bench/results/planner.md.
"""
from jaxft_configs import _arch, common


def get_config(arg=None):
  del arg
  c = common.base_config()
  c.batch_size = 256
  c.seq_len = 4096
  c.compute_dtype = "bfloat16"
  c.model.update(**_arch.LLAMA2_70B, remat="full")
  c.mesh.update(data=1, fsdp=32, tensor=4)
  c.optimizer.update(lr=1e-5, warmup_steps=10)
  return c
