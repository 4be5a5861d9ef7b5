"""One training step: full fine-tune vs LoRA (fast custom-VJP path, plain autodiff, rematerialised).

The reference workload: a float32 Llama-style causal LM (vocab 4096, hidden
512, MLP 1376, 4 layers, 8 heads), batch 8 x 128 random token ids, LoRA rank 8,
alpha 16 on all seven attention and MLP projections, ``optax.adamw(1e-4)``.
All steps are jitted with their parameter and optimizer state donated,
compiled ahead of time, warmed up, then called round-robin (the starting step
rotates each round) so that they share the machine's state; the ratios come
from the medians of this one run. The remat row rematerialises each decoder
layer (``LlamaConfig(remat=True)``) and compiles with
:func:`lora_jax.backend.memory_lean_options`: the memory option.
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
TARGET_MEMORY_RATIO = 0.60

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


def _build(seed: int):
    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    k_init, k_data, k_lora = jax.random.split(jax.random.key(seed), 3)
    batch = jax.random.randint(k_data, (BATCH, SEQ), 0, MODEL["vocab_size"], dtype=jnp.int32)
    params = jax.jit(model.init)(k_init, batch)["params"]
    cfg = lora_jax.LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS)
    lora = lora_jax.init_lora(model, params, cfg, batch, rng=k_lora)
    return model, cfg, params, lora, batch


def lora_step(cfg, tx, *, impl: str = "fast", remat: bool = False):
    """The LoRA step on the reference Llama; ``remat`` rematerialises each layer with the memory-lean scheduler."""
    model = LlamaForCausalLM(LlamaConfig(**MODEL, remat=remat))
    options = lora_jax.backend.memory_lean_options() if remat else None
    return lora_jax.make_train_step(lora_jax.lora_apply(model, cfg, impl=impl), loss_fn, tx,
                                    compiler_options=options)


def _runners(model, cfg, params, lora, batch, tx):
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    # The full step donates its params, so it trains a private copy; the LoRA
    # steps share the (never donated) base params and each own their adapters.
    full_params = copy(params)
    runners = [common.StepRunner("full fine-tune", make_full_step(model, tx), (full_params, tx.init(full_params)),
                                 (batch,))]
    for label, impl, remat in (("LoRA fast", "fast", False), ("LoRA plain", "plain", False),
                               ("LoRA fast + remat", "fast", True)):
        own = copy(lora)
        runners.append(common.StepRunner(label, lora_step(cfg, tx, impl=impl, remat=remat), (own, tx.init(own)),
                                         (params, batch)))
    return runners


def _full_remat_memory(params, batch, tx) -> dict:
    """XLA's memory analysis of the full step with the same remat option (compiled, never run)."""
    model = LlamaForCausalLM(LlamaConfig(**MODEL, remat=True))
    step = make_full_train_step(lambda p, *a: model.apply({"params": p}, *a), loss_fn, tx,
                                compiler_options=lora_jax.backend.memory_lean_options())
    return common.memory(step.lower(params, tx.init(params), batch).compile())


def workload_config(seed: int, settings: dict, **extra) -> dict:
    """The workload's hyper-parameters as recorded in every result that uses it."""
    return {"model": MODEL, "batch": BATCH, "seq": SEQ, "rank": RANK, "alpha": ALPHA, "targets": list(TARGETS),
            "learning_rate": LEARNING_RATE, "seed": seed, **extra, **settings}


