"""The suite at accelerator size: a ~1.1B-parameter Llama in bfloat16 on one GPU, with tokens/s and MFU.

``bash bench/gpu.sh`` (or ``python -m bench.gpu``) on a machine with one
NVIDIA GPU and ``jax[cuda12]``. It times, round-robin in one run:

* train steps: full fine-tune, LoRA (fast path), LoRA + remat;
* forwards: base, unmerged LoRA, merged LoRA;

and reports tokens/s, the ratios of the issue (LoRA / full time and memory,
unmerged / base and merged / base forward), compile times, and MFU: model
FLOPs per step over the measured time, divided by the card's dense bfloat16
peak (looked up from ``device_kind``; ``--peak-tflops`` overrides it).

Model FLOPs per token follow the usual accounting: a forward costs
``2 * N_matmul + 4 * layers * seq * attn_width`` (every weight once, the
two attention products over the full, unmasked sequence); the full step is
3 forwards (activation and weight gradients), the LoRA step 2 forwards
(activation gradients only; no base weight gradient) plus the adapters'
own products. XLA's ``cost_analysis`` count is written beside it.

``--tiny`` runs a toy size in seconds on any backend: the check that this
script works, measuring nothing worth keeping (results go to a temporary
directory unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import lora_jax
from bench import common
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss

NAME = "gpu"
TITLE = "Accelerator size: ~1.1B Llama, bfloat16, one device"
# TinyLlama-1.1B's shape (grouped-query attention, 4 KV heads): 1.10B params.
MODEL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4)
BATCH, SEQ = 8, 1024
TINY_MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
TINY_BATCH, TINY_SEQ = 2, 32
RANK, ALPHA, TARGETS = 8, 16, ("attention", "mlp")
LEARNING_RATE = 1e-4
# Dense bfloat16 peak TFLOP/s by device_kind substring (vendor data sheets, without sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.4, "GH200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0,
                    "L40S": 362.05, "A10G": 70.0, "L4": 121.0}


def peak_tflops(device_kind: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():   # order matters: "H100 PCIe" before "H100"
        if key in device_kind:
            return value
    return None


def model_flops_per_token(config: LlamaConfig, seq: int, lora_params: int) -> dict:
    """Forward, full-step and LoRA-step model FLOPs per token (see the module docstring)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    attn = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    per_layer = h * attn + 2 * h * kv + attn * h + 3 * h * config.intermediate_size
    matmul_params = layers * per_layer + h * config.vocab_size            # lm_head; the embedding is a lookup
    forward = 2 * matmul_params + 4 * layers * seq * attn
    lora_forward = 2 * lora_params                                        # x@A and (xA)@B
    return {"forward": forward, "full_step": 3 * forward, "lora_step": 2 * forward + 3 * lora_forward,
            "matmul_params": matmul_params}


def _loss(model, batch):
    return causal_lm_loss(model(batch), batch)


def _build(model_kw: dict, batch: int, seq: int, seed: int):
    dtype = jnp.bfloat16
    config = LlamaConfig(**model_kw, dtype=dtype, param_dtype=dtype, scan_layers=True)
    k_init, k_data, k_lora = jax.random.split(jax.random.key(seed), 3)
    ids = jax.random.randint(k_data, (batch, seq), 0, model_kw["vocab_size"], dtype=jnp.int32)
    model = LlamaForCausalLM(config)
    params = jax.jit(model.init)(k_init, ids)["params"]
    cfg = lora_jax.LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS)
    lora = lora_jax.init_lora(model, params, cfg, ids, rng=k_lora, dtype=dtype)
    return config, model, cfg, params, lora, ids


