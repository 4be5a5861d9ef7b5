"""A jitted training step that differentiates the adapters only."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(tree)))


def _update(objective, params, opt_state, optimizer, has_aux: bool):
    """One optimizer step on ``params`` for ``objective(params)``; returns ``(params, opt_state, metrics)``."""
    value, grads = jax.value_and_grad(objective, has_aux=has_aux)(params)
    loss, aux = value if has_aux else (value, None)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics: dict[str, Any] = {"loss": loss, "grad_norm": _global_norm(grads)}
    if has_aux:
        metrics["aux"] = aux
    return params, opt_state, metrics


def make_train_step(apply: Callable, loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                    has_aux: bool = False, donate: bool = True, compiler_options: dict | None = None) -> Callable:
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
      compiler_options: XLA options for this step's compilation, passed to
        ``jax.jit``; e.g. :func:`lora_jax.backend.memory_lean_options` with a
        rematerialised model.

    Returns:
      ``step(...) -> (lora_params, opt_state, metrics)`` where ``metrics`` holds
      ``"loss"``, ``"grad_norm"`` and, with ``has_aux``, ``"aux"``. When ``rng``
      is given it is passed to the model as the ``"lora_dropout"`` rng.

    >>> import flax.linen as nn, jax.numpy as jnp
    >>> from lora_jax import LoraConfig, init_lora, lora_apply
    >>> model, x = nn.Dense(3), jnp.ones((2, 4))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> cfg = LoraConfig(rank=2, targets="re:.*")
    >>> lora = init_lora(model, params, cfg, x, rng=jax.random.key(1))
    >>> tx = optax.sgd(0.1)
    >>> step = make_train_step(lora_apply(model, cfg), lambda m, x: (m(x) ** 2).mean(), tx)
    >>> lora, state, metrics = step(lora, tx.init(lora), params, x)
    >>> sorted(metrics)
    ['grad_norm', 'loss']
    """
    return jit_step(step_function(apply, loss_fn, optimizer, has_aux), donate=donate,
                    compiler_options=compiler_options)


def step_function(apply: Callable, loss_fn: Callable, optimizer: optax.GradientTransformation,
                  has_aux: bool = False) -> Callable:
    """The unjitted ``step(lora_params, opt_state, base_params, batch, rng=None)`` of :func:`make_train_step`."""

    def step(lora_params, opt_state, base_params, batch, rng=None):
        def objective(lp):
            def model(*args, **kwargs):
                if rng is not None:
                    kwargs["rngs"] = {**(kwargs.get("rngs") or {}), "lora_dropout": rng}
                return apply(base_params, lp, *args, **kwargs)

            return loss_fn(model, batch)

        return _update(objective, lora_params, opt_state, optimizer, has_aux)

    return step


def jit_step(step: Callable, *, donate: bool = True, in_shardings=None, out_shardings=None,
             compiler_options: dict | None = None) -> Callable:
    """``jax.jit`` of a :func:`step_function` step, donating the adapters and optimizer state.

    With ``in_shardings`` (one entry per argument, ``rng`` included) every call
    passes all five arguments positionally, as ``jax.jit`` requires.
    """
    donate_argnums = (0, 1) if donate else ()
    given = {k: v for k, v in (("in_shardings", in_shardings), ("out_shardings", out_shardings)) if v is not None}
    jitted = jax.jit(step, donate_argnums=donate_argnums, compiler_options=compiler_options, **given)
    return jitted if in_shardings is None else PositionalStep(jitted)


@dataclasses.dataclass(frozen=True)
class PositionalStep:
    """A step jitted with ``in_shardings``, callable (and lowerable) with ``rng`` left out.

    ``jax.jit`` with ``in_shardings`` takes every argument positionally, one
    per sharding; this passes ``rng=None`` on for the caller.

    Attributes:
      jitted: the ``jax.jit`` function of five positional arguments.
    """

    jitted: Callable

    def __call__(self, lora_params, opt_state, base_params, batch, rng=None):
        return self.jitted(lora_params, opt_state, base_params, batch, rng)

    def lower(self, lora_params, opt_state, base_params, batch, rng=None):
        """``jitted.lower(...)``: the program for ahead-of-time compilation or inspection."""
        return self.jitted.lower(lora_params, opt_state, base_params, batch, rng)


def make_full_train_step(apply: Callable, loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                         has_aux: bool = False, donate: bool = True,
                         compiler_options: dict | None = None) -> Callable:
    """The full fine-tuning baseline: ``step(params, opt_state, batch) -> (params, opt_state, metrics)``.

    Every parameter is differentiated and updated; use it to compare LoRA
    against full fine-tuning (or to pretrain a base) with the same loss.

    Args:
      apply: ``apply(params, *args, **kwargs)``, e.g.
        ``lambda p, *a, **k: module.apply({"params": p}, *a, **k)``.
      loss_fn, has_aux, compiler_options: as in :func:`make_train_step`.
      optimizer: any optax transformation, initialised on ``params``.
      donate: donate ``params`` and ``opt_state`` to the step.

    >>> import flax.linen as nn, jax.numpy as jnp
    >>> model, x = nn.Dense(3), jnp.ones((2, 4))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> tx = optax.sgd(0.1)
    >>> step = make_full_train_step(lambda p, *a: model.apply({"params": p}, *a),
    ...                             lambda m, x: (m(x) ** 2).mean(), tx)
    >>> params, state, metrics = step(params, tx.init(params), x)
    >>> sorted(metrics)
    ['grad_norm', 'loss']
    """

    def step(params, opt_state, batch):
        def objective(p):
            return loss_fn(lambda *args, **kwargs: apply(p, *args, **kwargs), batch)

        return _update(objective, params, opt_state, optimizer, has_aux)

    return jax.jit(step, donate_argnums=(0, 1) if donate else (), compiler_options=compiler_options)
