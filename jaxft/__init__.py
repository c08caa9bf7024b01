"""jaxft: pure-JAX fine-tuning of language models.

Importing jaxft does no I/O and sets no flags. The pieces:
  jaxft.models      decoder LM (init / apply / logical_axes)
  jaxft.adapters    adapter algebra (init -> (frozen, trainable), materialize, merge)
  jaxft.objectives  pure losses returning (loss, metrics) with token counts
  jaxft.optimizers  optax transforms by name
  jaxft.data        tokenizers, sources and grain pipelines
  jaxft.sharding    mesh and logical-axis rules
  jaxft.train       TrainState and make_train_step
  jaxft.runner      the training loop behind `jaxft train`
"""

__version__ = "0.1.0"
