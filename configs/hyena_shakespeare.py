"""A Hyena long-convolution LM trained from scratch on Shakespeare, its long convolutions
running through the FlashFFTConv Pallas kernel (`jaxft_kernels.fft_conv`).

    jaxft train hyena_shakespeare --workdir runs/hyena

Same data and tokenizer as `shakespeare`. On a CPU the kernel runs in Pallas interpret
mode (correct, slow); on a GPU/TPU it lowers for real. `--config.model.conv_impl=jnp_fft`
runs the same model on `jnp.fft` (the loss is the same to float error), `monarch` on the
kernel's matmul FFT as plain einsums, `direct` on the O(L²) convolution.
Partial / frequency-sparse variants: `--config.model.filter_len=32`,
`--config.model.freq_keep=0.5`.
Expected (measured, shared 2-core CPU, width 128 = 1.23M params, `--config.steps=30`):
~28 s compile, 2-3 s per step in interpret mode; training loss 7.62 -> 5.81 and eval loss
5.85 at step 30, identical to 4 decimals with `conv_impl=jnp_fft` (see
experiments/bench/results/kernels_fft_structured.md).

ARG sets the model width, e.g. `hyena_shakespeare:256` (default 128).
"""
from jaxft_configs import common


def get_config(arg=None):
  width = int(arg) if arg else 128
  c = common.base_config()
  c.steps = 300
  c.batch_size = 16
  c.seq_len = 128
  c.log_every = 10
  c.eval_every = 100
  c.eval_batches = 8
  c.checkpoint_every = 100
  c.model.name = "hyena"
  c.model.update(vocab_size=2048, d_model=width, n_layers=4, d_ff=3 * width, order=2,
                 filter_dim=64, filter_emb=17, max_len=c.seq_len, conv_impl="pallas")
  c.optimizer.update(lr=3e-3, warmup_steps=30, weight_decay=0.01)
  c.data.name = "shakespeare"
  return c
