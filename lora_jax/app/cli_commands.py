"""The ``lora-jax`` commands: train, merge, generate, inspect, and the demo and studies they start.

:func:`lora_jax.app.cli.main` parses the command line with
:mod:`lora_jax.app.cli_args` (no JAX) and imports this module, which loads
JAX, Flax and optax, only to run a command: ``run_<command>(args)`` returns
the exit status, and a problem the user can fix is a :class:`CliError` (the
exit codes are described in :mod:`lora_jax.app.cli`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import textwrap
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax import backend, distributed, factors
from lora_jax.analysis import effective_rank
from lora_jax.app.demo import run as demo_run
from lora_jax.app.demo import study
from lora_jax.app import cli_mesh
from lora_jax.app.cli_args import MAX_EVAL_WINDOWS, PROG, CliError
from lora_jax.app.cli_data import (encode_checked, eos_token_id, existing_file, fingerprint, folder_bytes, load_adapter,
                                   load_fitting_adapter, load_model, load_tokenizer, read_documents, read_json,
                                   tokenize_documents, window_batch)
from lora_jax.app.cli_checks import eval_windows, merge_verdict, position_warning, repeat_warning
from lora_jax.config import LoraConfig
# Checkpointer and TrainState are read from the lazy `lora_jax.io` where used: they bring orbax, which
# every command but train does not need.
from lora_jax import io as lora_io
from lora_jax.io.names import to_torch
from lora_jax.io.progress import loss_progress
from lora_jax.linen import init_lora, lora_apply
from lora_jax.models import from_pretrained, generate, save_pretrained
from lora_jax.models.hf import DTYPES, config_to_hf
from lora_jax.train import make_train_step
from lora_jax.tree import adapter_nodes, count_params, merge

CHECKPOINTS = "checkpoints"
RUN_FILE = "lora_jax_train.json"          # the settings of a training run, checked on --resume
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")   # what train writes, and refuses to replace
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# config.json keys save_pretrained writes in another form; every other key of the base is carried over.
REWRITTEN_KEYS = ("rope_theta", "rope_scaling", "torch_dtype")
# Settings that must not change when a run is resumed (steps and save_every may).
RESUME_KEYS = ("data_tokens", "rank", "alpha", "targets", "dropout", "lr", "weight_decay", "max_grad_norm",
               "batch_size", "seq_len", "seed")

__all__ = ["CliError", "decoder", "run_demo", "run_generate", "run_inspect", "run_interference", "run_merge",
           "run_sweep", "run_train", "spectrum_summary"]


# ---- shared helpers

def _interactive() -> bool:
    return sys.stderr.isatty()


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _use_backend(args) -> None:
    try:
        device = backend.use(args.backend)
    except backend.BackendUnavailableError as err:   # found while running: exit 1, its message says what to install
        raise CliError(str(err)) from None
    if args.debug:
        _note(f"backend: {backend.describe(device)}")


class _Interrupted(KeyboardInterrupt):
    """A Ctrl-C whose message says where training stopped (``main`` prints it as the one line)."""


@contextlib.contextmanager
def _report_interrupt(step: Callable[[], int], ckpt):
    """Turns a Ctrl-C in the block into an :class:`_Interrupted` naming ``step()`` and the last complete checkpoint.

    :meth:`Checkpointer.save` holds a Ctrl-C back until its step is complete, so the newest valid step on disk
    is whole whenever this runs.
    """
    try:
        yield
    except _Interrupted:
        raise
    except KeyboardInterrupt:
        last = ckpt.latest_step()
        saved = "there is no complete checkpoint" if last is None else f"the last complete checkpoint is step {last}"
        raise _Interrupted(f"interrupted at step {step()}; {saved}") from None



# ---- train

def _next_token_loss(model, batch):
    """Mean cross-entropy of predicting ``batch[:, 1:]`` from ``batch[:, :-1]``."""
    logits = model(batch[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def _optimizer(lr: float, weight_decay: float, max_grad_norm: float) -> optax.GradientTransformation:
    tx = optax.adamw(lr, weight_decay=weight_decay)
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), tx) if max_grad_norm > 0 else tx


@functools.lru_cache(maxsize=4)
def _train_step(module, config: LoraConfig, lr: float, weight_decay: float, max_grad_norm: float):
    """``(optimizer, jitted step)``, cached so that repeated runs in one process compile once."""
    tx = _optimizer(lr, weight_decay, max_grad_norm)
    return tx, make_train_step(lora_apply(module, config), _next_token_loss, tx)


def _saved_steps(ckpt_dir: str) -> list[int]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n)))


def _check_same_run(out: str, settings: dict) -> None:
    """On ``--resume``: the settings that shape the result must equal those the run started with."""
    path = os.path.join(out, RUN_FILE)
    if not os.path.isfile(path):
        _note(f"note: no {RUN_FILE} in {out}; cannot check that the settings match the checkpointed run")
        return
    saved = read_json(path)
    changed = [k for k in RESUME_KEYS if saved.get(k) != settings[k]]
    if "data_tokens" in changed:
        raise CliError(f"--resume: the data differ from the checkpointed run's (tokens {settings['data_tokens']}, "
                       f"the run had {saved.get('data_tokens')}); resuming would not reproduce it", code=2)
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} {settings[k]} (the run used {saved.get(k)})" for k in changed)
        raise CliError(f"--resume: settings differ from the checkpointed run: {diffs}", code=2)


@jax.jit
def _nonfinite_count(tree) -> jax.Array:
    return sum(jnp.sum(~jnp.isfinite(x)) for x in jax.tree.leaves(tree))


def _check_finite(args, step: int, loss: float, lora) -> None:
    """Stops the run before a non-finite adapter can be saved: the loss, then the values the step produced."""
    if not math.isfinite(loss):
        raise CliError(f"step {step}: the loss is {loss}; stopped without writing this step; "
                       f"try a lower --lr than {args.lr:g}")
    bad = int(_nonfinite_count(lora))
    if bad:
        raise CliError(f"step {step}: the update made {bad:,} of the adapter's {count_params(lora):,} values "
                       f"non-finite (inf or nan); stopped without writing them; try a lower --lr than {args.lr:g}")


def _train_loop(args, state, step_fn, base, tokens, ckpt, dropout: bool, place, evaluate=None):
    losses = []
    with loss_progress(args.steps, "training", completed=state.step, enabled=True, stderr=True) as bar, \
            _report_interrupt(lambda: state.step, ckpt):
        while state.step < args.steps:
            i = state.step
            batch = place.batch(window_batch(tokens, seed=args.seed, step=i, batch_size=args.batch_size,
                                             seq_len=args.seq_len))
            rng = jax.random.fold_in(state.rng, i) if dropout else None
            lora, opt_state, metrics = step_fn(state.lora_params, state.opt_state, base, batch, rng)
            state = lora_io.TrainState(lora, opt_state, i + 1, state.rng)
            losses.append(float(metrics["loss"]))
            _check_finite(args, i + 1, losses[-1], lora)
            bar.advance(losses[-1])
            if state.step % args.save_every == 0 or state.step == args.steps:
                ckpt.save(state, base=base)
                _note(f"step {state.step}/{args.steps}: loss {losses[-1]:.4f}, checkpoint saved")
            if evaluate is not None and (state.step % args.eval_every == 0 or state.step == args.steps):
                evaluate(state)
    return state, losses


@functools.lru_cache(maxsize=4)
def _held_out_loss(module, config: LoraConfig):
    """Jitted ``loss(base, lora, windows)``: the mean next-token loss of the adapted model, without dropout."""
    apply = lora_apply(module, dataclasses.replace(config, dropout=0.0))
    return jax.jit(lambda base, lora, windows: _next_token_loss(lambda x: apply(base, lora, x), windows))


def _evaluator(args, module, config, base, windows, history: list):
    """The loop's ``evaluate(state)``: logs the held-out loss on ``windows`` and appends ``[step, loss]``."""
    def evaluate(state):
        loss = float(_held_out_loss(module, config)(base, state.lora_params, windows))
        history.append([state.step, loss])
        _note(f"step {state.step}/{args.steps}: held-out loss {loss:.4f} ({len(windows)} windows of --eval-data)")
    return evaluate


