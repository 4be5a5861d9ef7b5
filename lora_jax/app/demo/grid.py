"""``lora-jax demo --study``: the grid of runs behind the demo's verdict on forgetting.

The default demo compares one full fine-tune with one LoRA run, one seed, one
learning rate each. The study trains, on the same base model and data
(``--study-steps`` steps of ``--batch-size`` x ``--seq-len`` bytes,
evaluated every ``--study-eval-every`` steps; by default 40 and 10, half the
demo's 80 steps with as many evaluations, so that the 54 runs take about 15
minutes on 2 idle CPU cores instead of 30):

* the arms (:func:`arms`): full fine-tuning; LoRA at ranks 1, 4, 16 and 64
  on every attention and MLP projection; LoRA rank 16 on attention only.
  ``alpha = 2 * rank``: the scale is 2 at every rank, as the demo's rank 8,
  alpha 16, so a learning rate means the same at every rank;
* each at 3 learning rates (:data:`LR_FACTORS` times the demo's
  ``--lr-full`` or ``--lr-lora``) and ``--study-seeds`` seeds (``--seed``,
  ``--seed + 1``, ...; a seed fixes the batches, the same for every arm,
  and the adapter's init);
* and two adapters, one on prose and one on the dialect's sibling corpus
  (code), with :func:`lora_jax.app.demo.study.interference_study` (what
  ``lora-jax interference --corpora prose code`` runs), at the demo's rank.

One compiled step serves all learning rates of an arm (the rate lives in the
optimizer state, ``optax.inject_hyperparams``), and every evaluation runs the
plain model, with a LoRA adapter merged in. Before the grid starts, each arm's
step is compiled and timed and the whole study's time is estimated from that.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as L
from lora_jax.app.demo import data, study
from lora_jax.app.demo.frontier import Trajectory
from lora_jax.io.progress import loss_progress
from lora_jax.models import causal_lm_loss

#: The learning rates of each arm: these factors times the demo's rate of the method.
LR_FACTORS = (0.3, 1.0, 3.0)
#: LoRA ranks on every attention and MLP projection.
RANKS = (1, 4, 16, 64)
#: The rank of the attention-only arm (compared with the same rank on every projection).
ATTENTION_RANK = 16
ALPHA_PER_RANK = 2.0
FULL = "full fine-tuning"


@dataclasses.dataclass(frozen=True)
class Arm:
    """One way of training: full fine-tuning (``rank`` None) or LoRA of ``rank`` on ``targets``."""

    method: str
    rank: int | None = None
    targets: tuple = ("attention", "mlp")

    def config(self) -> L.LoraConfig:
        return L.LoraConfig(rank=self.rank, alpha=ALPHA_PER_RANK * self.rank, targets=self.targets)


def arms(ranks=None, attention_rank: int | None = None) -> list[Arm]:
    """Full fine-tuning, LoRA at each of ``ranks`` on all projections, and ``attention_rank`` on attention only.

    The defaults are :data:`RANKS` and :data:`ATTENTION_RANK`, read when called.

    >>> [a.method for a in arms((1, 4), 4)]
    ['full fine-tuning', 'LoRA r=1', 'LoRA r=4', 'LoRA r=4 attention only']
    """
    ranks, attention_rank = ranks or RANKS, attention_rank or ATTENTION_RANK
    return [Arm(FULL), *(Arm(f"LoRA r={r}", r) for r in ranks),
            Arm(f"LoRA r={attention_rank} attention only", attention_rank, ("attention",))]


@dataclasses.dataclass
class Study:
    """What :func:`run_study` measured: one :class:`Trajectory` per (arm, learning rate, seed), and context.

    ``reference_lr`` is each arm's middle rate (the demo's); ``goal`` the
    held-out dialect loss full fine-tuning reached at its demo rate (mean over
    seeds): the level the rank verdict asks each rank to reach.
    """

    trajectories: list
    arms: list
    lrs: dict
    seeds: tuple
    steps: int
    trainable: dict
    step_s: dict
    estimate_s: float
    wall_s: float = 0.0
    diverged: list = dataclasses.field(default_factory=list)
    interference: object = None
    description: str = ""

    def to_dict(self) -> dict:
        return {"format": "lora_jax.app.demo.grid/1", "description": self.description,
                "arms": [dataclasses.asdict(a) for a in self.arms], "lrs": self.lrs, "seeds": list(self.seeds),
                "steps": self.steps, "trainable": self.trainable, "step_s": self.step_s,
                "estimate_s": self.estimate_s, "wall_s": self.wall_s, "diverged": self.diverged, "goal": self.goal,
                "trajectories": [t.to_dict() for t in self.trajectories],
                "interference": None if self.interference is None else self.interference.to_dict()}

    @property
    def reference_lr(self) -> dict:
        return {method: lrs[len(lrs) // 2] for method, lrs in self.lrs.items()}

    @property
    def goal(self) -> float:
        lr = self.reference_lr[FULL]
        return float(np.mean([t.target[-1] for t in self.trajectories if t.method == FULL and t.lr == lr]))


def _next_token_loss(model, ids):
    return causal_lm_loss(model(ids), ids)


def _optimizer(lr: float):
    return optax.inject_hyperparams(optax.adamw)(learning_rate=lr)


class _Trainer:
    """One arm's compiled step (any learning rate), its initial state per seed, and its evaluation params."""

    def __init__(self, arm: Arm, model, base, batch0):
        self.arm, self.base = arm, base
        if arm.rank is None:
            step = L.make_full_train_step(lambda p, *a: model.apply({"params": p}, *a), _next_token_loss,
                                          _optimizer(1.0))
            self.consts = ()
        else:
            self.cfg = arm.config()
            self._model, self._batch0, self._inits = model, batch0, {}
            self._merge = jax.jit(functools.partial(L.merge, config=self.cfg))
            step = L.make_train_step(L.lora_apply(model, self.cfg), _next_token_loss, _optimizer(1.0))
            self.consts = (base,)
        params, opt_state = self.init(0, 1.0)
        self.trainable = L.count_params(params)
        self.step = step.lower(params, opt_state, *self.consts, batch0).compile()

    def init(self, seed: int, lr: float) -> tuple:
        if self.arm.rank is None:
            params = jax.tree.map(jnp.array, self.base)   # a copy: the step donates it
        else:   # the init depends on the seed alone: traced once per seed, copied for each rate (the step donates it)
            if seed not in self._inits:
                self._inits[seed] = L.init_lora(self._model, self.base, self.cfg, self._batch0,
                                                rng=jax.random.key(seed))
            params = jax.tree.map(jnp.array, self._inits[seed])
        return params, _optimizer(lr).init(params)

    def eval_params(self, params):
        return params if self.arm.rank is None else self._merge(self.base, params)

    def time_step(self, batch, repeats: int = 3) -> float:
        """Median seconds of one step (after one untimed call)."""
        state, times = self.init(0, 0.0), []
        for i in range(repeats + 1):
            start = time.perf_counter()
            *state, metrics = self.step(*state, *self.consts, batch)
            float(metrics["loss"])
            times.append(time.perf_counter() - start)
        return float(np.median(times[1:]))


