"""Serving forward: one batch whose rows use 8 different adapters vs the same batch with one adapter.

The reference Llama workload of ``bench.train_step`` (float32, batch 8 x 128),
LoRA rank 8, alpha 16 on the seven attention and MLP projections, forward
only (logits), unmerged. Four jitted forwards, timed round-robin in one run:

* base: the model without adapters;
* merged: one adapter folded into the weights (costs what the base costs);
* one adapter: every row with the same adapter, factored;
* mixed: 8 adapters stacked (:func:`lora_jax.stack`), row ``i`` with adapter
  ``i`` (``adapter_ids``), gathered per row and still factored.

The issue's target: mixed / one adapter <= 1.10.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from bench import common
from bench.train_step import ALPHA, BATCH, MODEL, RANK, SEQ, TARGETS
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM

NAME = "multi_adapter"
TITLE = "Mixed-adapter batch (8 adapters) vs one adapter, forward, reference Llama workload"
N_ADAPTERS = 8
TARGET = 1.10


def _adapters(model, params, batch, cfg, n, seed):
    """``n`` adapters with random (non-zero) factors and different alphas."""
    shapes = jax.eval_shape(lambda: lora_jax.init_lora(model, params, cfg, batch, rng=jax.random.key(0)))
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        config = lora_jax.LoraConfig(rank=RANK, alpha=ALPHA * (1 + i % 3), targets=TARGETS)
        out[f"adapter{i}"] = lora_jax.Adapter(config, jax.tree.map(
            lambda s: jnp.asarray(0.02 * rng.normal(size=s.shape), s.dtype), shapes))
    return out


def _forwards(model, params, batch, adapters):
    one = next(iter(adapters.values()))
    stacked = lora_jax.stack(params, adapters)
    ids = jnp.arange(BATCH, dtype=jnp.int32) % len(adapters)
    base_fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
    unmerged = jax.jit(lora_jax.lora_apply(model, one.config))
    mixed = jax.jit(lora_jax.lora_apply(model, stacked.config))
    merged = lora_jax.merge(params, one.lora_params, one.config)
    return {
        "base": (base_fwd, (params, batch), {}),
        "merged": (base_fwd, (merged, batch), {}),
        "one adapter": (unmerged, (params, one.lora_params, batch), {}),
        f"mixed ({len(adapters)} adapters)": (mixed, (params, stacked.lora_params, batch), {"adapter_ids": ids}),
    }


def run(mode: str = "quick", *, seed: int = 0) -> dict:
    settings = common.MODES[mode]
    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    k_init, k_data = jax.random.split(jax.random.key(seed))
    batch = jax.random.randint(k_data, (BATCH, SEQ), 0, MODEL["vocab_size"], dtype=jnp.int32)
    params = jax.jit(model.init)(k_init, batch)["params"]
    cfg = lora_jax.LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS)
    adapters = _adapters(model, params, batch, cfg, N_ADAPTERS, seed)
    forwards = _forwards(model, params, batch, adapters)

    compiled, compile_s, outputs = {}, {}, {}
    for label, (fn, args, kwargs) in forwards.items():
        common.log(f"[{NAME}] compiling {label} ...")
        compiled[label], lower_s, comp_s = common.compile_aot(fn, *args, **kwargs)
        compile_s[label] = lower_s + comp_s
        outputs[label] = compiled[label](*args, **kwargs)
    for _ in range(settings["warmup"]):
        for label, (_, args, kwargs) in forwards.items():
            common.timed(compiled[label], *args, **kwargs)

    times = {label: [] for label in forwards}
    labels = list(forwards)
    for i in common.progress(range(settings["repeats"]), total=settings["repeats"], desc=f"[{NAME}] timing"):
        for j in range(len(labels)):
            label = labels[(i + j) % len(labels)]
            _, args, kwargs = forwards[label]
            times[label].append(common.timed(compiled[label], *args, **kwargs)[1])

    stats = {label: common.stats(t) for label, t in times.items()}
    mixed_label, one_label = labels[3], "one adapter"
    ratio = stats[mixed_label]["median_s"] / stats[one_label]["median_s"]
    # the check that the timed functions compute what they claim: row 0 of the mixed batch uses
    # adapter 0, which is the "one adapter" run; the merged run gives the same logits too
    row0 = float(jnp.max(jnp.abs(outputs[mixed_label][0] - outputs[one_label][0])))
    merged_diff = float(jnp.max(jnp.abs(outputs["merged"] - outputs[one_label])))
    peak = float(jnp.max(jnp.abs(outputs[one_label])))
    rows = []
    for label in labels:
        s = stats[label]
        rows.append([label, f"{compile_s[label]:.2f}", f"{s['median_s']:.4f}", f"{s['min_s']:.4f}",
                     f"{s['max_s']:.4f}", f"{BATCH * SEQ / s['median_s']:.0f}",
                     f"{s['median_s'] / stats['base']['median_s']:.3f}",
                     f"{s['median_s'] / stats[one_label]['median_s']:.3f}"])
    verdict = "met" if ratio <= TARGET else "MISSED"
    notes = [
        f"Workload: LlamaForCausalLM({', '.join(f'{k}={v}' for k, v in MODEL.items())}), float32; batch "
        f"{BATCH} x {SEQ} random ids; {N_ADAPTERS} adapters of rank {RANK} on {TARGETS} with alphas "
        f"{ALPHA:g}-{3 * ALPHA:g}; forward only (logits). The merged forward is the base's function "
        "on merged weights (same shapes: it reuses the base's compilation, hence compile 0).",
        f"mixed / one adapter = {ratio:.3f} (target <= {TARGET:.2f}: {verdict}); one adapter / base = "
        f"{stats[one_label]['median_s'] / stats['base']['median_s']:.3f}; merged / base = "
        f"{stats['merged']['median_s'] / stats['base']['median_s']:.3f}.",
        f"Correctness of the timed functions: row 0 of the mixed batch vs the one-adapter run, max |diff| "
        f"{row0:.2e}; merged vs unmerged {merged_diff:.2e} (max |logit| {peak:.3g}).",
    ]
    return {
        "title": TITLE, "mode": mode,
        "method": (f"{settings['warmup']} warm-up calls each, then {settings['repeats']} round-robin rounds, "
                   "`jax.block_until_ready` on every output; compiled ahead of time."),
        "ratios": {"mixed_over_one_adapter": ratio, "target": TARGET, "target_met": ratio <= TARGET,
                   "one_adapter_over_base": stats[one_label]["median_s"] / stats["base"]["median_s"],
                   "merged_over_base": stats["merged"]["median_s"] / stats["base"]["median_s"]},
        "forwards": {label: {**stats[label], "compile_s": compile_s[label], "times_s": times[label]}
                     for label in labels},
        "checks": {"row0_max_abs_diff": row0, "merged_max_abs_diff": merged_diff, "max_abs_logit": peak},
        "tables": [{"title": "Forward time",
                    "columns": ["forward", "compile s", "median s", "min s", "max s", "tokens/s",
                                "ratio vs base", "ratio vs one adapter"],
                    "rows": rows}],
        "notes": notes,
    }