def _eval_tokens(args, tokenizer, vocab_size: int):
    """The tokens of ``--eval-data`` (None without it); a file too short for one window is an error."""
    if args.eval_data is None:
        return None
    tokens = tokenize_documents(tokenizer, read_documents(args.eval_data), vocab_size, args.eval_data)
    if len(tokens) < args.seq_len + 1:
        raise CliError(f"--eval-data {args.eval_data}: {len(tokens)} tokens, fewer than --seq-len + 1 = "
                       f"{args.seq_len + 1}; use more text or a smaller --seq-len")
    return tokens


def _train_warnings(args, module, n_tokens: int) -> None:
    for message in (position_warning(args.seq_len, module.config.max_position_embeddings,
                                     f"--seq-len {args.seq_len}"),
                    repeat_warning(args.steps, args.batch_size, args.seq_len, n_tokens)):
        if message:
            _note(f"{PROG} train: warning: {message}")


def _record_held_out(out: str, history: list, first_step: int) -> None:
    """Adds the held-out losses to the run's json (keeping those a resumed run logged before ``first_step``)."""
    path = os.path.join(out, RUN_FILE)
    run = read_json(path) if os.path.isfile(path) else {}
    earlier = [e for e in run.get("held_out_losses", []) if e[0] <= first_step]
    with open(path, "w") as f:
        json.dump({**run, "held_out_losses": earlier + history}, f, indent=2)


