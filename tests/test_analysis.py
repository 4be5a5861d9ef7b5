"""lora_jax.analysis on constructed adapters whose answers are known, against dense NumPy float64."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_jax import Adapter, LoraConfig, merge, reference
from lora_jax.analysis import (effective_rank, interference, recommend_ranks, spectrum, subspace_overlap,
                               truncate)
from tests.tolerances import assert_close

F32_REL = 1e-5   # singular values and errors of float32 factors, relative to the largest


def _stacked(x):
    x = np.asarray(x, np.float64)
    return x if x.ndim == 3 else x[None]


@st.composite
def known_rank(draw):
    """An adapter of rank r whose delta has rank exactly k <= r (a = P @ Q with P [in, k]), maybe stacked."""
    n_in, n_out = draw(st.integers(3, 9)), draw(st.integers(3, 9))
    rank = draw(st.integers(2, min(n_in, n_out)))
    k = draw(st.integers(1, rank))
    lead = draw(st.sampled_from([(), (3,)]))
    alpha, rslora = draw(st.sampled_from([1.0, 4.0])), draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    a = rng.normal(size=lead + (n_in, k)) @ rng.normal(size=lead + (k, rank))
    b = rng.normal(size=lead + (rank, n_out))
    base = {"q": {"kernel": jnp.zeros(lead + (n_in, n_out))}}
    config = LoraConfig(rank=rank, alpha=alpha, use_rslora=rslora)
    lora = {"q": {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}}
    return Adapter(config, lora), base, k, reference.scaling(alpha, rank, rslora)


def _dense(adapter, scale):
    a, b = _stacked(adapter.lora_params["q"]["a"]), _stacked(adapter.lora_params["q"]["b"])
    return scale * a @ b


@given(known_rank())
def test_spectrum_matches_the_dense_svd_and_finds_the_rank(case):
    adapter, base, k, scale = case
    s = spectrum(base, adapter)["q"]
    expected = np.linalg.svd(_dense(adapter, scale), compute_uv=False)[:, :s.rank]
    assert s.sigma.shape == expected.shape
    assert np.max(np.abs(s.sigma - expected)) <= F32_REL * expected.max()
    assert s.numerical_rank() == k
    cumulative = np.cumsum(np.sum(expected ** 2, axis=0)) / np.sum(expected ** 2)
    assert all(abs(s.energy(j + 1) - cumulative[j]) <= 1e-6 for j in range(s.rank))
    assert s.energy(k) >= 1 - 1e-9
    assert recommend_ranks({"q": s}, 0.999999) == {"q": min(int(np.searchsorted(cumulative, 0.999999 - 1e-12)) + 1,
                                                            s.rank)}


def test_effective_rank_of_known_spectra():
    assert effective_rank([3.0, 3.0, 3.0, 0.0]) == pytest.approx(3.0)
    assert effective_rank([1.0]) == pytest.approx(1.0)
    assert 1.0 < effective_rank([2.0, 1.0]) < 2.0
    assert effective_rank(np.zeros(4)) == 0.0


@given(known_rank(), st.integers(1, 4))
def test_truncation_is_the_best_rank_k_and_reports_the_discarded_energy(case, k):
    adapter, base, _, scale = case
    small = truncate(base, adapter, rank=k)
    dense = _dense(adapter, scale)
    u, s, vt = np.linalg.svd(dense, full_matrices=False)
    kk = min(k, adapter.config.rank)
    best = (u[:, :, :kk] * s[:, None, :kk]) @ vt[:, :kk]
    merged = np.asarray(merge(base, small.lora_params, small.config)["q"]["kernel"], np.float64)
    assert small.lora_params["q"]["a"].shape[-1] == kk
    assert_close(merged.reshape(best.shape), best, jnp.float32, what=f"rank {kk}")
    discarded = np.sqrt(np.sum(s[:, kk:] ** 2)) / np.sqrt(np.sum(s ** 2))
    assert abs(small.errors["q"] - discarded) <= F32_REL, (small.errors["q"], discarded)


def test_truncate_by_energy_and_its_errors():
    rng = np.random.default_rng(0)
    # a delta with singular values 4, 2, 1 exactly: energy shares 16/21, 4/21, 1/21
    u, _ = np.linalg.qr(rng.normal(size=(6, 3)))
    v, _ = np.linalg.qr(rng.normal(size=(5, 3)))
    lora = {"q": {"a": jnp.asarray(u * [4.0, 2.0, 1.0], jnp.float32), "b": jnp.asarray(v.T, jnp.float32)}}
    adapter, base = Adapter(LoraConfig(rank=3, alpha=3), lora), {"q": {"kernel": jnp.zeros((6, 5))}}
    assert np.allclose(spectrum(base, adapter)["q"].sigma, [[4.0, 2.0, 1.0]], rtol=1e-6)
    for energy, k in ((0.7, 1), (16 / 21 + 1e-3, 2), (0.99, 3)):
        out = truncate(base, adapter, energy=energy)
        assert out.lora_params["q"]["a"].shape[-1] == k
        assert out.errors["q"] == pytest.approx(np.sqrt(sum([16.0, 4.0, 1.0][k:]) / 21), abs=1e-6)
    with pytest.raises(ValueError, match="exactly one of rank= and energy="):
        truncate(base, adapter)
    with pytest.raises(ValueError, match="rank given for layers the adapter does not have"):
        truncate(base, adapter, rank={"k": 1})


def _one_layer(a, b):
    """A one-layer adapter with alpha == rank (scale 1)."""
    return Adapter(LoraConfig(rank=a.shape[1], alpha=a.shape[1]), {"q": {"a": jnp.asarray(a, jnp.float32),
                                                                "b": jnp.asarray(b, jnp.float32)}})


def test_subspace_overlap_of_constructed_pairs():
    rng = np.random.default_rng(1)
    base = {"q": {"kernel": jnp.zeros((8, 6))}}
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    b = rng.normal(size=(2, 6))
    first = _one_layer(q[:, :2], b)
    orthogonal = _one_layer(q[:, 2:4], b)
    same_span = _one_layer(q[:, :2] @ rng.normal(size=(2, 2)), rng.normal(size=(2, 6)))   # other basis, other B
    half = _one_layer(np.stack([q[:, 0], q[:, 5]], axis=1), b)                          # shares one direction
    overlap = lambda other, **kw: subspace_overlap(base, first, other, **kw)["q"]
    assert overlap(orthogonal).overlap == pytest.approx(0.0, abs=1e-10)
    assert overlap(same_span).overlap == pytest.approx(1.0, abs=1e-6)
    assert overlap(first).overlap == pytest.approx(1.0, abs=1e-6)
    assert overlap(half).overlap == pytest.approx(0.5, abs=1e-6)
    assert np.allclose(overlap(half).cosines, [[1.0, 0.0]], atol=1e-6)
    # the output side: same B row space for `first` and `orthogonal`
    assert overlap(orthogonal, side="out").overlap == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="side must be 'in' or 'out'"):
        overlap(first, side="both")


def test_interference_matrix_uses_the_exact_sum_of_deltas():
    rng = np.random.default_rng(2)
    base = {"q": {"kernel": jnp.zeros((5, 4))}}
    adapters = {name: _one_layer(rng.normal(size=(5, 2)), rng.normal(size=(2, 4))) for name in ("x", "y", "z")}
    targets = {name: rng.normal(size=(5, 4)) for name in adapters}

    def evaluate(task, adapter):   # distance of the adapter's delta from the task's target
        delta = np.asarray(merge(base, adapter.lora_params, adapter.config)["q"]["kernel"], np.float64)
        return float(np.linalg.norm(delta - targets[task]))

    report = interference(base, adapters, evaluate)
    deltas = {n: _dense(a, 1.0)[0] for n, a in adapters.items()}   # alpha == rank: scale 1
    for i, task in enumerate(report.names):
        assert report.alone[i] == pytest.approx(np.linalg.norm(deltas[task] - targets[task]), rel=1e-5)
        for j, other in enumerate(report.names):
            both = deltas[task] + (deltas[other] if other != task else 0.0)
            assert report.together[i, j] == pytest.approx(np.linalg.norm(both - targets[task]), rel=1e-5)
    assert np.allclose(np.diag(report.increase), 0.0)


# ---- the 0.1 order (adapters first, base_params= as a keyword): each warns and gives what the 0.2 order gives


def _pair():
    rng = np.random.default_rng(3)
    base = {"q": {"kernel": jnp.zeros((6, 5))}}
    return base, _one_layer(rng.normal(size=(6, 3)), rng.normal(size=(3, 5))), _one_layer(
        rng.normal(size=(6, 2)), rng.normal(size=(2, 5)))


def test_spectrum_in_the_old_order_warns_and_agrees():
    base, first, _ = _pair()
    with pytest.warns(DeprecationWarning, match=r"use analysis.spectrum\(base_params, adapter\)"):
        old = spectrum(first, base_params=base)["q"]
    new = spectrum(base, first)["q"]
    assert (old.name, old.rank) == (new.name, new.rank) and np.array_equal(old.sigma, new.sigma)


def test_truncate_in_the_old_order_warns_and_agrees():
    base, first, _ = _pair()
    with pytest.warns(DeprecationWarning, match=r"analysis.truncate\(adapter, base_params=...\) is deprecated"):
        old = truncate(first, base_params=base, rank=1)
    new = truncate(base, first, rank=1)
    assert old.config == new.config and old.errors == new.errors
    assert all(np.array_equal(old.lora_params["q"][x], new.lora_params["q"][x]) for x in "ab")


def test_subspace_overlap_in_the_old_order_warns_and_agrees():
    base, first, second = _pair()
    with pytest.warns(DeprecationWarning, match=r"use analysis.subspace_overlap\(base_params, first, second\)"):
        old = subspace_overlap(first, second, base_params=base, side="out")["q"]
    new = subspace_overlap(base, first, second, side="out")["q"]
    assert old.overlap == new.overlap and np.array_equal(old.cosines, new.cosines)


def test_interference_in_the_old_order_warns_and_agrees():
    base, first, second = _pair()
    evaluate = lambda task, adapter: float(np.sum(np.asarray(adapter.lora_params["q"]["a"])) + len(task))
    with pytest.warns(DeprecationWarning, match=r"use analysis.interference\(base_params, adapters, evaluate\)"):
        old = interference({"x": first, "yy": second}, evaluate, base_params=base)
    new = interference(base, {"x": first, "yy": second}, evaluate)
    assert old.names == new.names and np.array_equal(old.together, new.together)
    assert np.array_equal(old.alone, new.alone)
