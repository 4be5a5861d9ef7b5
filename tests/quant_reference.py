"""The int8 and NF4 quantizers in NumPy float64: the oracle for ``lora_jax.quant``.

Written from the definitions, sharing no code with the JAX implementation: the
NF4 levels here are the published table, not derived, and the nearest level is
an argmin over all 16 distances. Each function also returns each value's
*margin*: its distance to the nearest rounding boundary, in units of the
quantity being rounded. Where a margin is within float32 rounding of zero, a
float32 implementation may legitimately round the other way.
"""

from __future__ import annotations

import numpy as np

# The 16 NF4 levels as published: QLoRA (Dettmers et al. 2023, arXiv:2305.14314), appendix E,
# identical to the NF4 lookup table of bitsandbytes (float32 values printed in full).
NF4_TABLE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])

#: Half the widest gap between adjacent levels: the worst NF4 rounding error, in units of the block absmax.
NF4_HALF_GAP = float(np.max(np.diff(NF4_TABLE)) / 2)


def int8(w, n_lead: int, n_in: int):
    """Symmetric per-output-channel int8: ``(q, scale, dequantized, margin)``.

    ``scale = max |w| / 127`` over the ``n_in`` axes after the ``n_lead`` stacked
    axes; ``q = round(w / scale)`` (half to even); an all-zero channel gets ``q = 0``.
    """
    w = np.asarray(w, np.float64)
    absmax = np.max(np.abs(w), axis=tuple(range(n_lead, n_lead + n_in)), keepdims=True)
    scale = absmax / 127.0
    v = w / np.where(scale > 0, scale, 1.0)
    q = np.round(v)
    margin = np.abs(np.abs(v - np.floor(v)) - 0.5)
    return q.astype(np.int64), scale, q * scale, margin


def blocks(w, n_lead: int, block_size: int):
    """Each stacked slice flattened (C order), zero-padded and cut into ``[..., blocks, block_size]``."""
    w = np.asarray(w, np.float64)
    flat = w.reshape(w.shape[:n_lead] + (-1,))
    pad = -flat.shape[-1] % block_size
    flat = np.concatenate([flat, np.zeros(flat.shape[:-1] + (pad,))], axis=-1)
    return flat.reshape(flat.shape[:-1] + (-1, block_size))


def nf4(w, n_lead: int, block_size: int, absmax_of=None):
    """Blockwise NF4: ``(codes, absmax, dequantized, margin)``; codes ``[..., blocks, block_size]`` in 0..15.

    Each value divided by its block's absmax goes to the nearest level (argmin;
    ties to the lower level). ``absmax_of`` maps the exact absmaxes to the ones
    used for dequantizing (double quantization); codes always use the exact ones.
    """
    w = np.asarray(w, np.float64)
    b = blocks(w, n_lead, block_size)
    absmax = np.max(np.abs(b), axis=-1)
    x = b / np.where(absmax > 0, absmax, 1.0)[..., None]
    dist = np.abs(x[..., None] - NF4_TABLE)
    codes = np.argmin(dist, axis=-1)
    ordered = np.sort(dist, axis=-1)
    margin = (ordered[..., 1] - ordered[..., 0]) / 2
    used = absmax if absmax_of is None else absmax_of(absmax)
    deq = (NF4_TABLE[codes] * used[..., None]).reshape(w.shape[:n_lead] + (-1,))
    n = int(np.prod(w.shape[n_lead:]))
    return codes, absmax, deq[..., :n].reshape(w.shape), margin


def absmax_8bit(absmax, group_size: int = 256):
    """Double quantization of block absmaxes ``[..., blocks]``: ``(q, scale, mean, values, margin)``.

    The mean over each slice's blocks is subtracted; the rest is symmetric int8
    with one absmax scale per ``group_size`` consecutive blocks.
    """
    absmax = np.asarray(absmax, np.float64)
    n = absmax.shape[-1]
    mean = absmax.mean(axis=-1, keepdims=True)
    centred = absmax - mean
    pad = -n % group_size
    groups = np.concatenate([centred, np.zeros(centred.shape[:-1] + (pad,))], axis=-1)
    groups = groups.reshape(groups.shape[:-1] + (-1, group_size))
    scale = np.max(np.abs(groups), axis=-1) / 127.0
    v = groups / np.where(scale > 0, scale, 1.0)[..., None]
    q = np.round(v)
    margin = np.abs(np.abs(v - np.floor(v)) - 0.5)
    flat = lambda t: t.reshape(t.shape[:-2] + (-1,))[..., :n]
    values = flat(q * scale[..., None]) + mean
    return flat(q).astype(np.int64), scale, mean, values, flat(margin)


def unpack_nibbles(packed):
    """``[..., k]`` uint8 -> ``[..., 2k]`` codes: the low nibble first, then the high one."""
    packed = np.asarray(packed).astype(np.int64)
    return np.stack([packed % 16, packed // 16], axis=-1).reshape(packed.shape[:-1] + (-1,))