def _check_out(args, ckpt_dir: str) -> None:
    """Refuses an ``--out`` whose files a new run would replace (unless ``--overwrite``), and the model folder."""
    if os.path.realpath(args.out) == os.path.realpath(args.model):
        raise CliError("--out must not be the --model folder (not even with --overwrite): the adapter files would "
                       "be written among the base model's", code=2)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CliError(f"--out {args.out!r} is a file, expected a folder", code=2)
    saved = _saved_steps(ckpt_dir)
    if args.resume:
        if not saved:
            raise CliError(f"--resume: no checkpoints in {ckpt_dir!r}; drop --resume to start a new run", code=2)
        return
    if saved:
        never = " (--overwrite replaces adapter files, never checkpoints)" if args.overwrite else ""
        raise CliError(f"--out {args.out!r} already holds checkpoints (steps {saved}); pass --resume to continue "
                       f"that run, or choose another --out{never}", code=2)
    present = [n for n in ADAPTER_FILES if os.path.exists(os.path.join(args.out, n))]
    if present and not args.overwrite:
        raise CliError(f"--out {args.out!r} already holds an adapter ({', '.join(present)}); pass --overwrite to "
                       f"replace it, or choose another --out", code=2)


def _lora_config(args, module, base, sample, rng):
    """``(config, adapters)``; a ``--targets``/``--rank`` the model cannot take is a command-line error."""
    try:
        config = LoraConfig(rank=args.rank, alpha=args.alpha, targets=tuple(args.targets), dropout=args.dropout)
        return config, init_lora(module, base, config, sample, rng=rng)
    except ValueError as err:
        raise CliError(str(err), code=2) from err


