"""The suite at accelerator size: a ~1.1B-parameter Llama in bfloat16 on one GPU, against PyTorch/PEFT.

``bash bench/gpu.sh`` on a machine with one NVIDIA GPU (it runs this module,
then the numeric tests on the GPU), or ``python -m bench.gpu``. In one run:

* JAX train steps, compiled ahead of time and timed round-robin: the full
  fine-tune step and the LoRA step with this release's default settings
  (cuDNN attention where it applies, the chunked loss), and the variants that
  show what each setting is worth: the 0.1 settings (XLA attention, the plain
  loss), cuDNN attention alone, fused q/k/v and gate/up projections, float32
  adapters (mixed precision), and rematerialisation with two policies;
* forwards: base, unmerged LoRA, merged LoRA;
* a long-context LoRA step (batch 1 x 8192);
* memory: XLA's memory analysis of each step, and the device's peak bytes
  in use, measured per step in a child process (JAX has no way to reset the
  peak), sharing this run's compilation cache;
* the profile of the default LoRA step (top XLA ops by device time);
* PyTorch/PEFT rows on the same device (``bench/torch_gpu.py``: the
  machine's torch, transformers and peft, in a subprocess), before any JAX
  memory is taken;
* batched generation with the KV cache (``bench/generation.py``): 8
  left-padded prompts of mixed lengths, 128 new tokens, greedy, bfloat16, on
  the model's shape with its first 8 layers (to bound the compile time),
  lora_jax's ``generate`` against transformers' on the same device
  (``--skip-generation`` leaves it out; ``--tiny``: the toy model, 8 tokens).

MFU is model FLOPs per step over the measured time, divided by the card's
dense bfloat16 peak (looked up from ``device_kind``; ``--peak-tflops``
overrides it). Model FLOPs per token: a forward costs
``2 * N_matmul + 4 * layers * seq * attn_width`` (every weight once, the two
attention products over the full, unmasked sequence); the full step is 3
forwards, the LoRA step 2 forwards (no base weight gradient) plus the
adapters' own products. Recomputation (remat, the chunked loss) is not
counted: it is the implementation's cost, not the model's.

``--tiny`` runs a toy size in seconds on any backend: the check that this
script works, measuring nothing worth keeping (results go to a temporary
directory unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import lora_jax
from bench import common, generation
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM, attention_implementation, causal_lm_loss

NAME = "gpu"
TITLE = "Accelerator size: ~1.1B Llama, bfloat16, one device, against PyTorch/PEFT"
# TinyLlama-1.1B's shape (grouped-query attention, 4 KV heads): 1.10B params.
MODEL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4)
BATCH, SEQ, LONG_SEQ = 8, 1024, 8192
TINY_MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
TINY_BATCH, TINY_SEQ, TINY_LONG_SEQ = 2, 32, 128
GENERATION_LAYERS, GENERATION_NEW_TOKENS, TINY_GENERATION_NEW_TOKENS = 8, 128, 8
RANK, ALPHA, TARGETS = 8, 16, ("attention", "mlp")
PEFT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LEARNING_RATE = 1e-4
# Dense bfloat16 peak TFLOP/s by device_kind substring (vendor data sheets, without sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.4, "GH200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0,
                    "L40S": 362.05, "A10G": 70.0, "L4": 121.0}
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Variant:
    """One timed training step: what it trains and with which settings."""

    label: str
    full: bool = False                 # full fine-tune instead of LoRA
    attention: str = "auto"            # LlamaConfig.attention_implementation
    chunked_loss: bool = True          # model(ids, labels=ids) instead of causal_lm_loss(model(ids), ids)
    remat: str | None = None           # LlamaConfig.remat_policy, None for no remat
    adapter_dtype: str = "bfloat16"    # init_lora's dtype (float32: mixed precision)
    fused: bool = False                # LlamaConfig.fused_projections
    long: bool = False                 # batch 1 x LONG_SEQ instead of BATCH x SEQ


DEFAULT = "LoRA (defaults)"
FULL = "full fine-tune (defaults)"
REMAT = "LoRA + remat (save nothing)"
MIXED = "LoRA, float32 adapters (mixed precision)"
LONG = "LoRA, 1 x long sequence"
VARIANTS = (
    Variant(FULL, full=True),
    Variant(DEFAULT),
    Variant("LoRA, 0.1 settings (XLA attention, plain loss)", attention="xla", chunked_loss=False),
    Variant("LoRA, default attention, plain loss", chunked_loss=False),
    Variant("LoRA, fused q/k/v and gate/up", fused=True),
    Variant(MIXED, adapter_dtype="float32"),
    Variant(REMAT, remat="nothing_saveable"),
    Variant("LoRA + remat (save matmuls)", remat="dots_with_no_batch_dims_saveable"),
)
LONG_VARIANT = Variant(LONG, long=True)
MEMORY_PROBES = (FULL, DEFAULT, REMAT, LONG)


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


def agreement_tolerance(dtype) -> float:
    """Relative tolerance of the first-step agreement checks: one unit roundoff of the compute dtype.

    Every variant starts from the same weights with ``B = 0``, so each first
    loss is the base model's loss computed in a different order (other
    attention kernels, chunked or plain loss, remat). Each is a mean of
    float32 log-softmax values over bfloat16 logits, so the variants may
    differ by rounding of the logits, far below one bfloat16 ulp of the loss.
    """
    return float(jnp.finfo(dtype).eps)


def _config(model_kw: dict, v: Variant) -> LlamaConfig:
    dtype = jnp.bfloat16
    return LlamaConfig(**model_kw, dtype=dtype, param_dtype=dtype, scan_layers=True, max_position_embeddings=LONG_SEQ,
                       attention_implementation=v.attention, remat=v.remat is not None, fused_projections=v.fused,
                       remat_policy=v.remat or "nothing_saveable")


def _loss_fn(v: Variant):
    if v.chunked_loss:
        return lambda model, batch: model(batch, labels=batch)
    return lambda model, batch: causal_lm_loss(model(batch), batch)


class Setup:
    """The base params, the adapters and the batches, shared by every variant."""

    def __init__(self, model_kw: dict, batch: int, seq: int, long_seq: int, seed: int):
        self.model_kw, self.batch, self.seq, self.long_seq = model_kw, batch, seq, long_seq
        k_init, k_data, k_long, k_lora = jax.random.split(jax.random.key(seed), 4)
        vocab = model_kw["vocab_size"]
        self.ids = jax.random.randint(k_data, (batch, seq), 0, vocab, dtype=jnp.int32)
        self.long_ids = jax.random.randint(k_long, (1, long_seq), 0, vocab, dtype=jnp.int32)
        self.config = _config(model_kw, VARIANTS[1])
        model = LlamaForCausalLM(self.config)
        self.params = jax.jit(model.init)(k_init, self.ids[:, :8])["params"]
        self.lora_config = lora_jax.LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS)
        self.lora = {name: lora_jax.init_lora(model, self.params, self.lora_config, self.ids[:, :8], rng=k_lora,
                                              dtype=getattr(jnp, name))
                     for name in ("bfloat16", "float32")}

    def runner(self, v: Variant, tx) -> common.StepRunner:
        model = LlamaForCausalLM(_config(self.model_kw, v))
        ids = self.long_ids if v.long else self.ids
        copy = lambda tree: jax.tree.map(jnp.copy, tree)
        options = lora_jax.backend.memory_lean_options() if v.remat else None
        if v.full:
            step = lora_jax.make_full_train_step(lambda p, *a, **k: model.apply({"params": p}, *a, **k),
                                                 _loss_fn(v), tx, compiler_options=options)
            own = copy(self.params)
            return common.StepRunner(v.label, step, (own, tx.init(own)), (ids,))
        step = lora_jax.make_train_step(lora_jax.lora_apply(model, self.lora_config), _loss_fn(v), tx,
                                        compiler_options=options)
        mine = copy(self.lora[v.adapter_dtype])
        return common.StepRunner(v.label, step, (mine, tx.init(mine)), (self.params, ids))

    def tokens(self, v: Variant) -> int:
        return self.long_seq if v.long else self.batch * self.seq


def _compile_all(runners, name: str) -> None:
    """Compiles the runners on a few threads (XLA compiles outside the GIL); the first error is raised."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, len(runners))) as pool:
        for future in [pool.submit(r.compile, name) for r in runners]:
            future.result()


