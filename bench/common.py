"""Shared benchmark plumbing: the machine header, timing, progress, JSON and markdown writers.

Every benchmark module exposes ``NAME``, ``TITLE`` and ``run(mode) -> dict``;
the dict holds ``tables`` (each ``{"title", "columns", "rows"}``), ``notes``
(strings) and anything else worth keeping (raw times, config). ``save`` adds
the header, writes ``results/<name>.json`` and rebuilds ``results/README.md``
from every JSON file there, so ``--only`` refreshes one section and keeps the rest.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import jax

from lora_jax.report import compiled_memory

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent

# Round-robin repeats and warm-up calls per mode.
MODES = {"smoke": {"repeats": 1, "warmup": 1}, "quick": {"repeats": 10, "warmup": 2},
         "full": {"repeats": 30, "warmup": 3}}


# ---- the header

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    # rev-parse only reads; nothing in the repository changes.
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def header() -> dict:
    """Date, machine, versions and the device JAX computes on."""
    device = jax.devices()[0]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "optax": _version("optax"),
        "numpy": _version("numpy"),
        "lora_jax": _version("lora-jax"),
        "git_commit": _git_commit(),
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


# ---- progress

try:
    from tqdm.auto import tqdm as _tqdm
except ImportError:
    _tqdm = None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def progress(iterable: Iterable, *, total: int, desc: str):
    """``tqdm`` when installed, else one line per item on stderr."""
    if _tqdm is not None:
        yield from _tqdm(iterable, total=total, desc=desc, file=sys.stderr)
        return
    start = time.perf_counter()
    for i, item in enumerate(iterable):
        yield item
        log(f"  {desc}: {i + 1}/{total} ({time.perf_counter() - start:.1f}s)")


# ---- timing

def timed(fn: Callable, *args, **kwargs):
    """``(result, seconds)`` of one call, waiting for every output with ``jax.block_until_ready``."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - start


def stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "mean_s": statistics.fmean(times), "n": len(times)}


def compile_aot(jitted, *args, **kwargs):
    """``(compiled, lower_s, compile_s)`` for ``jitted.lower(*args, **kwargs).compile()``."""
    start = time.perf_counter()
    lowered = jitted.lower(*args, **kwargs)
    mid = time.perf_counter()
    compiled = lowered.compile()
    return compiled, mid - start, time.perf_counter() - mid


def memory(compiled) -> dict:
    """XLA's memory analysis of ``compiled`` (see :func:`lora_jax.report.compiled_memory`)."""
    return compiled_memory(compiled)


def flops(compiled) -> float | None:
    """XLA's ``cost_analysis()`` flop count, or ``None``."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    value = cost.get("flops") if isinstance(cost, dict) else None
    return float(value) if value is not None else None


def ratio(num, den):
    return num / den if num is not None and den else None


# ---- train-step runs (train_step, nnx_step, peers)

class StepRunner:
    """One compiled training step that owns its (donated) state: ``state = step(*state, *const)``.

    ``jitted`` returns ``(*new_state, metrics)`` with ``metrics["loss"]`` and
    ``metrics["grad_norm"]``; ``const`` are the arguments it never donates
    (frozen base params, the batch).
    """

    def __init__(self, label: str, jitted, state, const):
        self.label, self.jitted, self.state, self.const = label, jitted, tuple(state), tuple(const)
        self.times: list[float] = []

    def compile(self, name: str) -> None:
        log(f"[{name}] compiling {self.label} ...")
        self.compiled, self.lower_s, self.compile_s = compile_aot(self.jitted, *self.state, *self.const)
        self.memory = memory(self.compiled)
        self.flops = flops(self.compiled)
        log(f"[{name}]   lower {self.lower_s:.2f}s + compile {self.compile_s:.2f}s")

    def step(self):
        out, seconds = timed(self.compiled, *self.state, *self.const)
        *state, metrics = out
        self.state = tuple(state)
        return metrics, seconds


def run_rounds(runners, settings: dict, name: str) -> dict:
    """Compiles every runner, warms each up, then times them round-robin (the first one rotating).

    Returns each runner's first-call ``loss``, ``grad_norm`` and ``first_call_s``.
    """
    for r in runners:
        r.compile(name)
    return time_rounds(runners, settings, name)


def time_rounds(runners, settings: dict, name: str) -> dict:
    """:func:`run_rounds` for runners already compiled: warm-up calls, then round-robin timing."""
    first = {}
    for i in range(settings["warmup"]):
        for r in runners:
            metrics, seconds = r.step()
            if i == 0:
                first[r.label] = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                                  "first_call_s": seconds}
        log(f"[{name}] warm-up {i + 1}/{settings['warmup']} done")
    n = len(runners)
    for i in progress(range(settings["repeats"]), total=settings["repeats"], desc=f"[{name}] timing"):
        for j in range(n):
            r = runners[(i + j) % n]
            r.times.append(r.step()[1])
    return first


def rounds_method(settings: dict) -> str:
    """The one-line description of :func:`run_rounds` for a result's ``method``."""
    return (f"{settings['warmup']} warm-up calls each, then {settings['repeats']} round-robin rounds "
            "(one call of each step per round, `jax.block_until_ready` on every output).")