def run_train(args) -> int:
    cli_mesh.join_processes()      # several processes when the environment names them; else nothing
    _use_backend(args)
    cli_mesh.check_processes(args)
    existing_file(args.data, "--data")
    if args.eval_data is not None:
        existing_file(args.eval_data, "--eval-data")
    ckpt_dir = os.path.join(args.out, CHECKPOINTS)
    _check_out(args, ckpt_dir)
    distributed.barrier("lora-jax train: --out checked")   # no process writes into --out before all have checked it
    main = distributed.current().is_main
    module, base, hf = load_model(args.model, show_progress=_interactive())
    tokenizer = load_tokenizer(args.model, hf)
    tokens = tokenize_documents(tokenizer, read_documents(args.data), module.config.vocab_size, args.data)
    if len(tokens) < args.seq_len + 1:
        raise CliError(f"--data {args.data}: {len(tokens)} tokens, fewer than --seq-len + 1 = {args.seq_len + 1}; "
                       f"use more text or a smaller --seq-len")
    _train_warnings(args, module, len(tokens))
    eval_tokens = _eval_tokens(args, tokenizer, module.config.vocab_size)
    settings = {"model": os.path.abspath(args.model), "data": os.path.abspath(args.data),
                "data_tokens": fingerprint(tokens), "rank": args.rank, "alpha": args.alpha,
                "targets": args.targets, "dropout": args.dropout, "lr": args.lr, "weight_decay": args.weight_decay,
                "max_grad_norm": args.max_grad_norm, "batch_size": args.batch_size, "seq_len": args.seq_len,
                "seed": args.seed, "eval_data": args.eval_data and os.path.abspath(args.eval_data),
                "eval_tokens": None if eval_tokens is None else fingerprint(eval_tokens),
                "eval_every": args.eval_every, "mesh": args.mesh and list(args.mesh),
                "sharding": args.mesh and args.sharding}
    if args.resume:
        _check_same_run(args.out, settings)
    key_lora, key_dropout = jax.random.split(jax.random.key(args.seed))
    sample = jnp.zeros((args.batch_size, args.seq_len), jnp.int32)
    config, lora = _lora_config(args, module, base, sample, key_lora)
    tx, one_device_step = _train_step(module, config, args.lr, args.weight_decay, args.max_grad_norm)
    place = cli_mesh.Placement(args, base, lora, tx)
    step_fn = place.step(module, config, tx, _next_token_loss, one_device_step)
    # Committed to the device (or the mesh), as restored arrays are, so both start the same compiled step.
    lora, opt_state, rng = place.state(lora, tx.init(lora), key_dropout)
    state, base = lora_io.TrainState(lora, opt_state, step=0, rng=rng), place.base(base)
    if args.mesh is not None:
        _note(f"training on {place.describe()}")
    os.makedirs(args.out, exist_ok=True)
    if main and not args.resume:
        with open(os.path.join(args.out, RUN_FILE), "w") as f:
            json.dump({"format": "lora_jax.app.cli.train/1", **settings}, f, indent=2)
    with lora_io.Checkpointer(ckpt_dir, base_ref=os.path.abspath(args.model)) as ckpt:
        if args.resume:
            state = ckpt.restore(state, base=base)
            if state.step > args.steps:
                raise CliError(f"--resume: the latest checkpoint is step {state.step}, beyond --steps {args.steps}",
                               code=2)
            _note(f"resumed from step {state.step} ({ckpt_dir})")
        history, first_step = [], state.step
        windows = None if eval_tokens is None else place.replicated(eval_windows(eval_tokens, args.seq_len,
                                                                                 MAX_EVAL_WINDOWS))
        evaluate = None if windows is None else _evaluator(args, module, config, base, windows, history)
        state, losses = _train_loop(args, state, step_fn, base, tokens, ckpt, config.dropout > 0, place, evaluate)
        ckpt.save(state, base=base)
        steps_saved = ckpt.all_steps()
    # every process takes part (the adapters may be sharded across them); process 0 writes
    files = distributed.save_peft(args.out, base, state.lora_params, config, task_type="CAUSAL_LM",
                                  base_model_name_or_path=args.model)
    if not main:
        return 0
    _print_train_summary(args, base, state, losses, files, steps_saved, len(tokens))
    if eval_tokens is not None:
        _record_held_out(args.out, history, first_step)
        if history:
            print(f"held-out loss: {history[-1][1]:.4f} (step {history[-1][0]}, --eval-data {args.eval_data})")
    return 0


def _print_train_summary(args, base, state, losses, files, steps_saved, n_tokens):
    trainable, total = count_params(state.lora_params), count_params(base)
    print(f"trainable parameters: {trainable:,} ({100 * trainable / total:.2f}% of the base model's {total:,})")
    if losses:
        first = state.step - len(losses) + 1
        print(f"loss: {losses[0]:.4f} (step {first}) -> {losses[-1]:.4f} (step {state.step}), "
              f"{n_tokens:,} tokens of data")
    else:
        print(f"no steps to run: the checkpoint is already at step {state.step}")
    print(f"wrote {', '.join(files + [RUN_FILE])} to {args.out}")
    print(f"checkpoints: {os.path.join(args.out, CHECKPOINTS)} (steps {', '.join(map(str, steps_saved))})")
    adapter, base_size = folder_bytes(args.out), folder_bytes(args.model)
    print(f"adapter size: {adapter:,} bytes, {100 * adapter / max(base_size, 1):.2f}% of the base model's "
          f"{base_size:,} bytes")


# ---- merge

def _extra_config(module, hf: dict) -> dict:
    """The base's config.json keys that save_pretrained does not derive from the LlamaConfig (token ids, ...)."""
    derived = set(config_to_hf(module.config))
    return {k: v for k, v in hf.items() if k not in derived and k not in REWRITTEN_KEYS}


def _copy_tokenizer(model_dir: str, out: str) -> list[str]:
    copied = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(model_dir, n))]
    for name in copied:
        shutil.copyfile(os.path.join(model_dir, name), os.path.join(out, name))
    return copied


