"""optax helpers for users who hold base and adapters in one combined tree.

The default path (:func:`lora_jax.make_train_step`) differentiates the adapter
tree alone and needs none of this. When a codebase keeps one tree (for example
``{"params": base, "lora": lora}``) these helpers make sure only adapters move.
Such a setup still computes the frozen gradients before dropping them (split
the trees to avoid that cost). Put gradient clipping *inside* the ``tx`` given to
:func:`adapters_only`, so the frozen gradients do not enter the global norm.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import optax

from lora_jax.tree import is_adapter_node


def adapter_mask(tree):
    """A tree of bools like ``tree``: ``True`` on the leaves of adapter nodes.

    >>> import jax.numpy as jnp
    >>> adapter_mask({"params": {"q": {"kernel": jnp.ones(2)}}, "lora": {"q": {"a": jnp.ones(1), "b": jnp.ones(1)}}})
    {'params': {'q': {'kernel': False}}, 'lora': {'q': {'a': True, 'b': True}}}
    """
    def walk(node, inside):
        if isinstance(node, Mapping):
            inside = inside or is_adapter_node(node)
            return {key: walk(child, inside) for key, child in node.items()}
        return jax.tree.map(lambda _: inside, node)

    return walk(tree, False)


def adapters_only(tx: optax.GradientTransformation, mask=None) -> optax.GradientTransformation:
    """Applies ``tx`` to adapter leaves and zeroes the updates of every other leaf.

    Built on ``optax.multi_transform`` with ``optax.set_to_zero`` for the frozen
    labels, so frozen leaves keep no optimizer state. ``optax.masked`` alone
    would pass frozen gradients through unchanged, which is not freezing.

    Args:
      tx: the optimizer for the adapters.
      mask: a bool tree (or a function of the params returning one); defaults
        to :func:`adapter_mask`.

    >>> import jax.numpy as jnp
    >>> tree = {"params": {"q": {"kernel": jnp.ones(2)}}, "lora": {"q": {"a": jnp.ones(1), "b": jnp.ones(1)}}}
    >>> tx = adapters_only(optax.sgd(1.0))
    >>> updates, _ = tx.update(jax.tree.map(jnp.ones_like, tree), tx.init(tree), tree)
    >>> float(updates["params"]["q"]["kernel"][0]), float(updates["lora"]["q"]["a"][0])
    (0.0, -1.0)
    """
    mask = adapter_mask if mask is None else mask

    def labels(params):
        m = mask(params) if callable(mask) else mask
        return jax.tree.map(lambda trainable: "lora" if trainable else "frozen", m)

    return optax.multi_transform({"lora": tx, "frozen": optax.set_to_zero()}, labels)
