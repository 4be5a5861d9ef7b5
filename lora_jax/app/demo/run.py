"""``lora-jax demo``: full fine-tuning vs LoRA on a new dialect, every claim measured.

What it trains and measures is :data:`~lora_jax.app.demo.options.DEMO_DESCRIPTION`
(``lora-jax demo --help``); its flags are :func:`~lora_jax.app.demo.options.add_arguments`,
kept there without JAX so that printing help imports none.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as L
from lora_jax.app.demo import data, grid, pretrain
from lora_jax.app.demo.options import DEMO_DESCRIPTION, add_arguments
from lora_jax.app.demo.report import write_report
from lora_jax.io import save_peft
from lora_jax.io.progress import loss_progress
from lora_jax.models import causal_lm_loss, generate
from lora_jax.report import compiled_memory

PROMPTS = {"prose": "The function returns a new", "code": "def __init__(self, "}


@dataclasses.dataclass
class Run:
    """One training method's measurements."""

    name: str
    trainable: int
    curve: list = dataclasses.field(default_factory=list)     # (step, dialect loss, base-language loss)
    step_times: list = dataclasses.field(default_factory=list)
    compile_s: float = 0.0
    memory: dict = dataclasses.field(default_factory=dict)

    @property
    def step_s(self) -> float:
        return float(np.median(self.step_times)) if self.step_times else float("nan")


_T0 = [time.perf_counter()]


def _say(msg: str) -> None:
    print(f"{msg}  [{time.perf_counter() - _T0[0]:.0f} s]" if msg.startswith("[") else msg, flush=True)


def _stage(args, k: int, what: str) -> None:
    _say(f"[{k}/{7 if args.study else 6}] {what}")


def _loss_eval(logits_fn: Callable) -> Callable:
    """``evaluate(*state, windows) -> float``: mean next-byte loss (nats) over ``[n, batch, seq]`` windows."""
    loss = jax.jit(lambda state, batch: causal_lm_loss(logits_fn(state, batch), batch))
    return lambda state, windows: float(np.mean([float(loss(state, jnp.asarray(w))) for w in windows]))


def _train(run: Run, compiled, state: tuple, const: tuple, batches, evaluate, *, steps: int, eval_every: int,
           show: bool) -> tuple:
    """Runs ``state = compiled(*state, *const_before, batch)`` for ``steps`` steps, evaluating along the way."""
    with loss_progress(steps, f"{run.name:>15}", enabled=show) as bar:
        run.curve.append((0, *evaluate(state)))
        for i in range(1, steps + 1):
            batch = jnp.asarray(next(batches))
            start = time.perf_counter()
            first, opt_state, metrics = compiled(*state, *const, batch)
            loss = float(metrics["loss"])            # blocks: the step is done
            run.step_times.append(time.perf_counter() - start)
            state = (first, opt_state)
            if i % eval_every == 0 or i == steps:
                run.curve.append((i, *evaluate(state)))
            bar.advance(loss)
    run.step_times = run.step_times[2:] or run.step_times   # the first calls include one-off work
    return state


def _aot(jitted, *args):
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def _corpora(args):
    prose = data.prose_corpus()
    dialect = data.shakespeare_corpus() if args.dialect == "shakespeare" else data.code_corpus()
    return prose, dialect


def _adapted_forward(model, config):
    """The forward :func:`generate` calls, with the adapters (``params[1]``) applied unmerged."""
    adapted = L.lora_apply(model, config)
    return lambda params, ids, cache: adapted(params[0], params[1], ids, cache=cache)


def _samples(model, params, lora=None, config=None, *, seed: int, tokens: int) -> dict:
    forward = None   # one forward for every prompt: the decoding loop compiles once per prompt length
    if config is not None:
        params, forward = (params, lora), _adapted_forward(model, config)
    out = {}
    for name, prompt in PROMPTS.items():
        ids = jnp.asarray(data.encode(prompt))[None, :]
        result = generate(model, params, ids, max_new_tokens=tokens, apply=forward,
                          temperature=0.7, top_k=20, rng=jax.random.key(seed))
        out[name] = prompt + data.decode(np.asarray(result)[0, ids.shape[1]:])
    return out