def _train(trainer: _Trainer, lr: float, seed: int, args, dialect, evaluate: Callable, before: tuple,
           bar) -> tuple[Trajectory, bool]:
    """One run: ``(its trajectory, whether it diverged)``; a diverged run keeps the evaluations before it."""
    batches = data.train_batches(dialect.train, seq_len=args.seq_len, batch_size=args.batch_size, seed=seed)
    params, opt_state = trainer.init(seed, lr)
    curve = [(0, *before)]
    for i in range(1, args.study_steps + 1):
        params, opt_state, metrics = trainer.step(params, opt_state, *trainer.consts, jnp.asarray(next(batches)))
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            bar.advance(steps=args.study_steps - i + 1)
            return Trajectory.from_curve(trainer.arm.method, curve, seed=seed, lr=lr), True
        if i % args.study_eval_every == 0 or i == args.study_steps:
            curve.append((i, *evaluate(trainer.eval_params(params))))
        bar.advance(loss)
    return Trajectory.from_curve(trainer.arm.method, curve, seed=seed, lr=lr), False


def _seconds(fn: Callable) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _estimate(args, step_s: dict, lrs: dict, seeds: tuple, eval_s: float, compile_s: float) -> float:
    """Seconds the grid and the interference study will take, from the timed steps and evaluation."""
    steps, every = args.study_steps, args.study_eval_every
    evals = steps // every + (steps % every != 0)
    grid = sum(len(lrs[m]) * len(seeds) * (steps * s + evals * eval_s) for m, s in step_s.items())
    lora = [m for m in step_s if m != FULL]
    interference = 2 * (steps * float(np.mean([step_s[m] for m in lora])) + compile_s) + 4 * eval_s
    return grid + interference


