"""Resume a LoRA run from an orbax checkpoint, exactly: train, "crash", restore, continue.

  1. a first run trains and saves a checkpoint every few steps, then stops abruptly
     (as if the machine went away): only what is on disk survives;
  2. a second run, started the way every run starts ("restore the latest checkpoint
     if there is one"), picks up at the last saved step and trains to the end;
  3. the result is compared with the same training done without interruption:
     adapters and optimizer state agree bitwise.

A checkpoint holds the adapters, the optimizer state, the step and the RNG key
(dropout draws from it). The frozen base params are not stored: their
fingerprint (paths, shapes, dtypes) and a ``base_ref`` note are, and the
restore checks the base it is given. Resuming is exact only if the data of
step ``i`` is a function of ``i`` (as here) or the data loader's position is
checkpointed too.

Run from the repository root:  python examples/resume_training.py [--steps 30] [--every 10] [--stop-at 17]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from lora_jax.io.checkpoint import Checkpointer, TrainState, directory_size
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss

VOCAB, SEQ, BATCH, PERIOD = 4096, 32, 4, 12


def nbytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def setup(seed: int):
    """The frozen base, a jitted step, the data of step ``i``, and ``initial()`` states."""
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=344,
                                         num_hidden_layers=2, num_attention_heads=4))
    ids = jnp.zeros((BATCH, SEQ), jnp.int32)
    key_model, key_lora, key_data, key_run = jax.random.split(jax.random.key(seed), 4)
    base = jax.jit(model.init)(key_model, ids)["params"]
    # The head is adapted too: a random base head could not become confident on its own.
    config = lora_jax.LoraConfig(rank=4, alpha=8, targets=("attention", "mlp", "lm_head"), dropout=0.1)
    lora = lora_jax.init_lora(model, base, config, ids, rng=key_lora)
    tx = optax.adamw(1e-2)
    step = lora_jax.make_train_step(lora_jax.lora_apply(model, config),
                                    lambda m, x: causal_lm_loss(m(x), x), tx)
    # The task (as in quickstart.py): continue a fixed repeating pattern of tokens. The batch of
    # step i depends on i alone, so a resumed run sees the same data.
    pattern = jax.random.permutation(key_data, VOCAB)[:PERIOD]

    @jax.jit
    def batch_of(i):
        starts = jax.random.randint(jax.random.fold_in(key_data, i), (BATCH, 1), 0, PERIOD)
        return pattern[(starts + jnp.arange(SEQ)[None, :]) % PERIOD]

    def initial():
        # A copy, as the step donates its inputs. Placed on the device explicitly ("committed"),
        # as restored arrays are: jit compiles separately for uncommitted arguments.
        arrays = jax.device_put((lora, tx.init(lora), key_run), jax.devices()[0], may_alias=False)
        return TrainState(arrays[0], arrays[1], step=0, rng=arrays[2])

    return base, step, batch_of, initial


def train(state, until, step, base, batch_of, ckpt=None, every=0):
    while state.step < until:
        rng, dropout_rng = jax.random.split(state.rng)
        lora, opt_state, metrics = step(state.lora_params, state.opt_state, base, batch_of(state.step), dropout_rng)
        state = TrainState(lora, opt_state, state.step + 1, rng)
        if ckpt is not None and state.step % every == 0:
            ckpt.save(state, base=base)
            print(f"  step {state.step:3d}  loss {float(metrics['loss']):.4f}  saved")
    return state


def run(until, ckpt_dir, setup_out, every):
    """One training run, as a script would be launched: resume if a checkpoint exists."""
    base, step, batch_of, initial = setup_out
    with Checkpointer(ckpt_dir, max_to_keep=2, base_ref="random init, see setup()") as ckpt:
        state = initial()
        if ckpt.latest_step() is not None:
            state = ckpt.restore(state, base=base)  # raises if `base` is not the base it was saved with
            print(f"  restored step {state.step} from {ckpt.directory}")
        return train(state, until, step, base, batch_of, ckpt, every)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps in all (default 30)")
    parser.add_argument("--every", type=int, default=10, help="save every this many steps (default 10)")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="the first run stops after this step, unsaved (default: steps * 2 // 3 + 1)")
    parser.add_argument("--ckpt-dir", default=None, help="checkpoint directory (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    stop_at = args.stop_at if args.stop_at is not None else args.steps * 2 // 3 + 1
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_dir = args.ckpt_dir or tmp
        setup_out = setup(args.seed)
        base = setup_out[0]

        print(f"run 1: train to step {stop_at}, saving every {args.every}, then stop without saving")
        run(stop_at, ckpt_dir, setup_out, args.every)  # its final state is dropped: a crash
        print(f"run 2: start again, to step {args.steps}")
        resumed = run(args.steps, ckpt_dir, setup_out, args.every)

        print("check: the same training without interruption")
        _, step, batch_of, initial = setup_out
        reference = train(initial(), args.steps, step, base, batch_of)
        trees = [(s.lora_params, s.opt_state, jax.random.key_data(s.rng)) for s in (resumed, reference)]
        same = [bool(np.array_equal(a, b)) for a, b in zip(*map(jax.tree.leaves, trees))]
        print(f"resumed == uninterrupted: {sum(same)}/{len(same)} arrays bitwise equal")

        with Checkpointer(ckpt_dir) as ckpt:
            step_bytes = directory_size(ckpt.step_directory(ckpt.latest_step()))
            print(f"\ncheckpoint directory: {directory_size(ckpt.directory):,} bytes for steps {ckpt.all_steps()}")
        print(f"one checkpoint: {step_bytes:,} bytes (adapters {nbytes(resumed.lora_params):,} + optimizer state "
              f"{nbytes(resumed.opt_state):,} + metadata)")
        print(f"base params (referenced, not stored): {nbytes(base):,} bytes; "
              f"one checkpoint is {100 * step_bytes / nbytes(base):.1f}% of it")
    print(f"\ndone in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
