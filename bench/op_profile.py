"""Where a jitted function's device time goes: ``top_ops(fn, *args)``, or ``python -m bench.op_profile --tiny``.

``top_ops`` warms ``fn`` up, runs it ``steps`` times under ``jax.profiler`` and reads the XPlane file
the profiler writes. Every trace event carrying an ``hlo_op`` stat is one execution of one XLA
instruction (a CUDA kernel on GPU, a thunk on CPU); their durations are summed per instruction and
divided by ``steps``. When the compiled HLO text is available (``fn`` is a ``Compiled``, or a
``jax.jit`` function that can be lowered again), each instruction is labelled with a category
(cuBLAS matmul, cuDNN attention, loop fusion, ...) and the JAX ``op_name`` it came from.

Limits:
- The profiler itself costs time; absolute numbers are a little pessimistic, shares are what to read.
- Durations are kernel (or thunk) times. The wall time of a step can be larger when the device idles
  (host overhead, waiting for input); ``total_ms_per_step`` does not count idle gaps, and on GPU
  kernels overlapping on several streams are counted once each, so shares can undercount overlap.
- Instruction names are matched between the trace and a compilation of ``fn``; a ``jax.jit``
  function is lowered again to get the text, which matches the executed program when the compile
  is deterministic (the usual case). Unknown names fall back to a category guessed from the kernel.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import tempfile
import time
from collections import defaultdict
from typing import Any, Callable

import jax

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([A-Za-z_][\w.\-]*)\s+=\s+(.*)$")
_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%?([A-Za-z_][\w.\-]*)\s+\(.*->.*\{\s*$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")
_FIELDS = {"kind": re.compile(r"\bkind=(k\w+)"), "calls": re.compile(r"\bcalls=\{?%?([\w.\-]+)"),
           "target": re.compile(r'custom_call_target="([^"]+)"'),
           "op_name": re.compile(r'op_name="((?:[^"\\]|\\.)*)"'),
           "backend_kind": re.compile(r'"kind":"([^"]+)"')}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Lines the profiler may derive from the stream lines; counting them too would double the time.
_DERIVED_LINES = {"XLA Modules", "XLA Ops", "XLA TraceMe", "Steps", "Framework Name Scope",
                  "Framework Ops", "Source code"}
COLUMNS = ["op", "category", "ms/step", "share", "source"]


def parse_hlo(text: str) -> dict[str, dict[str, Any]]:
    """Instruction name -> {opcode, kind, calls, target, backend_kind, op_name, root_opcode, category}."""
    instrs: dict[str, dict[str, Any]] = {}
    roots: dict[str, str] = {}          # computation name -> name of its ROOT instruction
    members: dict[str, list[str]] = defaultdict(list)
    comp = None
    for line in text.splitlines():
        if (m := _INSTR.match(line)) and comp is not None:
            name, rest = m.group(1), m.group(2)
            op = _OPCODE.search(" " + rest)
            info: dict[str, Any] = {"opcode": op.group(1) if op else "?"}
            for key, rx in _FIELDS.items():
                found = rx.search(rest)
                info[key] = found.group(1) if found else None
            instrs[name] = info
            members[comp].append(name)
            if line.lstrip().startswith("ROOT"):
                roots[comp] = name
        elif m := _HEADER.match(line):
            comp = m.group(1)
        elif line.strip() == "}":
            comp = None
    for info in instrs.values():
        called = info["calls"]
        root = instrs.get(roots.get(called, ""), {}) if called else {}
        info["root_opcode"] = root.get("opcode")
        if info["op_name"] is None and called:   # a fusion without metadata: borrow from its body
            names = [root.get("op_name")] + [instrs[n]["op_name"] for n in members.get(called, [])]
            info["op_name"] = next((n for n in names if n), None)
        info["category"] = _category(info)
    return instrs


def _category(info: dict[str, Any]) -> str:
    op, kind, root = info["opcode"], info.get("kind"), info.get("root_opcode")
    target = (info.get("target") or "").lower()
    backend = (info.get("backend_kind") or "").lower()
    if op == "custom-call":
        if "cublas" in target or "gemm" in target or "matmul" in target:
            return "matmul (cuBLAS)"
        if "cudnn" in target and ("fmha" in target or "attention" in target or "flash" in target):
            return "attention (cuDNN)"
        if "cudnn" in target and "conv" in target:
            return "convolution (cuDNN)"
        return f"custom-call ({info.get('target')})"
    if op == "fusion":
        if kind == "kCustom":
            if "cublas" in backend:
                return "matmul (cuBLAS)"
            if "triton" in backend and "gemm" in backend:
                return "matmul (Triton)"
            if "gemm" in backend or root in ("dot", "convolution"):
                return "matmul (fusion)"
            return f"fusion (custom{', ' + backend.strip('_') if backend else ''})"
        if root in ("dot", "convolution"):
            return "matmul (fusion)" if root == "dot" else "convolution"
        if root in ("transpose", "copy"):
            return "copy/transpose"
        if kind == "kInput" or root in ("reduce", "reduce-window"):
            return "fusion (reduction/input)"
        return {"kLoop": "fusion (loop)", "kOutput": "fusion (output)"}.get(kind or "", "fusion")
    if op.startswith(_COLLECTIVES):
        return "collective"
    if op in ("dot", "convolution"):
        return "matmul" if op == "dot" else "convolution"
    if op in ("copy", "transpose", "copy-start", "copy-done"):
        return "copy/transpose"
    if op in ("reduce", "reduce-window"):
        return "reduction"
    return op


def kernel_category(kernel: str) -> str:
    """A category guessed from a kernel (or thunk) name alone, when no HLO text matches."""
    k = kernel.lower()
    for words, label in ((("gemm", "cublas", "cutlass", "matmul", "xmma", "dot"), "matmul"),
                         (("fmha", "flash", "attention"), "attention"), (("nccl", "all_reduce"), "collective"),
                         (("transpose", "copy"), "copy/transpose"), (("reduce",), "reduction"),
                         (("fusion",), "fusion")):
        if any(w in k for w in words):
            return label
    return "other"


def shorten(op_name: str | None, width: int = 80) -> str:
    """Drops the leading ``jit(name)/`` and keeps the last ``width`` characters."""
    if not op_name:
        return ""
    text = re.sub(r"^jit\([^)]*\)/", "", op_name)
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _compiled_text(fn: Callable, args: tuple) -> str | None:
    try:
        if hasattr(fn, "as_text"):
            return fn.as_text()
        if hasattr(fn, "lower"):
            return fn.lower(*args).compile().as_text()
    except Exception:  # the labels are a nicety; a function that will not lower still gets timed
        return None
    return None


def _op_events(path: str, module: str | None) -> list[tuple[str, str, float]]:
    """(hlo_op, kernel name, duration ns) per event, from device planes when they have any."""
    found: dict[bool, list[tuple[str, str, float, str | None]]] = {True: [], False: []}
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        device = plane.name.startswith("/device:")
        for line in plane.lines:
            if line.name in _DERIVED_LINES:
                continue
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" in stats:
                    mod = stats.get("hlo_module")
                    found[device].append((str(stats["hlo_op"]), event.name, event.duration_ns,
                                          str(mod) if mod is not None else None))
    events = found[True] or found[False]
    if module and any(e[3] == module for e in events):   # drop other programs run meanwhile
        events = [e for e in events if e[3] == module]
    return [e[:3] for e in events]


def top_ops(fn: Callable, *args: Any, steps: int = 3, limit: int = 25, trace_dir: str | None = None) -> dict:
    """Profiles ``steps`` calls of ``fn(*args)``; the XLA ops by device time per step, largest first."""
    jax.block_until_ready(fn(*args))
    text = _compiled_text(fn, args)
    trace_dir = trace_dir or tempfile.mkdtemp(prefix="lora_jax_profile_")
    jax.profiler.start_trace(trace_dir)
    try:
        start = time.perf_counter()
        for _ in range(steps):
            jax.block_until_ready(fn(*args))
        wall = time.perf_counter() - start
    finally:
        jax.profiler.stop_trace()
    files = (glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.xplane.pb"))
             or glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not files:
        raise RuntimeError(f"the profiler wrote no *.xplane.pb under {trace_dir}")
    path = max(files, key=os.path.getmtime)
    hlo = parse_hlo(text) if text else {}
    module = m.group(1) if text and (m := re.match(r"\s*HloModule\s+([\w.\-]+)", text)) else None
    time_ns: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    kernels: dict[str, str] = {}
    for op, kernel, dur in _op_events(path, module):
        time_ns[op] += dur
        calls[op] += 1
        kernels.setdefault(op, kernel)
    result: dict[str, Any] = {"wall_ms_per_step": wall * 1e3 / steps, "trace": path}
    total = sum(time_ns.values())
    result["total_ms_per_step"] = total / 1e6 / steps
    ops = []
    for op in sorted(time_ns, key=time_ns.get, reverse=True):
        info = hlo.get(op)
        ops.append({"hlo_op": op, "ms_per_step": time_ns[op] / 1e6 / steps,
                    "share": time_ns[op] / total if total else 0.0, "calls_per_step": calls[op] / steps,
                    "kernel": kernels[op], "category": info["category"] if info else kernel_category(kernels[op]),
                    "source": shorten(info["op_name"]) if info else ""})
    result["ops"] = ops[:limit]
    result["other_ms_per_step"] = sum(o["ms_per_step"] for o in ops[limit:])
    if not ops:
        result["note"] = ("no trace events carried an hlo_op stat: this backend or jax version may not "
                          "annotate XLA ops, or fn ran no XLA program")
    return result


def rows(result: dict, limit: int = 15) -> list[list]:
    """Table rows for ``COLUMNS``; ms/step and share as printed text."""
    return [[o["hlo_op"], o["category"], f"{o['ms_per_step']:.3f}", f"{o['share']:.1%}", o["source"]]
            for o in result["ops"][:limit]]


def markdown(result: dict, limit: int = 15) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows(result, limit)]
    return "\n".join(lines)


def _tiny_step() -> tuple[Callable, tuple]:
    """A 2-layer MLP's SGD step on random data, jitted."""
    import jax.numpy as jnp

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(k1, (256, 512)) * 0.05, "w2": jax.random.normal(k2, (512, 10)) * 0.05}
    x, y = jax.random.normal(k3, (128, 256)), jnp.arange(128) % 10

    def loss(p, x, y):
        logits = jax.nn.relu(x @ p["w1"]) @ p["w2"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    def step(p, x, y):
        grads = jax.grad(loss)(p, x, y)
        return jax.tree.map(lambda a, g: a - 0.1 * g, p, grads)

    return jax.jit(step), (params, x, y)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.op_profile", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="profile a tiny MLP training step")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    if not args.tiny:
        parser.error("only --tiny is available from the command line; call top_ops() from Python")
    fn, fn_args = _tiny_step()
    result = top_ops(fn, *fn_args, steps=args.steps)
    print(f"{jax.default_backend()}: {result['total_ms_per_step']:.3f} ms/step in XLA ops "
          f"(wall {result['wall_ms_per_step']:.3f} ms/step under the profiler), "
          f"{result['other_ms_per_step']:.3f} ms/step outside the top ops")
    print(result.get("note") or markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
