"""Gemma-3-270M-shaped full fine-tuning on a TPU v5e-8 (8 chips): a planner config.

    jaxft compile gemma3_270m_full_v5e --topology v5e-8      # on any CPU, with libtpu

Needs no weights: the shapes are Gemma-3-270M's (configs/_arch.py). To train the
real model, add --config.model.pretrained=gemma3-270m. Its 262k-entry vocabulary
makes the logits the largest activation (B x L x 262144 in float32), so the batch
is sharded FSDP over the 8 chips and layers are rematerialised.
Batch 32 x 2048 tokens, bf16 compute, fp32 master weights and AdamW state.
Expected: see experiments/bench/results/planner.md.
"""
from jaxft_configs import _arch, common


def get_config(arg=None):
  del arg
  c = common.base_config()
  c.batch_size = 32
  c.seq_len = 2048
  c.compute_dtype = "bfloat16"
  c.model.update(**_arch.GEMMA3_270M, remat="full")
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.optimizer.update(lr=3e-5, warmup_steps=10)
  return c