def _step_runners(config, model, cfg, params, lora, ids, tx):
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    full = lora_jax.make_full_train_step(lambda p, *a: model.apply({"params": p}, *a), _loss, tx)
    remat_model = LlamaForCausalLM(dataclasses.replace(config, remat=True))
    own = copy(params)
    runners = [common.StepRunner("full fine-tune", full, (own, tx.init(own)), (ids,))]
    for label, module, options in (("LoRA fast", model, None),
                                   ("LoRA fast + remat", remat_model, lora_jax.backend.memory_lean_options())):
        step = lora_jax.make_train_step(lora_jax.lora_apply(module, cfg), _loss, tx, compiler_options=options)
        mine = copy(lora)
        runners.append(common.StepRunner(label, step, (mine, tx.init(mine)), (params, ids)))
    return runners


def _forwards(model, cfg, params, lora, ids):
    base = jax.jit(lambda p, x: model.apply({"params": p}, x))
    unmerged = jax.jit(lora_jax.lora_apply(model, cfg))
    merged = lora_jax.merge(params, lora, cfg)
    return {"base": (base, (params, ids)), "unmerged LoRA": (unmerged, (params, lora, ids)),
            "merged LoRA": (base, (merged, ids))}


def _time_forwards(forwards, settings) -> dict:
    compiled, compile_s = {}, {}
    for label, (fn, args) in forwards.items():
        compiled[label], lower_s, comp_s = common.compile_aot(fn, *args)
        compile_s[label] = lower_s + comp_s
        for _ in range(settings["warmup"]):
            common.timed(compiled[label], *args)
    times = {label: [] for label in forwards}
    labels = list(forwards)
    for i in common.progress(range(settings["repeats"]), total=settings["repeats"], desc=f"[{NAME}] forwards"):
        for j in range(len(labels)):
            label = labels[(i + j) % len(labels)]
            times[label].append(common.timed(compiled[label], *forwards[label][1])[1])
    return {label: {**common.stats(times[label]), "compile_s": compile_s[label], "times_s": times[label]}
            for label in labels}


