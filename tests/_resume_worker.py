"""A small LoRA training run that tests/test_checkpoint.py starts, kills and resumes in subprocesses.

A tiny Llama with LoRA (dropout on, so the RNG matters) trained with adamw.
The batch of step ``i`` is a pure function of ``i``; the RNG is carried in the
state and split once per step. The run writes its final state to ``--out``
(an ``.npz`` of every leaf), so that runs can be compared bitwise.

  --ckpt-dir D --every K   save every K steps (and print "saved N" after each save returned)
  --kill-at P              SIGKILL this process the moment step P's save has returned
  --resume                 start from the latest checkpoint in D
  --control-out F          also resume with a re-seeded RNG (a bug) and write its end state to F
  --reference-out F        also train from scratch without interruption and write its end state to F
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as L
from lora_jax.io.checkpoint import Checkpointer, TrainState
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss

MODEL = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2)
LORA = L.LoraConfig(rank=2, alpha=4, targets=("attention", "mlp"), dropout=0.25)
BATCH, SEQ = 2, 8


def _normal(rng, scale):
    # Host-side values for abstract shapes: no init programs to compile (on CPU
    # compiling them would take longer than the whole test).
    return lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype)


def build():
    """``(step_fn, base, batch_of, initial)``; ``initial()`` makes a new initial state (steps donate theirs)."""
    model = LlamaForCausalLM(MODEL)
    ids = np.zeros((BATCH, SEQ), np.int32)
    rng = np.random.default_rng(0)
    base = jax.tree.map(_normal(rng, 0.3), jax.eval_shape(model.init, jax.random.key(0), ids)["params"])
    # Nonzero B from the start, so that dropout changes every gradient.
    lora = jax.eval_shape(lambda: L.init_lora(model, base, LORA, ids, rng=jax.random.key(1)))
    lora = jax.tree.map(_normal(rng, 0.1), lora)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-2))
    step_fn = L.make_train_step(L.lora_apply(model, LORA), lambda m, x: causal_lm_loss(m(x), x), tx)
    batch_of = lambda i: np.random.default_rng([2, i]).integers(0, MODEL.vocab_size, (BATCH, SEQ), np.int32)
    # rbg: a typed key whose implementation is not the default (and compiles faster than threefry here).
    # device_put commits the arrays to the device, as orbax's restored ones are: jit compiles
    # committed and uncommitted arguments separately, and one compiled step (shared by the
    # workers through the compilation cache) keeps the test fast.
    def initial():
        arrays = jax.device_put((lora, tx.init(lora), jax.random.key(3, impl="rbg")), jax.devices()[0],
                                may_alias=False)  # a copy: the step donates it
        return TrainState(arrays[0], arrays[1], step=0, rng=arrays[2])
    return step_fn, base, batch_of, initial


def train(state, until, step_fn, base, batch_of, ckpt=None, every=0, kill_at=None):
    while state.step < until:
        rng, step_rng = jax.random.split(state.rng)
        lora, opt_state, _ = step_fn(state.lora_params, state.opt_state, base, batch_of(state.step), step_rng)
        state = TrainState(lora, opt_state, state.step + 1, rng)
        if ckpt is not None and state.step % every == 0:
            ckpt.save(state, base=base)
            print(f"saved {state.step}", flush=True)
        if state.step == kill_at:
            # No clean-up of any kind: a save still in flight would be lost.
            os.kill(os.getpid(), signal.SIGKILL)
    return state


def dump(state, path):
    flat = jax.tree_util.tree_flatten_with_path({"lora": state.lora_params, "opt_state": state.opt_state})[0]
    arrays = {jax.tree_util.keystr(kp, simple=True, separator="/"): np.asarray(leaf) for kp, leaf in flat}
    np.savez(path, rng=np.asarray(jax.random.key_data(state.rng)), step=np.asarray(state.step), **arrays)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt-dir")
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--control-out")
    parser.add_argument("--reference-out")
    args = parser.parse_args(argv)
    step_fn, base, batch_of, initial = build()
    run = lambda state, **kw: train(state, args.steps, step_fn, base, batch_of, **kw)
    ckpt = Checkpointer(args.ckpt_dir, base_ref="tests/_resume_worker") if args.ckpt_dir else None
    state = initial()
    if args.resume:
        start = ckpt.latest_step()
        print(f"resuming from {start}", flush=True)
        if args.control_out:
            # The bug the exactness test must be able to catch: resuming with a re-seeded RNG.
            restored = ckpt.restore(initial(), step=start, base=base)
            dump(run(dataclasses.replace(restored, rng=initial().rng)), args.control_out)
        state = ckpt.restore(state, step=start, base=base)
    dump(run(state, ckpt=ckpt, every=args.every, kill_at=args.kill_at), args.out)
    if args.reference_out:
        # Uninterrupted, from scratch, never saved.
        dump(run(initial()), args.reference_out)
    if ckpt is not None:
        ckpt.close()


if __name__ == "__main__":
    main()