def _forwards(setup: Setup):
    model = LlamaForCausalLM(setup.config)
    lora = setup.lora["bfloat16"]
    # Non-zero B, so that the unmerged forward does real work and the merged weights differ from the base.
    lora = jax.tree.map(lambda x: x + jnp.asarray(1e-3, x.dtype), lora)
    base = jax.jit(lambda p, x: model.apply({"params": p}, x))
    unmerged = jax.jit(lora_jax.lora_apply(model, setup.lora_config))
    merged = lora_jax.merge(setup.params, lora, setup.lora_config)
    return {"base": (base, (setup.params, setup.ids)), "unmerged LoRA": (unmerged, (setup.params, lora, setup.ids)),
            "merged LoRA": (base, (merged, setup.ids))}


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


class _Stepping:
    """A runner's step as a zero-argument callable, with its compiled HLO text, for the profiler."""

    def __init__(self, runner: common.StepRunner):
        self.runner = runner

    def __call__(self):
        return self.runner.step()[0]

    def as_text(self):
        return self.runner.compiled.as_text()


def _profile(runner: common.StepRunner, steps: int) -> dict:
    try:
        from bench import op_profile as profile
        return profile.top_ops(_Stepping(runner), steps=steps, limit=25)
    except Exception as exc:  # noqa: BLE001 - a profiler failure must not lose the timings
        return {"error": f"{type(exc).__name__}: {exc}"}