def describe(study_: Study, args) -> str:
    """One line: what the grid trains.

    >>> from types import SimpleNamespace as S
    >>> s = Study([], arms((1,), 1), {"a": (1, 2, 3)}, (0, 1), 10, {}, {}, 0.0)
    >>> describe(s, S(rank=8))
    '3 arms x 3 learning rates x 2 seeds = 18 runs of 10 steps, then 2 adapters (prose, code; rank 8) for interference'
    """
    n_lrs = len(next(iter(study_.lrs.values())))
    runs = len(study_.arms) * n_lrs * len(study_.seeds)
    return (f"{len(study_.arms)} arms x {n_lrs} learning rates x {len(study_.seeds)} seeds = {runs} runs of "
            f"{study_.steps} steps, then 2 adapters (prose, code; rank {args.rank}) for interference")


def _prepare(args, model, base, batch0, evaluate: Callable) -> tuple[dict, Study, float]:
    """Compiles and times each arm; returns the trainers, an empty :class:`Study` and the seconds per evaluation."""
    grid = arms()
    compile_s, trainers = {}, {}
    for arm in grid:
        start = time.perf_counter()
        trainers[arm.method] = _Trainer(arm, model, base, batch0)
        compile_s[arm.method] = time.perf_counter() - start
    step_s = {m: t.time_step(batch0) for m, t in trainers.items()}
    eval_s = _seconds(lambda: evaluate(base))
    lrs = {a.method: tuple(f * (args.lr_full if a.rank is None else args.lr_lora) for f in LR_FACTORS) for a in grid}
    seeds = tuple(args.seed + i for i in range(args.study_seeds))
    estimate = _estimate(args, step_s, lrs, seeds, eval_s, float(np.mean(list(compile_s.values()))))
    trainable = {m: t.trainable for m, t in trainers.items()}
    return trainers, Study([], grid, lrs, seeds, args.study_steps, trainable, step_s, estimate), eval_s


def run_study(args, model, base, dialect, evaluate: Callable, before: tuple, *, show: bool,
              say: Callable[[str], None] = print) -> Study:
    """Trains the grid (module docstring) and the two interference adapters; returns the :class:`Study`.

    ``evaluate(params) -> (dialect loss, base-language loss)`` on the held-out
    sets; ``before`` is its value for ``base``. ``args`` are the demo's flags.
    """
    started = time.perf_counter()
    batch0 = jnp.asarray(next(data.train_batches(dialect.train, seq_len=args.seq_len, batch_size=args.batch_size,
                                                 seed=args.seed)))
    trainers, result, _ = _prepare(args, model, base, batch0, evaluate)
    result.description = describe(result, args)
    say(f"      {result.description}: about {result.estimate_s / 60:.1f} min "
        f"(estimated from each arm's timed step)")
    runs = [(arm, lr, seed) for arm in result.arms for lr in result.lrs[arm.method] for seed in result.seeds]
    with loss_progress(len(runs) * args.study_steps, "study", enabled=show) as bar:
        for k, (arm, lr, seed) in enumerate(runs, start=1):
            traj, diverged = _train(trainers[arm.method], lr, seed, args, dialect, evaluate, before, bar)
            result.trajectories.append(traj)
            if diverged:
                result.diverged.append(f"{arm.method}, lr {lr:.3g}, seed {seed}")
            bar.print(f"      [{k}/{len(runs)}] {arm.method}, lr {lr:.3g}, seed {seed}: {dialect.name} "
                      f"{traj.target[-1]:.3f}, prose {traj.forgot[-1]:+.3f}" + (" (diverged)" if diverged else ""))
    result.interference = study.interference_study(
        ("prose", "code"), rank=args.rank, alpha=args.alpha, steps=args.study_steps,
        lr=args.lr_lora * args.alpha / args.rank, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
        show_progress=show)
    result.wall_s = time.perf_counter() - started
    return result