@functools.lru_cache(maxsize=4)
def _forward(module, config: LoraConfig | None):
    """Jitted ``logits(params, lora, ids)`` of ``module``, with the adapters of ``config`` unless it is None."""
    if config is None:
        return jax.jit(lambda params, lora, ids: module.apply({"params": params}, ids))
    return jax.jit(lora_apply(module, config))


def _probe_ids(vocab_size: int, length: int = 16) -> jnp.ndarray:
    return jnp.asarray((np.arange(length) * 37 + 11) % vocab_size, jnp.int32)[None, :]


def run_merge(args) -> int:
    _use_backend(args)
    if os.path.realpath(args.out) in (os.path.realpath(args.model), os.path.realpath(args.adapter)):
        raise CliError("--out must be a new folder, not the --model or --adapter folder", code=2)
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise CliError(f"--out {args.out!r} is not empty; choose a new folder", code=2)
    module, base, hf = load_model(args.model, show_progress=_interactive())
    lora, config = load_fitting_adapter(base, args.adapter)
    module, base = _in_dtype(module, base, args.dtype)
    files = save_pretrained(args.out, module, merge(base, lora, config), extra_config=_extra_config(module, hf))
    files += _copy_tokenizer(args.model, args.out)
    _, reread = from_pretrained(args.out, show_progress=False)
    ids = _probe_ids(module.config.vocab_size)
    # Both in the written dtype: the base's weights (exact in any wider dtype) with the adapter unmerged.
    unmerged = _forward(module, config)(base, lora, ids).astype(jnp.float32)
    merged = _forward(module, None)(reread, None, ids).astype(jnp.float32)
    diff, scale = float(jnp.max(jnp.abs(merged - unmerged))), float(jnp.max(jnp.abs(unmerged)))
    print(f"merged the {len(adapter_nodes(lora))} layers of {args.adapter} into {args.model}'s weights; "
          f"wrote {', '.join(files)} to {args.out}")
    print(f"check: max |logit difference| merged vs unmerged on a {ids.shape[1]}-token probe: {diff:.3g} "
          f"(logits up to {scale:.3g}): "
          f"{merge_verdict(diff, module.config.param_dtype, scale, module.config.num_hidden_layers)}")
    return 0


def _in_dtype(module, base, dtype: str | None):
    """``(module, base)`` computing and storing in ``dtype`` (``--dtype``; None keeps the base's)."""
    if dtype is None:
        return module, base
    config = dataclasses.replace(module.config, dtype=DTYPES[dtype], param_dtype=DTYPES[dtype])
    return type(module)(config), jax.tree.map(lambda x: x.astype(DTYPES[dtype]), base)


# ---- generate

def decoder(module, base_params, lora_params, config: LoraConfig | None):
    """``(params, apply)`` for :func:`~lora_jax.models.generate`: the base alone, or base and adapters unmerged."""
    if config is None:
        return base_params, None
    adapted = lora_apply(module, config)
    return (base_params, lora_params), lambda p, ids, cache: adapted(p[0], p[1], ids, cache=cache)


def run_generate(args) -> int:
    _use_backend(args)
    module, base, hf = load_model(args.model, show_progress=_interactive())
    tokenizer = load_tokenizer(args.model, hf)
    lora, config = load_fitting_adapter(base, args.adapter)
    vocab = module.config.vocab_size
    prompt = encode_checked(tokenizer, args.prompt, vocab, "--prompt")
    if prompt.size == 0:
        raise CliError("--prompt is empty after tokenization", code=2)
    late = position_warning(prompt.size + args.max_new_tokens, module.config.max_position_embeddings,
                            f"a {prompt.size}-token --prompt and --max-new-tokens {args.max_new_tokens}")
    if late:
        _note(f"{PROG} generate: warning: {late}")
    if args.top_k is not None and args.top_k > vocab:
        raise CliError(f"--top-k {args.top_k} exceeds the vocabulary size {vocab}", code=2)
    eos = eos_token_id(args.model, hf)
    params, forward = decoder(module, base, lora, config)
    out = generate(module, params, prompt[None, :], max_new_tokens=args.max_new_tokens, apply=forward,
                   temperature=args.temperature, top_k=args.top_k, rng=jax.random.key(args.seed),
                   eos_token_id=eos)
    new = [int(t) for t in np.asarray(out)[0, prompt.size:]]
    if eos is not None and eos in new:
        new = new[:new.index(eos)]
    print(tokenizer.decode(new))
    return 0


