"""Learning against forgetting: fine-tuning methods compared at equal learning, over seeds (NumPy only).

Every evaluation of a run is one point of its *trajectory*: how far the
held-out loss on the target (the new dialect) has fallen since step 0, and how
far the held-out loss on the source (the base language) has risen. A method
that learns less in the same steps will usually also forget less, so two
runs' final losses cannot tell "forgets less" from "learns less"; their
trajectories can, compared at the same target loss.

Matching. A run *reaches* a target loss when its held-out target loss falls
to that level at an evaluation. Its forgetting there is interpolated linearly
between the two evaluations around the first crossing; a level a run never
reached has no value: nothing is extrapolated. A method with several runs per
seed (learning rates) takes at each level the least forgetting among its runs
that reached it (its frontier). Methods are compared at the deepest target
loss that every seed of each compared method reached; when their ranges share
no level below the start, the verdict says so and compares nothing.

Seed noise (the rule, :func:`beyond_noise`). With one seed the spread is
unknown and the verdict says the numbers come from one seed. With ``n >= 2``
seeds, a difference is *beyond seed noise* when the two methods' ranges over
seeds do not overlap: every seed of one forgot less than every seed of the
other. If seeds merely shuffled the values, that would happen by chance with
probability ``2 / C(2n, n)`` (1 in 10 for 3 seeds), so it is a modest bar.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["Comparison", "Trajectory", "beyond_noise", "common_level", "compare", "forgetting_per_seed", "frontier_at",
           "group", "levels_table", "lowest_per_seed", "reach_verdict", "spread_text"]


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """One run's evaluations: held-out target and source losses at each evaluated step (the first is step 0).

    >>> t = Trajectory.from_curve("full", [(0, 2.0, 1.0), (10, 1.5, 1.25), (20, 1.0, 1.5)])
    >>> t.learned.tolist(), t.forgot.tolist()
    ([0.0, 0.5, 1.0], [0.0, 0.25, 0.5])
    >>> t.forgetting_at(1.25), t.forgetting_at(0.75)
    (0.375, nan)
    """

    method: str
    steps: np.ndarray
    target: np.ndarray
    source: np.ndarray
    seed: int = 0
    lr: float | None = None

    @classmethod
    def from_curve(cls, method: str, curve: Sequence[Sequence[float]], *, seed: int = 0,
                   lr: float | None = None) -> Trajectory:
        """From ``(step, target loss, source loss)`` rows, as the demo's ``Run.curve`` holds them.

        Rows from the first non-finite loss on are dropped (a diverged run keeps what it measured before).
        """
        rows = np.asarray(curve, dtype=np.float64).reshape(-1, 3)
        bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
        rows = rows[:bad[0]] if len(bad) else rows
        if len(rows) == 0:
            raise ValueError(f"trajectory of {method!r}: no finite evaluations")
        return cls(method, rows[:, 0].astype(int), rows[:, 1], rows[:, 2], seed, lr)

    def to_dict(self) -> dict:
        return {"method": self.method, "seed": self.seed, "lr": self.lr, "steps": self.steps.tolist(),
                "target": self.target.tolist(), "source": self.source.tolist()}

    @property
    def learned(self) -> np.ndarray:
        """Fall of the target loss since step 0, per evaluation."""
        return self.target[0] - self.target

    @property
    def forgot(self) -> np.ndarray:
        """Rise of the source loss since step 0, per evaluation."""
        return self.source - self.source[0]

    @property
    def deepest(self) -> float:
        """The lowest target loss evaluated."""
        return float(np.min(self.target))

    def forgetting_at(self, level: float) -> float:
        """The forgetting when the target loss first fell to ``level`` (linear between evaluations); NaN if never."""
        hits = np.flatnonzero(self.target <= level)
        if len(hits) == 0:
            return float("nan")
        i = int(hits[0])
        if i == 0:
            return float(self.forgot[0])
        t = (self.target[i - 1] - level) / (self.target[i - 1] - self.target[i])
        return float(self.forgot[i - 1] + t * (self.forgot[i] - self.forgot[i - 1]))


Groups = Mapping[str, Mapping[int, Sequence[Trajectory]]]


def group(trajectories: Sequence[Trajectory]) -> dict[str, dict[int, list[Trajectory]]]:
    """``{method: {seed: [runs]}}``, methods and seeds in order of first appearance.

    >>> runs = [Trajectory.from_curve(m, [(0, 2.0, 1.0)], seed=s) for m in ("a", "b") for s in (3, 1)]
    >>> {m: sorted(seeds) for m, seeds in group(runs).items()}
    {'a': [1, 3], 'b': [1, 3]}
    """
    out: dict[str, dict[int, list[Trajectory]]] = {}
    for t in trajectories:
        out.setdefault(t.method, {}).setdefault(t.seed, []).append(t)
    return out


def frontier_at(runs: Sequence[Trajectory], level: float) -> float:
    """The least forgetting at ``level`` among ``runs`` that reached it; NaN if none did.

    >>> a = Trajectory.from_curve("x", [(0, 2.0, 1.0), (5, 1.0, 1.5)])
    >>> b = Trajectory.from_curve("x", [(0, 2.0, 1.0), (5, 1.5, 1.125)])
    >>> frontier_at([a, b], 1.5), frontier_at([a, b], 1.25)
    (0.125, 0.375)
    """
    values = [r.forgetting_at(level) for r in runs]
    finite = [v for v in values if np.isfinite(v)]
    return min(finite) if finite else float("nan")


def forgetting_per_seed(seeds: Mapping[int, Sequence[Trajectory]], level: float) -> np.ndarray:
    """Per seed (in seed order), the frontier's forgetting at ``level`` (NaN where that seed never reached it).

    >>> runs = [Trajectory.from_curve("a", [(0, 2.0, 1.0), (5, 2.0 - d, 1.5)], seed=s)
    ...         for s, d in ((0, 1.0), (1, 0.25))]
    >>> forgetting_per_seed(group(runs)["a"], 1.5).tolist(), lowest_per_seed(group(runs)["a"]).tolist()
    ([0.25, nan], [1.0, 1.75])
    """
    return np.array([frontier_at(runs, level) for _, runs in sorted(seeds.items())])


def lowest_per_seed(seeds: Mapping[int, Sequence[Trajectory]]) -> np.ndarray:
    """Per seed (in seed order), the lowest target loss any of that seed's runs reached.

    See :func:`forgetting_per_seed` for an example.
    """
    return np.array([min(r.deepest for r in runs) for _, runs in sorted(seeds.items())])


def _start(groups: Groups, methods: Sequence[str]) -> float:
    return min(float(r.target[0]) for m in methods for runs in groups[m].values() for r in runs)


def common_level(groups: Groups, methods: Sequence[str]) -> float | None:
    """The deepest target loss every seed of every method reached; None if that is not below the start.

    >>> a = Trajectory.from_curve("a", [(0, 2.0, 1.0), (5, 1.5, 1.5)])
    >>> b = Trajectory.from_curve("b", [(0, 2.0, 1.0), (5, 2.5, 1.5)])
    >>> common_level(group([a, b]), ["a"]), common_level(group([a, b]), ["a", "b"])
    (1.5, None)
    """
    level = max(float(np.max(lowest_per_seed(groups[m]))) for m in methods)
    return level if level < _start(groups, methods) else None


def beyond_noise(a: np.ndarray, b: np.ndarray) -> bool | None:
    """Whether per-seed values ``a`` and ``b`` differ beyond seed noise (ranges apart); None with < 2 seeds each.

    >>> beyond_noise(np.array([0.1, 0.2, 0.15]), np.array([0.3, 0.25, 0.4])), beyond_noise(np.ones(1), np.zeros(1))
    (True, None)
    """
    if min(len(a), len(b)) < 2:
        return None
    return bool(np.max(a) < np.min(b) or np.max(b) < np.min(a))


def spread_text(values: np.ndarray, fmt: str = ".3f") -> str:
    """``"0.300"`` for one value; ``"0.300 (0.250 to 0.350, 3 seeds)"``: the mean and the range over seeds.

    >>> spread_text(np.array([0.25, 0.3, 0.35]))
    '0.300 (0.250 to 0.350, 3 seeds)'
    """
    if len(values) == 1:
        return format(float(values[0]), fmt)
    return f"{np.mean(values):{fmt}} ({np.min(values):{fmt}} to {np.max(values):{fmt}}, {len(values)} seeds)"


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Method ``a`` against reference ``b`` at equal learning (see :func:`compare`).

    Attributes:
      start: the target loss at step 0.
      deepest_a, deepest_b: per seed, the lowest target loss of each method.
      level: the matched target loss; None when the methods share no level below ``start``.
      forgot_a, forgot_b: per seed, each method's forgetting at ``level`` (empty without one).
    """

    a: str
    b: str
    start: float
    deepest_a: np.ndarray
    deepest_b: np.ndarray
    level: float | None
    forgot_a: np.ndarray
    forgot_b: np.ndarray

    @property
    def difference(self) -> np.ndarray:
        """Per seed, ``a``'s forgetting minus ``b``'s at ``level`` (negative: ``a`` forgot less)."""
        return self.forgot_a - self.forgot_b

    @property
    def outcome(self) -> str:
        """``"unmatched"``, ``"one seed"``, ``"within noise"``, ``"less"`` or ``"more"`` (``a`` than ``b``)."""
        if self.level is None:
            return "unmatched"
        beyond = beyond_noise(self.forgot_a, self.forgot_b)
        if beyond is None:
            return "one seed"
        return ("less" if np.mean(self.difference) < 0 else "more") if beyond else "within noise"

    def sentence(self, target: str = "target", source: str = "source", unit: str = "nats/byte") -> str:
        """The verdict in words, every number in it measured; see :func:`compare` for an example."""
        if self.level is None:
            return self._unmatched(target)
        d = self.difference
        way = "less" if np.mean(d) < 0 else "more" if np.mean(d) > 0 else "as much"
        text = (f"At equal {target} loss ({self.level:.3f} {unit}, the most learning every run of both reached), "
                f"{self.a} forgot {abs(np.mean(d)):.3f} {unit} {way} {source} than {self.b}")
        if len(d) == 1:
            text += (f" ({self.a} +{self.forgot_a[0]:.3f}, {self.b} +{self.forgot_b[0]:.3f}); this is one seed, "
                     f"so seed noise is not measured.")
        else:
            ranges = (f"{self.a} {np.min(self.forgot_a):.3f} to {np.max(self.forgot_a):.3f}, {self.b} "
                      f"{np.min(self.forgot_b):.3f} to {np.max(self.forgot_b):.3f}")
            judged = ("beyond seed noise (their ranges over seeds do not overlap: " if self.outcome != "within noise"
                      else "no difference beyond seed noise (their ranges over seeds overlap: ")
            text += f" (mean of {len(d)} seeds; per seed {np.min(d):+.3f} to {np.max(d):+.3f}): {judged}{ranges})."
        return text + self._further(target)

    def _unmatched(self, target: str) -> str:
        stuck = [m for m, deep in ((self.a, self.deepest_a), (self.b, self.deepest_b)) if np.max(deep) >= self.start]
        return (f"No common level of learning: {' and '.join(stuck)} did not bring the {target} loss below its start "
                f"({self.start:.3f}) in every run, so forgetting is not compared at equal learning (nothing is "
                f"extrapolated). Lowest {target} loss: {self.a} {np.min(self.deepest_a):.3f}, {self.b} "
                f"{np.min(self.deepest_b):.3f}.")

    def _further(self, target: str) -> str:
        mean_a, mean_b = float(np.mean(self.deepest_a)), float(np.mean(self.deepest_b))
        if mean_a == mean_b:
            return ""
        further, other = (self.a, self.b) if mean_a < mean_b else (self.b, self.a)
        return (f" {further[0].upper()}{further[1:]} learned more in the same steps (lowest {target} loss "
                f"{min(mean_a, mean_b):.3f} vs {max(mean_a, mean_b):.3f}); below {self.level:.3f} the runs of {other} "
                f"have no points, so nothing is said there.")

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "start": self.start, "level": self.level, "outcome": self.outcome,
                "deepest_a": self.deepest_a.tolist(), "deepest_b": self.deepest_b.tolist(),
                "forgot_a": self.forgot_a.tolist(), "forgot_b": self.forgot_b.tolist()}


