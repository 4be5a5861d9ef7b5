"""DoRA's training step against plain LoRA's on the reference Llama workload (see bench/train_step.py).

Same model, batch, rank, alpha, targets and optimizer as ``train_step``; the
steps differ only in ``LoraConfig(use_dora=...)`` and ``impl``. ``DoRA fast``
is the library's path: the layer's own output is rescaled (no second base
matmul, forward or backward) and the column norm of ``W + s A B`` is expanded
so that it never forms the ``[in, out]`` sum. ``DoRA plain`` forms that sum
and differentiates the low-rank product by ordinary autodiff: the textbook
implementation, for comparison. All steps are compiled ahead of time and
timed round-robin in one process.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

import lora_jax
from bench import common, train_step

NAME = "dora"
TITLE = "DoRA train step vs LoRA train step (reference Llama workload)"
#: PEFT users report DoRA steps 20% to 2.4x slower than LoRA; the issue asks for far less.
TARGET_RATIO = 1.10


def run(mode: str = "quick", *, seed: int = 0) -> dict:
    settings = common.MODES[mode]
    tx = optax.adamw(train_step.LEARNING_RATE)
    model, cfg, params, lora, batch = train_step._build(seed)
    dora_cfg = dataclasses.replace(cfg, use_dora=True)
    dora = lora_jax.init_lora(model, params, dora_cfg, batch, rng=jax.random.key(seed + 1))
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    runners = []
    for label, config, adapters, impl in (("LoRA fast", cfg, lora, "fast"), ("DoRA fast", dora_cfg, dora, "fast"),
                                          ("DoRA plain", dora_cfg, dora, "plain")):
        own = copy(adapters)
        runners.append(common.StepRunner(label, train_step.lora_step(config, tx, impl=impl), (own, tx.init(own)),
                                         (params, batch)))
    first = common.run_rounds(runners, settings, NAME)
    base, fast, plain = runners
    report = common.step_report(runners, base, train_step.BATCH * train_step.SEQ, first,
                                targets={fast.label: ("time", TARGET_RATIO)})
    for table in report["tables"]:
        table["columns"] = [c.replace("vs full", "vs LoRA fast") for c in table["columns"]]
    per_step = report["steps"]
    ratio = {label: per_step[label]["ratio_vs_full"] for label in per_step}
    mem = {label: per_step[label]["memory_ratio_vs_full"] for label in per_step}
    magnitudes = lora_jax.count_params(dora) - lora_jax.count_params(lora)
    notes = [
        f"Workload: as `train_step` (LlamaForCausalLM {train_step.MODEL}, float32, batch {train_step.BATCH} x "
        f"{train_step.SEQ}, rank {train_step.RANK}, alpha {train_step.ALPHA}, targets {train_step.TARGETS}, "
        f"optax.adamw); DoRA adds {magnitudes:,} magnitude parameters to LoRA's "
        f"{lora_jax.count_params(lora):,}.",
        f"Time, ratios of the medians of this run: DoRA fast / LoRA fast = {ratio[fast.label]:.3f} (target <= "
        f"{TARGET_RATIO:.2f}); DoRA plain / LoRA fast = {ratio[plain.label]:.3f}. XLA FLOP ratio DoRA fast / "
        f"LoRA fast = {common._fmt(per_step[fast.label]['flops_ratio_vs_full'], '.3f')}.",
        f"Memory (XLA argument + temp bytes): DoRA fast / LoRA fast = {common._fmt(mem[fast.label], '.3f')}, "
        f"DoRA plain / LoRA fast = {common._fmt(mem[plain.label], '.3f')}.",
        "First step from the same initial model (B = 0, m = ||W||, so DoRA's model is the base): loss "
        + ", ".join(f"{k} {v['loss']:.6f}" for k, v in first.items()) + ".",
    ]
    return {
        "title": TITLE,
        "mode": mode,
        "method": common.rounds_method(settings),
        "config": train_step.workload_config(seed, settings, magnitude_params=magnitudes),
        "ratios": {"dora_fast_over_lora_fast": ratio[fast.label], "dora_plain_over_lora_fast": ratio[plain.label],
                   "memory_dora_fast_over_lora_fast": mem[fast.label],
                   "memory_dora_plain_over_lora_fast": mem[plain.label]},
        "verdicts": report["verdicts"],
        "steps": per_step,
        "tables": report["tables"],
        "notes": notes,
    }
