"""The shape of the package: module sizes, largest functions, private names crossing modules, import cost.

``python -m bench --only architecture`` measures this checkout;
``python -m bench.architecture --root DIR`` measures another checkout of the
project (an older commit unpacked with ``git archive``) and prints the same
tables, so a refactoring can state its before and after.

Import cost is measured in fresh interpreters, alternating the two commands,
``import jax, flax, optax`` and ``OURS`` (the names a training script
imports; ``import lora_jax`` alone is lazy and loads no JAX); the extra cost
of ``lora_jax`` is the difference of the medians. The modules that ``OURS``
leaves loaded are checked against the heavy optional ones.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench import common

NAME = "architecture"
TITLE = "Package shape: module sizes, largest functions, private cross-module names, import cost"
ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("orbax", "safetensors", "rich", "tokenizers", "matplotlib", "flax.nnx", "lora_jax.nnx",
         "lora_jax.sharding", "lora_jax.io.checkpoint")
REPEATS = {"smoke": 1, "quick": 5, "full": 9}


def modules(root: Path) -> dict[str, ast.Module]:
    """``{dotted module name: parsed source}`` for every ``.py`` file of ``root/lora_jax``."""
    out = {}
    for path in sorted((root / "lora_jax").rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def _lines(root: Path, name: str) -> int:
    base = root / Path(*name.split("."))
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    return len(path.read_text().splitlines())


def functions(tree: ast.Module) -> list[tuple[str, int]]:
    """``(qualified name, lines)`` of every function and method, nested ones included."""
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((prefix + child.name, child.end_lineno - child.lineno + 1))
                visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve(current: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = current.split(".") if is_package else current.split(".")[:-1]
    parts = parts[:len(parts) - node.level + 1]
    return ".".join(parts + ([node.module] if node.module else []))


def private_imports(mods: dict[str, ast.Module]) -> list[str]:
    """Every underscore name one ``lora_jax`` module takes from another, as ``importer: module.name``.

    Counts ``from lora_jax.x import _y`` and ``x._y`` where ``x`` names an
    imported ``lora_jax`` module.
    """
    found = []
    for current, tree in mods.items():
        aliases = {}
        is_package = any(other.startswith(current + ".") for other in mods)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _resolve(current, node, is_package)
                if not source.startswith("lora_jax"):
                    continue
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    if full in mods:
                        aliases[alias.asname or alias.name] = full
                    elif _is_private(alias.name):
                        found.append(f"{current}: {full}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("lora_jax") and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _is_private(node.attr)):
                found.append(f"{current}: {aliases[node.value.id]}.{node.attr}")
    return sorted(set(found))


def imports_inside_functions(mods: dict[str, ast.Module]) -> list[str]:
    """``module:line`` of every import statement inside a function body (docstring examples excluded)."""
    found = []
    for current, tree in mods.items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        found.append(f"{current}:{node.lineno}")
    return sorted(set(found))


OURS = "from lora_jax import LoraConfig, init_lora, lora_apply, make_train_step"


def _time_import(root: Path, statement: str) -> tuple[float, list[str]]:
    code = ("import sys, time, json; t = time.perf_counter(); " + statement + "; dt = time.perf_counter() - t; "
            f"print(json.dumps([dt, [m for m in {HEAVY!r} if m in sys.modules]]))")
    env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                         check=True)
    seconds, loaded = json.loads(out.stdout.strip().splitlines()[-1])
    return seconds, loaded


def import_cost(root: Path, repeats: int) -> dict:
    """Medians over ``repeats`` fresh interpreters of ``import jax, flax, optax`` and ``OURS``."""
    deps, ours, loaded = [], [], []
    for _ in range(repeats):
        deps.append(_time_import(root, "import jax, flax, optax")[0])
        seconds, loaded = _time_import(root, OURS)
        ours.append(seconds)
    return {"deps_median_s": statistics.median(deps), "lora_jax_median_s": statistics.median(ours),
            "extra_s": statistics.median(ours) - statistics.median(deps), "heavy_loaded": loaded,
            "repeats": repeats}


def measure(root: Path, repeats: int) -> dict:
    """Every number of this benchmark for the checkout at ``root``."""
    mods = modules(root)
    sizes = {name: _lines(root, name) for name in mods}
    fns = sorted(((f"{mod}.{fn}", n) for mod, tree in mods.items() for fn, n in functions(tree)),
                 key=lambda item: -item[1])
    exports = {}
    for node in mods["lora_jax"].body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            exports = sorted(ast.literal_eval(node.value))
    return {"modules": sizes, "total_lines": sum(sizes.values()), "largest_functions": fns[:10],
            "functions_over_40_lines": sum(1 for _, n in fns if n > 40),
            "private_imports": private_imports(mods), "imports_inside_functions": imports_inside_functions(mods),
            "all": exports, "import": import_cost(root, repeats)}


def tables(m: dict) -> list[dict]:
    """The markdown tables of one measurement."""
    imp = m["import"]
    big = sorted(m["modules"].items(), key=lambda item: -item[1])[:12]
    return [
        {"title": "Summary", "columns": ["measure", "value"], "rows": [
            ["modules", len(m["modules"])], ["lines", m["total_lines"]],
            ["largest module", f"{big[0][0]} ({big[0][1]} lines)"],
            ["functions over 40 lines", m["functions_over_40_lines"]],
            ["private names imported across modules", len(m["private_imports"])],
            ["imports inside functions", len(m["imports_inside_functions"])],
            ["names in lora_jax.__all__", len(m["all"])],
            ["import jax, flax, optax (median s)", round(imp["deps_median_s"], 3)],
            ["import of LoraConfig, init_lora, lora_apply, make_train_step (median s)",
             round(imp["lora_jax_median_s"], 3)],
            ["extra cost of that import (s)", round(imp["extra_s"], 3)],
            ["heavy modules loaded by it", ", ".join(imp["heavy_loaded"]) or "none"]]},
        {"title": "Largest modules", "columns": ["module", "lines"], "rows": [list(row) for row in big]},
        {"title": "Largest functions", "columns": ["function", "lines"],
         "rows": [list(row) for row in m["largest_functions"]]},
    ]


def run(mode: str) -> dict:
    """Measures this checkout (the ``python -m bench`` entry point)."""
    m = measure(ROOT, REPEATS[mode])
    return {**m, "tables": tables(m),
            "notes": [f"Private cross-module names: {', '.join(m['private_imports']) or 'none'}.",
                      f"Imports inside functions: {', '.join(m['imports_inside_functions']) or 'none'}.",
                      f"Import cost: medians of {m['import']['repeats']} fresh interpreters each, alternating."]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.architecture", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to measure (default: this one)")
    parser.add_argument("--repeats", type=int, default=REPEATS["quick"])
    parser.add_argument("--json", type=Path, help="also write the measurement here")
    args = parser.parse_args(argv)
    m = measure(args.root.resolve(), args.repeats)
    for table in tables(m):
        print(f"\n{table['title']}\n" + common.markdown_table(table["columns"], table["rows"]))
    print("\nprivate cross-module names:", *m["private_imports"] or ["none"], sep="\n  ")
    print("imports inside functions:", *m["imports_inside_functions"] or ["none"], sep="\n  ")
    if args.json:
        args.json.write_text(json.dumps(m, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
