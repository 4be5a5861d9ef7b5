"""QLoRA: the frozen base stored int8 / NF4, against float32 and bfloat16 copies of the same base.

Three measurements on a Llama-style causal LM (``scan_layers=True``: under the
scan only one layer's weights are dequantized at a time):

* bytes of the base params (:func:`lora_jax.quant.nbytes`: codes, scales and
  double-quantization constants counted), whole tree and the quantized
  projections alone;
* the logit error of each stored base against the float32 model on one batch:
  max |difference|, that over max |logit|, the mean KL divergence of the
  next-token distributions and the top-1 agreement;
* the LoRA train step (rank 8 on every attention and MLP projection,
  ``optax.adamw``) on each base, compiled ahead of time and timed round-robin
  in one run (:func:`bench.common.run_rounds`), as ratios to the float32 base.

The base is a random initialisation (normal, std 0.02), which NF4's levels
suit; a trained model's weights have heavier tails, so its error may differ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import lora_jax
from bench import common
from bench.train_step import ALPHA, LEARNING_RATE, RANK, TARGETS
from lora_jax import quant
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss

NAME = "qlora"
TITLE = "QLoRA: int8 / NF4 base memory, logit error and LoRA step time vs a float32 base"

# ~30M parameters: the reference workload's widths with 8 decoder layers.
MODEL = dict(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
             num_attention_heads=8, scan_layers=True)
BATCH, SEQ = 4, 128
SMOKE_MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, scan_layers=True)
SMOKE_BATCH, SMOKE_SEQ = 2, 16
BLOCK_SIZE = 64

# label -> quantize_base options (None: a float copy of the base in that dtype)
FORMATS = {"float32": None, "bfloat16": None, "int8": dict(method="int8"),
           "NF4": dict(method="nf4", block_size=BLOCK_SIZE),
           "NF4 + double quant": dict(method="nf4", block_size=BLOCK_SIZE, double_quant=True)}
TIMED = ("float32", "int8", "NF4", "NF4 + double quant")
SMOKE_TIMED = ("float32", "NF4")   # each timed base is its own compile


def loss_fn(model, batch):
    return causal_lm_loss(model(batch), batch)


def _bases(model, params, batch) -> dict:
    bases = {}
    for label, options in FORMATS.items():
        if options is None:
            dtype = jnp.float32 if label == "float32" else jnp.bfloat16
            bases[label] = jax.tree.map(lambda x: x.astype(dtype), params)
        else:
            bases[label] = quant.quantize_base(model, params, batch, **options)
    return bases


def _quantized_part(qbase) -> list:
    return [leaf for leaf in jax.tree.leaves(qbase, is_leaf=quant.is_quantized) if quant.is_quantized(leaf)]


def _logit_errors(model, bases, batch) -> dict:
    forward = jax.jit(lambda p: lora_jax.lora_apply(model, lora_jax.LoraConfig(rank=1))(p, None, batch))
    ref = forward(bases["float32"]).astype(jnp.float32)
    ref_logp = jax.nn.log_softmax(ref, axis=-1)
    scale = float(jnp.max(jnp.abs(ref)))
    out = {}
    for label, base in bases.items():
        logits = forward(base).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        err = float(jnp.max(jnp.abs(logits - ref)))
        out[label] = {"max_abs": err, "max_abs_over_max_logit": err / scale,
                      "mean_kl": float(jnp.mean(jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1))),
                      "top1_agreement": float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(ref, -1)))}
    return out


def _trained_errors(batch_size: int, seq: int) -> tuple[dict, dict]:
    """Logit errors and held-out loss on the demo's shipped pretrained model (trained weights, real text)."""
    from lora_jax.app.demo import data, pretrain

    model, params = pretrain.load_base()
    corpus = data.prose_corpus()
    batch = jnp.asarray(data.eval_windows(corpus.heldout, seq_len=seq, batch_size=batch_size, n_batches=1)[0])
    bases = _bases(model, params, batch)
    errors = _logit_errors(model, bases, batch)
    forward = jax.jit(lambda p: lora_jax.lora_apply(model, lora_jax.LoraConfig(rank=1))(p, None, batch))
    for label, base in bases.items():
        errors[label]["heldout_loss"] = float(causal_lm_loss(forward(base).astype(jnp.float32), batch))
    info = {"model": {k: getattr(model.config, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                            "num_hidden_layers", "num_attention_heads")},
            "params": lora_jax.count_params(params), "batch": [batch_size, seq], "text": corpus.summary()}
    return errors, info


