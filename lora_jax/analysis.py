"""Instruments for trained adapters: the spectrum of each delta, truncation, and how adapters overlap.

Everything is computed from the small factors (:mod:`lora_jax.factors`): the
QR factors of ``A`` and ``B^T`` keep the delta's singular values and vectors,
so only an ``r x r`` core is decomposed and the ``[in, out]`` delta is never
formed. Layers stacked by ``nn.scan`` are analysed slice by slice (``sigma``
has one row per stacked layer). The math runs in float64 NumPy.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import numpy as np

from lora_jax import factors
from lora_jax.config import Adapter
from lora_jax.multi import Combined, combine, old_order_shim


class LayerSpectrum(NamedTuple):
    """The singular values of one layer's delta ``scale * A @ B``.

    Attributes:
      name: the layer path.
      rank: the adapter's rank ``r`` at this layer.
      sigma: ``[slices, r]`` singular values per stacked slice (one slice if
        the layer is not stacked), largest first.
    """

    name: str
    rank: int
    sigma: np.ndarray

    def energy(self, k: int) -> float:
        """The fraction of ``||delta||_F^2`` the top-``k`` singular values hold (all slices together)."""
        total = float(np.sum(self.sigma ** 2))
        return 1.0 if total == 0.0 else float(np.sum(self.sigma[:, :k] ** 2) / total)

    def rank_for_energy(self, threshold: float) -> int:
        """The smallest ``k`` whose top-``k`` singular values hold at least ``threshold`` of the energy."""
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"energy threshold must be in (0, 1], got {threshold!r}")
        return next(k for k in range(1, self.rank + 1) if self.energy(k) >= threshold - 1e-12)

    def numerical_rank(self, rtol: float = 1e-5) -> int:
        """The number of singular values above ``rtol`` times the largest (most over the slices)."""
        top = self.sigma[:, :1]
        return int(np.max(np.sum(self.sigma > rtol * top, axis=1))) if np.any(top > 0) else 0

    @property
    def effective_rank(self) -> float:
        """Roy & Vetterli's entropy rank ``exp(H(sigma / sum sigma))``, averaged over the slices."""
        return float(np.mean([effective_rank(s) for s in self.sigma]))


def effective_rank(sigma) -> float:
    """``exp`` of the entropy of ``sigma / sum(sigma)``: ``k`` for ``k`` equal values, 0 for none.

    >>> round(effective_rank([2.0, 2.0, 0.0]), 6), effective_rank([0.0])
    (2.0, 0.0)
    """
    sigma = np.asarray(sigma, np.float64)
    total = float(sigma.sum())
    if total == 0.0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


@old_order_shim("analysis.spectrum(adapter, base_params=...)", "analysis.spectrum(base_params, adapter)")
def spectrum(base_params, adapter) -> dict[str, LayerSpectrum]:
    """Per layer, the singular values of ``scale * A @ B``.

    >>> import jax.numpy as jnp
    >>> from lora_jax import LoraConfig
    >>> base = {"q": {"kernel": jnp.zeros((3, 2))}}
    >>> lora = {"q": {"a": jnp.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]), "b": jnp.eye(2)}}
    >>> s = spectrum(base, Adapter(LoraConfig(rank=2, alpha=1), lora))["q"]
    >>> s.sigma.tolist(), s.energy(1), s.rank_for_energy(0.9)
    ([[1.0, 0.5]], 0.8, 2)
    """
    adapter = factors.as_adapter(adapter, "spectrum")
    out = {}
    for name, layer in factors.layers(factors.base_shapes(base_params), adapter, "spectrum").items():
        _, s, _ = factors.svd(layer.a, layer.b, layer.scale)
        out[name] = LayerSpectrum(name, layer.a.shape[-1], np.asarray(s))
    return out


def recommend_ranks(spectra: Mapping[str, LayerSpectrum], energy: float = 0.9) -> dict[str, int]:
    """Per layer, the smallest rank that keeps ``energy`` of the delta's squared Frobenius norm."""
    return {name: s.rank_for_energy(energy) for name, s in spectra.items()}


@old_order_shim("analysis.truncate(adapter, base_params=...)", "analysis.truncate(base_params, adapter)")
def truncate(base_params, adapter, *, rank: int | Mapping[str, int] | None = None,
             energy: float | None = None) -> Combined:
    """A smaller adapter: each layer's best rank-``k`` approximation (Eckart-Young).

    Give ``rank`` (one int, or ``{layer: k}``) or ``energy`` (keep the smallest
    rank holding that fraction of each layer's energy), not both. ``k`` never
    exceeds a layer's current rank. ``errors`` is the relative Frobenius error
    each layer is left with, ``sqrt(sum of discarded sigma^2) / ||delta||``,
    measured on the returned factors.

    >>> import jax.numpy as jnp
    >>> from lora_jax import LoraConfig
    >>> base = {"q": {"kernel": jnp.zeros((3, 2))}}
    >>> lora = {"q": {"a": jnp.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]), "b": jnp.eye(2)}}
    >>> small = truncate(base, Adapter(LoraConfig(rank=2, alpha=2), lora), rank=1)
    >>> small.lora_params["q"]["a"].shape, round(small.errors["q"], 6)   # sqrt(1) / sqrt(4 + 1)
    ((3, 1), 0.447214)
    """
    if (rank is None) == (energy is None):
        raise ValueError("truncate: give exactly one of rank= and energy=")
    adapter = factors.as_adapter(adapter, "truncate")
    base = factors.base_shapes(base_params)
    layers = factors.layers(base, adapter, "truncate")
    if energy is not None:
        ranks = recommend_ranks(spectrum(base, adapter), energy)
    elif isinstance(rank, Mapping):
        unknown = sorted(set(rank) - set(layers))
        if unknown:
            raise ValueError(f"truncate: rank given for layers the adapter does not have: {unknown}")
        ranks = {name: rank.get(name, layer.a.shape[-1]) for name, layer in layers.items()}
    else:
        ranks = {name: rank for name in layers}
    for name, k in ranks.items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"truncate: layer {name!r}: rank must be a positive int, got {k!r}")
    ranks = {name: min(k, layers[name].a.shape[-1]) for name, k in ranks.items()}
    terms = {name: [(layer.scale, layer.a, layer.b)] for name, layer in layers.items()}
    outputs = {name: factors.truncated(*factors.concat(terms[name]), ranks[name]) for name in layers}
    lora_params = factors.to_tree(outputs, layers, next(iter(layers.values())).dtype)
    errors = factors.measured_errors(lora_params, layers, terms)
    return Combined(factors.scale_one_config(ranks), lora_params, errors)


