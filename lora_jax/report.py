"""A table of which layers carry adapters and how many parameters train."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from lora_jax.config import LoraConfig
from lora_jax.tree import weight_name, adapter_nodes, count_params, get_path


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    path: str
    weight_shape: tuple[int, ...]
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    rank: int
    scale: float | None
    params: int


@dataclasses.dataclass(frozen=True)
class Summary:
    """What :func:`summary` returns.

    ``total`` counts base and adapter parameters together, as PEFT's
    ``print_trainable_parameters`` does.
    """

    rows: tuple[SummaryRow, ...]
    trainable: int
    base: int

    @property
    def total(self) -> int:
        return self.base + self.trainable

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def headline(self) -> str:
        return f"trainable {100 * self.fraction:.2f}% ({self.trainable:,} / {self.total:,})"

    def table(self) -> str:
        header = ("layer", "weight", "a", "b", "rank", "scale", "params")
        lines = [header] + [(r.path, str(list(r.weight_shape)), str(list(r.a_shape)), str(list(r.b_shape)),
                             str(r.rank), "-" if r.scale is None else f"{r.scale:g}", f"{r.params:,}")
                            for r in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        fmt = lambda line: "  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
        return "\n".join([fmt(lines[0]), fmt(tuple("-" * w for w in widths))] + [fmt(l) for l in lines[1:]]
                         + [self.headline()])


def summary(base_params, lora_params, config: LoraConfig | None = None, *,
            print_fn: Callable[[str], None] | None = print) -> Summary:
    """Prints and returns which layers have adapters, their shapes and the trainable share.

    >>> base = {"q": {"kernel": np.zeros((8, 8)), "bias": np.zeros(8)}}
    >>> lora = {"q": {"a": np.zeros((8, 2)), "b": np.zeros((2, 8))}}
    >>> s = summary(base, lora, LoraConfig(rank=2, alpha=4), print_fn=None)
    >>> s.headline()
    'trainable 30.77% (32 / 104)'
    >>> s.rows[0].scale
    2.0
    """
    rows = []
    for path, node in adapter_nodes(lora_params).items():
        name = "/".join(path)
        base_node = get_path(base_params, path)
        w = base_node[weight_name(base_node, path)]
        a, b = node["a"], node["b"]
        rank = int(np.shape(a)[-1])
        rows.append(SummaryRow(name, tuple(np.shape(w)), tuple(np.shape(a)), tuple(np.shape(b)), rank,
                               None if config is None else config.scaling(name, rank), count_params(node)))
    result = Summary(tuple(rows), count_params(lora_params), count_params(base_params))
    if print_fn is not None:
        print_fn(result.table())
    return result


MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
                 "generated_code_size_in_bytes")


def compiled_memory(compiled) -> dict:
    """XLA's ``memory_analysis()`` of a compiled function as byte counts (``None`` where the backend gives none).

    ``total`` is argument + output + temp; ``total_minus_alias`` subtracts the
    outputs that reuse donated argument buffers, which ``total`` counts twice:
    the memory the step needs while it runs.

    >>> import jax, jax.numpy as jnp
    >>> compiled = jax.jit(lambda x: x * 2).lower(jnp.ones(256, jnp.float32)).compile()
    >>> compiled_memory(compiled)["argument_size_in_bytes"]
    1024
    """
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):  # some backends raise (XLA's UNIMPLEMENTED) instead of returning None
        stats = None
    out = {field: getattr(stats, field, None) if stats is not None else None for field in MEMORY_FIELDS}
    parts = [out["argument_size_in_bytes"], out["output_size_in_bytes"], out["temp_size_in_bytes"]]
    out["total"] = sum(parts) if all(p is not None for p in parts) else None
    alias = out["alias_size_in_bytes"]
    out["total_minus_alias"] = out["total"] - alias if out["total"] is not None and alias is not None else None
    return out