def _loss(m, ids):
    return causal_lm_loss(m(ids), ids)


def _batches(args, dialect):
    return data.train_batches(dialect.train, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)


def _full_finetune(args, model, base, dialect, evaluate, show) -> tuple[Run, dict]:
    """Trains every parameter; returns the run's measurements and the fine-tuned params."""
    tx = optax.adamw(args.lr_full)
    step = L.make_full_train_step(lambda p, *a: model.apply({"params": p}, *a), _loss, tx)
    params = jax.tree.map(jnp.array, base)   # a copy: the step donates it
    run = Run("full fine-tune", L.count_params(params))
    compiled, run.compile_s = _aot(step, params, tx.init(params), jnp.asarray(next(_batches(args, dialect))))
    run.memory = compiled_memory(compiled)
    params, _ = _train(run, compiled, (params, tx.init(params)), (), _batches(args, dialect), evaluate,
                       steps=args.steps, eval_every=args.eval_every, show=show)
    return run, params


def _lora_finetune(args, model, base, dialect, windows, show):
    """Trains a LoRA adapter; returns the run's measurements, the adapter, its config and apply function."""
    batch0 = jnp.asarray(next(_batches(args, dialect)))
    cfg = L.LoraConfig(rank=args.rank, alpha=args.alpha, targets=("attention", "mlp"))
    lora = L.init_lora(model, base, cfg, batch0, rng=jax.random.key(args.seed))
    apply = L.lora_apply(model, cfg)
    lora_eval = _loss_eval(lambda adapter, ids: apply(base, adapter, ids))
    evaluate = lambda state: (lora_eval(state[0], windows["dialect"]), lora_eval(state[0], windows["base"]))
    tx = optax.adamw(args.lr_lora)
    step = L.make_train_step(apply, _loss, tx)
    run = Run("LoRA", L.count_params(lora))
    compiled, run.compile_s = _aot(step, lora, tx.init(lora), base, batch0)
    run.memory = compiled_memory(compiled)
    lora, _ = _train(run, compiled, (lora, tx.init(lora)), (base,), _batches(args, dialect), evaluate,
                     steps=args.steps, eval_every=args.eval_every, show=show)
    return run, lora, cfg, apply


def _checks(model, base, base_copy, lora, cfg, apply, probe) -> dict:
    """merged == unmerged, adapter off == base (bitwise), on again == on, base params untouched."""
    unmerged = apply(base, lora, probe)
    merged = model.apply({"params": L.merge(base, lora, cfg)}, probe)
    base_logits = model.apply({"params": base}, probe)
    untouched = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), base_copy, jax.tree.map(np.asarray, base))
    return {
        "merged_vs_unmerged_max_abs": float(jnp.max(jnp.abs(merged - unmerged))),
        "max_abs_logit": float(jnp.max(jnp.abs(unmerged))),
        "adapter_off_equals_base": bool(jnp.array_equal(apply(base, None, probe), base_logits)),
        "adapter_on_again_equal": bool(jnp.array_equal(apply(base, lora, probe), unmerged)),
        "adapter_changes_logits_by": float(jnp.max(jnp.abs(unmerged - base_logits))),
        "base_params_unchanged": all(jax.tree.leaves(untouched)),
    }


def _save(out: Path, base_dir, base, lora, cfg, params) -> dict:
    """Writes the adapter (PEFT) and the fully fine-tuned model (as the base is stored); returns file sizes."""
    adapter_dir, full_dir = out / "adapter", out / "full_finetuned"
    save_peft(adapter_dir, base, lora, cfg, task_type="CAUSAL_LM", base_model_name_or_path=str(base_dir))
    pretrain.save_base(full_dir, params)   # the same format as the shipped base (bfloat16)
    return {"adapter": os.path.getsize(adapter_dir / "adapter_model.safetensors"),
            "base": os.path.getsize(Path(base_dir) / "model.safetensors"),
            "full": os.path.getsize(full_dir / "model.safetensors")}


