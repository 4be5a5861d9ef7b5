"""Orbax checkpoints of a LoRA training run: adapters, optimizer state, step and RNG.

A checkpoint holds what training changes and nothing else. The frozen base
params are referenced, not copied: each save records a *fingerprint* of the
base (every leaf's path, shape and dtype; no values are read) and an optional
``base_ref`` string (say, the Hugging Face folder the base came from), and a
restore that is handed the base checks it against the fingerprint.

On disk, ``<directory>/<step>/`` holds two orbax items: ``state`` (the arrays:
``lora``, ``opt_state`` and the RNG's raw key data) and ``meta`` (JSON: the
step, the RNG's kind and implementation, a manifest of every saved leaf, the
base fingerprint and ``base_ref``). The manifest lets a restore name the first
leaf that does not fit before orbax reads anything, and refuse a dtype that
orbax would otherwise cast silently.

A step is *valid* when both items are present and its ``meta`` records the
step its directory is named after. Choosing a step (:meth:`Checkpointer.latest_step`,
a restore of the latest) skips invalid ones with a warning that names each and
why, so an empty or half-copied ``<step>/`` or a renamed one never hides the
intact steps before it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import signal
import threading
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lora_jax import deprecation

FORMAT = "lora_jax.train_state/1"
_STATE, _META = "state", "meta"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """What a LoRA run needs to resume: adapters, optimizer state, step and RNG.

    A pytree (all four fields are children), so it passes through ``jax.jit``.

    Attributes:
      lora_params: the adapters' pytree (from :func:`lora_jax.init_lora`).
      opt_state: the optax state of the adapters.
      step: the number of steps taken (a Python int or an integer scalar array).
      rng: the key the next step's randomness is drawn from: a typed key
        (``jax.random.key``), a raw ``uint32`` key (``jax.random.PRNGKey``), or None.
    """

    lora_params: Any
    opt_state: Any
    step: Any = 0
    rng: Any = None

    lora = deprecation.renamed_attribute("TrainState", "lora", "lora_params")


def _path(keypath) -> str:
    return jax.tree_util.keystr(keypath, simple=True, separator="/")


def _describe(leaf) -> list:
    dtype = getattr(leaf, "dtype", None)
    dtype = np.asarray(leaf).dtype if dtype is None else dtype
    return [list(np.shape(leaf)), str(dtype)]


def _manifest(tree) -> list[list]:
    """``[[path, shape, dtype], ...]`` for every leaf of ``tree``, in flattening order."""
    return [[_path(kp), *_describe(leaf)] for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def base_fingerprint(base) -> list[list]:
    """The identity of a base params tree, cheaply: ``[[path, shape, dtype], ...]``.

    No values are read, so it costs nothing for a model of any size (and works
    on ``jax.ShapeDtypeStruct`` leaves). It tells models of different
    architecture, size or dtype apart; two checkpoints of one architecture
    (a base and its instruction-tuned sibling) share it, which is what
    ``base_ref`` is for.

    >>> base_fingerprint({"q": {"kernel": jnp.zeros((4, 3), jnp.bfloat16)}})
    [['q/kernel', [4, 3], 'bfloat16']]
    """
    return _manifest(base)


def _fmt(entry) -> str:
    return f"{entry[1]}[{', '.join(map(str, entry[0]))}]"


def _first_difference(expected: list, actual: list) -> str | None:
    """Names the first leaf where two manifests differ, or returns None if they agree."""
    want = {path: (shape, dtype) for path, shape, dtype in expected}
    have = {path: (list(shape), dtype) for path, shape, dtype in actual}
    for path, shape, dtype in expected:
        if path not in have:
            return f"{path!r} is missing (expected {_fmt((shape, dtype))})"
        if have[path] != (shape, dtype):
            return f"{path!r} is {_fmt(have[path])}, expected {_fmt((shape, dtype))}"
    extra = [path for path, *_ in actual if path not in want]
    return f"{extra[0]!r} is not in the checkpoint" if extra else None


def _is_typed_key(rng) -> bool:
    return rng is not None and jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)


def _rng_kind(rng) -> str | None:
    """``"typed"`` (``jax.random.key``), ``"raw"`` (a ``uint32`` key) or None."""
    return None if rng is None else "typed" if _is_typed_key(rng) else "raw"


def _key_data(key):
    # eval_shape lets an abstract key (a ShapeDtypeStruct in `like`) through too
    if isinstance(key, jax.ShapeDtypeStruct):
        return jax.eval_shape(jax.random.key_data, key)
    return jax.random.key_data(key)


def _payload(state: TrainState) -> dict:
    # Orbax versions differ in whether they store typed key arrays; their raw
    # key data (uint32) is stored everywhere, and wrapped back on restore.
    payload = {"lora": state.lora_params, "opt_state": state.opt_state}   # "lora": the file format of 0.1
    if state.rng is not None:
        payload["rng"] = _key_data(state.rng) if _is_typed_key(state.rng) else state.rng
    return payload


def _abstract(leaf):
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is not None:
        return leaf
    # No sharding given: the default device. (Orbax would otherwise reuse the saved sharding, which fails
    # when the checkpoint was written by other devices or processes.)
    default = jax.config.jax_default_device
    device = default if isinstance(default, jax.Device) else jax.local_devices()[0]
    dtype = leaf.dtype if isinstance(leaf, jax.ShapeDtypeStruct) else np.asarray(leaf).dtype
    return jax.ShapeDtypeStruct(np.shape(leaf), dtype, sharding=jax.sharding.SingleDeviceSharding(device))


def directory_size(path: str | os.PathLike) -> int:
    """The bytes of all files under ``path`` (a checkpoint directory, or one step of it).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = pathlib.Path(d, "x").write_bytes(b"12345")
    ...     directory_size(d)
    5
    """
    return sum(p.stat().st_size for p in pathlib.Path(path).rglob("*") if p.is_file())


@contextlib.contextmanager
def _interrupts_deferred():
    """Holds back Ctrl-C (SIGINT) until the block ends, then raises the KeyboardInterrupt.

    Orbax writes with helper threads and event loops; a KeyboardInterrupt raised
    in the middle leaves them writing into a closed process (tracebacks, a
    timeout of minutes, even an abort). A LoRA save takes well under a second,
    so letting it finish costs the user nothing and leaves it complete. Only the
    main thread receives signals; elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