def _memory_table(bases) -> tuple[dict, list]:
    f32 = quant.nbytes(bases["float32"])
    f32_proj = quant.nbytes(_quantized_part(bases["NF4"]), as_dtype=jnp.float32)
    n_proj = f32_proj // 4
    sizes, rows = {}, []
    for label, base in bases.items():
        whole = quant.nbytes(base)
        if label in ("float32", "bfloat16"):
            proj = quant.nbytes(_quantized_part(bases["NF4"]), as_dtype=jnp.dtype(label))
        else:
            proj = quant.nbytes(_quantized_part(base))
        sizes[label] = {"base_bytes": whole, "projection_bytes": proj, "base_over_float32": whole / f32,
                        "projections_over_float32": proj / f32_proj, "bits_per_projection_weight": 8 * proj / n_proj}
        rows.append([label, f"{whole / 2**20:.2f}", f"{whole / f32:.3f}", f"{proj / 2**20:.2f}",
                     f"{proj / f32_proj:.3f}", f"{8 * proj / n_proj:.3f}"])
    return sizes, rows


def _runners(model, cfg, bases, lora, batch, tx, timed) -> list:
    step = lora_jax.make_train_step(lora_jax.lora_apply(model, cfg), loss_fn, tx)
    runners = []
    for label in timed:
        own = jax.tree.map(jnp.copy, lora)
        runners.append(common.StepRunner(f"LoRA, {label} base", step, (own, tx.init(own)), (bases[label], batch)))
    return runners