def run(mode: str = "quick", *, seed: int = 0) -> dict:
    settings = common.MODES[mode]
    tx = optax.adamw(LEARNING_RATE)
    model, cfg, params, lora, batch = _build(seed)
    runners = _runners(model, cfg, params, lora, batch, tx)
    full, fast, plain, remat = runners
    first = common.run_rounds(runners, settings, NAME)
    report = common.step_report(runners, full, BATCH * SEQ, first,
                                targets={fast.label: ("time", TARGET_FAST_RATIO),
                                         remat.label: ("memory", TARGET_MEMORY_RATIO)})
    per_step = report["steps"]
    full_remat = _full_remat_memory(params, batch, tx)
    full_remat_mem = full_remat["argument_size_in_bytes"] + full_remat["temp_size_in_bytes"]
    ratio = {label: per_step[label]["ratio_vs_full"] for label in per_step}
    mem = {label: per_step[label]["memory_ratio_vs_full"] for label in per_step}

    trainable, base_count = lora_jax.count_params(lora), lora_jax.count_params(params)
    notes = [
        f"Workload: LlamaForCausalLM({', '.join(f'{k}={v}' for k, v in MODEL.items())}), float32; batch "
        f"{BATCH} x {SEQ} random ids; LoRA rank {RANK}, alpha {ALPHA}, targets {TARGETS} "
        f"({len(lora_jax.adapter_paths(lora))} adapters, {trainable:,} trainable of {base_count:,} base "
        f"params); optax.adamw({LEARNING_RATE:g}); state donated.",
        "Compile = `jax.jit(step).lower(...)` + `.compile()` (ahead of time), timed before any call; "
        "per step: lower " + ", ".join(f"{r.label} {r.lower_s:.2f}s" for r in runners)
        + "; compile " + ", ".join(f"{r.label} {r.compile_s:.2f}s" for r in runners) + ".",
        f"Time, ratios of the medians of this run: LoRA fast / full = {ratio[fast.label]:.3f} (target <= "
        f"{TARGET_FAST_RATIO:.2f}), LoRA plain / full = {ratio[plain.label]:.3f}, LoRA fast + remat / full = "
        f"{ratio[remat.label]:.3f}. The ratio of the minima is a check on noise; the XLA FLOP ratio is "
        "what the arithmetic alone would give (the LoRA step still back-propagates activation gradients "
        "through every frozen layer, and skips only the weight gradients and the optimizer update of the base).",
        f"Memory is XLA's `compiled.memory_analysis()`, argument + temp bytes (donated outputs reuse their "
        f"arguments' buffers). LoRA fast / full = {mem[fast.label]:.3f}; LoRA fast + remat / full = "
        f"{mem[remat.label]:.3f} (target <= {TARGET_MEMORY_RATIO:.2f}). The LoRA steps' arguments include the "
        f"frozen base params. For reference, the full step with the same remat option needs "
        f"{full_remat_mem / 2**20:.1f} MiB ({full_remat_mem / per_step[full.label]['memory_args_temp']:.3f} "
        "of the plain full step; compiled, not timed).",
        "Why remat needs `lora_jax.backend.memory_lean_options()` on CPU: XLA:CPU's default scheduler "
        "orders work for parallelism and starts the recomputation of rematerialised layers early, which "
        "keeps their activations alive anyway; the memory-aware scheduler honours the checkpoints. "
        "GPU and TPU schedulers are memory-aware already (the option is empty there).",
        common.first_step_note(first, fast.label, plain.label),
    ]
    return {
        "title": TITLE,
        "mode": mode,
        "method": common.rounds_method(settings),
        "config": workload_config(seed, settings, trainable_params=trainable, base_params=base_count),
        "ratios": {"lora_fast_over_full": ratio[fast.label], "lora_plain_over_full": ratio[plain.label],
                   "lora_fast_remat_over_full": ratio[remat.label],
                   "memory_lora_fast_over_full": mem[fast.label],
                   "memory_lora_fast_remat_over_full": mem[remat.label],
                   "memory_full_remat_over_full": full_remat_mem / per_step[full.label]["memory_args_temp"],
                   "flops_lora_fast_over_full": per_step[fast.label]["flops_ratio_vs_full"]},
        "verdicts": report["verdicts"],
        "full_remat_memory": full_remat,
        "steps": per_step,
        "tables": report["tables"],
        "notes": notes,
    }