class Checkpointer:
    """Saves and restores :class:`TrainState` under ``directory``, one subdirectory per step.

    Every :meth:`save` is complete when it returns (orbax writes into a
    temporary directory and renames it when done), so a process killed at any
    later moment leaves a restorable checkpoint, and one killed during a save
    leaves the previous ones intact. LoRA states are small, so waiting costs
    little. Saves are synchronous, and a Ctrl-C during one (in the main
    thread) is held until the save is complete, then raised as
    ``KeyboardInterrupt``: an interrupted run stops with its checkpoints whole.

    Args:
      directory: where the steps go; created on the first save.
      max_to_keep: how many of the newest steps to keep (None keeps all).
      base_ref: a note recorded with every save to say which base the adapters
        belong to (a path, a hub id, a revision).

    >>> import tempfile, optax
    >>> lora = {"q": {"a": jnp.ones((4, 2)), "b": jnp.zeros((2, 3))}}
    >>> tx = optax.adam(1e-3)
    >>> state = TrainState(lora, tx.init(lora), step=10, rng=jax.random.key(0))
    >>> with tempfile.TemporaryDirectory() as d, Checkpointer(d, base_ref="my/base") as ckpt:
    ...     ckpt.save(state)
    ...     back = ckpt.restore(state)
    ...     ckpt.all_steps(), ckpt.metadata()["base_ref"]
    True
    ([10], 'my/base')
    >>> back.step, type(back.opt_state[0]).__name__, back.rng.dtype == state.rng.dtype
    (10, 'ScaleByAdamState', True)
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, base_ref: str | None = None):
        self.directory = pathlib.Path(directory).absolute()
        self.base_ref = base_ref
        # Synchronous: a save runs in the calling thread, so Ctrl-C stops it at once. Async saving
        # left orbax's finalize threads writing after a KeyboardInterrupt, which printed their
        # tracebacks and could wait out a timeout of minutes before the process could exit.
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=False,
                                               cleanup_tmp_directories=True, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(_STATE, _META))
        self._warned: set[str] = set()   # the skipped steps already warned about

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Waits for any save in flight and releases orbax's resources."""
        self._manager.close()

    def all_steps(self) -> list[int]:
        """The step directories on disk, oldest first (valid or not; see :meth:`latest_step`)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest *valid* step, or None if there is none; invalid newer ones are skipped with a warning."""
        return self._newest_valid(self.all_steps())[0]

    def step_directory(self, step: int) -> pathlib.Path:
        """The directory of one saved step (e.g. for :func:`directory_size`)."""
        return self.directory / str(self._existing(step))

    def problem(self, step: int) -> str | None:
        """Why step ``step`` cannot be restored (an item missing, another step recorded, ...), or None if valid."""
        path = self.directory / str(step)
        missing = [item for item in (_STATE, _META) if not (path / item).is_dir() or not any((path / item).iterdir())]
        if missing:
            return f"its {' and '.join(repr(m) for m in missing)} item{'s are' if len(missing) > 1 else ' is'} missing"
        try:
            meta = self._read_meta(step)
        except Exception as err:  # noqa: BLE001 -- orbax's errors vary by version; the reason is reported
            return f"its {_META!r} item cannot be read ({type(err).__name__}: {err})"
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            return "it is not a lora_jax TrainState checkpoint"
        if meta.get("step") != step:
            return f"it records step {meta.get('step')}, not {step} (a renamed directory?)"
        return None

    def _newest_valid(self, steps: list[int]) -> tuple[int | None, list[str]]:
        """``(newest valid step or None, ["step N: why", ...] for the newer invalid ones)``; warns once for each."""
        skipped = []
        for step in reversed(steps):
            problem = self.problem(step)
            if problem is None:
                break
            skipped.append(f"step {step}: {problem}")
        else:
            step = None
        new = [s for s in skipped if s not in self._warned]
        if new and step is not None:
            self._warned.update(new)
            warnings.warn(f"{str(self.directory)!r}: skipped checkpoint {'; '.join(new)}; using step {step}",
                          stacklevel=3)
        return step, skipped

    def save(self, state: TrainState, *, base=None) -> bool:
        """Writes ``state`` as step ``int(state.step)`` and waits until it is on disk.

        A Ctrl-C (SIGINT) that arrives meanwhile raises ``KeyboardInterrupt``
        once the step is complete.

        Args:
          state: the state to save.
          base: the frozen base params; their fingerprint (not their values) is
            recorded, so that :meth:`restore` can check them.

        Returns:
          True; False (writing nothing) if this step is already saved.

        Raises:
          ValueError: the directory already holds a newer valid step (a stale
            directory from another run?), or an invalid directory of this step.
        """
        step = int(state.step)
        if step in self.all_steps():
            problem = self.problem(step)
            if problem is None:
                return False
            raise ValueError(f"cannot save step {step} in {str(self.directory)!r}: its directory exists but is not "
                             f"a valid checkpoint ({problem}); move it away")
        latest = self.latest_step()
        if latest is not None and step < latest:
            raise ValueError(f"cannot save step {step} in {str(self.directory)!r}: it already holds the newer "
                             f"step {latest}. Resume from it, or use another directory.")
        kind, payload = _rng_kind(state.rng), _payload(state)
        impl = str(jax.random.key_impl(state.rng)) if kind == "typed" else None
        meta = {"format": FORMAT, "step": step, "rng_kind": kind, "rng_impl": impl,
                "manifest": _manifest(payload), "base_ref": self.base_ref,
                "base_fingerprint": None if base is None else base_fingerprint(base)}
        self.directory.mkdir(parents=True, exist_ok=True)
        with _interrupts_deferred():
            self._manager.save(step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(payload),
                                                                 _META: ocp.args.JsonSave(meta)}),
                               force=True)   # orbax would skip, silently, a step older than an invalid newer one
            self._manager.wait_until_finished()
        return True

    def _existing(self, step: int | None) -> int:
        """``step`` if it is valid, else the newest valid step when ``step`` is None; else a clear error."""
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {str(self.directory)!r}")
        if step is None:
            newest, skipped = self._newest_valid(steps)
            if newest is None:
                raise FileNotFoundError(f"no valid checkpoint in {str(self.directory)!r}: {'; '.join(skipped)}")
            return newest
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} in {str(self.directory)!r}; saved steps: {steps}")
        problem = self.problem(step)
        if problem is not None:
            raise ValueError(f"checkpoint step {step} in {str(self.directory)!r} cannot be restored: {problem}")
        return step

    def _read_meta(self, step: int):
        return self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]

    def metadata(self, step: int | None = None) -> dict:
        """The JSON saved with a step (the latest valid by default): ``base_ref``, ``base_fingerprint``, ..."""
        return self._read_meta(self._existing(step))

    def restore(self, like: TrainState, *, step: int | None = None, base=None) -> TrainState:
        """Reads a saved state into the structure of ``like``.

        ``like`` supplies the tree structure (so optax's state classes come back
        as themselves), and each leaf's shape, dtype and sharding, which must
        match what was saved: nothing is cast. Its values are not used (its
        leaves may be ``jax.ShapeDtypeStruct``). The arrays come back placed
        on ``like``'s shardings (the default device for a leaf without one),
        i.e. committed: a step jitted on uncommitted arrays compiles once more.

        Args:
          like: a state of the same structure, e.g. a freshly initialised one.
          step: the step to restore; by default the newest valid one (newer
            invalid steps are skipped with a warning naming each and why).
          base: the base params to be used with the adapters; if given, they
            must match the fingerprint recorded at save time.

        Returns:
          The saved :class:`TrainState`; ``step`` is a Python int if ``like.step``
          is an integer, else an array of its dtype, and ``rng`` is a typed key
          again if a typed key was saved.

        Raises:
          FileNotFoundError: no checkpoint (of that step), or no valid one, in the directory.
          ValueError: ``like`` or ``base`` does not match the checkpoint (the
            message names the first differing path), or the given ``step`` is
            not valid.
        """
        step = self._existing(step)
        meta = self.metadata(step)
        where = f"checkpoint step {step} in {str(self.directory)!r}"
        if base is not None:
            self._check_base(meta, base, where)
        kind = _rng_kind(like.rng)
        if kind != meta["rng_kind"]:
            raise ValueError(f"{where}: 'rng' was saved as {meta['rng_kind'] or 'None'} key, "
                             f"but like.rng is {kind or 'None'}")
        target = jax.tree.map(_abstract, _payload(like))
        problem = _first_difference(meta["manifest"], _manifest(target))
        if problem is not None:
            raise ValueError(f"{where} does not fit `like`: {problem}")
        arrays = self._manager.restore(step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)}))
        arrays = arrays[_STATE]
        rng = arrays.get("rng")
        if meta["rng_kind"] == "typed":
            rng = jax.random.wrap_key_data(rng, impl=meta["rng_impl"])
        as_int = isinstance(like.step, (int, np.integer))
        step_value = step if as_int else jnp.asarray(step, _describe(like.step)[1])
        return TrainState(arrays["lora"], arrays["opt_state"], step_value, rng)

    @staticmethod
    def _check_base(meta: dict, base, where: str) -> None:
        expected = meta["base_fingerprint"]
        ref = f" (base_ref {meta['base_ref']!r})" if meta.get("base_ref") else ""
        if expected is None:
            raise ValueError(f"{where} was saved without a base fingerprint{ref}, so `base` cannot be checked; "
                             "pass base=None to restore without the check")
        problem = _first_difference(expected, base_fingerprint(base))
        if problem is not None:
            raise ValueError(f"the base params differ from the base of {where}{ref}: {problem}")
