"""One training step through the NNX front end: full fine-tune vs LoRA (fast) vs LoRA (plain).

The reference workload of ``bench.train_step`` (float32 Llama-style causal LM,
vocab 4096, hidden 512, MLP 1376, 4 layers, 8 heads, batch 8 x 128 random ids,
LoRA rank 8, alpha 16 on the seven attention and MLP projections,
``optax.adamw(1e-4)``), written as a compact ``flax.nnx`` model (layers in an
``nnx.List``, no scan) and adapted with :func:`lora_jax.nnx.attach`.

Each step is a pure function of ``nnx.split`` pieces: ``(trainable, opt_state,
frozen, batch) -> (trainable, opt_state, metrics)``, where the model is
rebuilt inside the trace with ``nnx.merge(graphdef, trainable, frozen)``. The
trainable state (``nnx.Param`` for the full step, ``LoraParam`` for LoRA) and
its optimizer state are donated; the steps are ``jax.jit``-ed, compiled ahead
of time, warmed up and timed round-robin exactly as ``bench.train_step``. This
is what ``nnx.jit`` + ``nnx.Optimizer(model, tx, wrt=...)`` compiles to, minus
``nnx.jit``'s per-call Python graph traversal, which would add a fixed cost
of similar size to every step and blur the ratio.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lora_jax
from bench import common
from bench.train_step import ALPHA, BATCH, LEARNING_RATE, MODEL, RANK, SEQ, TARGET_FAST_RATIO, TARGETS, _mb
from lora_jax.models.llama import causal_lm_loss, inverse_frequencies, rotary
from lora_jax.nnx import LoraParam, attach

NAME = "nnx_step"
TITLE = "NNX: LoRA train step vs full fine-tune step (reference Llama workload)"


# ---- a compact NNX Llama (Hugging Face's names: self_attn/q_proj, mlp/gate_proj, lm_head)


def _linear(n_in, n_out, rngs):
    return nnx.Linear(n_in, n_out, use_bias=False, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, hidden, heads, rngs):
        self.heads, self.head_dim = heads, hidden // heads
        self.q_proj, self.k_proj = _linear(hidden, hidden, rngs), _linear(hidden, hidden, rngs)
        self.v_proj, self.o_proj = _linear(hidden, hidden, rngs), _linear(hidden, hidden, rngs)

    def __call__(self, x, positions):
        batch, seq, _ = x.shape
        inv_freq = inverse_frequencies(self.head_dim, 10000.0)
        split = lambda t: t.reshape(batch, seq, self.heads, self.head_dim)
        q = rotary(split(self.q_proj(x)), positions, inv_freq)
        k = rotary(split(self.k_proj(x)), positions, inv_freq)
        out = jax.nn.dot_product_attention(q, k, split(self.v_proj(x)), is_causal=True)
        return self.o_proj(out.reshape(batch, seq, -1))


class MLP(nnx.Module):
    def __init__(self, hidden, intermediate, rngs):
        self.gate_proj, self.up_proj = _linear(hidden, intermediate, rngs), _linear(hidden, intermediate, rngs)
        self.down_proj = _linear(intermediate, hidden, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, hidden, intermediate, heads, rngs):
        self.input_layernorm = nnx.RMSNorm(hidden, epsilon=1e-6, rngs=rngs)
        self.self_attn = Attention(hidden, heads, rngs)
        self.post_attention_layernorm = nnx.RMSNorm(hidden, epsilon=1e-6, rngs=rngs)
        self.mlp = MLP(hidden, intermediate, rngs)

    def __call__(self, x, positions):
        x = x + self.self_attn(self.input_layernorm(x), positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class NnxLlama(nnx.Module):
    def __init__(self, vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, *, rngs):
        self.embed_tokens = nnx.Embed(vocab_size, hidden_size, embedding_init=nnx.initializers.normal(0.02),
                                      rngs=rngs)
        self.layers = nnx.List([DecoderLayer(hidden_size, intermediate_size, num_attention_heads, rngs)
                                for _ in range(num_hidden_layers)])
        self.norm = nnx.RMSNorm(hidden_size, epsilon=1e-6, rngs=rngs)
        self.lm_head = _linear(hidden_size, vocab_size, rngs)

    def __call__(self, ids):
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, positions)
        return self.lm_head(self.norm(x))


# ---- the steps


def make_step(graphdef, tx):
    """``(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics)``, jitted, first two donated."""

    def step(trainable, opt_state, frozen, batch):
        def loss_fn(t):
            return causal_lm_loss(nnx.merge(graphdef, t, frozen)(batch), batch)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, {"loss": loss,
                                                                    "grad_norm": optax.global_norm(grads)}

    return jax.jit(step, donate_argnums=(0, 1))


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
    k_init, k_data, k_lora = jax.random.split(jax.random.key(seed), 3)
    model = NnxLlama(**MODEL, rngs=nnx.Rngs(k_init))
    batch = jax.random.randint(k_data, (BATCH, SEQ), 0, MODEL["vocab_size"], dtype=jnp.int32)
    cfg = lora_jax.LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS)
    return model, cfg, batch, k_lora


def _runners(model, cfg, batch, k_lora, tx):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # The full step donates its params, so it trains a private copy; the LoRA
    # steps share the (never donated) base params and each own their adapters.
    own = jax.tree.map(jnp.copy, params)
    runners = [_Runner("NNX full fine-tune", make_step(graphdef, tx), (own, tx.init(own)), (rest, batch))]
    adapted = {}
    for impl in ("fast", "plain"):
        lora_model = attach(model, cfg, rngs=k_lora, impl=impl)   # same key: identical adapters
        adapted[impl] = lora_model
        lora_def, lora, frozen = nnx.split(lora_model, LoraParam, ...)
        runners.append(_Runner(f"NNX LoRA {impl}", make_step(lora_def, tx), (lora, tx.init(lora)), (frozen, batch)))
    return runners, params, adapted


def run(mode: str = "quick", *, seed: int = 0) -> dict:
    settings = common.MODES[mode]
    tx = optax.adamw(LEARNING_RATE)
    model, cfg, batch, k_lora = _build(seed)
    runners, params, adapted = _runners(model, cfg, batch, k_lora, tx)
    full, fast, plain = runners
    lora_state = nnx.state(adapted["fast"], LoraParam)
    n_adapters = len({path[:-1] for path, _ in nnx.to_flat_state(lora_state)})
    trainable, base_count = lora_jax.count_params(lora_state), lora_jax.count_params(params)

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
    met = fast_ratio <= TARGET_FAST_RATIO

    time_rows = []
    for r in runners:
        p = per_step[r.label]
        target = f"<= {TARGET_FAST_RATIO:.2f} ({'met' if met else 'MISSED'})" if r is fast else ""
        time_rows.append([r.label, f"{r.lower_s + r.compile_s:.2f}", f"{p['median_s']:.4f}", f"{p['min_s']:.4f}",
                          f"{p['max_s']:.4f}", f"{p['tokens_per_s']:.0f}", f"{p['ratio_vs_full']:.3f}",
                          f"{p['ratio_vs_full_of_mins']:.3f}",
                          None if p["flops_ratio_vs_full"] is None else f"{p['flops_ratio_vs_full']:.3f}", target])
    fmt = lambda v: None if v is None else f"{v:.1f}"
    mem_rows = []
    for r in runners:
        m, p = r.memory, per_step[r.label]
        mem_rows.append([r.label, fmt(_mb(m["argument_size_in_bytes"])), fmt(_mb(m["output_size_in_bytes"])),
                         fmt(_mb(m["temp_size_in_bytes"])), fmt(_mb(m["alias_size_in_bytes"])),
                         fmt(_mb(m["total"])), fmt(_mb(m["total_minus_alias"])),
                         None if p["memory_ratio_vs_full"] is None else f"{p['memory_ratio_vs_full']:.3f}",
                         None if p["memory_ratio_vs_full_minus_alias"] is None
                         else f"{p['memory_ratio_vs_full_minus_alias']:.3f}",
                         None if r.flops is None else f"{r.flops / 1e9:.1f}"])

    losses = [v["loss"] for v in first.values()]
    loss_spread = max(losses) - min(losses)
    losses_agree = loss_spread <= 1e-5 * max(abs(x) for x in losses)
    gn_fast, gn_plain = first[fast.label]["grad_norm"], first[plain.label]["grad_norm"]
    notes = [
        f"Workload: a compact NNX Llama ({', '.join(f'{k}={v}' for k, v in MODEL.items())}; nnx.Embed, "
        f"nnx.RMSNorm, rotary attention and SwiGLU MLP from nnx.Linear without bias, layers in an nnx.List), "
        f"float32; batch {BATCH} x {SEQ} random ids; `lora_jax.nnx.attach` rank {RANK}, alpha {ALPHA}, targets "
        f"{TARGETS} ({n_adapters} adapters, {trainable:,} trainable of {base_count:,} base params); "
        f"optax.adamw({LEARNING_RATE:g}) on nnx.Param (full) or LoraParam (LoRA); trainable and optimizer "
        "state donated.",
        "Each step is `jax.jit` of a pure function of `nnx.split(model, <trainable filter>, ...)` pieces "
        "(the model is rebuilt in the trace with `nnx.merge`), compiled ahead of time as in train_step; "
        "no `nnx.jit` graph traversal is timed. Compile: lower "
        + ", ".join(f"{r.label} {r.lower_s:.2f}s" for r in runners)
        + "; compile " + ", ".join(f"{r.label} {r.compile_s:.2f}s" for r in runners) + ".",
        f"Ratios of the medians of this run: NNX LoRA-fast/full = {fast_ratio:.3f} "
        f"(target <= {TARGET_FAST_RATIO:.2f}: {'met' if met else 'MISSED'}), NNX LoRA-plain/full = "
        f"{plain_ratio:.3f}. The ratio of the minima is a check on noise; the XLA FLOP ratio is what "
        "the arithmetic alone would give.",
        "Memory is XLA's `compiled.memory_analysis()`; total = argument + output + temp; `total - alias` "
        "discounts donated buffers counted twice. The LoRA steps' arguments include the frozen base params.",
        "Correctness: first step from identical initial weights (LoRA B = 0, so the adapted model is the base): "
        "loss " + ", ".join(f"{k} {v['loss']:.6f}" for k, v in first.items())
        + f" (spread {loss_spread:.2e}: {'agree' if losses_agree else 'DISAGREE'}); LoRA grad norm fast "
        f"{gn_fast:.6g} vs plain {gn_plain:.6g} (rel. diff {abs(gn_fast - gn_plain) / max(abs(gn_plain), 1e-30):.2e}).",
    ]
    return {
        "title": TITLE,
        "mode": mode,
        "method": (f"{settings['warmup']} warm-up calls each, then {settings['repeats']} round-robin rounds "
                   f"(one call of each step per round, `jax.block_until_ready` on every output)."),
        "config": {"model": MODEL, "batch": BATCH, "seq": SEQ, "rank": RANK, "alpha": ALPHA,
                   "targets": list(TARGETS), "learning_rate": LEARNING_RATE, "seed": seed,
                   "trainable_params": trainable, "base_params": base_count, "adapters": n_adapters, **settings},
        "ratios": {"lora_fast_over_full": fast_ratio, "lora_plain_over_full": plain_ratio,
                   "target_lora_fast_over_full": TARGET_FAST_RATIO, "target_met": met,
                   "flops_lora_fast_over_full": per_step[fast.label]["flops_ratio_vs_full"],
                   "memory_lora_fast_over_full": per_step[fast.label]["memory_ratio_vs_full"],
                   "memory_lora_fast_over_full_minus_alias": per_step[fast.label]["memory_ratio_vs_full_minus_alias"]},
        "first_step_losses_agree": losses_agree,
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
