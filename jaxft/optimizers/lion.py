"""Lion: "Symbolic Discovery of Optimization Algorithms" (Chen et al., 2023).

    c = b1 m + (1 - b1) g
    theta <- theta - lr (sign(c) + wd theta)
    m <- b2 m + (1 - b2) g

Defaults b1 = 0.9, b2 = 0.99 (the paper also uses 0.95 / 0.98 for LMs). Use a
learning rate 3-10x below AdamW's and a weight decay 3-10x above, keeping lr*wd
about the same. One state buffer (the momentum), optionally bfloat16. The update
equals `optax.lion` step for step; this module adds the config entry and the
`decay_mask` switch (the paper decays weight matrices only).
"""
from __future__ import annotations

import optax

from jaxft.optimizers import core
from jaxft.optimizers.sign_momentum import scale_by_sign_momentum


def scale_by_lion(b1: float = 0.9, b2: float = 0.99, mu_dtype=None) -> optax.GradientTransformation:
  """sign(b1 m + (1 - b1) g), m <- b2 m + (1 - b2) g; see `scale_by_sign_momentum`."""
  return scale_by_sign_momentum(b1, b2, mu_dtype)


def lion(learning_rate, b1: float = 0.9, b2: float = 0.99, weight_decay: float = 1e-3,
         mu_dtype=None, mask=None) -> optax.GradientTransformation:
  """Lion with decoupled weight decay: theta <- theta - lr (sign(c) + wd theta)."""
  return optax.chain(scale_by_lion(b1, b2, mu_dtype),
                     optax.add_decayed_weights(weight_decay, mask),
                     optax.scale_by_learning_rate(learning_rate))


def _lion(lr, spec):
  """Lion: sign(b1 m + (1 - b1) g) update, momentum b2, decoupled weight decay."""
  return lion(lr, b1=spec["b1"], b2=spec["b2"], weight_decay=spec["weight_decay"],
              mu_dtype=core.dtype_or_none(spec["mu_dtype"]), mask=core.decay_mask(spec))


REGISTRY = {
    "lion": (_lion, {"b1": 0.9, "b2": 0.99, "mu_dtype": "", "decay_mask": "matrices"}),
}
