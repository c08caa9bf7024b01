"""Helpers the adapter test files share (imported as a plain module: tests/ is on sys.path)."""
import jax


def perturb(tree, key, scale=0.05):
  """`tree` + scale * N(0, 1) noise on every leaf (moves a zero-initialised adapter off its
  identity so merge-vs-unmerged comparisons test something)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                      for x, k in zip(leaves, keys)])
