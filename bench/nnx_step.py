"""One training step through the NNX front end: full fine-tune vs LoRA (fast, plain) vs Flax's own ``nnx.LoRA``.

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

The peer row is Flax's built-in ``nnx.LoRA(base_module=linear)`` wrapped around
the same seven projections (same rank, B = 0 at the start, ``nnx.LoRAParam``
trained); it has no alpha/r scaling, which costs one multiply less.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lora_jax
from bench import common
from bench.train_step import (ALPHA, BATCH, LEARNING_RATE, MODEL, RANK, SEQ, TARGET_FAST_RATIO, TARGETS,
                              workload_config)
from lora_jax.models.llama import causal_lm_loss, inverse_frequencies, rotary
from lora_jax.nnx import LoraParam, attach

NAME = "nnx_step"
TITLE = "NNX: LoRA train step vs full fine-tune step and Flax's nnx.LoRA (reference Llama workload)"


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


PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def with_flax_lora(model: NnxLlama, rank: int, rngs: nnx.Rngs) -> NnxLlama:
    """A copy of ``model`` whose seven projections per layer are wrapped in Flax's ``nnx.LoRA``."""
    model = nnx.clone(model)
    for layer in model.layers:
        for block, names in PROJECTIONS.items():
            parent = getattr(layer, block)
            for name in names:
                linear = getattr(parent, name)
                n_in, n_out = linear.kernel.shape
                setattr(parent, name, nnx.LoRA(n_in, rank, n_out, base_module=linear, rngs=rngs))
    return model


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
    runners = [common.StepRunner("NNX full fine-tune", make_step(graphdef, tx), (own, tx.init(own)), (rest, batch))]
    adapted = {}
    for impl in ("fast", "plain"):
        lora_model = attach(model, cfg, rngs=k_lora, impl=impl)   # same key: identical adapters
        adapted[impl] = lora_model
        lora_def, lora, frozen = nnx.split(lora_model, LoraParam, ...)
        runners.append(common.StepRunner(f"NNX LoRA {impl}", make_step(lora_def, tx), (lora, tx.init(lora)),
                                         (frozen, batch)))
    peer = with_flax_lora(model, RANK, nnx.Rngs(k_lora))
    peer_def, peer_lora, peer_frozen = nnx.split(peer, nnx.LoRAParam, ...)
    runners.append(common.StepRunner("Flax nnx.LoRA (peer)", make_step(peer_def, tx),
                                     (peer_lora, tx.init(peer_lora)), (peer_frozen, batch)))
    return runners, params, adapted, peer_lora


def run(mode: str = "quick", *, seed: int = 0) -> dict:
    settings = common.MODES[mode]
    tx = optax.adamw(LEARNING_RATE)
    model, cfg, batch, k_lora = _build(seed)
    runners, params, adapted, peer_lora = _runners(model, cfg, batch, k_lora, tx)
    full, fast, plain, peer = runners
    lora_state = nnx.state(adapted["fast"], LoraParam)
    n_adapters = len({path[:-1] for path, _ in nnx.to_flat_state(lora_state)})
    trainable, base_count = lora_jax.count_params(lora_state), lora_jax.count_params(params)
    if lora_jax.count_params(peer_lora) != trainable:
        raise AssertionError(f"the nnx.LoRA peer trains {lora_jax.count_params(peer_lora):,} params, "
                             f"lora_jax {trainable:,}: not the same workload")

    first = common.run_rounds(runners, settings, NAME)
    report = common.step_report(runners, full, BATCH * SEQ, first, targets={fast.label: ("time", TARGET_FAST_RATIO)})
    per_step = report["steps"]
    ratio = {label: per_step[label]["ratio_vs_full"] for label in per_step}
    vs_peer = per_step[fast.label]["tokens_per_s"] / per_step[peer.label]["tokens_per_s"]
    notes = [
        f"Workload: a compact NNX Llama ({', '.join(f'{k}={v}' for k, v in MODEL.items())}; nnx.Embed, "
        f"nnx.RMSNorm, rotary attention and SwiGLU MLP from nnx.Linear without bias, layers in an nnx.List), "
        f"float32; batch {BATCH} x {SEQ} random ids; `lora_jax.nnx.attach` rank {RANK}, alpha {ALPHA}, targets "
        f"{TARGETS} ({n_adapters} adapters, {trainable:,} trainable of {base_count:,} base params); "
        f"optax.adamw({LEARNING_RATE:g}) on nnx.Param (full), LoraParam (lora_jax) or nnx.LoRAParam (the "
        "Flax peer); trainable and optimizer state donated.",
        "Each step is `jax.jit` of a pure function of `nnx.split(model, <trainable filter>, ...)` pieces "
        "(the model is rebuilt in the trace with `nnx.merge`), compiled ahead of time as in train_step; "
        "no `nnx.jit` graph traversal is timed. Compile: lower "
        + ", ".join(f"{r.label} {r.lower_s:.2f}s" for r in runners)
        + "; compile " + ", ".join(f"{r.label} {r.compile_s:.2f}s" for r in runners) + ".",
        f"Ratios of the medians of this run: NNX LoRA fast / full = {ratio[fast.label]:.3f} "
        f"(target <= {TARGET_FAST_RATIO:.2f}), NNX LoRA plain / full = {ratio[plain.label]:.3f}, "
        f"Flax nnx.LoRA / full = {ratio[peer.label]:.3f}; lora_jax NNX fast vs the Flax peer: "
        f"{vs_peer:.3f}x its tokens/s.",
        "Memory is XLA's `compiled.memory_analysis()`, argument + temp bytes; the LoRA steps' arguments "
        "include the frozen base params.",
        common.first_step_note(first, fast.label, plain.label),
    ]
    return {
        "title": TITLE,
        "mode": mode,
        "method": common.rounds_method(settings),
        "config": workload_config(seed, settings, trainable_params=trainable, base_params=base_count,
                                  adapters=n_adapters),
        "ratios": {"lora_fast_over_full": ratio[fast.label], "lora_plain_over_full": ratio[plain.label],
                   "flax_lora_over_full": ratio[peer.label], "lora_fast_tokens_over_flax_lora": vs_peer,
                   "memory_lora_fast_over_full": per_step[fast.label]["memory_ratio_vs_full"],
                   "flops_lora_fast_over_full": per_step[fast.label]["flops_ratio_vs_full"]},
        "verdicts": report["verdicts"],
        "steps": per_step,
        "tables": report["tables"],
        "notes": notes,
    }
