"""Communication in a compiled XLA program: counts and bytes of its collective ops.

:func:`collectives` reads ``compiled.as_text()`` (or HLO text) and lists every
all-gather, reduce-scatter, all-reduce, collective-permute and all-to-all with
the bytes of its result on one device; ops inside a loop body (``nn.scan``'s
layers) count once per known trip. ``lora_jax.sharding`` re-exports it.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(KINDS) + r")(-start|-done)?\(")
_CALLEE = re.compile(r"\b(?:body|calls|to_apply|condition|true_computation|false_computation)=%?([\w.\-]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op of a compiled program: its kind, result bytes, result type and runs per call."""

    kind: str
    bytes: int
    shape: str
    runs: int


@dataclasses.dataclass(frozen=True)
class Collectives:
    """The collectives of a compiled program (one entry per op in the HLO text)."""

    ops: tuple[Collective, ...]

    def counts(self, *, executed: bool = True) -> dict[str, int]:
        """Ops per kind; ``executed`` counts an op inside a loop (scanned layers) once per iteration."""
        c = Counter()
        for op in self.ops:
            c[op.kind] += op.runs if executed else 1
        return {k: c[k] for k in KINDS if c[k]}

    def bytes(self, *, executed: bool = True) -> dict[str, int]:
        """Result bytes per kind, summed over the ops (per device; times the runs with ``executed``)."""
        c = Counter()
        for op in self.ops:
            c[op.kind] += op.bytes * (op.runs if executed else 1)
        return {k: c[k] for k in KINDS if c[k]}


def _type_bytes(text: str) -> int:
    return sum(_DTYPE_BYTES.get(dt, 4) * int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
               for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text) if dt in _DTYPE_BYTES)


def collectives(compiled) -> Collectives:
    """The collective ops of a compiled program (``jitted.lower(...).compile()``, or its HLO text).

    Parses the optimized HLO for all-gather, reduce-scatter, all-reduce,
    collective-permute and all-to-all (async pairs counted once, at ``-done``),
    with the bytes of each result on one device. An op in a ``while`` body with
    a known trip count (``nn.scan``'s layer loop) runs that many times per call.

    >>> hlo = '''ENTRY %main () -> f32[8] {
    ...   %ag = f32[8]{0} all-gather(f32[2]{0} %p), dimensions={0}
    ... }'''
    >>> collectives(hlo).bytes()
    {'all-gather': 32}
    """
    text = compiled if isinstance(compiled, str) else compiled.as_text()
    found, calls, entry, current = [], {}, None, None
    for line in text.splitlines():
        head = _COMPUTATION.match(line)
        if head and "=" not in line.split("(")[0]:
            current = head.group(1)
            entry = current if line.startswith("ENTRY") else entry
            calls.setdefault(current, [])
            continue
        trips = _TRIPS.search(line)
        for callee in _CALLEE.findall(line):
            calls.setdefault(current, []).append((callee, int(trips.group(1)) if trips and " while(" in line else 1))
        op = _OP.search(line)
        if op and op.group(3) != "-start":
            found.append((current, op.group(2), _type_bytes(op.group(1)), op.group(1)))
    runs = Counter()

    def visit(comp, times):                 # the call graph is a small DAG
        runs[comp] += times
        for callee, n in calls.get(comp, []):
            visit(callee, times * n)

    visit(entry, 1)
    return Collectives(tuple(Collective(kind, nbytes, shape, max(runs[comp], 1))
                             for comp, kind, nbytes, shape in found))