def run(*, tiny: bool = False, repeats: int = 10, warmup: int = 2, peak: float | None = None, seed: int = 0) -> dict:
    model_kw, batch, seq = (TINY_MODEL, TINY_BATCH, TINY_SEQ) if tiny else (MODEL, BATCH, SEQ)
    settings = {"repeats": repeats, "warmup": warmup}
    device = jax.devices()[0]
    peak = peak or peak_tflops(device.device_kind)
    tx = optax.adamw(LEARNING_RATE)
    config, model, cfg, params, lora, ids = _build(model_kw, batch, seq, seed)
    tokens = batch * seq
    n_lora, n_base = lora_jax.count_params(lora), lora_jax.count_params(params)
    flops = model_flops_per_token(config, seq, n_lora // config.num_hidden_layers * config.num_hidden_layers)

    runners = _step_runners(config, model, cfg, params, lora, ids, tx)
    full, fast, remat = runners
    first = common.run_rounds(runners, settings, NAME)
    report = common.step_report(runners, full, tokens, first,
                                targets={fast.label: ("time", 0.70), remat.label: ("memory", 0.60)})
    per_step = report["steps"]
    mfu_rows = []
    for r, kind in ((full, "full_step"), (fast, "lora_step"), (remat, "lora_step")):
        p = per_step[r.label]
        model_tflops = flops[kind] * tokens / p["median_s"] / 1e12
        xla_tflops = None if r.flops is None else r.flops / p["median_s"] / 1e12
        p.update(model_tflops_per_s=model_tflops, xla_tflops_per_s=xla_tflops,
                 mfu=None if peak is None else model_tflops / peak)
        mfu_rows.append([r.label, f"{p['tokens_per_s']:.0f}", f"{model_tflops:.1f}",
                         None if xla_tflops is None else f"{xla_tflops:.1f}",
                         "n/a" if peak is None else f"{100 * model_tflops / peak:.1f}%"])

    del runners  # free the step states before the forwards
    fwd = _time_forwards(_forwards(model, cfg, params, lora, ids), settings)
    base_s = fwd["base"]["median_s"]
    fwd_rows = [[label, f"{s['compile_s']:.2f}", f"{s['median_s']:.4f}", f"{s['min_s']:.4f}", f"{s['max_s']:.4f}",
                 f"{tokens / s['median_s']:.0f}", f"{s['median_s'] / base_s:.3f}",
                 f"{100 * flops['forward'] * tokens / s['median_s'] / 1e12 / peak:.1f}%" if peak else "n/a"]
                for label, s in fwd.items()]
    unmerged_ratio = fwd["unmerged LoRA"]["median_s"] / base_s
    merged_ratio = fwd["merged LoRA"]["median_s"] / base_s
    notes = [
        f"Model: LlamaForCausalLM({', '.join(f'{k}={v}' for k, v in model_kw.items())}), bfloat16 params and "
        f"compute, layers in one nn.scan; {n_base / 1e9:.3f}B params; batch {batch} x {seq}; LoRA rank {RANK}, "
        f"alpha {ALPHA} on {TARGETS} ({n_lora:,} trainable); optax.adamw({LEARNING_RATE:g}).",
        f"Device: {device.device_kind}; peak bf16 {'unknown' if peak is None else f'{peak:g} TFLOP/s'}. "
        f"Model FLOPs per token: forward {flops['forward'] / 1e9:.2f} GFLOP, full step "
        f"{flops['full_step'] / 1e9:.2f}, LoRA step {flops['lora_step'] / 1e9:.2f}.",
        f"Forward: unmerged / base = {unmerged_ratio:.3f} (target <= 1.03), merged / base = {merged_ratio:.3f} "
        "(target 1.00).",
        common.first_step_note(first, fast.label, remat.label),
    ]
    return {
        "title": TITLE, "mode": "tiny" if tiny else "gpu",
        "method": (f"{warmup} warm-up calls each, then {repeats} round-robin rounds, `jax.block_until_ready` on "
                   "every output; compiled ahead of time."),
        "config": {"model": model_kw, "batch": batch, "seq": seq, "rank": RANK, "alpha": ALPHA,
                   "targets": list(TARGETS), "dtype": "bfloat16", "base_params": n_base, "lora_params": n_lora,
                   "peak_bf16_tflops": peak, "model_flops_per_token": flops},
        "ratios": {"lora_fast_over_full": per_step[fast.label]["ratio_vs_full"],
                   "memory_lora_fast_remat_over_full": per_step[remat.label]["memory_ratio_vs_full"],
                   "unmerged_over_base_forward": unmerged_ratio, "merged_over_base_forward": merged_ratio},
        "verdicts": report["verdicts"], "steps": per_step, "forwards": fwd,
        "tables": report["tables"] + [
            {"title": "Throughput and MFU (train steps)",
             "columns": ["step", "tokens/s", "model TFLOP/s", "XLA-counted TFLOP/s", "MFU"], "rows": mfu_rows},
            {"title": "Forward",
             "columns": ["forward", "compile s", "median s", "min s", "max s", "tokens/s", "ratio vs base", "MFU"],
             "rows": fwd_rows}],
        "notes": notes,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a toy size that runs anywhere in seconds")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default: bench/results)")
    args = parser.parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix="lora_jax_gpu_tiny_")) if args.tiny else common.RESULTS)
    hdr = common.header()
    common.log(f"[{NAME}] {hdr['backend']} ({hdr['device_kind']}), jax {hdr['jax']}")
    if hdr["backend"] != "gpu" and not args.tiny:
        common.log(f"[{NAME}] no GPU here (backend {hdr['backend']}); use --tiny to check the script")
        return 2
    start = time.perf_counter()
    result = run(tiny=args.tiny, repeats=args.repeats, warmup=args.warmup, peak=args.peak_tflops)
    name = NAME if not args.tiny else f"{NAME}_tiny"
    path = common.save(name, {**result, "wall_s": time.perf_counter() - start}, hdr, out)
    for table in result["tables"]:
        print(f"\n{table['title']}\n" + common.markdown_table(table["columns"], table["rows"]))
    for note in result["notes"]:
        print(f"- {note}")
    print(f"\nwrote {path} in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
