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
MODES = {"quick": {"repeats": 10, "warmup": 2}, "full": {"repeats": 30, "warmup": 3}}


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