# ---- inspect

def _wrapped(label: str, names, width: int = 100) -> str:
    """``label`` and ``names`` (a list, or PEFT's regex string) wrapped to ``width`` columns.

    >>> print(_wrapped("targets: ", ["q_proj", "k_proj", "v_proj"], width=24))
    targets: q_proj, k_proj,
             v_proj
    """
    text = ", ".join(map(str, names)) if isinstance(names, (list, tuple)) else str(names)
    return textwrap.fill(text, width, initial_indent=label, subsequent_indent=" " * len(label),
                         break_long_words=False, break_on_hyphens=False)


def spectrum_summary(sigma: np.ndarray) -> tuple[float, float, float]:
    """``(top singular value, effective rank, top-1 energy share)``.

    The effective rank is ``exp`` of the entropy of ``sigma / sum(sigma)``
    (Roy & Vetterli); the energy share is ``sigma_1^2 / sum(sigma^2)``. A zero
    delta gives ``(0, 0, nan)``.

    >>> spectrum_summary(np.array([1.0, 1.0]))
    (1.0, 2.0, 0.5)
    """
    if float(sigma.sum()) == 0.0:
        return 0.0, 0.0, math.nan
    return float(sigma[0]), effective_rank(sigma), float(sigma[0] ** 2 / (sigma ** 2).sum())


def run_inspect(args) -> int:
    adapter = load_adapter(args.adapter_dir, "ADAPTER_DIR")
    cfg, peft = adapter.config, adapter.peft_config
    print(f"adapter: {args.adapter_dir}")
    print(f"base model: {peft.get('base_model_name_or_path')}  task: {peft.get('task_type')}")
    print(f"rank {peft.get('r')}, alpha {peft.get('lora_alpha')}, rsLoRA {'on' if cfg.use_rslora else 'off'}, "
          f"dropout {cfg.dropout}")
    print(_wrapped("targets: ", peft.get("target_modules")))
    size = os.path.getsize(os.path.join(args.adapter_dir, "adapter_model.safetensors"))
    layers = adapter_nodes(adapter.lora_params)
    print(f"parameters: {count_params(adapter.lora_params):,} in {len(layers)} layers; "
          f"adapter_model.safetensors: {size:,} bytes")
    header = ("layer", "in x out", "rank", "alpha", "scale", "top sigma", "eff. rank", "top-1 energy")
    rows = []
    for path, node in layers.items():
        name, rank = "/".join(path), int(np.shape(node["a"])[-1])
        scale = cfg.scaling(name, rank)
        top, eff, share = spectrum_summary(factors.singular_values(node["a"], node["b"], scale))
        rows.append((to_torch(name), f"{np.shape(node['a'])[0]} x {np.shape(node['b'])[-1]}", str(rank),
                     f"{cfg.alpha_for(name):g}", f"{scale:.4g}", f"{top:.4g}", f"{eff:.2f}",
                     "-" if math.isnan(share) else f"{100 * share:.1f}%"))
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return 0


# ---- demo (lora_jax/app/demo/run.py)

def run_demo(args) -> int:
    _use_backend(args)
    return int(demo_run.main(args) or 0)


# ---- sweep and interference (lora_jax/app/demo/study.py)

def _study_budget(args) -> dict:
    return dict(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                eval_rows=args.eval_rows, seed=args.seed, show_progress=_interactive())


def _print_study(result, out: str) -> None:
    files = result.save(out)
    print(result.markdown())
    print(f"\nwrote {', '.join(f.name for f in files)} to {out}")


def run_sweep(args) -> int:
    if len(set(args.ranks)) != len(args.ranks):
        raise CliError(f"--ranks repeats a rank: {' '.join(map(str, args.ranks))}", code=2)
    _use_backend(args)
    _print_study(study.rank_sweep(args.ranks, alpha_per_rank=args.alpha_per_rank, **_study_budget(args)), args.out)
    return 0


def run_interference(args) -> int:
    if len(set(args.corpora)) != len(args.corpora) or len(args.corpora) < 2:
        raise CliError(f"--corpora needs at least two distinct corpora, got {' '.join(args.corpora)}", code=2)
    _use_backend(args)
    _print_study(study.interference_study(args.corpora, rank=args.rank, alpha=args.alpha, **_study_budget(args)),
                 args.out)
    return 0
