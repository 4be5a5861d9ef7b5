"""Checks the ``lora-jax`` commands print: merge's rounding verdict, the warnings of train and
generate (positions past the model's, data repeated many times), and train's held-out windows."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

#: ``train`` warns when its windows cover the data more than this many times over.
MAX_PASSES = 10.0


def rounding_bound(eps: float, logit_scale: float, n_layers: int) -> float:
    """The largest merged-vs-unmerged logit difference that rounding to a dtype of epsilon ``eps`` explains.

    A Llama of ``L`` layers passes its input through ``4 L + 1`` matrices in
    sequence on the way to the logits (per layer the attention's input and output
    projections and the MLP's input and output projections, then ``lm_head``).
    Per matrix, four roundings of up to ``eps / 2`` separate merged from
    unmerged (the merged weight ``W + delta``, the merged product, the unmerged
    base product, the adapter term added to it), and the sums inside the
    products (float32 accumulation) add about as much again: ``4 eps``
    relative. Independent roundings add in quadrature, so the expected difference
    is at most ``4 sqrt(4 L + 1) * eps * max|logit|``.

    >>> rounding_bound(2.0 ** -7, 13.5, 2)   # bfloat16, two layers
    1.265625
    """
    return 4 * math.sqrt(4 * n_layers + 1) * eps * logit_scale


def merge_verdict(diff: float, dtype, logit_scale: float, n_layers: int) -> str:
    """What a merged-vs-unmerged logit difference means for weights written in ``dtype``.

    >>> print(merge_verdict(0.125, "bfloat16", 13.5, 2))
    within the expected rounding of bfloat16 (bound 1.27 = 4 x sqrt(4 x 2 layers + 1) x eps 0.00781 x max |logit| 13.5)
    >>> merge_verdict(1.0, "float32", 13.5, 2).split(" (")[0]
    'LARGER than float32 rounding explains'
    """
    dtype = jnp.dtype(dtype)
    eps = float(jnp.finfo(dtype).eps)
    bound = rounding_bound(eps, logit_scale, n_layers)
    verdict = (f"within the expected rounding of {dtype.name}" if diff <= bound
               else f"LARGER than {dtype.name} rounding explains")
    return (f"{verdict} (bound {bound:.3g} = 4 x sqrt(4 x {n_layers} layers + 1) x eps {eps:.3g} x max |logit| "
            f"{logit_scale:.3g})")


def position_warning(n_positions: int, max_positions: int, what: str) -> str | None:
    """A warning when ``what`` needs more positions than the model was built for, else None.

    >>> print(position_warning(1024, 512, "--seq-len 1024"))
    --seq-len 1024 needs 1024 positions, beyond the model's max_position_embeddings 512; quality degrades past it
    >>> position_warning(512, 512, "--seq-len 512") is None
    True
    """
    if n_positions <= max_positions:
        return None
    return (f"{what} needs {n_positions} positions, beyond the model's max_position_embeddings {max_positions}; "
            f"quality degrades past it")


def repeat_warning(steps: int, batch_size: int, seq_len: int, n_tokens: int) -> str | None:
    """A warning when training reads its data more than :data:`MAX_PASSES` times over, else None.

    >>> print(repeat_warning(200, 8, 128, 8700))
    200 steps x 8 windows x 128 tokens read the 8,700 tokens of --data 23.5 times over; the adapter may memorise them (watch --eval-data's held-out loss, or use fewer --steps or more data)
    >>> repeat_warning(10, 8, 128, 8700) is None
    True
    """
    passes = steps * batch_size * seq_len / n_tokens
    if passes <= MAX_PASSES:
        return None
    return (f"{steps} steps x {batch_size} windows x {seq_len} tokens read the {n_tokens:,} tokens of --data "
            f"{passes:.1f} times over; the adapter may memorise them (watch --eval-data's held-out loss, or use "
            f"fewer --steps or more data)")


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> np.ndarray:
    """The held-out windows: consecutive, non-overlapping runs of ``seq_len + 1`` tokens from the start, at most
    ``max_windows`` of them.

    >>> eval_windows(np.arange(11), 4, 8).tolist()
    [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    """
    span = seq_len + 1
    n = min(len(tokens) // span, max_windows)
    return np.asarray(tokens[:n * span]).reshape(n, span)
