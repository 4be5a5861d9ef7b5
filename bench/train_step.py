"""One training step: full fine-tune vs LoRA (fast custom-VJP path) vs LoRA (plain autodiff).

The reference workload: a float32 Llama-style causal LM (vocab 4096, hidden
512, MLP 1376, 4 layers, 8 heads), batch 8 x 128 random token ids, LoRA rank 8,
alpha 16 on all seven attention and MLP projections, ``optax.adamw(1e-4)``.
All three steps are jitted with their parameter and optimizer state donated,
compiled ahead of time, warmed up, then called round-robin (the starting step
rotates each round) so that they share the machine's state; the ratios come
from the medians of this one run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import lora_jax
from bench import common
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss
from lora_jax.train import make_full_train_step

NAME = "train_step"
TITLE = "LoRA train step vs full fine-tune step (reference Llama workload)"
TARGET_FAST_RATIO = 0.70

MODEL = dict(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
             num_attention_heads=8)
BATCH, SEQ = 8, 128
RANK, ALPHA, TARGETS = 8, 16, ("attention", "mlp")
LEARNING_RATE = 1e-4


def loss_fn(model, batch):
    return causal_lm_loss(model(batch), batch)


def make_full_step(model, tx):
    """The baseline: gradients for every base parameter, adamw on all of them."""
    return make_full_train_step(lambda p, *a: model.apply({"params": p}, *a), loss_fn, tx)


class _Runner:
    """One compiled step with its own (donated) state, called as ``state = step(*state, *const)``."""

    def __init__(self, label, jitted, state, const):
        self.label, self.jitted, self.state, self.const = label, jitted, tuple(state), tuple(const)
        self.times: list[float] = []

    def compile(self):
        self.compiled, self.lower_s, self.compile_s = common.compile_aot(self.jitted, *self.state, *self.const)
        self.memory = common.memory(self.compiled)
        self.flops = common.flops(self.compiled)

    def step(self):
        out, seconds = common.timed(self.compiled, *self.state, *self.const)
        *state, metrics = out
        self.state = tuple(state)
        return metrics, seconds


def _build(seed: int):
    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    k_init, k_data, k_lora = jax.random.split(jax.random.key(seed), 3)
    batch = jax.random.randint(k_data, (BATCH, SEQ), 0, MODEL["vocab_size"], dtype=jnp.int32)
    params = jax.jit(model.init)(k_init, batch)["params"]
    cfg = lora_jax.LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS)
    lora = lora_jax.init_lora(cfg, model, params, batch, rng=k_lora)
    return model, cfg, params, lora, batch


def _runners(model, cfg, params, lora, batch, tx):
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    # The full step donates its params, so it trains a private copy; the LoRA
    # steps share the (never donated) base params and each own their adapters.
    full_params = copy(params)
    runners = [_Runner("full fine-tune", make_full_step(model, tx), (full_params, tx.init(full_params)), (batch,))]
    for impl in ("fast", "plain"):
        step = lora_jax.make_train_step(lora_jax.lora_apply(model, cfg, impl=impl), loss_fn, tx)
        own = copy(lora)
        runners.append(_Runner(f"LoRA {impl}", step, (own, tx.init(own)), (params, batch)))
    return runners


def _mb(value):
    return None if value is None else value / 2**20


def run(mode: str = "quick", *, seed: int = 0) -> dict:
    settings = common.MODES[mode]
    tx = optax.adamw(LEARNING_RATE)
    model, cfg, params, lora, batch = _build(seed)
    runners = _runners(model, cfg, params, lora, batch, tx)
    full, fast, plain = runners

    for r in runners:
        common.log(f"[{NAME}] compiling {r.label} ...")
        r.compile()
        common.log(f"[{NAME}]   lower {r.lower_s:.2f}s + compile {r.compile_s:.2f}s")

    first = {}
    for i in range(settings["warmup"]):
        for r in runners:
            metrics, seconds = r.step()
            if i == 0:
                first[r.label] = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                                  "first_call_s": seconds}
        common.log(f"[{NAME}] warm-up {i + 1}/{settings['warmup']} done")

    n = len(runners)
    for i in common.progress(range(settings["repeats"]), total=settings["repeats"], desc=f"[{NAME}] timing"):
        for j in range(n):
            r = runners[(i + j) % n]
            r.times.append(r.step()[1])

    tokens = BATCH * SEQ
    base_stats = common.stats(full.times)
    per_step = {}
    for r in runners:
        s = common.stats(r.times)
        per_step[r.label] = {
            **s, "tokens_per_s": tokens / s["median_s"], "ratio_vs_full": s["median_s"] / base_stats["median_s"],
            "ratio_vs_full_of_mins": s["min_s"] / base_stats["min_s"],
            "flops_ratio_vs_full": common.ratio(r.flops, full.flops),
            "lower_s": r.lower_s, "compile_s": r.compile_s, "times_s": r.times, **first[r.label],
            "memory": r.memory, "flops": r.flops,
            "memory_ratio_vs_full": common.ratio(r.memory["total"], full.memory["total"]),
            "memory_ratio_vs_full_minus_alias": common.ratio(r.memory["total_minus_alias"],
                                                             full.memory["total_minus_alias"]),
        }
    fast_ratio = per_step[fast.label]["ratio_vs_full"]
    plain_ratio = per_step[plain.label]["ratio_vs_full"]

    time_rows = []
    for r in runners:
        p = per_step[r.label]
        target = f"<= {TARGET_FAST_RATIO:.2f} ({'met' if fast_ratio <= TARGET_FAST_RATIO else 'MISSED'})" \
            if r is fast else ""
        time_rows.append([r.label, f"{r.lower_s + r.compile_s:.2f}", f"{p['median_s']:.4f}", f"{p['min_s']:.4f}",
                          f"{p['max_s']:.4f}", f"{p['tokens_per_s']:.0f}", f"{p['ratio_vs_full']:.3f}",
                          f"{p['ratio_vs_full_of_mins']:.3f}",
                          None if p["flops_ratio_vs_full"] is None else f"{p['flops_ratio_vs_full']:.3f}", target])
    mem_rows = []
    for r in runners:
        m, p = r.memory, per_step[r.label]
        fmt = lambda v: None if v is None else f"{v:.1f}"
        mem_rows.append([r.label, fmt(_mb(m["argument_size_in_bytes"])), fmt(_mb(m["output_size_in_bytes"])),
                         fmt(_mb(m["temp_size_in_bytes"])), fmt(_mb(m["alias_size_in_bytes"])),
                         fmt(_mb(m["total"])), fmt(_mb(m["total_minus_alias"])),
                         None if p["memory_ratio_vs_full"] is None else f"{p['memory_ratio_vs_full']:.3f}",
                         None if p["memory_ratio_vs_full_minus_alias"] is None
                         else f"{p['memory_ratio_vs_full_minus_alias']:.3f}",
                         None if r.flops is None else f"{r.flops / 1e9:.1f}"])

    trainable, base_count = lora_jax.count_params(lora), lora_jax.count_params(params)
    gn_fast, gn_plain = first[fast.label]["grad_norm"], first[plain.label]["grad_norm"]
    notes = [
        f"Workload: LlamaForCausalLM({', '.join(f'{k}={v}' for k, v in MODEL.items())}), float32; batch "
        f"{BATCH} x {SEQ} random ids; LoRA rank {RANK}, alpha {ALPHA}, targets {TARGETS} "
        f"({len(lora_jax.adapter_paths(lora))} adapters, {trainable:,} trainable of {base_count:,} base "
        f"params); optax.adamw({LEARNING_RATE:g}); state donated.",
        "Compile = `jax.jit(step).lower(...)` + `.compile()` (ahead of time), timed before any call; "
        "per step: lower " + ", ".join(f"{r.label} {r.lower_s:.2f}s" for r in runners)
        + "; compile " + ", ".join(f"{r.label} {r.compile_s:.2f}s" for r in runners) + ".",
        f"Ratios of the medians of this run: LoRA-fast/full = {fast_ratio:.3f} "
        f"(target <= {TARGET_FAST_RATIO:.2f}), LoRA-plain/full = {plain_ratio:.3f}. The ratio of the minimum "
        "times is shown beside it as a check on noise; the XLA FLOP ratio is what the arithmetic alone "
        "would give (the LoRA step still back-propagates activation gradients through every frozen layer, "
        "and skips only the weight gradients and the optimizer update of the base).",
        "Memory is XLA's `compiled.memory_analysis()`; total = argument + output + temp. With donation the "
        "outputs that reuse donated inputs (alias) are counted in both argument and output, so "
        "`total - alias` is the closer footprint estimate. The LoRA steps' arguments include the frozen "
        "base params (not donated).",
        "First step (identical initial weights; LoRA B = 0 so all three losses agree): loss "
        + ", ".join(f"{k} {v['loss']:.6f}" for k, v in first.items())
        + f"; LoRA grad norm fast {gn_fast:.6g} vs plain {gn_plain:.6g} "
        f"(rel. diff {abs(gn_fast - gn_plain) / max(abs(gn_plain), 1e-30):.2e}).",
    ]
    return {
        "title": TITLE,
        "mode": mode,
        "method": (f"{settings['warmup']} warm-up calls each, then {settings['repeats']} round-robin rounds "
                   f"(one call of each step per round, `jax.block_until_ready` on every output)."),
        "config": {"model": MODEL, "batch": BATCH, "seq": SEQ, "rank": RANK, "alpha": ALPHA,
                   "targets": list(TARGETS), "learning_rate": LEARNING_RATE, "seed": seed,
                   "trainable_params": trainable, "base_params": base_count, **settings},
        "ratios": {"lora_fast_over_full": fast_ratio, "lora_plain_over_full": plain_ratio,
                   "target_lora_fast_over_full": TARGET_FAST_RATIO,
                   "target_met": fast_ratio <= TARGET_FAST_RATIO,
                   "flops_lora_fast_over_full": per_step[fast.label]["flops_ratio_vs_full"],
                   "memory_lora_fast_over_full": per_step[fast.label]["memory_ratio_vs_full"],
                   "memory_lora_fast_over_full_minus_alias": per_step[fast.label]["memory_ratio_vs_full_minus_alias"]},
        "steps": per_step,
        "tables": [
            {"title": "Time per step",
             "columns": ["step", "compile s", "median s", "min s", "max s", "tokens/s", "ratio vs full (median)",
                         "ratio vs full (min)", "XLA FLOP ratio vs full", "target (median ratio)"],
             "rows": time_rows},
            {"title": "XLA memory analysis (MiB) and cost analysis",
             "columns": ["step", "argument", "output", "temp", "alias", "total", "total - alias",
                         "ratio vs full (total)", "ratio vs full (total - alias)", "GFLOP (XLA)"],
             "rows": mem_rows},
        ],
        "notes": notes,
    }
