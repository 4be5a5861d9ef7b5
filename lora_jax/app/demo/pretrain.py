"""Pretrains the demo's base model: a small byte-level Llama that learns English prose.

The model reads UTF-8 bytes (vocabulary 256) and is trained from scratch on
the prose corpus (the standard library's docstrings, :mod:`lora_jax.app.demo.data`)
with AdamW, linear warmup then cosine decay, and gradient clipping. The result
is a Hugging Face folder (``config.json`` + ``model.safetensors``, weights in
bfloat16) plus ``pretrain_log.json``; the shipped one is in ``BASE_DIR``.

Regenerate the shipped checkpoint (900 steps, about 12 minutes on a 2-core CPU):

    python -m lora_jax.app.demo.pretrain --out lora_jax/app/demo/base_model

Load it in float32 with :func:`load_base`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax.app.demo import data, options
from lora_jax.models.hf import from_pretrained, save_pretrained
from lora_jax.io.progress import loss_progress
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss
from lora_jax.train import make_full_train_step

BASE_CONFIG = LlamaConfig(vocab_size=data.VOCAB_SIZE, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                          num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=512,
                          tie_word_embeddings=False)
BASE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "base_model")
TOKENIZER_KEY = "lora_jax_tokenizer"
LOG_NAME = "pretrain_log.json"
DEFAULT_STEPS = options.PRETRAIN_STEPS
EVAL_BATCHES = 8          # periodic evaluation: 8 fixed batches per split
FINAL_EVAL_BATCHES = 32   # the numbers written to the log


def make_optimizer(lr: float, steps: int, *, warmup: int | None = None, weight_decay: float = 0.1,
                   clip: float = 1.0) -> optax.GradientTransformation:
    """AdamW with gradient clipping, linear warmup and cosine decay to a tenth of ``lr``.

    Weight decay applies to matrices only (kernels, embeddings), not to norm weights.

    Args:
      lr: the peak learning rate.
      steps: the total number of steps (the length of the schedule).
      warmup: warmup steps (default: 5% of ``steps``, at most 200).
      weight_decay: AdamW's decoupled weight decay.
      clip: the global gradient-norm bound.

    Returns:
      the optax transformation.

    >>> tx = make_optimizer(1e-3, 100, warmup=10)
    >>> params = {"w": jnp.ones((2, 2)), "norm": jnp.ones(2)}
    >>> update = jax.jit(tx.update)
    >>> state = tx.init(params)
    >>> first, state = update(params, state, params)      # warmup starts at a learning rate of 0
    >>> second, state = update(params, state, params)
    >>> float(first["w"][0, 0]) == 0, float(second["w"][0, 0]) < 0
    (True, True)
    """
    warmup = min(200, max(1, steps // 20)) if warmup is None else warmup
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * 0.1)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay, mask=decay_mask))


def make_eval(model: LlamaForCausalLM) -> Callable:
    """``evaluate(params, windows) -> float``: the mean next-byte loss (nats) over ``[n, batch, seq]`` windows.

    >>> cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
    ...                   num_attention_heads=2)
    >>> model = LlamaForCausalLM(cfg)
    >>> params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    >>> bool(abs(make_eval(model)(params, np.zeros((2, 3, 4), np.int32)) - np.log(16)) < 0.1)
    True
    """
    loss = jax.jit(lambda params, batch: causal_lm_loss(model.apply({"params": params}, batch), batch))

    def evaluate(params, windows) -> float:
        return float(np.mean([float(loss(params, jnp.asarray(batch))) for batch in windows]))

    return evaluate


def save_base(out_dir: str | os.PathLike, params, config: LlamaConfig = BASE_CONFIG) -> list[str]:
    """Writes ``params`` as a Hugging Face folder with bfloat16 weights, marked as a byte-level model.

    ``config.json`` gets ``"lora_jax_tokenizer": "bytes"`` (transformers ignores
    unknown keys): token ids are UTF-8 bytes, see :func:`lora_jax.app.demo.data.encode`.

    Returns:
      the file names written.
    """
    bf16 = dataclasses.replace(config, param_dtype=jnp.bfloat16)
    files = save_pretrained(out_dir, bf16, jax.tree.map(lambda p: jnp.asarray(p, jnp.bfloat16), params),
                            extra_config={TOKENIZER_KEY: "bytes"})
    return files


def load_base(path: str | os.PathLike = BASE_DIR) -> tuple[LlamaForCausalLM, dict]:
    """The pretrained byte-level base model ``(module, params)``, in float32.

    Args:
      path: a folder written by :func:`pretrain` (default: the shipped one).

    Returns:
      the module and its params.

    >>> module, params = load_base()
    >>> module.config.vocab_size, params["lm_head"]["kernel"].dtype
    (256, dtype('float32'))
    """
    return from_pretrained(path, dtype=jnp.float32, param_dtype=jnp.float32, show_progress=False)


def pretrain(out_dir: str | os.PathLike, *, steps: int = DEFAULT_STEPS, seq_len: int = 128, batch_size: int = 16,
             lr: float = 3e-3, seed: int = 0, eval_every: int = 100, config: LlamaConfig = BASE_CONFIG,
             prose: data.Corpus | None = None, code: data.Corpus | None = None,
             show_progress: bool = True) -> dict:
    """Trains the base model from scratch on the prose train split and saves it to ``out_dir``.

    Args:
      out_dir: the output folder (``config.json``, ``model.safetensors``,
        ``pretrain_log.json``).
      steps, seq_len, batch_size: training length and batch shape (bytes).
      lr: the peak learning rate of :func:`make_optimizer`.
      seed: initialisation and data order; a run is a function of its arguments.
      eval_every: steps between held-out evaluations (logged).
      config: the architecture (vocabulary 256).
      prose, code: the corpora (default: :func:`data.prose_corpus`,
        :func:`data.code_corpus`); code is only evaluated, never trained on.
      show_progress: a progress bar with the running loss, and evaluation lines.

    Returns:
      the log written to ``pretrain_log.json``: settings, wall time, corpus
      sizes, the evaluation history, and ``final``: losses (nats per byte) of
      the saved bfloat16 weights on prose train / prose held-out / code held-out.
    """
    start = time.perf_counter()
    prose = prose if prose is not None else data.prose_corpus()
    code = code if code is not None else data.code_corpus()
    model = LlamaForCausalLM(config)
    params = model.init(jax.random.key(seed), jnp.zeros((1, seq_len), jnp.int32))["params"]
    optimizer = make_optimizer(lr, steps)
    opt_state = optimizer.init(params)
    step_fn = make_full_train_step(lambda p, *a: model.apply({"params": p}, *a),
                                   lambda m, ids: causal_lm_loss(m(ids), ids), optimizer)
    evaluate = make_eval(model)
    windows = {name: data.eval_windows(text, seq_len=seq_len, batch_size=batch_size, n_batches=EVAL_BATCHES)
               for name, text in (("prose_heldout", prose.heldout), ("code_heldout", code.heldout))}
    batches = data.train_batches(prose.train, seq_len=seq_len, batch_size=batch_size, seed=seed)

    history, recent, train_start = [], [], time.perf_counter()
    with loss_progress(steps, "pretraining", enabled=show_progress) as bar:
        for i in range(1, steps + 1):
            params, opt_state, metrics = step_fn(params, opt_state, jnp.asarray(next(batches)))
            recent.append(metrics["loss"])
            if i % 10 == 0 or i == steps:
                bar.advance(float(recent[-1]), steps=10 if i % 10 == 0 else i % 10)
            if i % eval_every == 0 or i == steps:
                row = {"step": i, "train_loss": float(np.mean([float(x) for x in recent]))}
                row.update({name: evaluate(params, w) for name, w in windows.items()})
                history.append(row)
                recent = []
                if show_progress:
                    bar.print(f"step {i:5d}  train {row['train_loss']:.3f}  held-out prose "
                              f"{row['prose_heldout']:.3f}  held-out code {row['code_heldout']:.3f}")
    train_time = time.perf_counter() - train_start

    save_base(out_dir, params, config)
    final = _final_losses(out_dir, prose, code, seq_len=seq_len, batch_size=batch_size)
    log = {"steps": steps, "seq_len": seq_len, "batch_size": batch_size, "tokens_seen": steps * seq_len * batch_size,
           "lr": lr, "seed": seed, "final": final, "history": history,
           "train_seconds": round(train_time, 1), "step_ms": round(1000 * train_time / steps, 1),
           "wall_seconds": round(time.perf_counter() - start, 1),
           "corpus": {c.name: {"train_bytes": len(c.train), "heldout_bytes": len(c.heldout),
                               "train_files": len(c.train_files), "heldout_files": len(c.heldout_files),
                               "source": c.source} for c in (prose, code)},
           "python": platform.python_version(), "jax": jax.__version__, "backend": jax.default_backend(),
           "params": int(sum(p.size for p in jax.tree.leaves(params))), "weights_dtype": "bfloat16"}
    with open(os.path.join(os.fspath(out_dir), LOG_NAME), "w") as f:
        json.dump(log, f, indent=2)
    return log


def _final_losses(out_dir, prose: data.Corpus, code: data.Corpus, *, seq_len: int, batch_size: int) -> dict:
    """Losses of the weights as saved (bfloat16, loaded as float32) on fixed windows of each split."""
    module, params = load_base(out_dir)
    evaluate = make_eval(module)
    texts = {"prose_train": prose.train, "prose_heldout": prose.heldout, "code_heldout": code.heldout}
    return {name: round(evaluate(params, data.eval_windows(text, seq_len=seq_len, batch_size=batch_size,
                                                            n_batches=FINAL_EVAL_BATCHES)), 4)
            for name, text in texts.items()}


def main(argv: list[str] | None = None) -> dict:
    """``python -m lora_jax.app.demo.pretrain --out DIR [--steps N] [--seed S] ...``"""
    parser = argparse.ArgumentParser(description="Pretrain the lora-jax demo's byte-level base model on "
                                                 "English prose (the standard library's docstrings).")
    parser.add_argument("--out", required=True, help=f"output folder (the shipped model lives in {BASE_DIR})")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps (default {DEFAULT_STEPS})")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and data order (default 0)")
    parser.add_argument("--seq-len", type=int, default=128, help="bytes per training window (default 128)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per step (default 16)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between evaluations (default 100)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    log = pretrain(args.out, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                   seed=args.seed, eval_every=args.eval_every, show_progress=not args.no_progress)
    final = log["final"]
    print(f"saved to {args.out} in {log['wall_seconds']:.0f}s ({log['step_ms']:.0f} ms/step); loss in nats/byte: "
          f"prose train {final['prose_train']:.3f}, prose held-out {final['prose_heldout']:.3f}, "
          f"code held-out {final['code_heldout']:.3f} (uniform: {np.log(data.VOCAB_SIZE):.3f})")
    return log


if __name__ == "__main__":
    main(sys.argv[1:])