def _base_model(args, out: Path, prose, dialect, show):
    if not args.pretrain:
        _stage(args, 2, f"the shipped base model ({pretrain.BASE_DIR}; --pretrain rebuilds it)")
        return pretrain.BASE_DIR
    _stage(args, 2, f"pretraining the base model on prose ({args.pretrain_steps} steps)")
    base_dir = str(out / "base_model")
    pretrain.pretrain(base_dir, steps=args.pretrain_steps, seed=args.seed, prose=prose, code=dialect,
                      show_progress=show)
    return base_dir


def _study(args, model, base, dialect, windows, plain_eval, before, show):
    """The ``--study`` grid (:mod:`~lora_jax.app.demo.grid`), or None without ``--study``."""
    if not args.study:
        return None
    _stage(args, 6, "the study: learning rates, ranks, targets and seeds")
    evaluate = lambda params: (plain_eval(params, windows["dialect"]), plain_eval(params, windows["base"]))
    return grid.run_study(args, model, base, dialect, evaluate, before, show=show, say=_say)


def main(args: argparse.Namespace) -> int:
    """Runs the demo; returns the exit code (0)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    show = not args.no_progress
    started = _T0[0] = time.perf_counter()

    _stage(args, 1, "corpora from this Python's standard library")
    prose, dialect = _corpora(args)
    _say(f"      base language  {prose.summary()}\n      new dialect    {dialect.summary()}")
    windows = {name: data.eval_windows(corpus.heldout, seq_len=args.seq_len, batch_size=args.batch_size,
                                       n_batches=4) for name, corpus in (("dialect", dialect), ("base", prose))}
    base_dir = _base_model(args, out, prose, dialect, show)
    model, base = pretrain.load_base(base_dir)
    base_copy = jax.tree.map(np.array, base)
    plain_eval = _loss_eval(lambda p, ids: model.apply({"params": p}, ids))
    evaluate_full = lambda state: (plain_eval(state[0], windows["dialect"]), plain_eval(state[0], windows["base"]))
    before = evaluate_full((base,))

    _stage(args, 3, f"full fine-tuning, {args.steps} steps")
    full, params = _full_finetune(args, model, base, dialect, evaluate_full, show)
    _stage(args, 4, f"LoRA rank {args.rank} on attention and MLP, {args.steps} steps")
    run_lora, lora, cfg, apply = _lora_finetune(args, model, base, dialect, windows, show)

    _stage(args, 5, "checks and samples")
    checks = _checks(model, base, base_copy, lora, cfg, apply, jnp.asarray(windows["dialect"][0]))
    sizes = _save(out, base_dir, base, lora, cfg, params)
    sample = dict(seed=args.seed, tokens=args.sample_tokens)
    samples = {"base model": _samples(model, base, **sample), "LoRA": _samples(model, base, lora, cfg, **sample),
               "full fine-tune": _samples(model, params, **sample)}

    study = _study(args, model, base, dialect, windows, plain_eval, before, show)
    _stage(args, 7 if study else 6, "report")
    result = dict(args=vars(args), corpora={"base": prose.summary(), "dialect": dialect.summary()},
                  before={"dialect": before[0], "base": before[1]}, runs=[full, run_lora],
                  total_params=L.count_params(base), checks=checks, sizes=sizes, samples=samples,
                  wall_s=time.perf_counter() - started, backend=L.backend.describe())
    if study is not None:
        result["study"] = study
    _say(f"\nreport: {write_report(out, result)}")
    return 0


def run_from_argv(argv: list[str] | None = None) -> int:
    """``python -m lora_jax.app.demo.run [flags]``: the demo without the CLI wrapper."""
    parser = argparse.ArgumentParser(description=DEMO_DESCRIPTION.splitlines()[0])
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(run_from_argv())