# ---- memory: one child process per step (the device's peak cannot be reset within a process)

def memory_probe(label: str, tiny: bool, seed: int) -> dict:
    """In a fresh process: the device's bytes in use before the step and its peak over two steps."""
    model_kw, batch, seq, long_seq = _sizes(tiny)
    setup = Setup(model_kw, batch, seq, long_seq, seed)
    v = {v.label: v for v in (*VARIANTS, LONG_VARIANT)}[label]
    runner = setup.runner(v, optax.adamw(LEARNING_RATE))
    runner.compile(NAME)
    device = jax.devices()[0]
    before = (device.memory_stats() or {}).get("bytes_in_use")
    for _ in range(2):
        runner.step()
    stats = device.memory_stats() or {}
    return {"bytes_in_use_before": before, "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
            "xla_args_temp_bytes": common.args_temp(runner.memory)} if stats else {"note": "no memory_stats"}


def _probe_all(labels, tiny: bool, seed: int, timeout_s: float) -> dict:
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    procs = {label: subprocess.Popen([sys.executable, "-m", "bench.gpu", "--memory-probe", label]
                                     + (["--tiny"] if tiny else []) + ["--seed", str(seed)],
                                     cwd=common.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
             for label in labels}
    results, deadline = {}, time.monotonic() + timeout_s
    for label, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            results[label] = {"error": f"timed out after {timeout_s:.0f}s"}
            continue
        lines = [line for line in out.splitlines() if line.startswith("{")]
        results[label] = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
            "error": f"exit {proc.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}"}
    return results


# ---- the run

def _sizes(tiny: bool):
    return (TINY_MODEL, TINY_BATCH, TINY_SEQ, TINY_LONG_SEQ) if tiny else (MODEL, BATCH, SEQ, LONG_SEQ)


def _torch_rows(model_kw, batch, seq, long_seq, settings, python: str | None, timeout_s: float) -> dict:
    try:
        from bench import torch_gpu
        return torch_gpu.measure(
            config=model_kw, batch=batch, seq=seq, long_seq=long_seq, rank=RANK, alpha=ALPHA,
            targets=list(PEFT_TARGETS), lr=LEARNING_RATE, warmup=settings["warmup"], repeats=settings["repeats"],
            python=python or sys.executable, timeout_s=timeout_s)
    except Exception as exc:  # noqa: BLE001 - the JAX rows still count without PyTorch's
        return {"error": f"{type(exc).__name__}: {exc}"}


def _generation(tiny: bool, settings: dict, python: str | None, skip_torch: bool, seed: int,
                timeout_s: float) -> dict:
    """Batched generation, lora_jax against transformers (``bench.generation.measure``), bfloat16."""
    model_kw = TINY_MODEL if tiny else dict(MODEL, num_hidden_layers=GENERATION_LAYERS)
    try:
        return generation.measure(model_kw, new_tokens=TINY_GENERATION_NEW_TOKENS if tiny else GENERATION_NEW_TOKENS,
                                  dtype="bfloat16", warmup=1, repeats=min(settings["repeats"], 3), seed=seed,
                                  torch_python=None if skip_torch else python or sys.executable, timeout_s=timeout_s)
    except Exception as exc:  # noqa: BLE001 - the train steps' results still count without this part
        return {"error": f"{type(exc).__name__}: {exc}"}