class Overlap(NamedTuple):
    """How two adapters' subspaces at one layer align.

    Attributes:
      cosines: ``[slices, k]`` cosines of the principal angles between the two
        top-``k`` singular subspaces, largest first (1: a shared direction, 0:
        orthogonal).
      overlap: ``||U_1^T U_2||_F^2 / k`` averaged over slices, in ``[0, 1]``:
        the LoRA paper's normalized subspace similarity (0 for orthogonal
        subspaces, 1 for identical ones).
    """

    cosines: np.ndarray
    overlap: float


@old_order_shim("analysis.subspace_overlap(first, second, base_params=...)",
                "analysis.subspace_overlap(base_params, first, second)")
def subspace_overlap(base_params, first, second, *, k: int | None = None, side: str = "in") -> dict[str, Overlap]:
    """Per layer adapted by both, the overlap of the two deltas' top-``k`` singular subspaces.

    ``side="in"`` compares the input-side subspaces (left singular vectors of
    the ``[in, out]`` delta, spanned by ``A``), ``"out"`` the output side
    (spanned by ``B``). ``k`` defaults to the smaller numerical rank of the two
    deltas at each layer.

    >>> import jax.numpy as jnp
    >>> from lora_jax import LoraConfig
    >>> base = {"q": {"kernel": jnp.zeros((4, 3))}}
    >>> cfg = LoraConfig(rank=1)
    >>> x = Adapter(cfg, {"q": {"a": jnp.array([[1.0], [0], [0], [0]]), "b": jnp.ones((1, 3))}})
    >>> y = Adapter(cfg, {"q": {"a": jnp.array([[0.0], [1], [0], [0]]), "b": jnp.ones((1, 3))}})
    >>> subspace_overlap(base, x, y)["q"].overlap, subspace_overlap(base, x, x)["q"].overlap
    (0.0, 1.0)
    """
    if side not in ("in", "out"):
        raise ValueError(f"subspace_overlap: side must be 'in' or 'out', got {side!r}")
    base = factors.base_shapes(base_params)
    one = factors.layers(base, factors.as_adapter(first, "subspace_overlap: first"), "subspace_overlap: first")
    two = factors.layers(base, factors.as_adapter(second, "subspace_overlap: second"), "subspace_overlap: second")
    out = {}
    for name in [n for n in one if n in two]:
        svds = [factors.svd(layer.a, layer.b, layer.scale) for layer in (one[name], two[name])]
        kk = k or min(LayerSpectrum(name, s.shape[-1], s).numerical_rank() for _, s, _ in svds)
        if kk == 0:
            continue
        bases = [u[:, :, :kk] if side == "in" else np.swapaxes(vt, -1, -2)[:, :, :kk] for u, _, vt in svds]
        cosines = np.linalg.svd(np.swapaxes(bases[0], -1, -2) @ bases[1], compute_uv=False)
        out[name] = Overlap(np.clip(cosines, 0.0, 1.0), float(np.mean(np.sum(cosines ** 2, axis=-1)) / kk))
    return out


class Interference(NamedTuple):
    """Each adapter's loss on its own task, alone and with each other adapter added.

    Attributes:
      names: the adapters (and tasks), in order.
      alone: ``[n]`` loss on task ``i`` with adapter ``i`` alone.
      together: ``[n, n]`` loss on task ``i`` with adapters ``i`` and ``j``
        both active (their deltas summed); the diagonal repeats ``alone``.
    """

    names: tuple
    alone: np.ndarray
    together: np.ndarray

    @property
    def increase(self) -> np.ndarray:
        """``together - alone[:, None]``: how much adding adapter ``j`` costs task ``i``."""
        return self.together - self.alone[:, None]


@old_order_shim("analysis.interference(adapters, evaluate, base_params=...)",
                "analysis.interference(base_params, adapters, evaluate)")
def interference(base_params, adapters: Mapping[str, Adapter],
                 evaluate: Callable[[str, Adapter], float]) -> Interference:
    """The functional interference matrix of named adapters.

    ``evaluate(task, adapter)`` returns a held-out loss on ``task`` (one name
    per adapter) with ``adapter`` applied; the pair ``i + j`` is the exact
    ``"cat"`` combination with weights 1 and 1.
    """
    names = tuple(adapters)
    items = {name: factors.as_adapter(item, f"interference: {name!r}") for name, item in adapters.items()}
    alone = np.array([evaluate(name, items[name]) for name in names], np.float64)
    together = np.diag(alone).copy()
    for i, task in enumerate(names):
        for j, other in enumerate(names):
            if i != j:
                pair = combine(base_params, [items[task], items[other]], [1.0, 1.0]).adapter
                together[i, j] = evaluate(task, pair)
    return Interference(names, alone, together)
