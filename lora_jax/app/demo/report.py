"""The demo's report: ``report.md``, ``loss_curves.png``, ``results.json`` and a one-screen summary."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np


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


def plot(out: Path, result: dict) -> Path:
    """Held-out loss curves of both methods on both held-out sets, as a PNG."""
    import matplotlib   # deferred: optional (the app extra) and slow to import, only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return {**dataclasses.asdict(value), "step_s": value.step_s}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def markdown(result: dict, plot_name: str) -> str:
    """The report's text: the table of claims and numbers, the checks, the samples."""
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
    """Writes ``report.md``, ``loss_curves.png`` and ``results.json`` into ``out``; returns the report's path."""
    out = Path(out)
    png = plot(out, result)
    (out / "results.json").write_text(json.dumps(_jsonable(result), indent=2, default=str))
    path = out / "report.md"
    path.write_text(markdown(result, png.name))
    print_summary(result)
    return path
