"""A 2-layer model on the built-in Shakespeare excerpt: seconds on a laptop CPU.

Used by tests and examples. Any adapter, objective or optimizer can be tried on it:

    jaxft train tiny --workdir /tmp/tiny
    jaxft train tiny --workdir /tmp/tiny_lora --config.adapter.name=lora

Expected (2-core CPU): 20 steps in a few seconds after a ~5 s compile, loss from
~7.7 (ln 2048) falling below 7.
"""
from jaxft_configs import common


def get_config(arg=None):
  del arg
  c = common.base_config()
  c.steps = 20
  c.batch_size = 8
  c.seq_len = 64
  c.log_every = 5
  c.eval_every = 10
  c.eval_batches = 2
  c.checkpoint_every = 10
  c.model.update(vocab_size=2048, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                 head_dim=16, d_ff=128)
  c.optimizer.update(lr=3e-3, warmup_steps=2)
  return c