def _mib(value):
    return None if value is None else value / 2**20


def _fmt(value, spec: str):
    return None if value is None else format(value, spec)


def step_report(runners, baseline, tokens: int, first: dict, targets: dict | None = None) -> dict:
    """Per-step statistics and the two tables (time, memory) relative to ``baseline``.

    ``targets`` maps a runner label to ``(column, limit)``: the ratio in that
    column ("time" or "memory") must be at most ``limit``. Memory is XLA's
    argument + temporary bytes (donated outputs alias their arguments).
    """
    targets = targets or {}
    base_time = stats(baseline.times)
    base_mem = args_temp(baseline.memory)
    per_step = {}
    for r in runners:
        s = stats(r.times)
        per_step[r.label] = {
            **s, "tokens_per_s": tokens / s["median_s"], "ratio_vs_full": s["median_s"] / base_time["median_s"],
            "ratio_vs_full_of_mins": s["min_s"] / base_time["min_s"],
            "flops_ratio_vs_full": ratio(r.flops, baseline.flops),
            "lower_s": r.lower_s, "compile_s": r.compile_s, "times_s": r.times, **first[r.label],
            "memory": r.memory, "flops": r.flops, "memory_args_temp": args_temp(r.memory),
            "memory_ratio_vs_full": ratio(args_temp(r.memory), base_mem),
        }
    verdicts = {}
    for label, (column, limit) in targets.items():
        key = "ratio_vs_full" if column == "time" else "memory_ratio_vs_full"
        value = per_step[label][key]
        verdicts[label] = {"column": column, "limit": limit, "value": value,
                           "met": value is not None and value <= limit}
    time_rows, mem_rows = [], []
    for r in runners:
        p, m = per_step[r.label], r.memory
        verdict = lambda col: (f"<= {verdicts[r.label]['limit']:.2f} ({'met' if verdicts[r.label]['met'] else 'MISSED'})"
                               if verdicts.get(r.label, {}).get("column") == col else "")
        time_rows.append([r.label, f"{r.lower_s + r.compile_s:.2f}", f"{p['median_s']:.4f}", f"{p['min_s']:.4f}",
                          f"{p['max_s']:.4f}", f"{p['tokens_per_s']:.0f}", f"{p['ratio_vs_full']:.3f}",
                          f"{p['ratio_vs_full_of_mins']:.3f}", _fmt(p["flops_ratio_vs_full"], ".3f"),
                          verdict("time")])
        mem_rows.append([r.label, _fmt(_mib(m["argument_size_in_bytes"]), ".1f"),
                         _fmt(_mib(m["temp_size_in_bytes"]), ".1f"), _fmt(_mib(m["output_size_in_bytes"]), ".1f"),
                         _fmt(_mib(m["alias_size_in_bytes"]), ".1f"), _fmt(_mib(p["memory_args_temp"]), ".1f"),
                         _fmt(p["memory_ratio_vs_full"], ".3f"), _fmt(None if r.flops is None else r.flops / 1e9, ".1f"),
                         verdict("memory")])
    return {
        "steps": per_step, "verdicts": verdicts,
        "tables": [
            {"title": "Time per step",
             "columns": ["step", "compile s", "median s", "min s", "max s", "tokens/s", "ratio vs full (median)",
                         "ratio vs full (min)", "XLA FLOP ratio vs full", "target"],
             "rows": time_rows},
            {"title": "XLA memory analysis (MiB) and cost analysis",
             "columns": ["step", "argument", "temp", "output", "alias", "argument + temp",
                         "ratio vs full (argument + temp)", "GFLOP (XLA)", "target"],
             "rows": mem_rows},
        ],
    }


