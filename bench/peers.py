"""lora_jax against Hugging Face PEFT on PyTorch (CPU): the same Llama, the same weights and batch, back to back.

The reference workload of ``bench.train_step`` (float32 Llama, vocab 4096,
hidden 512, MLP 1376, 4 layers, 8 heads, batch 8 x 128, LoRA rank 8, alpha
16 on q/k/v/o/gate/up/down, AdamW at 1e-4). lora_jax writes its initial
weights as a Hugging Face checkpoint; a PyTorch worker (``bench/peft_worker.py``,
run by a separate Python that has ``torch``, ``transformers`` and ``peft``)
loads it with ``LlamaForCausalLM.from_pretrained`` and wraps a copy with
``peft.get_peft_model``. Four steps are then timed round-robin in this one
invocation, one call each per round: lora_jax full, lora_jax LoRA,
PyTorch full, PEFT LoRA. Both frameworks use this machine's cores (JAX's
thread pool and ``torch.get_num_threads()``), never at the same time.

PyTorch is never a dependency of lora_jax or of its tests. The worker's
Python comes from ``LORA_JAX_BENCH_TORCH_PYTHON``, else ``bench/.peers-venv``
(made by ``bash bench/setup_peers.sh``: ``torch==2.13.0``, ``transformers``,
``peft``); without either, this benchmark records that it was skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from bench import common
from bench.train_step import (ALPHA, BATCH, LEARNING_RATE, MODEL, RANK, SEQ, _build, lora_step, make_full_step,
                              workload_config)
from lora_jax.models import hf

NAME = "peers"
TITLE = "lora_jax vs Hugging Face PEFT (PyTorch, same CPU), reference Llama workload"
TARGET_VS_PEFT = 1.10       # lora_jax LoRA tokens/s over PEFT LoRA tokens/s, at least
ENV_VAR = "LORA_JAX_BENCH_TORCH_PYTHON"
DEFAULT_VENV = Path(__file__).resolve().parent / ".peers-venv" / "bin" / "python"
WORKER = Path(__file__).resolve().parent / "peft_worker.py"
WEIGHT_DECAY = 1e-4         # optax.adamw's default, passed to torch.optim.AdamW (whose default is 1e-2)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def torch_python() -> str | None:
    """The Python that runs the PyTorch worker, or None when there is none."""
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        if not Path(explicit).exists():
            raise FileNotFoundError(f"{ENV_VAR}={explicit!r} does not exist")
        return explicit
    return str(DEFAULT_VENV) if DEFAULT_VENV.exists() else None


class Worker:
    """The PyTorch process: one JSON request and one JSON answer per line."""

    def __init__(self, python: str):
        self.proc = subprocess.Popen([python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)

    def ask(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the PyTorch worker exited (code {self.proc.wait()}); see its stderr above")
        answer = json.loads(line)
        if not answer.pop("ok"):
            raise RuntimeError(f"PyTorch worker: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            self.ask(cmd="quit")
        self.proc.wait(timeout=30)


class TorchRunner:
    """A PyTorch step with the :class:`bench.common.StepRunner` interface; times are measured in the worker."""

    def __init__(self, label: str, worker: Worker, which: str):
        self.label, self.worker, self.which = label, worker, which
        self.times: list[float] = []

    def compile(self, name: str) -> None:  # eager PyTorch: nothing to compile
        self.lower_s = self.compile_s = 0.0

    def step(self):
        answer = self.worker.ask(cmd="step", which=self.which, n=1)
        return {"loss": answer["losses"][0], "grad_norm": float("nan")}, answer["times_s"][0]


def _skipped(reason: str) -> dict:
    common.log(f"[{NAME}] skipped: {reason}")
    return {"title": TITLE, "skipped": reason, "tables": [], "notes": [f"Skipped: {reason}"]}


def run(mode: str = "quick", *, seed: int = 0) -> dict:
    python = torch_python()
    if python is None:
        return _skipped(f"no PyTorch environment; run `bash bench/setup_peers.sh` or set {ENV_VAR}")
    settings = common.MODES[mode]
    tx = optax.adamw(LEARNING_RATE)
    model, cfg, params, lora, batch = _build(seed)
    full_params = jax.tree.map(jnp.copy, params)
    ours = [common.StepRunner("lora_jax full fine-tune", make_full_step(model, tx),
                              (full_params, tx.init(full_params)), (batch,)),
            common.StepRunner("lora_jax LoRA", lora_step(cfg, tx), (lora, tx.init(lora)), (params, batch))]

    worker = Worker(python)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp, model.config, params)
            common.log(f"[{NAME}] starting the PyTorch worker ({python}) ...")
            info = worker.ask(cmd="setup", model_dir=tmp, input_ids=np.asarray(batch).tolist(), rank=RANK,
                              alpha=ALPHA, targets=list(PROJECTIONS), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                              seed=seed)
        theirs = [TorchRunner("PyTorch full fine-tune", worker, "full"), TorchRunner("PEFT LoRA", worker, "lora")]
        runners = [ours[0], theirs[0], ours[1], theirs[1]]
        first = common.run_rounds(runners, settings, NAME)
    finally:
        worker.close()
    return _report(mode, settings, runners, first, info, lora, params, seed)


def _report(mode, settings, runners, first, info, lora, params, seed) -> dict:
    our_full, torch_full, our_lora, peft_lora = runners
    tokens = BATCH * SEQ
    stats = {r.label: common.stats(r.times) for r in runners}
    tps = {label: tokens / s["median_s"] for label, s in stats.items()}
    vs_peft = tps[our_lora.label] / tps[peft_lora.label]
    vs_torch_full = tps[our_full.label] / tps[torch_full.label]
    met = vs_peft >= TARGET_VS_PEFT
    trainable = lora_jax.count_params(lora)
    if info["lora_trainable_params"] != trainable or info["base_params"] != lora_jax.count_params(params):
        raise AssertionError(f"PEFT trains {info['lora_trainable_params']:,} of {info['base_params']:,} params, "
                             f"lora_jax {trainable:,} of {lora_jax.count_params(params):,}: not the same workload")
    loss0 = {label: first[label]["loss"] for label in first}
    spread = max(loss0.values()) - min(loss0.values())
    rows = []
    for r, full in ((our_full, our_full), (torch_full, torch_full), (our_lora, our_full), (peft_lora, torch_full)):
        s = stats[r.label]
        same_framework = s["median_s"] / stats[full.label]["median_s"]
        row_target = f">= {TARGET_VS_PEFT:.2f}x PEFT ({'met' if met else 'MISSED'})" if r is our_lora else ""
        rows.append([r.label, f"{r.lower_s + r.compile_s:.2f}", f"{s['median_s']:.4f}", f"{s['min_s']:.4f}",
                     f"{s['max_s']:.4f}", f"{tps[r.label]:.0f}", f"{same_framework:.3f}",
                     f"{loss0[r.label]:.6f}", row_target])
    notes = [
        f"Workload: LlamaForCausalLM({', '.join(f'{k}={v}' for k, v in MODEL.items())}), float32, batch "
        f"{BATCH} x {SEQ} (the same ids in both frameworks); LoRA rank {RANK}, alpha {ALPHA} on "
        f"{', '.join(PROJECTIONS)} ({trainable:,} trainable params in both); AdamW lr {LEARNING_RATE:g}, "
        f"weight decay {WEIGHT_DECAY:g}. lora_jax: `make_train_step` with the fast path, jitted, compiled "
        f"ahead of time. PyTorch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}, "
        f"{info['torch_threads']} threads, attention `{info['attn_implementation']}`, eager mode: "
        "`model(input_ids=x, labels=x).loss.backward(); opt.step(); opt.zero_grad()`.",
        f"lora_jax LoRA / PEFT LoRA = {vs_peft:.3f}x the tokens/s (target >= {TARGET_VS_PEFT:.2f}: "
        f"{'met' if met else 'MISSED'}); lora_jax full / PyTorch full = {vs_torch_full:.3f}x.",
        f"Same workload check: first-step losses from the same weights and batch, {spread:.2e} apart ("
        + ", ".join(f"{k} {v:.6f}" for k, v in loss0.items()) + ").",
    ]
    return {
        "title": TITLE, "mode": mode,
        "method": (f"{settings['warmup']} warm-up calls each, then {settings['repeats']} round-robin rounds "
                   "of the four steps; lora_jax steps timed with `jax.block_until_ready`, PyTorch steps timed "
                   "inside the worker around the whole step (forward, backward, optimizer)."),
        "config": workload_config(seed, settings, trainable_params=trainable, weight_decay=WEIGHT_DECAY),
        "peer_versions": info,
        "ratios": {"lora_jax_lora_over_peft_lora_tokens": vs_peft, "target": TARGET_VS_PEFT, "target_met": met,
                   "lora_jax_full_over_torch_full_tokens": vs_torch_full,
                   "first_step_loss_spread": spread},
        "steps": {r.label: {**stats[r.label], "tokens_per_s": tps[r.label], "times_s": r.times,
                            "first_loss": loss0[r.label]} for r in runners},
        "tables": [{"title": "Time per training step",
                    "columns": ["step", "compile s", "median s", "min s", "max s", "tokens/s",
                                "ratio vs same framework's full step", "first-step loss", "target"],
                    "rows": rows}],
        "notes": notes,
    }