def run(mode: str = "quick", *, seed: int = 0) -> dict:
    settings = common.MODES[mode]
    shape, batch_size, seq = (SMOKE_MODEL, SMOKE_BATCH, SMOKE_SEQ) if mode == "smoke" else (MODEL, BATCH, SEQ)
    model = LlamaForCausalLM(LlamaConfig(**shape))
    k_init, k_data, k_lora = jax.random.split(jax.random.key(seed), 3)
    batch = jax.random.randint(k_data, (batch_size, seq), 0, shape["vocab_size"], dtype=jnp.int32)
    params = jax.jit(model.init)(k_init, batch)["params"]
    common.log(f"[{NAME}] quantizing the base ({lora_jax.count_params(params):,} params) ...")
    bases = _bases(model, params, batch)
    sizes, mem_rows = _memory_table(bases)
    errors = _logit_errors(model, bases, batch)
    common.log(f"[{NAME}] logit error of the shipped pretrained demo model ...")
    trained, trained_info = _trained_errors(2 if mode == "smoke" else 8, 64 if mode == "smoke" else 256)

    cfg = lora_jax.LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS)
    lora = lora_jax.init_lora(model, bases["NF4"], cfg, batch, rng=k_lora)
    tx = optax.adamw(LEARNING_RATE)
    timed = SMOKE_TIMED if mode == "smoke" else TIMED
    runners = _runners(model, cfg, bases, lora, batch, tx, timed)
    first = common.run_rounds(runners, settings, NAME)
    base_runner = runners[0]
    base_time = common.stats(base_runner.times)["median_s"]
    base_mem = base_runner.memory["argument_size_in_bytes"] + base_runner.memory["temp_size_in_bytes"]
    steps, time_rows = {}, []
    for r, label in zip(runners, timed):
        s = common.stats(r.times)
        mem = r.memory["argument_size_in_bytes"] + r.memory["temp_size_in_bytes"]
        steps[label] = {**s, "ratio_vs_float32": s["median_s"] / base_time,
                        "ratio_vs_float32_of_mins": s["min_s"] / common.stats(base_runner.times)["min_s"],
                        "compile_s": r.lower_s + r.compile_s, "memory": r.memory,
                        "memory_args_temp": mem, "memory_ratio_vs_float32": mem / base_mem,
                        "times_s": r.times, **first[r.label]}
        time_rows.append([r.label, f"{r.lower_s + r.compile_s:.2f}", f"{s['median_s']:.4f}", f"{s['min_s']:.4f}",
                          f"{s['median_s'] / base_time:.3f}", f"{steps[label]['ratio_vs_float32_of_mins']:.3f}",
                          f"{mem / 2**20:.1f}", f"{mem / base_mem:.3f}", f"{first[r.label]['loss']:.5f}"])

    nf4 = "NF4"
    temp = lambda label: steps[label]["memory"]["temp_size_in_bytes"]
    temp_gap, float_proj = temp(nf4) - temp("float32"), sizes["float32"]["projection_bytes"]
    headline = [[f"QLoRA {nf4} base / float32 base", f"{sizes[nf4]['base_over_float32']:.3f}",
                 f"{sizes[nf4]['projections_over_float32']:.3f}", f"{steps[nf4]['ratio_vs_float32']:.3f}",
                 f"{errors[nf4]['max_abs_over_max_logit']:.2e}"]]
    err_rows = [[label, f"{e['max_abs']:.3e}", f"{e['max_abs_over_max_logit']:.3e}", f"{e['mean_kl']:.3e}",
                 f"{e['top1_agreement']:.4f}"] for label, e in errors.items()]
    trained_rows = [[label, f"{e['heldout_loss']:.4f}", f"{e['heldout_loss'] - trained['float32']['heldout_loss']:+.4f}",
                     f"{e['max_abs']:.3e}", f"{e['max_abs_over_max_logit']:.3e}", f"{e['mean_kl']:.3e}",
                     f"{e['top1_agreement']:.4f}"] for label, e in trained.items()]
    dq_saved = sizes["NF4"]["base_bytes"] - sizes["NF4 + double quant"]["base_bytes"]
    notes = [
        f"Workload: LlamaForCausalLM({', '.join(f'{k}={v}' for k, v in shape.items())}), float32 compute; "
        f"{lora_jax.count_params(params):,} base params, random init; batch {batch_size} x {seq} random ids; "
        f"LoRA rank {RANK}, alpha {ALPHA}, targets {TARGETS}; optax.adamw({LEARNING_RATE:g}); NF4 blocks of "
        f"{BLOCK_SIZE}, double quantization in groups of {quant.ABSMAX_GROUP} block absmaxes.",
        "Quantized: the seven attention and MLP projections of every decoder layer; the embedding, the "
        "output head and the norms stay float32 (as QLoRA). 'base' counts the whole params tree; "
        "'projections' only the quantized weights.",
        f"Double quantization saves {dq_saved:,} bytes ({dq_saved / 2**20:.2f} MiB; "
        f"{sizes['NF4']['bits_per_projection_weight'] - sizes['NF4 + double quant']['bits_per_projection_weight']:.3f}"
        " bits per projection weight).",
        "Logit error: the float32 model's logits on the batch against each stored base's (the bfloat16 row "
        "casts the weights only; compute stays float32). KL is KL(float32 || quantized) per position, averaged.",
        "Step memory is XLA's argument + temp bytes of the compiled step (the base is an argument).",
        f"Temporary memory of the NF4 step minus the float32 step's: {temp_gap / 2**20:+.1f} MiB (the "
        f"projections take {float_proj / 2**20:.1f} MiB in float32). lora_apply runs each quantized layer under "
        "jax.checkpoint, so the backward pass dequantizes again instead of keeping every layer's float weight "
        "as a residual of the scan.",
        f"Trained model: the demo's shipped pretrained base ({trained_info['params']:,} params, "
        f"{trained_info['model']}), float32 compute, on {trained_info['batch'][0]} x {trained_info['batch'][1]} "
        f"byte windows of held-out text ({trained_info['text']}). Held-out loss float32 "
        f"{trained['float32']['heldout_loss']:.4f} nats/byte; NF4 {trained['NF4']['heldout_loss']:.4f}, int8 "
        f"{trained['int8']['heldout_loss']:.4f}. Its weights are stored in bfloat16, so the bfloat16 copy is "
        "exact there.",
    ]
    return {
        "title": TITLE, "mode": mode, "method": common.rounds_method(settings),
        "config": {"model": shape, "batch": batch_size, "seq": seq, "rank": RANK, "alpha": ALPHA,
                   "targets": list(TARGETS), "block_size": BLOCK_SIZE, "seed": seed, **settings},
        "ratios": {"nf4_base_bytes_over_float32": sizes[nf4]["base_over_float32"],
                   "nf4_projection_bytes_over_float32": sizes[nf4]["projections_over_float32"],
                   "nf4_step_time_over_float32": steps[nf4]["ratio_vs_float32"],
                   "nf4_step_memory_over_float32": steps[nf4]["memory_ratio_vs_float32"],
                   "nf4_trained_heldout_loss_increase": trained[nf4]["heldout_loss"] - trained["float32"]["heldout_loss"]},
        "sizes": sizes, "logit_errors": errors, "trained_model": {**trained_info, "errors": trained},
        "steps": steps,
        "tables": [
            {"title": "QLoRA NF4 base vs float32 base",
             "columns": ["", "base bytes ratio", "projection bytes ratio", "LoRA step time ratio (median)",
                         "max logit error / max logit"], "rows": headline},
            {"title": "Base memory",
             "columns": ["base", "MiB", "ratio vs float32", "projections MiB", "projections ratio",
                         "bits / projection weight"], "rows": mem_rows},
            {"title": "Trained model (the shipped demo base): held-out loss and logit error vs float32",
             "columns": ["base", "held-out loss", "vs float32", "max abs", "max abs / max logit", "mean KL",
                         "top-1 agreement"], "rows": trained_rows},
            {"title": "Logit error vs the float32 model (random-init workload model)",
             "columns": ["base", "max abs", "max abs / max logit", "mean KL", "top-1 agreement"], "rows": err_rows},
            {"title": "LoRA train step",
             "columns": ["step", "compile s", "median s", "min s", "ratio vs float32 base (median)",
                         "ratio (min)", "argument + temp MiB", "memory ratio", "first loss"], "rows": time_rows},
        ],
        "notes": notes,
    }
