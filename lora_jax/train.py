"""A jitted training step that differentiates the adapters only."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(tree)))


def make_train_step(apply: Callable, loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                    has_aux: bool = False, donate: bool = True) -> Callable:
    """Builds ``step(lora_params, opt_state, base_params, batch, rng=None)``.

    The gradient is taken with respect to ``lora_params`` alone; ``base_params``
    enter as constants, so no base-weight gradient is ever formed. With
    ``donate`` the adapter and optimizer buffers are reused in place.

    Args:
      apply: an adapted apply function from :func:`lora_jax.lora_apply`.
      loss_fn: ``loss_fn(model, batch)`` returning a scalar loss (or
        ``(loss, aux)`` with ``has_aux``), where ``model(*args, **kwargs)`` calls
        ``apply(base_params, lora_params, *args, **kwargs)``.
      optimizer: any optax transformation, initialised on ``lora_params``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      donate: donate ``lora_params`` and ``opt_state`` to the step.

    Returns:
      ``step(...) -> (lora_params, opt_state, metrics)`` where ``metrics`` holds
      ``"loss"``, ``"grad_norm"`` and, with ``has_aux``, ``"aux"``. When ``rng``
      is given it is passed to the model as the ``"lora_dropout"`` rng.

    >>> import flax.linen as nn, jax.numpy as jnp
    >>> from lora_jax import LoraConfig, init_lora, lora_apply
    >>> model, x = nn.Dense(3), jnp.ones((2, 4))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> cfg = LoraConfig(rank=2, targets="re:.*")
    >>> lora = init_lora(cfg, model, params, x, rng=jax.random.key(1))
    >>> tx = optax.sgd(0.1)
    >>> step = make_train_step(lora_apply(model, cfg), lambda m, x: (m(x) ** 2).mean(), tx)
    >>> lora, state, metrics = step(lora, tx.init(lora), params, x)
    >>> sorted(metrics)
    ['grad_norm', 'loss']
    """

    def step(lora_params, opt_state, base_params, batch, rng=None):
        def objective(lp):
            def model(*args, **kwargs):
                if rng is not None:
                    kwargs["rngs"] = {**(kwargs.get("rngs") or {}), "lora_dropout": rng}
                return apply(base_params, lp, *args, **kwargs)

            return loss_fn(model, batch)

        value, grads = jax.value_and_grad(objective, has_aux=has_aux)(lora_params)
        loss, aux = value if has_aux else (value, None)
        updates, opt_state = optimizer.update(grads, opt_state, lora_params)
        lora_params = optax.apply_updates(lora_params, updates)
        metrics: dict[str, Any] = {"loss": loss, "grad_norm": _global_norm(grads)}
        if has_aux:
            metrics["aux"] = aux
        return lora_params, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())
