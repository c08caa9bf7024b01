"""SmolLM2-135M-shaped full fine-tuning on a TPU v5e-8 (8 chips): a planner config.

    jaxft compile smollm2_full_v5e --topology v5e-8          # on any CPU, with libtpu
    jaxft compile smollm2_full_v5e --topology v5e-8 --remat all

Needs no weights: the shapes are SmolLM2-135M's (configs/_arch.py). To train the
real model on a v5e-8, add --config.model.pretrained=smollm2-135m-instruct.
Batch 64 x 2048 tokens, data parallel over the 8 chips, bf16 compute, fp32 master
weights and AdamW state. Expected: see experiments/bench/results/planner.md.
"""
from jaxft_configs import _arch, common


def get_config(arg=None):
  del arg
  c = common.base_config()
  c.batch_size = 64
  c.seq_len = 2048
  c.compute_dtype = "bfloat16"
  c.model.update(**_arch.SMOLLM2_135M, remat="dots")
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  c.optimizer.update(lr=3e-5, warmup_steps=10)
  return c