def _first_check(first: dict, tol: float) -> dict:
    """The first steps' losses against the full step's, and the LoRA steps' grad norms' spread.

    The long-sequence step sees another batch, so it takes part in neither.
    """
    ref = first[FULL]
    rows = {}
    for label, f in first.items():
        if label == LONG:
            continue
        rel_loss = abs(f["loss"] - ref["loss"]) / abs(ref["loss"])
        rows[label] = {"loss": f["loss"], "grad_norm": f["grad_norm"], "rel_loss_vs_full": rel_loss,
                       "agree": rel_loss <= tol}
    lora = [f["grad_norm"] for label, f in first.items() if label not in (FULL, LONG)]
    spread = (max(lora) - min(lora)) / max(lora) if lora else 0.0
    return {"tolerance": tol, "rows": rows, "lora_grad_norm_rel_spread": spread,
            "grad_norms_agree": spread <= 4 * tol, "all_agree": all(r["agree"] for r in rows.values())}


def run(*, tiny: bool = False, repeats: int = 10, warmup: int = 2, peak: float | None = None, seed: int = 0,
        torch_python: str | None = None, skip_torch: bool = False, probe_timeout_s: float = 240.0,
        torch_timeout_s: float = 240.0, profile_steps: int = 3, skip_generation: bool = False) -> dict:
    model_kw, batch, seq, long_seq = _sizes(tiny)
    settings = {"repeats": repeats, "warmup": warmup}
    device = jax.devices()[0]
    peak = peak or peak_tflops(device.device_kind)
    torch = {"skipped": "--skip-torch"} if skip_torch else _torch_rows(
        model_kw, batch, seq, long_seq, settings, torch_python, torch_timeout_s)

    tx = optax.adamw(LEARNING_RATE)
    setup = Setup(model_kw, batch, seq, long_seq, seed)
    tokens = batch * seq
    n_lora, n_base = lora_jax.count_params(setup.lora["bfloat16"]), lora_jax.count_params(setup.params)
    flops = model_flops_per_token(setup.config, seq, n_lora)
    long_flops = model_flops_per_token(setup.config, long_seq, n_lora)
    attention = attention_implementation(setup.config, jnp.bfloat16)

    runners = [setup.runner(v, tx) for v in VARIANTS]
    long_runner = setup.runner(LONG_VARIANT, tx)
    _compile_all(runners + [long_runner], NAME)
    first = common.time_rounds(runners, settings, NAME)
    first.update(common.time_rounds([long_runner], settings, NAME))
    by_label = {r.label: r for r in runners + [long_runner]}
    profile = _profile(by_label[DEFAULT], profile_steps)
    steps = {}
    for v in (*VARIANTS, LONG_VARIANT):
        r = by_label[v.label]
        s = common.stats(r.times)
        n_tokens = setup.tokens(v)
        model_flops = (long_flops if v.long else flops)["full_step" if v.full else "lora_step"]
        tflops = model_flops * n_tokens / s["median_s"] / 1e12
        steps[v.label] = {**s, **dataclasses.asdict(v), "tokens": n_tokens, "tokens_per_s": n_tokens / s["median_s"],
                          "model_tflops_per_s": tflops, "mfu": None if peak is None else tflops / peak,
                          "xla_flops": r.flops, "memory": r.memory, "xla_args_temp_bytes": common.args_temp(r.memory),
                          "compile_s": r.lower_s + r.compile_s, "times_s": r.times}
    del runners, long_runner, by_label
    forwards = _time_forwards(_forwards(setup), settings)
    del setup
    memory = _probe_all(MEMORY_PROBES, tiny, seed, probe_timeout_s)
    for label, m in memory.items():
        steps[label]["device_peak_bytes"] = m.get("peak_bytes_in_use")
        steps[label]["device_bytes_before_step"] = m.get("bytes_in_use_before")
    check = _first_check(first, agreement_tolerance(jnp.bfloat16))
    gen = {"skipped": "--skip-generation"} if skip_generation else _generation(
        tiny, settings, torch_python, skip_torch, seed, torch_timeout_s)
    result = {
        "title": TITLE, "mode": "tiny" if tiny else "gpu",
        "method": (f"{warmup} warm-up calls each, then {repeats} round-robin rounds of the train steps "
                   "(the long-sequence step timed on its own), then of the forwards; `jax.block_until_ready` on "
                   "every output; compiled ahead of time. Device peak memory: one child process per step."),
        "config": {"model": model_kw, "batch": batch, "seq": seq, "long_seq": long_seq, "rank": RANK,
                   "alpha": ALPHA, "targets": list(TARGETS), "dtype": "bfloat16", "base_params": n_base,
                   "lora_params": n_lora, "peak_bf16_tflops": peak, "model_flops_per_token": flops,
                   "attention_implementation": attention, "device_kind": device.device_kind},
        "steps": steps, "forwards": forwards, "first_step_check": check, "profile": profile, "torch": torch,
        "generation": gen,
    }
    result["goals"] = goals(result)
    result["tables"], result["notes"] = _tables(result), _notes(result)
    if "lora_jax" in gen:
        result["tables"].append(generation.table(gen, " (bfloat16, KV cache, 8 mixed-length prompts)"))
        result["notes"] += generation.notes(gen)
    else:
        result["notes"].append(f"Generation not measured: {gen.get('error') or gen.get('skipped')}")
    return result


