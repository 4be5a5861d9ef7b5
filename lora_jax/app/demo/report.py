"""The demo's report: ``report.md``, ``loss_curves.png``, ``frontier.png``, ``results.json`` and a one-screen summary.

With ``--study`` also ``study.png``. The words of the verdicts come from
:mod:`~lora_jax.app.demo.findings`, built from the measured numbers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from lora_jax.app.demo import findings


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _kb(n) -> str:
    return f"{n / 1e3:.1f} KB"


def summary_rows(result: dict) -> list[tuple[str, str, str]]:
    """``(claim, full fine-tune, LoRA)`` rows, each with the measured numbers.

    >>> from types import SimpleNamespace as S
    >>> run = lambda n, t: S(name=n, trainable=t, curve=[(0, 3.0, 1.5), (10, 1.0, 1.6)], step_s=0.1,
    ...                      compile_s=1.0, memory={"total_minus_alias": 2e6})
    >>> r = dict(runs=[run("full", 100), run("LoRA", 5)], total_params=100, before={"dialect": 3.0, "base": 1.5},
    ...          sizes={"adapter": 2000, "base": 200, "full": 200})
    >>> summary_rows(r)[0]
    ('trainable parameters', '100 (100.00%)', '5 (5.00%)')
    """
    full, lora = result["runs"]
    total, before = result["total_params"], result["before"]

    def last(run, i):
        return run.curve[-1][i]

    return [
        ("trainable parameters", f"{full.trainable:,} (100.00%)" if full.trainable == total else
         f"{full.trainable:,}", f"{lora.trainable:,} ({100 * lora.trainable / total:.2f}%)"),
        ("saved file", f"{_mb(result['sizes']['full'])} (whole model, bf16)",
         f"{_kb(result['sizes']['adapter'])} (adapter, f32)"),
        ("dialect held-out loss (before -> after)", f"{before['dialect']:.3f} -> {last(full, 1):.3f}",
         f"{before['dialect']:.3f} -> {last(lora, 1):.3f}"),
        ("base-language held-out loss (before -> after)", f"{before['base']:.3f} -> {last(full, 2):.3f}",
         f"{before['base']:.3f} -> {last(lora, 2):.3f}"),
        ("forgetting (base-language loss increase)", f"{last(full, 2) - before['base']:+.3f}",
         f"{last(lora, 2) - before['base']:+.3f}"),
        ("step time (median)", f"{1e3 * full.step_s:.1f} ms", f"{1e3 * lora.step_s:.1f} ms"),
        ("step memory (XLA: args + out + temp - alias)", _mb(full.memory.get("total_minus_alias")),
         _mb(lora.memory.get("total_minus_alias"))),
        ("compile time of the step", f"{full.compile_s:.1f} s", f"{lora.compile_s:.1f} s"),
    ]


def _table(rows, header) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _pyplot():
    import matplotlib   # deferred: optional (the app extra) and slow to import, only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(out: Path, result: dict) -> Path:
    """Held-out loss curves of both methods on both held-out sets, as a PNG."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    titles = ("new dialect (held-out): learning", "base language (held-out): forgetting")
    for column, (ax, title) in enumerate(zip(axes, titles), start=1):
        for run, style in zip(result["runs"], ("-o", "-s")):
            curve = np.asarray(run.curve)
            ax.plot(curve[:, 0], curve[:, column], style, markersize=3, label=run.name)
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.set_ylabel("loss (nats / byte)")
        ax.grid(alpha=0.3)
        ax.legend()
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _trajectory_lines(ax, trajectories, methods, colors, *, annotate: bool) -> None:
    """One line per (method, learning rate): the mean over seeds of (learned, forgot) at each evaluation."""
    for method in methods:
        runs = [t for t in trajectories if t.method == method]
        lrs = list(dict.fromkeys(t.lr for t in runs))
        for lr, style in zip(lrs, (":", "-", "--") if len(lrs) == 3 else ("-",) * len(lrs)):
            same = [t for t in runs if t.lr == lr]
            n = min(len(t.target) for t in same)
            x, y = (np.mean([getattr(t, k)[:n] for t in same], axis=0) for k in ("learned", "forgot"))
            label = method if len(lrs) == 1 else f"{method}, lr {lr:.2g}"
            ax.plot(x, y, style, marker="o", markersize=3, color=colors[method], label=label)
            for step, xi, yi in zip(same[0].steps[:n], x, y) if annotate else ():
                ax.annotate(str(step), (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7)


def _zoom(ax) -> None:
    """Limits the view to learning above -10% of the most learned, so that a run whose target loss rose a lot
    (a too high rate) does not squeeze the others into a corner; it leaves the view at the left edge."""
    points = np.concatenate([line.get_xydata() for line in ax.get_lines()])
    left = -0.1 * max(points[:, 0].max(), 1e-6)
    shown = points[points[:, 0] >= left]
    ax.set_xlim(left, 1.05 * points[:, 0].max())
    ax.set_ylim(min(0.0, shown[:, 1].min()) - 0.02, 1.08 * shown[:, 1].max() + 0.02)


def plot_trajectories(path: Path, trajectories, panels, *, names=("target", "source"), level=None,
                      annotate: bool = False) -> Path:
    """Learning (x) against forgetting (y), one panel per ``(title, methods)`` of ``panels``; returns the path.

    ``level``: a matched target loss, drawn as a vertical line at the learning it means.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), constrained_layout=True, squeeze=False)
    methods = list(dict.fromkeys(t.method for t in trajectories))
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    start = max(t.target[0] for t in trajectories)
    for ax, (title, shown) in zip(axes[0], panels):
        _trajectory_lines(ax, trajectories, shown, colors, annotate=annotate)
        _zoom(ax)
        if level is not None:
            ax.axvline(start - level, color="grey", linestyle="--", linewidth=1, label=f"equal learning ({level:.3f})")
        ax.set_title(title)
        ax.set_xlabel(f"learned: fall of the held-out {names[0]} loss (nats/byte)")
        ax.set_ylabel(f"forgot: rise of the held-out {names[1]} loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _plots(out: Path, result: dict) -> dict:
    """Draws every figure; returns ``{name: file name}``."""
    names = findings.names(result)
    trajectories = findings.demo_trajectories(result)
    comparison = findings.demo_comparison(result)
    files = {"curves": plot(out, result).name,
             "frontier": plot_trajectories(out / "frontier.png", trajectories,
                                           [("default run: one seed, one rate each", [t.method for t in trajectories])],
                                           names=names, level=comparison.level, annotate=True).name}
    study = result.get("study")
    if study is not None:
        every = [a for a in study.arms if a.rank is not None and len(a.targets) > 1]
        attention = [a for a in study.arms if a.rank is not None and len(a.targets) == 1]
        same = [a.method for a in every if a.rank in {x.rank for x in attention}]
        panels = [("full fine-tuning and LoRA by rank (mean over seeds)", [findings.FULL, *(a.method for a in every)]),
                  ("LoRA on attention only vs every projection",
                   [findings.FULL, *same, *(a.method for a in attention)])]
        files["study"] = plot_trajectories(out / "study.png", study.trajectories, panels, names=names).name
    return files


def _jsonable(value):
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    if isinstance(value, np.ndarray):
        return value.tolist()
    if dataclasses.is_dataclass(value):
        return {**dataclasses.asdict(value), "step_s": value.step_s}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def markdown(result: dict, plot_name: str, plots: dict | None = None) -> str:
    """The report's text: the table of claims and numbers, forgetting at equal learning, the checks, the samples.

    ``plots``: the figures' file names (:func:`_plots`); without it the new sections are left out.
    """
    checks, args = result["checks"], result["args"]
    rel = checks["merged_vs_unmerged_max_abs"] / max(checks["max_abs_logit"], 1e-30)
    parts = [
        "# lora_jax demo: full fine-tuning vs LoRA",
        f"A byte-level Llama ({result['total_params']:,} parameters) that knows English prose learns a new "
        f"dialect, {args['steps']} steps of batch {args['batch_size']} x {args['seq_len']} bytes per method, the "
        f"same batches for both. LoRA: rank {args['rank']}, alpha {args['alpha']:g}, attention and MLP "
        f"projections. Backend: {result['backend']}. Whole run: {result['wall_s']:.0f} s.",
        f"- base language: {result['corpora']['base']}\n- new dialect: {result['corpora']['dialect']}",
        "## Measured",
        _table(summary_rows(result), ("", "full fine-tune", "LoRA")),
        f"The shipped base checkpoint is {_mb(result['sizes']['base'])} (bfloat16); the adapter file holds "
        f"{100 * result['sizes']['adapter'] / result['sizes']['base']:.1f}% of that.",
        f"![held-out loss curves]({plot_name})",
        *_sections(result, plots),
        "## Checks",
        f"- merged == unmerged: max |logit difference| {checks['merged_vs_unmerged_max_abs']:.3g} "
        f"(relative to the largest logit: {rel:.2g})",
        f"- adapter switched off in the same session gives the base model's logits bitwise: "
        f"{checks['adapter_off_equals_base']}; switched on again, the adapted logits bitwise: "
        f"{checks['adapter_on_again_equal']} (the adapter moves logits by up to "
        f"{checks['adapter_changes_logits_by']:.3g})",
        f"- base params bitwise unchanged by LoRA training: {checks['base_params_unchanged']}",
        "## Samples (temperature 0.7, top-k 20, same seed)",
    ]
    for model, texts in result["samples"].items():
        for kind, text in texts.items():
            parts.append(f"**{model}**, {kind} prompt:\n\n```text\n{text}\n```")
    return "\n\n".join(parts) + "\n"


def _sections(result: dict, plots: dict | None) -> list[str]:
    if plots is None:
        return []
    sections = [findings.demo_section(result, plots["frontier"])]
    if "study" in plots:
        sections.append(findings.study_section(result["study"], plots["study"], *findings.names(result)))
    return sections + [findings.claims_section(result)]


def print_summary(result: dict) -> None:
    """The one-screen table (rich) of the measured claims."""
    from rich.console import Console   # deferred: only when the table is shown
    from rich.table import Table

    table = Table(title="lora_jax demo: full fine-tuning vs LoRA")
    for column in ("", "full fine-tune", "LoRA"):
        table.add_column(column)
    for row in summary_rows(result):
        table.add_row(*row)
    Console().print(table)


def write_report(out: Path, result: dict) -> Path:
    """Writes ``report.md``, the figures and ``results.json`` into ``out``; returns the report's path."""
    out = Path(out)
    plots = _plots(out, result)
    result = {**result, "verdicts": findings.verdicts(result)}
    (out / "results.json").write_text(json.dumps(_jsonable(result), indent=2, default=str))
    path = out / "report.md"
    path.write_text(markdown(result, plots["curves"], plots))
    print_summary(result)
    print(f"\n{result['verdicts']['demo']['sentence']}")
    return path
