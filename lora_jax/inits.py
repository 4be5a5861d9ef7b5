"""Initialisations from the base weight: PiSSA (top singular vectors) and OLoRA (QR), and their export.

Both start the adapters from the weight itself instead of from ``B = 0``,
and move the same amount out of the base so that the model is unchanged at
step 0: the base becomes the *residual* ``W - scale * A @ B``. Training then
updates the principal (PiSSA) or orthonormal (OLoRA) directions.

A residual base is not the base everyone else has, so an adapter trained
this way is shared with :func:`to_plain_lora`: ``residual + scale * A' @ B'``
equals ``W + scale * (A' @ B' - A0 @ B0)``, a plain LoRA of rank ``2r`` on
the untouched ``W`` (what PEFT's ``path_initial_model_for_weight_conversion``
writes).

Weights are decomposed per layer (and per stacked layer of an ``nn.scan``)
in float32 as ``[in, out]`` matrices, their input dims and output dims each
flattened; embeddings are refused, as in PEFT.
"""

from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp

from lora_jax.config import Adapter, LoraConfig
from lora_jax.multi import Combined, combine, old_order_shim
from lora_jax.tree import adapted_layers, set_path


def _decompose(base_params, lora_params, config: LoraConfig | None, factor: Callable, where: str) -> tuple[dict, dict]:
    """``(residual base, lora)`` with ``factor(w2, rank, scale) -> (a2, b2)`` on each ``[lead, in, out]`` weight."""
    lora_params, config = Adapter.unpack(lora_params, config, where=where)
    residual, lora = base_params, lora_params
    for path, weight, base_node, node, (lead, in_shape, out_shape) in adapted_layers(base_params, lora_params):
        name = "/".join(path)
        if weight == "embedding":
            raise ValueError(f"layer {name!r}: PiSSA/OLoRA initialise dense-like layers only, not embeddings "
                             "(leave it out of the targets, or give it its own adapter with init='default')")
        w = base_node[weight]
        rank = node["a"].shape[-1]
        scale = config.scaling(name, rank)
        if rank > min(math.prod(in_shape), math.prod(out_shape)):
            raise ValueError(f"layer {name!r}: rank {rank} exceeds the weight's smaller side "
                             f"{min(math.prod(in_shape), math.prod(out_shape))}")
        w2 = w.astype(jnp.float32).reshape(*lead, math.prod(in_shape), math.prod(out_shape))
        a2, b2 = factor(w2, rank, scale)
        moved = scale * jnp.matmul(a2, b2, precision="highest")
        residual = set_path(residual, path + (weight,), (w2 - moved).reshape(w.shape).astype(w.dtype))
        lora = set_path(lora, path, {**node,
                                     "a": a2.reshape(node["a"].shape).astype(node["a"].dtype),
                                     "b": b2.reshape(node["b"].shape).astype(node["b"].dtype)})
    return residual, lora


def _pissa_factors(w2, rank, scale):
    u, s, vt = jnp.linalg.svd(w2, full_matrices=False)
    root = jnp.sqrt(s[..., :rank] / scale)
    return u[..., :, :rank] * root[..., None, :], root[..., :, None] * vt[..., :rank, :]


def _olora_factors(w2, rank, scale):
    # PEFT's OLoRA: QR of the [out, in] weight, B = Q[:, :r] and A = R[:r]
    # (scale not divided out). In the [in, out] layout that is QR of w2^T.
    q, r = jnp.linalg.qr(jnp.swapaxes(w2, -1, -2))
    return jnp.swapaxes(r[..., :rank, :], -1, -2), jnp.swapaxes(q[..., :, :rank], -1, -2)


@old_order_shim("inits.pissa(config, base_params, lora_params)", "inits.pissa(base_params, lora_params, config)")
def pissa(base_params, lora_params, config: LoraConfig | None = None) -> tuple[dict, dict]:
    """PiSSA (Meng et al., 2024): adapters from the top-``r`` singular triplets; the base keeps the rest.

    With ``W = U S V^T``: ``A = U_r sqrt(S_r / scale)``, ``B = sqrt(S_r / scale) V_r^T``,
    so ``scale * A @ B`` is the best rank-``r`` approximation of ``W``, and the
    returned base holds ``W - scale * A @ B``. Train the adapters on that
    residual base; share them with :func:`to_plain_lora`.

    Args:
      base_params: the base params (not modified; a new tree is returned).
      lora_params: adapters from :func:`lora_jax.init_lora`, used for which
        layers and ranks; their values are replaced. Or one adapter value,
        with ``config`` omitted.
      config: the adapters' config (ranks, scaling).

    Returns:
      ``(residual_base, lora)``.

    >>> import numpy as np
    >>> w = jnp.asarray(np.diag([3.0, 2.0, 1.0]))
    >>> cfg = LoraConfig(rank=1, alpha=1)
    >>> res, lora = pissa({"q": {"kernel": w}}, {"q": {"a": jnp.zeros((3, 1)), "b": jnp.zeros((1, 3))}}, cfg)
    >>> np.round(np.asarray(res["q"]["kernel"]).diagonal(), 5).tolist(), float(lora["q"]["a"][0, 0] ** 2)
    ([0.0, 2.0, 1.0], 3.0)
    """
    return _decompose(base_params, lora_params, config, _pissa_factors, "inits.pissa")


@old_order_shim("inits.olora(config, base_params, lora_params)", "inits.olora(base_params, lora_params, config)")
def olora(base_params, lora_params, config: LoraConfig | None = None) -> tuple[dict, dict]:
    """OLoRA (Büyükakyüz, 2024): orthonormal ``B`` from a QR decomposition of the weight; the base keeps the rest.

    As PEFT: with ``W^T = Q R`` (the ``[out, in]`` weight), ``B = Q_r^T``
    (orthonormal rows) and ``A = R_r^T``; the returned base holds
    ``W - scale * A @ B``. Arguments and result as :func:`pissa`.

    >>> import numpy as np
    >>> w = jnp.asarray(np.arange(12.0).reshape(4, 3))
    >>> res, lora = olora({"q": {"kernel": w}}, {"q": {"a": jnp.zeros((4, 2)), "b": jnp.zeros((2, 3))}},
    ...                   LoraConfig(rank=2, alpha=2))
    >>> b = np.asarray(lora["q"]["b"]); np.allclose(b @ b.T, np.eye(2), atol=1e-5)
    True
    """
    return _decompose(base_params, lora_params, config, _olora_factors, "inits.olora")


@old_order_shim("inits.to_plain_lora(config, initial_lora, trained_lora, base_params=...)",
                "inits.to_plain_lora(base_params, initial_lora, trained_lora, config)")
def to_plain_lora(base_params, initial_lora, trained_lora, config: LoraConfig) -> Combined:
    """The trained adapter as a plain LoRA on the *original* base: rank ``2r``, exact.

    ``residual + scale * A' @ B' == W + scale * [A', A0] @ [B'; -B0]``, so the
    result is :func:`lora_jax.combine` of the trained and (negated) initial
    adapters with ``method="cat"``; like every combined adapter its config
    has scale 1, with the scales carried by the factors. Save it with
    :func:`lora_jax.io.peft.save_peft` for PEFT users.

    Args:
      base_params: the original base's params (shapes are checked).
      initial_lora: the adapters :func:`pissa`/:func:`olora` returned (before training).
      trained_lora: the same adapters after training.
      config: the config both adapters were made with.
    """
    return combine(base_params, [Adapter(config, trained_lora), Adapter(config, initial_lora)], [1.0, -1.0],
                   method="cat")