def compare(groups: Groups, a: str, b: str) -> Comparison:
    """Methods ``a`` and ``b`` (keys of :func:`group`) at the deepest target loss every seed of both reached.

    >>> full = Trajectory.from_curve("full", [(0, 2.0, 1.0), (10, 1.0, 2.0)])
    >>> lora = Trajectory.from_curve("LoRA", [(0, 2.0, 1.0), (10, 1.5, 1.25)])
    >>> c = compare(group([full, lora]), "LoRA", "full")
    >>> c.level, c.forgot_a.tolist(), c.forgot_b.tolist()
    (1.5, [0.25], [0.5])
    >>> c.sentence("code", "prose")[:100]
    'At equal code loss (1.500 nats/byte, the most learning every run of both reached), LoRA forgot 0.250'
    """
    if sorted(groups[a]) != sorted(groups[b]):
        raise ValueError(f"compare: {a!r} has seeds {sorted(groups[a])}, {b!r} has {sorted(groups[b])}")
    deep_a, deep_b = lowest_per_seed(groups[a]), lowest_per_seed(groups[b])
    start, level = _start(groups, (a, b)), common_level(groups, (a, b))
    if level is None:
        return Comparison(a, b, start, deep_a, deep_b, None, np.zeros(0), np.zeros(0))
    forgot_a, forgot_b = forgetting_per_seed(groups[a], level), forgetting_per_seed(groups[b], level)
    return Comparison(a, b, start, deep_a, deep_b, level, forgot_a, forgot_b)


