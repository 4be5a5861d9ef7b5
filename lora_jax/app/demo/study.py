"""Two measured studies of LoRA: what rank buys, and how adapters trained on different data interfere.

``sweep_ranks`` and ``measure_interference`` are the generic cores: they take a
``train(config) -> lora`` and evaluation callables, so they run on any model.
``rank_sweep`` and ``interference_study`` run them on the demo's shipped base
(a byte-level Llama that knows English prose) and corpora built from the
Python installation (nothing is downloaded):

* rank sweep: the base learns Python source at ranks 1 ... 64 with the same
  steps, batches, learning rate and seed. ``alpha = 2 * rank`` by default, so
  the scale ``alpha / rank`` is 2 at every rank: the update ``scale * A @ B``
  starts from the same size and the learning rate means the same thing at each
  rank, and only the rank differs between the runs. Per rank: held-out loss on
  code (learning) and on prose (forgetting), trainable parameters, and from
  the trained deltas' spectra the mean effective rank and the (median over
  layers) rank holding 90% of the energy.
* interference: one adapter per corpus (prose, code, "shout" = prose in
  capitals), same config; the mean subspace overlap of every pair (input side,
  over layers) and the functional matrix: held-out loss on each adapter's own
  corpus alone and with each other adapter added.

Held-out losses are measured with the adapter merged into the weights
(``W + scale * A @ B``, exact), so one compiled forward serves every rank and
every combination.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax import analysis
from lora_jax.config import LoraConfig
from lora_jax.app.demo import data, pretrain
from lora_jax.app.demo.options import CORPORA, DEFAULT_RANKS
from lora_jax.io.progress import loss_progress
from lora_jax.linen import init_lora, lora_apply
from lora_jax.models.llama import causal_lm_loss
from lora_jax.multi import Adapter
from lora_jax.train import make_train_step
from lora_jax.tree import count_params, merge

TARGETS = ("attention", "mlp")
ENERGY = 0.9

__all__ = ["CORPORA", "DEFAULT_RANKS", "DemoTask", "InterferenceStudy", "RankSweep", "SweepRow", "demo_corpora",
           "interference_study", "measure_interference", "rank_sweep", "sweep_ranks"]


# ---------------------------------------------------------------------------- generic cores

@dataclasses.dataclass(frozen=True)
class SweepRow:
    """One rank's measurements.

    Attributes:
      rank, alpha: the adapter's config.
      trainable: the adapter's parameter count.
      losses: ``{evaluation name: held-out loss}``.
      mean_effective_rank: the effective rank (``exp`` of the entropy of
        ``sigma / sum sigma``) of each layer's delta, averaged over layers.
      energy_rank: the median over layers of the smallest rank holding
        ``RankSweep.energy`` of the delta's squared Frobenius norm.
    """

    rank: int
    alpha: float
    trainable: int
    losses: dict
    mean_effective_rank: float
    energy_rank: float


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _pyplot():
    import matplotlib   # deferred: optional (the app extra) and slow to import, only when a figure is drawn

    matplotlib.use("Agg")   # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    return plt


@dataclasses.dataclass
class RankSweep:
    """The result of :func:`sweep_ranks`: one :class:`SweepRow` per rank, plus context.

    Attributes:
      rows: per rank, in the order run.
      baseline: ``{evaluation name: loss}`` of the base model without adapter
        (empty if not measured).
      total_params: the base model's parameter count (0 if unknown).
      energy: the energy threshold of ``SweepRow.energy_rank``.
      settings: how the runs were made (steps, lr, ...), for the record.
    """

    rows: list
    baseline: dict = dataclasses.field(default_factory=dict)
    total_params: int = 0
    energy: float = ENERGY
    settings: dict = dataclasses.field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """The evaluations, in the order of the first row."""
        return list(self.rows[0].losses) if self.rows else []

    def markdown(self) -> str:
        """The table: one line per rank; losses with their change from the base model in brackets.

        >>> r = RankSweep([SweepRow(1, 2.0, 10, {"code": 1.5}, 1.0, 1.0)], baseline={"code": 2.0}, total_params=1000)
        >>> print(r.markdown())
        base model: code 2.0000
        <BLANKLINE>
        | rank | alpha | trainable params | code loss (vs base) | mean eff. rank | rank for 90% energy (median) |
        |---|---|---|---|---|---|
        | 1 | 2 | 10 (1.000%) | 1.5000 (-0.5000) | 1.00 | 1 |
        """
        header = ["rank", "alpha", "trainable params"]
        header += [f"{n} loss (vs base)" if n in self.baseline else f"{n} loss" for n in self.names]
        header += ["mean eff. rank", f"rank for {100 * self.energy:g}% energy (median)"]
        rows = []
        for row in self.rows:
            share = f" ({100 * row.trainable / self.total_params:.3f}%)" if self.total_params else ""
            losses = [f"{row.losses[n]:.4f}" + (f" ({row.losses[n] - self.baseline[n]:+.4f})"
                                                  if n in self.baseline else "") for n in self.names]
            rows.append([str(row.rank), f"{row.alpha:g}", f"{row.trainable:,}{share}", *losses,
                         f"{row.mean_effective_rank:.2f}", f"{row.energy_rank:g}"])
        lead = ("base model: " + ", ".join(f"{n} {v:.4f}" for n, v in self.baseline.items()) + "\n\n"
                if self.baseline else "")
        return lead + _table(header, rows)

    def to_dict(self) -> dict:
        return {"format": "lora_jax.app.demo.study.sweep/1", "settings": self.settings, "baseline": self.baseline,
                "total_params": self.total_params, "energy": self.energy,
                "rows": [dataclasses.asdict(row) for row in self.rows]}

    def plot(self, path) -> Path:
        """Writes a PNG: held-out losses against rank and against trainable parameters (log x); returns its path."""
        plt = _pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
        ranks = [r.rank for r in self.rows]
        params = [r.trainable for r in self.rows]
        for ax, x, label in ((axes[0], ranks, "LoRA rank"), (axes[1], params, "trainable parameters")):
            for i, name in enumerate(self.names):
                line, = ax.plot(x, [r.losses[name] for r in self.rows], "-o", markersize=4, label=name)
                if name in self.baseline:
                    ax.axhline(self.baseline[name], color=line.get_color(), linestyle=":", linewidth=1,
                               label=f"{name}, base model")
            ax.set_xscale("log", base=2 if x is ranks else 10)
            ax.set_xlabel(label)
            ax.set_ylabel("held-out loss")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0].set_title("loss vs rank")
        axes[1].set_title("loss vs trainable parameters")
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def save(self, out) -> list[Path]:
        """Writes ``sweep.md``, ``sweep.png`` and ``sweep.json`` to the folder ``out``; returns their paths."""
        return _save(Path(out), "sweep", self, "LoRA rank sweep")


def _save(out: Path, stem: str, result, title: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    png = result.plot(out / f"{stem}.png")
    md = out / f"{stem}.md"
    md.write_text(f"# {title}\n\n{result.markdown()}\n\n![{title}]({png.name})\n")
    js = out / f"{stem}.json"
    js.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return [md, png, js]


def _check_ranks(ranks: Sequence[int]) -> tuple[int, ...]:
    ranks = tuple(ranks)
    if not ranks:
        raise ValueError("rank sweep: give at least one rank")
    bad = [r for r in ranks if isinstance(r, bool) or not isinstance(r, int) or r < 1]
    if bad:
        raise ValueError(f"rank sweep: ranks must be positive ints, got {bad}")
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"rank sweep: ranks repeat: {list(ranks)}")
    return ranks


def sweep_ranks(train: Callable[[LoraConfig], Mapping], evaluate: Mapping[str, Callable[[Adapter], float]], *,
                base_params, ranks: Sequence[int] = DEFAULT_RANKS,
                config_for: Callable[[int], LoraConfig] | None = None, baseline: Mapping[str, float] | None = None,
                energy: float = ENERGY, settings: Mapping | None = None) -> RankSweep:
    """Trains one adapter per rank and measures each: losses, size, spectrum.

    Args:
      train: ``train(config) -> lora`` trains an adapter of ``config`` (same
        budget for every call is the caller's job).
      evaluate: ``{name: evaluate(adapter) -> loss}``, e.g. held-out loss on
        the task and on what the base knew before.
      base_params: the base model's params (shapes only are read).
      ranks: the ranks, in the order to run them; distinct positive ints.
      config_for: ``rank -> LoraConfig``; default ``alpha = 2 * rank`` on
        attention and MLP layers (constant scale 2: see the module docstring).
      baseline: ``{name: loss}`` of the base model, kept for the table.
      energy: the threshold of ``SweepRow.energy_rank``.
      settings: recorded in the result as is.

    Returns:
      a :class:`RankSweep`.
    """
    ranks = _check_ranks(ranks)
    config_for = config_for or (lambda r: LoraConfig(rank=r, alpha=2.0 * r, targets=TARGETS))
    rows = []
    for rank in ranks:
        config = config_for(rank)
        adapter = Adapter(config, train(config))
        spectra = analysis.spectrum(base_params, adapter).values()
        alphas = {config.alpha_for(s.name) for s in spectra}
        rows.append(SweepRow(
            rank=rank, alpha=alphas.pop() if len(alphas) == 1 else math.nan,
            trainable=count_params(adapter.lora_params),
            losses={name: float(fn(adapter)) for name, fn in evaluate.items()},
            mean_effective_rank=float(np.mean([s.effective_rank for s in spectra])),
            energy_rank=float(np.median([s.rank_for_energy(energy) for s in spectra]))))
    return RankSweep(rows, dict(baseline or {}), count_params(base_params), energy, dict(settings or {}))


@dataclasses.dataclass
class InterferenceStudy:
    """The result of :func:`measure_interference`.

    Attributes:
      names: the adapters (and their tasks), in order.
      overlap: ``[n, n]`` mean over shared layers of the subspace overlap
        (:func:`lora_jax.analysis.subspace_overlap`, ``side``) of adapters
        ``i`` and ``j``; 1 on the diagonal, symmetric.
      functional: the :class:`lora_jax.analysis.Interference` of the adapters:
        ``alone``, ``together`` and ``increase``.
      side: which side's subspaces ``overlap`` compares.
      settings: how the adapters were made, for the record.
    """

    names: tuple
    overlap: np.ndarray
    functional: analysis.Interference
    side: str = "in"
    settings: dict = dataclasses.field(default_factory=dict)

    def markdown(self) -> str:
        """Three tables: subspace overlap, loss with a second adapter added, and the increase.

        >>> f = analysis.Interference(("x", "y"), np.array([1.0, 2.0]), np.array([[1.0, 1.5], [2.25, 2.0]]))
        >>> print(*InterferenceStudy(("x", "y"), np.eye(2), f).markdown().splitlines()[-2:], sep="\\n")
        | x | - | +0.5000 |
        | y | +0.2500 | - |
        """
        names, f = self.names, self.functional
        overlap = _table(["adapter", *names], [[a, *(f"{v:.3f}" for v in row)] for a, row in zip(names, self.overlap)])
        together = _table(["task (own adapter)", "alone", *(f"+ {n}" for n in names)],
                          [[a, f"{f.alone[i]:.4f}", *(("-" if i == j else f"{v:.4f}") for j, v in enumerate(row))]
                           for i, (a, row) in enumerate(zip(names, f.together))])
        increase = _table(["task (own adapter)", *(f"+ {n}" for n in names)],
                          [[a, *(("-" if i == j else f"{v:+.4f}") for j, v in enumerate(row))]
                           for i, (a, row) in enumerate(zip(names, f.increase))])
        return (f"mean subspace overlap ({self.side}put side, over layers; 1 = same subspace, 0 = orthogonal):\n\n"
                f"{overlap}\n\nheld-out loss on each task with its own adapter, alone and with another added:\n\n"
                f"{together}\n\nincrease in that loss from adding the other adapter:\n\n{increase}")

    def to_dict(self) -> dict:
        f = self.functional
        return {"format": "lora_jax.app.demo.study.interference/1", "settings": self.settings, "names": list(self.names),
                "side": self.side, "overlap": self.overlap.tolist(), "alone": f.alone.tolist(),
                "together": f.together.tolist(), "increase": f.increase.tolist()}

    def plot(self, path) -> Path:
        """Writes a PNG of two heatmaps, the subspace overlap and the loss increase; returns its path."""
        plt = _pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), constrained_layout=True)
        n = len(self.names)
        increase = self.functional.increase
        limit = float(np.max(np.abs(increase))) or 1.0
        panels = ((self.overlap, "mean subspace overlap", "viridis", 0.0, 1.0, "{:.2f}", "adapter"),
                  (increase, "loss increase on task i from adding adapter j", "RdBu_r", -limit, limit, "{:+.3f}",
                   "added adapter j"))
        for ax, (matrix, title, cmap, lo, hi, fmt, xlabel) in zip(axes, panels):
            image = ax.imshow(matrix, cmap=cmap, vmin=lo, vmax=hi)
            for i in range(n):
                for j in range(n):
                    # light text on the dark cells of each map: viridis is dark low, RdBu dark at both ends
                    dark = abs(matrix[i, j]) > 0.6 * hi if cmap == "RdBu_r" else matrix[i, j] < 0.6
                    ax.text(j, i, fmt.format(matrix[i, j]), ha="center", va="center", fontsize=9,
                            color="white" if dark else "black")
            ax.set_xticks(range(n), self.names)
            ax.set_yticks(range(n), self.names)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("adapter" if cmap == "viridis" else "task i (own adapter)")
            ax.set_title(title, fontsize=10)
            fig.colorbar(image, ax=ax, shrink=0.8)
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def save(self, out) -> list[Path]:
        """Writes ``interference.md``, ``interference.png`` and ``interference.json`` to ``out``; returns the paths."""
        return _save(Path(out), "interference", self, "Adapter interference")


def measure_interference(adapters: Mapping[str, Adapter], evaluate: Callable[[str, Adapter], float], *,
                         base_params, side: str = "in", settings: Mapping | None = None) -> InterferenceStudy:
    """The subspace overlap of every pair of adapters and their functional interference.

    Args:
      adapters: ``{task name: Adapter}``, at least two.
      evaluate: ``evaluate(task, adapter) -> loss`` on ``task``'s held-out data.
      base_params: the base model's params.
      side: ``"in"`` or ``"out"``, as for :func:`lora_jax.analysis.subspace_overlap`.
      settings: recorded in the result as is.

    Returns:
      an :class:`InterferenceStudy`; ``overlap[i, j]`` is the mean over the
      layers both adapt of the pair's subspace overlap (every pair computed,
      so symmetry is measured, not imposed).
    """
    names = tuple(adapters)
    if len(names) < 2:
        raise ValueError(f"interference: need at least two adapters, got {list(names)}")
    overlap = np.zeros((len(names), len(names)))
    for i, first in enumerate(names):
        for j, second in enumerate(names):
            layers = analysis.subspace_overlap(base_params, adapters[first], adapters[second], side=side)
            if not layers:
                raise ValueError(f"interference: {first!r} and {second!r} share no layer with a nonzero delta")
            overlap[i, j] = np.mean([o.overlap for o in layers.values()])
    functional = analysis.interference(base_params, adapters, evaluate)
    return InterferenceStudy(names, overlap, functional, side, dict(settings or {}))


# ---------------------------------------------------------------------------- the demo's model and data

def demo_corpora(names: Sequence[str], *, max_bytes: int, heldout_bytes: int) -> dict:
    """``{name: data.Corpus}`` for names among ``CORPORA``: prose, code and "shout" (the prose in capitals)."""
    unknown = [n for n in names if n not in CORPORA]
    if unknown:
        raise ValueError(f"unknown corpora {unknown}; choose from {list(CORPORA)}")
    caps = dict(heldout_bytes=heldout_bytes)
    out = {}
    if "prose" in names or "shout" in names:
        prose = data.prose_corpus(max_bytes, **caps)
        out["prose"] = prose
        out["shout"] = dataclasses.replace(prose, name="shout", train=prose.train.upper(),
                                           heldout=prose.heldout.upper(), source="the prose corpus, in capitals")
    if "code" in names:
        out["code"] = data.code_corpus(max_bytes, **caps)
    return {n: out[n] for n in names}


def _next_token_loss(model, ids):
    return causal_lm_loss(model(ids), ids)


@functools.lru_cache(maxsize=8)
def _train_step(module, config: LoraConfig, lr: float):
    """``(optimizer, jitted step)``, cached so that every study in one process compiles a config once."""
    tx = optax.adamw(lr)
    return tx, make_train_step(lora_apply(module, config), _next_token_loss, tx)


@functools.lru_cache(maxsize=4)
def _heldout_loss(module):
    """Jitted ``loss(params, ids)`` of the plain module."""
    return jax.jit(lambda params, ids: causal_lm_loss(module.apply({"params": params}, ids), ids))


def _pad(lora, rank: int):
    """``lora`` with every ``A`` zero-padded to ``rank`` columns and ``B`` to ``rank`` rows."""
    def pad(node):
        extra = rank - node["a"].shape[-1]
        a = jnp.pad(node["a"], [(0, 0)] * (node["a"].ndim - 1) + [(0, extra)])
        b = jnp.pad(node["b"], [(0, 0)] * (node["b"].ndim - 2) + [(0, extra), (0, 0)])
        return {"a": a, "b": b}

    return jax.tree.map(pad, lora, is_leaf=lambda x: isinstance(x, dict) and set(x) == {"a", "b"})


def _unpad(lora, rank: int):
    return jax.tree.map(lambda n: {"a": n["a"][..., :rank], "b": n["b"][..., :rank, :]}, lora,
                        is_leaf=lambda x: isinstance(x, dict) and set(x) == {"a", "b"})


class DemoTask:
    """The demo's base model and corpora, with cached compiled steps: trains and evaluates adapters.

    Args:
      corpora: names among ``CORPORA`` to load.
      steps, batch_size, seq_len: the training budget of every adapter.
      lr: the AdamW rate at scale 1; an adapter of scale ``s`` trains at
        ``lr / s`` (Adam moves each factor entry by about the rate per step and
        the delta is ``s * A @ B``, so this makes different alphas comparable).
      eval_rows: held-out windows of ``seq_len`` bytes per corpus (fixed,
        evenly spaced over the held-out split).
      max_bytes, heldout_bytes: caps on each corpus's splits.
      show_progress: draw a loss bar (on stderr) while training.
    """

    def __init__(self, corpora: Sequence[str], *, steps: int, batch_size: int, seq_len: int, lr: float,
                 eval_rows: int, max_bytes: int, heldout_bytes: int, show_progress: bool = True):
        for label, value in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len),
                             ("eval_rows", eval_rows)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive int, got {value!r}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        self.steps, self.batch_size, self.seq_len, self.lr = steps, batch_size, seq_len, lr
        self.show_progress = show_progress
        self.module, self.base = pretrain.load_base()
        self.corpora = demo_corpora(corpora, max_bytes=max_bytes, heldout_bytes=heldout_bytes)
        self.heldout = {name: jnp.asarray(data.eval_windows(c.heldout, seq_len=seq_len, batch_size=eval_rows,
                                                            n_batches=1)[0]) for name, c in self.corpora.items()}
        # Every adapter is evaluated merged into the weights: one compiled forward for all ranks and pairs.
        self._loss = _heldout_loss(self.module)

    def settings(self) -> dict:
        return {"steps": self.steps, "batch_size": self.batch_size, "seq_len": self.seq_len, "lr": self.lr,
                "eval_rows": int(next(iter(self.heldout.values())).shape[0]),
                "corpora": {n: c.summary() for n, c in self.corpora.items()}}

    def evaluate(self, corpus: str, adapter: Adapter | None) -> float:
        """Held-out loss (nats per byte) on ``corpus`` with ``adapter`` merged in (``None``: the base model)."""
        params = self.base if adapter is None else merge(self.base, adapter.lora_params, adapter.config)
        return float(self._loss(params, self.heldout[corpus]))

    def train(self, config: LoraConfig, corpus: str, *, seed: int, train_rank: int | None = None,
              label: str | None = None):
        """A ``config`` adapter trained on ``corpus`` for ``steps`` steps; returns its LoRA tree.

        ``seed`` fixes the adapter's init and the batches. With ``train_rank``
        above ``config.rank`` the adapter trains zero-padded to that rank (at
        the same scale) and is cut back: the padding's gradients are exactly
        zero (its ``A`` columns and ``B`` rows are zero), and AdamW with weight
        decay keeps zeros at zero, so the result equals plain training up to
        float rounding, while adapters of different ranks share one compiled
        step.
        """
        rank, scale = config.rank, config.alpha / config.rank
        if config.use_rslora or config.rank_pattern or config.alpha_pattern or config.dropout:
            raise ValueError("DemoTask.train: the demo trains one rank and alpha for all layers, without rsLoRA "
                             "or dropout")
        batches = data.train_batches(self.corpora[corpus].train, seq_len=self.seq_len, batch_size=self.batch_size,
                                     seed=seed)
        first = jnp.asarray(next(batches))
        lora = init_lora(self.module, self.base, config, first, rng=jax.random.key(seed))
        train_rank = train_rank or rank
        if train_rank < rank:
            raise ValueError(f"DemoTask.train: train_rank {train_rank} is below the rank {rank}")
        if train_rank > rank:
            lora = _pad(lora, train_rank)
            config = dataclasses.replace(config, rank=train_rank, alpha=scale * train_rank)
        tx, step = _train_step(self.module, config, self.lr / scale)
        opt_state, batch = tx.init(lora), first
        with loss_progress(self.steps, label or f"{corpus} rank {rank}", enabled=self.show_progress,
                           stderr=True) as bar:
            for i in range(self.steps):
                lora, opt_state, metrics = step(lora, opt_state, self.base, batch)
                loss = float(metrics["loss"])
                if not math.isfinite(loss):
                    raise ValueError(f"training on {corpus} at rank {rank}: step {i + 1} loss is {loss}; "
                                     f"try a lower lr")
                bar.advance(loss)
                batch = jnp.asarray(next(batches))
        return _unpad(lora, rank) if train_rank > rank else lora


def rank_sweep(ranks: Sequence[int] = DEFAULT_RANKS, *, steps: int = 50, task: str = "code",
               also: Sequence[str] = ("prose",), alpha_per_rank: float = 2.0, lr: float = 5e-3, batch_size: int = 8,
               seq_len: int = 128, eval_rows: int = 32, max_bytes: int = 300_000, heldout_bytes: int = 100_000,
               seed: int = 0, shared_compile: bool = True, show_progress: bool = True) -> RankSweep:
    """The demo base learns ``task`` at each rank with the same budget; see the module docstring.

    Args:
      ranks: distinct positive ranks (default 1, 2, 4, ..., 64).
      steps, batch_size, seq_len, lr: the budget of every rank (``lr`` at
        scale 1; see :class:`DemoTask`).
      task: the corpus learned (default code); ``also``: corpora only
        evaluated (default prose: forgetting of the base's language).
      alpha_per_rank: ``alpha = alpha_per_rank * rank``, so every rank has
        scale ``alpha_per_rank`` (default 2).
      eval_rows: held-out windows per corpus.
      max_bytes, heldout_bytes: caps on each corpus's splits.
      seed: the adapters' init and the batches (the same batches at every rank).
      shared_compile: train every rank zero-padded to the largest (exact, see
        :meth:`DemoTask.train`): one compiled step instead of one per rank.
      show_progress: loss bars on stderr.

    Returns:
      a :class:`RankSweep` whose losses are named after the corpora.
    """
    ranks = _check_ranks(ranks)
    names = (task, *[n for n in also if n != task])
    demo = DemoTask(names, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, eval_rows=eval_rows,
                    max_bytes=max_bytes, heldout_bytes=heldout_bytes, show_progress=show_progress)
    top = max(ranks) if shared_compile else None
    return sweep_ranks(
        lambda config: demo.train(config, task, seed=seed, train_rank=top, label=f"rank {config.rank:>3}"),
        {name: (lambda adapter, name=name: demo.evaluate(name, adapter)) for name in names},
        base_params=demo.base, ranks=ranks,
        config_for=lambda r: LoraConfig(rank=r, alpha=alpha_per_rank * r, targets=TARGETS),
        baseline={name: demo.evaluate(name, None) for name in names},
        settings={**demo.settings(), "task": task, "alpha_per_rank": alpha_per_rank, "seed": seed,
                  "shared_compile": shared_compile, "targets": list(TARGETS)})


def interference_study(corpora: Sequence[str] = CORPORA, *, steps: int = 50, rank: int = 8, alpha: float = 16.0,
                       lr: float = 5e-3, batch_size: int = 8, seq_len: int = 128, eval_rows: int = 32,
                       max_bytes: int = 300_000, heldout_bytes: int = 100_000, seed: int = 0, side: str = "in",
                       show_progress: bool = True) -> InterferenceStudy:
    """One adapter per corpus on the demo base (same config and budget), then :func:`measure_interference`.

    Args:
      corpora: at least two distinct names among prose, code, shout.
      steps, rank, alpha, lr, batch_size, seq_len: every adapter's training.
      eval_rows, max_bytes, heldout_bytes: as for :func:`rank_sweep`.
      seed: adapter ``i`` uses ``seed + i`` (init and batches).
      side: the subspaces compared, ``"in"`` (spanned by ``A``) or ``"out"``.
      show_progress: loss bars on stderr.

    Returns:
      an :class:`InterferenceStudy`.
    """
    corpora = tuple(corpora)
    if len(set(corpora)) != len(corpora) or len(corpora) < 2:
        raise ValueError(f"interference: need at least two distinct corpora, got {list(corpora)}")
    demo = DemoTask(corpora, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, eval_rows=eval_rows,
                    max_bytes=max_bytes, heldout_bytes=heldout_bytes, show_progress=show_progress)
    config = LoraConfig(rank=rank, alpha=alpha, targets=TARGETS)
    trained = {name: Adapter(config, demo.train(config, name, seed=seed + i, label=f"{name:>6}"))
               for i, name in enumerate(corpora)}
    return measure_interference(trained, demo.evaluate, base_params=demo.base, side=side,
                                settings={**demo.settings(), "rank": rank, "alpha": alpha, "seed": seed,
                                          "targets": list(TARGETS)})


@dataclasses.dataclass
class TruncationStudy:
    """A trained adapter cut to smaller ranks (:func:`lora_jax.analysis.truncate`), measured on held-out data.

    Attributes:
      rows: per setting (``"full"``, ``"energy 0.9"``, ...): trainable
        params, largest relative weight error over layers, held-out loss, and
        the largest ``|logit|`` difference from the untruncated adapter.
    """

    task: str
    rows: list

    def markdown(self) -> str:
        lines = [f"| setting | trainable params | max weight error | {self.task} loss | max \\|logit diff\\| |",
                 "|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['setting']} | {r['trainable']:,} | {r['weight_error']:.3g} | {r['loss']:.4f} | "
                         f"{r['logit_diff']:.3g} |")
        return "\n".join(lines)


def truncation_study(*, rank: int = 32, energies: Sequence[float] = (0.99, 0.9, 0.75, 0.5), task: str = "code",
                     steps: int = 50, lr: float = 5e-3, batch_size: int = 8, seq_len: int = 128, eval_rows: int = 32,
                     max_bytes: int = 300_000, heldout_bytes: int = 100_000, seed: int = 0,
                     show_progress: bool = True) -> TruncationStudy:
    """Trains one rank-``rank`` adapter (alpha ``2 * rank``) on ``task``, then truncates it to each energy.

    The output error is measured, not inferred: the held-out loss and the
    largest logit difference on the held-out windows, truncated vs untruncated.
    """
    demo = DemoTask((task,), steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, eval_rows=eval_rows,
                    max_bytes=max_bytes, heldout_bytes=heldout_bytes, show_progress=show_progress)
    config = LoraConfig(rank=rank, alpha=2.0 * rank, targets=TARGETS)
    full = Adapter(config, demo.train(config, task, seed=seed, label=f"rank {rank}"))
    logits = jax.jit(lambda params, ids: demo.module.apply({"params": params}, ids))
    ids = demo.heldout[task]
    reference_logits = logits(merge(demo.base, full.lora_params, full.config), ids)
    settings = [("full", full, 0.0)]
    for energy in energies:
        cut = analysis.truncate(demo.base, full, energy=energy)
        settings.append((f"energy {energy:g}", cut.adapter, max(cut.errors.values())))
    rows = []
    for label, adapter, error in settings:
        out = logits(merge(demo.base, adapter.lora_params, adapter.config), ids)
        rows.append({"setting": label, "trainable": count_params(adapter.lora_params), "weight_error": error,
                     "loss": float(causal_lm_loss(out, ids)),
                     "logit_diff": float(jnp.max(jnp.abs(out - reference_logits)))})
    return TruncationStudy(task, rows)
