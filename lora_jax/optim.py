"""optax helpers: LoRA+ learning rates, and freezing for users who hold base and adapters in one tree.

:func:`lora_plus` gives the ``B`` factors a larger learning rate than ``A``.
The default path (:func:`lora_jax.make_train_step`) differentiates the adapter
tree alone and needs none of this. When a codebase keeps one tree (for example
``{"params": base, "lora": lora}``) these helpers make sure only adapters move.
Such a setup still computes the frozen gradients before dropping them (split
the trees to avoid that cost). Put gradient clipping *inside* the ``tx`` given to
:func:`adapters_only`, so the frozen gradients do not enter the global norm.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

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


def _factor_labels(tree):
    """``"b"`` on the ``b`` and DoRA ``m`` leaves of every adapter node, ``"a"`` on every other leaf."""
    def walk(node, key=None, in_adapter=False):
        if isinstance(node, Mapping):
            here = is_adapter_node(node)
            return {k: walk(child, k, here) for k, child in node.items()}
        # PEFT's create_loraplus_optimizer puts one-dimensional parameters (DoRA's magnitude) with B.
        label = "b" if in_adapter and key in ("b", "m") else "a"
        return jax.tree.map(lambda _: label, node)

    return walk(tree)


def lora_plus(optimizer: Callable[..., optax.GradientTransformation], learning_rate, *,
              ratio: float = 16.0) -> optax.GradientTransformation:
    """LoRA+ (Hayou, Ghosh and Yu, 2024): the ``B`` factors learn ``ratio`` times faster than ``A``.

    ``optimizer(learning_rate)`` builds the optimizer for the ``A`` factors and
    ``optimizer(ratio * learning_rate)`` the one for ``B`` (each with its own
    state), like PEFT's ``create_loraplus_optimizer`` with ``loraplus_lr_ratio``.
    A DoRA magnitude ``m`` gets ``B``'s rate (as PEFT groups it); any other
    leaf gets the ``A`` rate.

    Args:
      optimizer: a function of the learning rate, e.g. ``optax.adamw`` or
        ``lambda lr: optax.adamw(lr, weight_decay=0.01)``.
      learning_rate: the ``A`` factors' rate: a number or an optax schedule
        (``B`` then follows ``ratio`` times the schedule).
      ratio: ``B``'s rate over ``A``'s; the paper recommends about 16 for
        most tasks (larger for harder ones). Must be positive.

    >>> import jax.numpy as jnp
    >>> lora = {"q": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3))}}
    >>> tx = lora_plus(optax.sgd, 0.5, ratio=4.0)
    >>> updates, _ = tx.update(jax.tree.map(jnp.ones_like, lora), tx.init(lora), lora)
    >>> float(updates["q"]["a"][0, 0]), float(updates["q"]["b"][0, 0])
    (-0.5, -2.0)
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
        raise ValueError(f"LoRA+ ratio must be a positive number, got {ratio!r}")
    if callable(learning_rate):
        b_rate = lambda count: ratio * learning_rate(count)
    else:
        b_rate = ratio * learning_rate
    return optax.multi_transform({"a": optimizer(learning_rate), "b": optimizer(b_rate)}, _factor_labels)