def args_temp(mem: dict):
    """XLA's argument + temporary bytes of a memory analysis, or None."""
    parts = (mem.get("argument_size_in_bytes"), mem.get("temp_size_in_bytes"))
    return None if None in parts else sum(parts)


def first_step_note(first: dict, fast: str, plain: str) -> str:
    """The correctness line: first-step losses (identical initial model) and the two LoRA grad norms."""
    losses = [v["loss"] for v in first.values()]
    spread = max(losses) - min(losses)
    agree = spread <= 1e-5 * max(abs(x) for x in losses)
    gn_fast, gn_plain = first[fast]["grad_norm"], first[plain]["grad_norm"]
    return ("Correctness: first step from identical initial weights (LoRA B = 0, so the adapted model is the "
            "base): loss " + ", ".join(f"{k} {v['loss']:.6f}" for k, v in first.items())
            + f" (spread {spread:.2e}: {'agree' if agree else 'DISAGREE'}); LoRA grad norm {fast} "
            f"{gn_fast:.6g} vs {plain} {gn_plain:.6g} (rel. diff "
            f"{abs(gn_fast - gn_plain) / max(abs(gn_plain), 1e-30):.2e}).")


# ---- writers

def save(name: str, result: dict, hdr: dict, results_dir: Path = RESULTS) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps({"name": name, "header": hdr, **result}, indent=2, default=str) + "\n")
    write_readme(results_dir)
    return path


def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def header_markdown(hdr: dict) -> str:
    cores = f"{hdr['cpu_cores']} cores" + (f" ({hdr['cpu_cores_usable']} usable)"
                                            if hdr.get("cpu_cores_usable") != hdr["cpu_cores"] else "")
    lines = [
        f"- date: {hdr['date']}" + (f", commit `{hdr['git_commit']}`" if hdr.get("git_commit") else ""),
        f"- machine: {hdr['cpu']}, {cores}, {hdr['os']}",
        f"- python {hdr['python']}, jax {hdr['jax']}, jaxlib {hdr['jaxlib']}, flax {hdr['flax']}, "
        f"optax {hdr['optax']}, lora_jax {hdr['lora_jax']}",
        f"- backend: {hdr['backend']}, device kind: {hdr['device_kind']} (x{hdr['device_count']})"
        + (f", XLA_FLAGS=`{hdr['xla_flags']}`" if hdr.get("xla_flags") else ""),
    ]
    return "\n".join(lines)


def write_readme(results_dir: Path = RESULTS) -> Path:
    parts = ["# Benchmark results", "",
             "Written by `python -m bench` (see `bench/`). Ratios are measured side by side in one "
             "process; on CPU only the ratios mean much, absolute times only on an accelerator.", ""]
    for path in sorted(results_dir.glob("*.json")):
        data = json.loads(path.read_text())
        parts += [f"## {data['name']}: {data.get('title', '')}".rstrip(": "), "",
                  header_markdown(data["header"]), ""]
        if data.get("mode"):
            parts += [f"Mode: `{data['mode']}`. {data.get('method', '')}".rstrip(), ""]
        for table in data.get("tables", []):
            if table.get("title"):
                parts += [f"**{table['title']}**", ""]
            parts += [markdown_table(table["columns"], table["rows"]), ""]
        for note in data.get("notes", []):
            parts.append(f"- {note}")
        if data.get("notes"):
            parts.append("")
    out = results_dir / "README.md"
    out.write_text("\n".join(parts))
    return out