# ---- the goals, each computed from this run

def _get(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def _row(goal: str, value, target: str, met) -> dict:
    return {"goal": goal, "value": value, "target": target, "met": met}


def goals(result: dict) -> list[dict]:
    steps, fwd, torch = result["steps"], result["forwards"], result["torch"]
    ours_lora, ours_full = steps[DEFAULT]["tokens_per_s"], steps[FULL]["tokens_per_s"]
    t_lora, t_full = _get(torch, "steps", "lora", "tokens_per_s"), _get(torch, "steps", "full", "tokens_per_s")
    ratio = lambda a, b: None if a is None or b is None else a / b
    base_tps = result["config"]["batch"] * result["config"]["seq"] / fwd["base"]["median_s"]
    t_base = _get(torch, "forwards", "base", "tokens_per_s")
    lora_full = steps[DEFAULT]["median_s"] / steps[FULL]["median_s"]
    unmerged = fwd["unmerged LoRA"]["median_s"] / fwd["base"]["median_s"]
    merged = fwd["merged LoRA"]["median_s"] / fwd["base"]["median_s"]
    peak_lora, peak_remat = steps[DEFAULT].get("device_peak_bytes"), steps[REMAT].get("device_peak_bytes")
    t_peak = _get(torch, "steps", "lora", "peak_bytes")
    le = lambda value, limit: None if value is None or limit is None else value <= limit
    ours_mixed = steps[MIXED]["tokens_per_s"]
    return [
        # PEFT keeps a bfloat16 model's adapters in float32 (and so their optimizer state): like for like.
        _row("1a. LoRA step tokens/s over PEFT's, float32 adapters as PEFT", ratio(ours_mixed, t_lora), ">= 2.0",
             le(2.0, ratio(ours_mixed, t_lora))),
        _row("1b. LoRA step tokens/s over PEFT's, our default (bfloat16 adapters)", ratio(ours_lora, t_lora), ">= 2.0",
             le(2.0, ratio(ours_lora, t_lora))),
        _row("2. full step tokens/s over PyTorch's", ratio(ours_full, t_full), ">= 1.0",
             le(1.0, ratio(ours_full, t_full))),
        _row("3. LoRA step time / our full step time", lora_full, "<= 0.70", le(lora_full, 0.70)),
        _row("4a. forward tokens/s, base, over PyTorch's", ratio(base_tps, t_base), ">= 1.0",
             le(1.0, ratio(base_tps, t_base))),
        _row("4b. forward unmerged / base", unmerged, "<= 1.03", le(unmerged, 1.03)),
        _row("4c. forward merged / base", merged, "<= 1.01", le(merged, 1.01)),
        _row("5a. LoRA step device peak (GiB) vs PEFT's", None if peak_lora is None else peak_lora / GIB,
             "<= PEFT's" + ("" if t_peak is None else f" ({t_peak / GIB:.1f})"), le(peak_lora, t_peak)),
        _row("5b. LoRA + remat device peak (GiB)", None if peak_remat is None else peak_remat / GIB, "<= 8",
             le(peak_remat, 8 * GIB)),
        _row("6. long context LoRA step tokens/s (1 x long)", steps[LONG]["tokens_per_s"],
             "runs; PEFT: " + str(_get(torch, "long", "tokens_per_s") or _get(torch, "long", "error")), True),
    ]


def _fmt(value, spec=".3g"):
    return "n/a" if value is None else format(value, spec)


def _tables(result: dict) -> list[dict]:
    steps, fwd, torch, cfg = result["steps"], result["forwards"], result["torch"], result["config"]
    full_s = steps[FULL]["median_s"]
    step_rows = [[label, _fmt(s["compile_s"], ".1f"), _fmt(s["median_s"], ".4f"), _fmt(s["min_s"], ".4f"),
                  _fmt(s["tokens_per_s"], ".0f"), _fmt(s["median_s"] / full_s, ".3f") if not s["long"] else "-",
                  _fmt(None if s["mfu"] is None else 100 * s["mfu"], ".1f"),
                  _fmt(None if s["xla_args_temp_bytes"] is None else s["xla_args_temp_bytes"] / GIB, ".2f"),
                  _fmt(None if s.get("device_peak_bytes") is None else s["device_peak_bytes"] / GIB, ".2f")]
                 for label, s in steps.items()]
    for which in ("full", "lora"):
        t = _get(torch, "steps", which)
        if t:
            step_rows.append([f"PyTorch/PEFT {which}", "-", _fmt(t.get("median_s"), ".4f"), _fmt(t.get("min_s"), ".4f"),
                              _fmt(t.get("tokens_per_s"), ".0f"), "-", "-", "-",
                              _fmt(None if t.get("peak_bytes") is None else t["peak_bytes"] / GIB, ".2f")])
    t_long = torch.get("long") if isinstance(torch, dict) else None
    if t_long:
        step_rows.append(["PyTorch/PEFT LoRA, 1 x long sequence", "-", _fmt(t_long.get("median_s"), ".4f"),
                          _fmt(t_long.get("min_s"), ".4f"), _fmt(t_long.get("tokens_per_s"), ".0f"), "-", "-", "-",
                          _fmt(None if t_long.get("peak_bytes") is None else t_long["peak_bytes"] / GIB, ".2f")
                          if not t_long.get("error") else t_long["error"][:60]])
    base_s = fwd["base"]["median_s"]
    tokens = cfg["batch"] * cfg["seq"]
    fwd_rows = [[label, _fmt(s["compile_s"], ".1f"), _fmt(s["median_s"], ".4f"), _fmt(tokens / s["median_s"], ".0f"),
                 _fmt(s["median_s"] / base_s, ".3f")] for label, s in fwd.items()]
    for label, t in (_get(torch, "forwards") or {}).items():
        fwd_rows.append([f"PyTorch {label}", "-", _fmt(t.get("median_s"), ".4f"), _fmt(t.get("tokens_per_s"), ".0f"),
                         "-"])
    goal_rows = [[g["goal"], _fmt(g["value"], ".3f") if isinstance(g["value"], float) else g["value"], g["target"],
                  "n/a" if g["met"] is None else ("met" if g["met"] else "MISSED")] for g in result["goals"]]
    tables = [
        {"title": "Goals (issue 18)", "columns": ["goal", "measured", "target", "verdict"], "rows": goal_rows},
        {"title": "Train steps", "columns": ["step", "compile s", "median s", "min s", "tokens/s", "time / full",
                                            "MFU %", "XLA args+temp GiB", "device peak GiB"], "rows": step_rows},
        {"title": "Forward", "columns": ["forward", "compile s", "median s", "tokens/s", "ratio vs base"],
         "rows": fwd_rows},
    ]
    ops = _get(result, "profile", "ops")
    if ops:
        from bench import op_profile as profile
        tables.append({"title": f"Profile of '{DEFAULT}': top ops by device time "
                                f"({result['profile']['total_ms_per_step']:.1f} ms of kernels per step)",
                       "columns": ["op", "category", "ms/step", "share", "source"],
                       "rows": profile.rows(result["profile"], limit=15)})
    return tables


def _notes(result: dict) -> list[str]:
    cfg, check, torch = result["config"], result["first_step_check"], result["torch"]
    flops, peak = cfg["model_flops_per_token"], cfg["peak_bf16_tflops"]
    notes = [
        f"Model: LlamaForCausalLM({', '.join(f'{k}={v}' for k, v in cfg['model'].items())}), bfloat16 params and "
        f"compute, layers in one nn.scan; {cfg['base_params'] / 1e9:.3f}B params; batch {cfg['batch']} x "
        f"{cfg['seq']}; LoRA rank {RANK}, alpha {ALPHA} on q,k,v,o,gate,up,down ({cfg['lora_params']:,} "
        f"trainable); optax.adamw({LEARNING_RATE:g}). Attention with the default settings: "
        f"{cfg['attention_implementation']}.",
        f"Device: {cfg['device_kind']}; peak bf16 {'unknown' if peak is None else f'{peak:g} TFLOP/s'}. "
        f"Model FLOPs per token: forward {flops['forward'] / 1e9:.2f} GFLOP, full step "
        f"{flops['full_step'] / 1e9:.2f}, LoRA step {flops['lora_step'] / 1e9:.2f}.",
        "First step from identical weights (B = 0): losses relative to the full step's within "
        f"{check['tolerance']:.2g} (one bfloat16 unit roundoff): "
        f"{'all agree' if check['all_agree'] else 'DISAGREE'} (largest "
        f"{max(r['rel_loss_vs_full'] for r in check['rows'].values()):.2e}); LoRA grad norms' spread "
        f"{check['lora_grad_norm_rel_spread']:.2e} (within 4 ulp: "
        f"{'yes' if check['grad_norms_agree'] else 'NO'}).",
    ]
    if isinstance(torch, dict) and torch.get("versions"):
        notes.append("PyTorch side: " + ", ".join(f"{k} {v}" for k, v in torch["versions"].items())
                     + "; LlamaForCausalLM, sdpa attention, eager, `model(input_ids=x, labels=x).loss.backward(); "
                       "opt.step()` with torch.optim.AdamW; PEFT get_peft_model with the same LoRA config.")
    elif isinstance(torch, dict) and (torch.get("error") or torch.get("skipped")):
        notes.append(f"PyTorch rows not measured: {torch.get('error') or torch.get('skipped')}")
    if _get(result, "profile", "error"):
        notes.append(f"Profile failed: {result['profile']['error']}")
    return notes


def record_tests(log_path: Path, results: Path) -> Path:
    """Adds the GPU test run's summary (the files run and pytest's last line) to ``gpu.json``."""
    path = results / f"{NAME}.json"
    data = json.loads(path.read_text())
    text = log_path.read_text(errors="replace")
    summary = [line for line in text.splitlines() if " passed" in line or " failed" in line or " error" in line]
    failed = [line for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))]
    files = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("test files:")), [])
    data["gpu_tests"] = {"summary": summary[-1] if summary else "no pytest summary line (timed out?)",
                         "failed": failed, "files": files}
    data.setdefault("notes", []).append(f"Numeric tests on this device ({', '.join(files) or 'none'}): "
                                        f"{data['gpu_tests']['summary']}" + (f"; failed: {len(failed)}" if failed else ""))
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    common.write_readme(results)
    return path


