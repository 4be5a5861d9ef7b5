"""Training checkpoints: exact round trips, clear refusals, and a killed run that resumes bitwise."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_jax.io.checkpoint import Checkpointer, TrainState, base_fingerprint, directory_size

WORKER = pathlib.Path(__file__).with_name("_resume_worker.py")
BASE = {"blk": {"q": {"kernel": jnp.zeros((4, 3))}, "norm": {"weight": jnp.ones(4)}}}
TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))


def _state(seed=0, step=7, rng="typed"):
    lora = {"blk": {"q": {"a": jax.random.normal(jax.random.key(seed), (4, 2)),
                          "b": jax.random.normal(jax.random.key(seed + 1), (2, 3))}}}
    opt_state = TX.init(lora)
    # one update, so that the moments and the count are not their initial zeros
    _, opt_state = TX.update(jax.tree.map(jnp.ones_like, lora), opt_state, lora)
    keys = {"typed": jax.random.key(seed), "rbg": jax.random.key(seed, impl="rbg"),
            "raw": jax.random.PRNGKey(seed), None: None}
    return TrainState(lora, opt_state, step, keys[rng])


def _assert_equal_trees(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)):
        assert a.dtype == b.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("rng", ["typed", "rbg", "raw", None])
def test_round_trip_is_exact_and_keeps_types(tmp_path, rng):
    state = _state(rng=rng)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(state, base=BASE)
    # a new Checkpointer, as a resumed process would make, into a like of other values
    like = _state(seed=5, step=0, rng=rng)
    with Checkpointer(tmp_path) as ckpt:
        back = ckpt.restore(like, base=BASE)
    assert back.step == 7 and isinstance(back.step, int)
    _assert_equal_trees(back.lora_params, state.lora_params)
    # the optax state classes come back (treedefs compare node types), with every value
    _assert_equal_trees(back.opt_state, state.opt_state)
    assert type(back.opt_state[1][0]) is optax.ScaleByAdamState
    if rng is None:
        assert back.rng is None
    else:
        assert back.rng.dtype == state.rng.dtype  # key<fry>, key<rbg> or uint32
        if rng != "raw":
            assert jax.random.key_impl(back.rng) == jax.random.key_impl(state.rng)
            np.testing.assert_array_equal(jax.random.key_data(back.rng), jax.random.key_data(state.rng))
        else:
            np.testing.assert_array_equal(back.rng, state.rng)
        # the restored key draws the very numbers the saved one draws
        np.testing.assert_array_equal(jax.random.uniform(back.rng, (3,)), jax.random.uniform(state.rng, (3,)))


def test_array_step_and_abstract_like(tmp_path):
    state = _state()
    state = TrainState(state.lora_params, state.opt_state, jnp.asarray(12, jnp.int32), state.rng)
    like = jax.eval_shape(lambda: state)  # every leaf a ShapeDtypeStruct, the key included
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(state)
        back = ckpt.restore(like)
    assert back.step.dtype == jnp.int32 and int(back.step) == 12
    _assert_equal_trees(back.lora_params, state.lora_params)
    np.testing.assert_array_equal(jax.random.key_data(back.rng), jax.random.key_data(state.rng))


def test_restore_a_given_step_and_prune_old_ones(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in (1, 2, 3, 4):
            ckpt.save(_state(seed=step, step=step))
        assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
        assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]
        third = ckpt.restore(_state(), step=3)
        latest = ckpt.restore(_state())
        with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 1 in .*saved steps: \[3, 4\]"):
            ckpt.restore(_state(), step=1)
    assert third.step == 3 and latest.step == 4
    _assert_equal_trees(third.lora_params, _state(seed=3).lora_params)
    _assert_equal_trees(latest.lora_params, _state(seed=4).lora_params)


def test_saving_a_step_twice_writes_nothing_and_an_older_step_is_refused(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(_state(seed=0, step=5))
        assert not ckpt.save(_state(seed=1, step=5))
        _assert_equal_trees(ckpt.restore(_state()).lora_params, _state(seed=0).lora_params)
        with pytest.raises(ValueError, match=r"cannot save step 4 .* already holds the newer step 5"):
            ckpt.save(_state(step=4))


def test_base_fingerprint_mismatch_names_the_path(tmp_path):
    with Checkpointer(tmp_path, base_ref="hf/llama-tiny") as ckpt:
        ckpt.save(_state(), base=BASE)
        assert ckpt.metadata()["base_ref"] == "hf/llama-tiny"
        assert ckpt.metadata()["base_fingerprint"] == [["blk/norm/weight", [4], "float32"],
                                                       ["blk/q/kernel", [4, 3], "float32"]]
        ckpt.restore(_state(), base=BASE)  # the matching base passes
        wider = {"blk": {**BASE["blk"], "q": {"kernel": jnp.zeros((4, 5))}}}
        with pytest.raises(ValueError, match=r"base_ref 'hf/llama-tiny'.*'blk/q/kernel' is float32\[4, 5\], "
                                             r"expected float32\[4, 3\]"):
            ckpt.restore(_state(), base=wider)
        half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), BASE)
        with pytest.raises(ValueError, match=r"'blk/norm/weight' is bfloat16\[4\], expected float32\[4\]"):
            ckpt.restore(_state(), base=half)
        with pytest.raises(ValueError, match=r"'blk/norm/weight' is missing"):
            ckpt.restore(_state(), base={"blk": {"q": BASE["blk"]["q"]}})
        with pytest.raises(ValueError, match=r"'blk/k/kernel' is not in the checkpoint"):
            ckpt.restore(_state(), base={"blk": {**BASE["blk"], "k": {"kernel": jnp.zeros(1)}}})
        # an abstract base is enough: the fingerprint never reads values
        ckpt.restore(_state(), base=jax.eval_shape(lambda: BASE))


def test_base_cannot_be_checked_without_a_fingerprint(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(_state())
        with pytest.raises(ValueError, match="saved without a base fingerprint"):
            ckpt.restore(_state(), base=BASE)


def test_empty_directory_is_named(tmp_path):
    missing = tmp_path / "nothing-here"
    with Checkpointer(missing) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        with pytest.raises(FileNotFoundError, match=f"no checkpoints in '{missing}'"):
            ckpt.restore(_state())
    assert not missing.exists()  # a restore never creates the directory


def test_like_that_does_not_fit_is_refused_with_the_path(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(_state())
        state = _state()
        extra = {"blk": {**state.lora_params["blk"], "k": state.lora_params["blk"]["q"]}}
        with pytest.raises(ValueError, match=r"'lora/blk/k/a' is not in the checkpoint"):
            ckpt.restore(TrainState(extra, TX.init(extra), 0, state.rng))
        rank4 = {"blk": {"q": {"a": jnp.zeros((4, 4)), "b": jnp.zeros((4, 3))}}}
        with pytest.raises(ValueError, match=r"'lora/blk/q/a' is float32\[4, 4\], expected float32\[4, 2\]"):
            ckpt.restore(TrainState(rank4, TX.init(rank4), 0, state.rng))
        # orbax alone would cast this silently; a resumed run must not change dtype
        half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state.lora_params)
        with pytest.raises(ValueError, match=r"'lora/blk/q/a' is bfloat16\[4, 2\], expected float32\[4, 2\]"):
            ckpt.restore(TrainState(half, state.opt_state, 0, state.rng))
        sgd = optax.sgd(0.1, momentum=0.9)
        with pytest.raises(ValueError, match=r"'opt_state/1/0/count' is missing"):
            ckpt.restore(TrainState(state.lora_params, sgd.init(state.lora_params), 0, state.rng))
        with pytest.raises(ValueError, match=r"'rng' was saved as typed key, but like.rng is raw"):
            ckpt.restore(TrainState(state.lora_params, state.opt_state, 0, jax.random.PRNGKey(0)))


def test_restore_falls_back_to_the_newest_valid_step(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        for step in (2, 4, 6):
            ckpt.save(_state(seed=step, step=step))
    shutil.rmtree(tmp_path / "6" / "meta")   # a step with a missing item
    (tmp_path / "9").mkdir()                  # an empty step directory
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [2, 4, 6, 9]
        with pytest.warns(UserWarning, match=r"skipped checkpoint step 9: its 'state' and 'meta' items are "
                                             r"missing; step 6: its 'meta' item is missing; using step 4"):
            back = ckpt.restore(_state(step=0))
        assert back.step == 4 and ckpt.latest_step() == 4
        _assert_equal_trees(back.lora_params, _state(seed=4).lora_params)
        with pytest.raises(ValueError, match=r"checkpoint step 6 .* cannot be restored: its 'meta' item is missing"):
            ckpt.restore(_state(), step=6)
        with pytest.raises(ValueError, match=r"cannot save step 6 .* not a valid checkpoint .*move it away"):
            ckpt.save(_state(step=6))
        # a later step still saves, although orbax alone would skip one older than the (empty) step 9
        assert ckpt.save(_state(seed=8, step=8))
        _assert_equal_trees(ckpt.restore(_state(), step=8).lora_params, _state(seed=8).lora_params)
        assert ckpt.latest_step() == 8


def test_a_renamed_step_is_skipped_with_the_reason(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        for step in (10, 25):
            ckpt.save(_state(seed=step, step=step))
    (tmp_path / "25").rename(tmp_path / "99")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.warns(UserWarning, match=r"skipped checkpoint step 99: it records step 25, not 99 "
                                             r"\(a renamed directory\?\); using step 10"):
            back = ckpt.restore(_state(step=0))
    assert back.step == 10
    _assert_equal_trees(back.lora_params, _state(seed=10).lora_params)


def test_no_valid_step_is_a_clear_error(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(_state(step=3))
    shutil.rmtree(tmp_path / "3" / "state")
    (tmp_path / "5").mkdir()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError, match=r"no valid checkpoint in .*: step 5: its 'state' and 'meta' "
                                                    r"items are missing; step 3: its 'state' item is missing"):
            ckpt.restore(_state())


def test_directory_size_counts_the_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "x").write_bytes(b"123")
    (tmp_path / "sub" / "y").write_bytes(b"12345")
    assert directory_size(tmp_path) == 8
    state = _state()
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(state)
        size = directory_size(ckpt.step_directory(7))
    # at least the arrays themselves, at most metadata of a few tens of kB on top
    payload = sum(np.asarray(x).nbytes for x in jax.tree.leaves((state.lora_params, state.opt_state)))
    assert payload <= size < payload + 100_000, (payload, size)


def test_fingerprint_reads_no_values():
    tree = {"w": jax.ShapeDtypeStruct((1 << 20, 1 << 20), jnp.bfloat16)}  # 2 TiB, if it were read
    assert base_fingerprint(tree) == [["w", [1 << 20, 1 << 20], "bfloat16"]]


def _worker_env(cache):
    # A shared compilation cache: the step compiles once, in the first worker.
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


@pytest.mark.slow  # ~20-30 s on 2 CPU cores, most of it compiling the step once
def test_killed_run_resumes_bitwise(tmp_path):
    env, ckpt_dir, out = _worker_env(tmp_path / "cache"), tmp_path / "ckpt", tmp_path
    args = [sys.executable, str(WORKER), "--steps", "12", "--every", "3", "--ckpt-dir", str(ckpt_dir)]
    # 1. Train, saving every 3 steps; the worker SIGKILLs itself the moment step 6's save returned.
    killed = subprocess.run(args + ["--kill-at", "6", "--out", str(out / "killed.npz")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert killed.stdout.splitlines() == ["saved 3", "saved 6"]
    assert not (out / "killed.npz").exists()
    with Checkpointer(ckpt_dir) as ckpt:
        assert ckpt.all_steps() == [3, 6]
    # 2. Resume in a new process; it also runs the control and the uninterrupted reference.
    done = subprocess.run(args + ["--resume", "--out", str(out / "resumed.npz"), "--control-out",
                                  str(out / "control.npz"), "--reference-out", str(out / "reference.npz")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["resuming from 6", "saved 9", "saved 12"], done.stdout
    resumed, reference, control = (np.load(out / f"{name}.npz") for name in ("resumed", "reference", "control"))
    assert sorted(resumed.files) == sorted(reference.files)
    assert int(reference["step"]) == 12 and any(int(reference[k]) == 12 for k in reference.files
                                                 if k.endswith("count"))
    assert [k for k in reference.files if not np.array_equal(resumed[k], reference[k])] == []
    # Positive control: resuming with a re-seeded RNG (other dropout masks) ends elsewhere,
    # so the bitwise comparison above can fail.
    lora_keys = [k for k in reference.files if k.startswith("lora/")]
    differing = [k for k in lora_keys if not np.array_equal(control[k], reference[k])]
    assert len(differing) == len(lora_keys), differing


def test_ctrl_c_during_a_save_is_raised_once_the_step_is_complete(tmp_path, monkeypatch):
    state = _state(step=3)
    before = signal.getsignal(signal.SIGINT)
    with Checkpointer(tmp_path) as ckpt:
        real_save = ckpt._manager.save

        def interrupted_save(*args, **kwargs):   # the Ctrl-C arrives as orbax starts writing
            os.kill(os.getpid(), signal.SIGINT)
            return real_save(*args, **kwargs)

        monkeypatch.setattr(ckpt._manager, "save", interrupted_save)
        with pytest.raises(KeyboardInterrupt):
            ckpt.save(state, base=BASE)
        assert sorted(os.listdir(tmp_path)) == ["3"] and ckpt.problem(3) is None
        _assert_equal_trees(ckpt.restore(_state(seed=5, step=0), base=BASE).lora_params, state.lora_params)
    assert signal.getsignal(signal.SIGINT) is before   # the handler is put back