def _cell(values: np.ndarray) -> str:
    reached = np.isfinite(values)
    if reached.all():
        return "+" + spread_text(values)
    return "not reached" if not reached.any() else f"not reached ({int(reached.sum())}/{len(values)} seeds)"


def levels_table(groups: Groups, methods: Sequence[str], *, n: int = 5, unit: str = "nats/byte") -> str:
    """Markdown: each method's forgetting at ``n`` target losses from the start to the deepest one method reached.

    A cell says "not reached" where some seed never got there (nothing is extrapolated).

    >>> full = Trajectory.from_curve("full", [(0, 2.0, 1.0), (10, 1.0, 2.0)])
    >>> lora = Trajectory.from_curve("LoRA", [(0, 2.0, 1.0), (10, 1.5, 1.25)])
    >>> print(levels_table(group([full, lora]), ["full", "LoRA"], n=2))
    | target loss (nats/byte) | learned | forgetting: full | forgetting: LoRA |
    |---|---|---|---|
    | 1.500 | 0.500 | +0.500 | +0.250 |
    | 1.000 | 1.000 | +1.000 | not reached |
    """
    start = _start(groups, methods)
    floor = min(float(np.max(lowest_per_seed(groups[m]))) for m in methods)
    rows = []
    for level in np.linspace(start, floor, n + 1)[1:] if floor < start else []:
        cells = [_cell(forgetting_per_seed(groups[m], level)) for m in methods]
        rows.append(f"| {level:.3f} | {start - level:.3f} | " + " | ".join(cells) + " |")
    header = f"| target loss ({unit}) | learned | " + " | ".join(f"forgetting: {m}" for m in methods) + " |"
    return "\n".join([header, "|" + "---|" * (len(methods) + 2), *rows])