def _share_compilation_cache() -> None:
    """One persistent compilation cache for this run and its memory probes (which compile the same steps)."""
    path = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="lora_jax_gpu_cache_"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a toy size that runs anywhere in seconds")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("--torch-python", default=None, help="the Python with torch, transformers and peft "
                        "(default: this one)")
    parser.add_argument("--skip-torch", action="store_true", help="leave out the PyTorch/PEFT rows")
    parser.add_argument("--skip-generation", action="store_true", help="leave out batched generation")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default: bench/results)")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--record-tests", type=Path, default=None,
                        help="add a pytest log's summary to the results' gpu.json and stop")
    args = parser.parse_args(argv)
    if args.memory_probe:
        _share_compilation_cache()
        print(json.dumps(memory_probe(args.memory_probe, args.tiny, args.seed)))
        return 0
    out = args.out or (Path(tempfile.mkdtemp(prefix="lora_jax_gpu_tiny_")) if args.tiny else common.RESULTS)
    if args.record_tests:
        print(f"updated {record_tests(args.record_tests, out)}")
        return 0
    _share_compilation_cache()
    hdr = common.header()
    common.log(f"[{NAME}] {hdr['backend']} ({hdr['device_kind']}), jax {hdr['jax']}")
    if hdr["backend"] != "gpu" and not args.tiny:
        common.log(f"[{NAME}] no GPU here (backend {hdr['backend']}); use --tiny to check the script")
        return 2
    start = time.perf_counter()
    result = run(tiny=args.tiny, repeats=args.repeats, warmup=args.warmup, peak=args.peak_tflops, seed=args.seed,
                 torch_python=args.torch_python, skip_torch=args.skip_torch, skip_generation=args.skip_generation)
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