def reach_verdict(groups: Groups, methods: Sequence[str], level: float, level_name: str, *,
                  target: str = "target", unit: str = "nats/byte") -> str:
    """Which ``methods`` reached the target loss ``level`` in every seed, and what each forgot there.

    >>> runs = [Trajectory.from_curve(f"r={r}", [(0, 2.0, 1.0), (10, 2.0 - d, 1.0 + d)])
    ...         for r, d in ((1, 0.4), (4, 1.0))]
    >>> text = reach_verdict(group(runs), ["r=1", "r=4"], 1.2, "the goal", target="code")
    >>> text.split(" Did not ")
    ['At the goal (1.200 nats/byte): r=4 reached it and forgot +0.800 there.', 'reach it in every seed: r=1 (lowest code loss 1.600).']
    """
    start = _start(groups, methods)
    if not level < start:
        return (f"{level_name[0].upper()}{level_name[1:]} ({level:.3f} {unit}) is not below the start "
                f"({start:.3f}): there is no learning to match there, so nothing is compared at it.")
    reached = [m for m in methods if np.max(lowest_per_seed(groups[m])) <= level]
    missed = [m for m in methods if m not in reached]
    forgot = {m: forgetting_per_seed(groups[m], level) for m in reached}
    text = f"At {level_name} ({level:.3f} {unit}): "
    if reached:
        text += "; ".join(f"{m} reached it and forgot +{spread_text(forgot[m])}" for m in reached) + " there."
    else:
        text += "no run reached it."
    best = min(reached, key=lambda m: np.mean(forgot[m]), default=None)
    worst = max(reached, key=lambda m: np.mean(forgot[m]), default=None)
    if best is not None and np.mean(forgot[best]) < np.mean(forgot[worst]):
        judged = {None: "one seed, so seed noise is not measured", True: "beyond seed noise",
                  False: "within seed noise"}[beyond_noise(forgot[best], forgot[worst])]
        text += (f" Least forgetting: {best}, {np.mean(forgot[worst]) - np.mean(forgot[best]):.3f} {unit} less than "
                 f"{worst} ({judged}).")
    if missed:
        text += " Did not reach it in every seed: " + ", ".join(
            f"{m} (lowest {target} loss {np.min(lowest_per_seed(groups[m])):.3f})" for m in missed) + "."
    return text
