"""`LoraConfig`: the hyper-parameters of one adapter, validated when built.

Layer paths are the linen module path joined by ``/`` (``"layers_0/attn/query"``),
the same path as the layer's entry in the params tree. A target entry is one of

* a kind preset: ``"attention"``, ``"mlp"``, ``"embedding"``, ``"all-linear"``;
* a regex, written ``"re:<regex>"`` (or a compiled ``re.Pattern``), which must
  match the *whole* path;
* a glob: ``*`` matches within one path segment, ``**`` across segments, ``?``
  one character. A glob matches the whole path or any trailing run of segments,
  so ``"query"`` selects every layer named ``query`` and ``"attn/*"`` every
  layer directly inside a module named ``attn``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
from collections.abc import Mapping
from typing import Any, NamedTuple, Union

from lora_jax import deprecation

PRESETS = ("attention", "mlp", "embedding", "all-linear")
INITS = ("default", "gaussian")

Pattern = Union[str, "re.Pattern[str]"]


@functools.lru_cache(maxsize=None)
def _glob_to_regex(glob: str) -> str:
    out, i = [], 0
    while i < len(glob):
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return "(?:.*/)?" + "".join(out)


def compile_pattern(entry: Pattern, *, field: str = "targets") -> "re.Pattern[str]":
    """Turns one target/exclude entry (glob, ``re:`` regex or compiled regex) into a regex.

    Presets are not patterns; callers handle them first.

    >>> bool(compile_pattern("attn/*").fullmatch("layers_0/attn/query"))
    True
    >>> bool(compile_pattern("re:layers_[01]/.*").fullmatch("layers_2/mlp/up"))
    False
    """
    if isinstance(entry, re.Pattern):
        return entry
    if not isinstance(entry, str) or not entry:
        raise ValueError(f"LoraConfig.{field}: entries must be non-empty strings or re.Pattern, got {entry!r}")
    if entry.startswith("re:"):
        try:
            return re.compile(entry[3:])
        except re.error as err:
            raise ValueError(f"LoraConfig.{field}: invalid regex {entry!r}: {err}") from None
    return re.compile(_glob_to_regex(entry))


def _as_tuple(value, field: str) -> tuple:
    if isinstance(value, (str, re.Pattern)):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise ValueError(f"LoraConfig.{field} must be a string or a sequence of strings, got {value!r}") from None


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Hyper-parameters of a LoRA adapter.

    Args:
      rank: the adapter rank ``r`` (positive int).
      alpha: the scaling numerator; the delta is ``alpha / r * A @ B``
        (``alpha / sqrt(r)`` with ``use_rslora``).
      targets: which layers get adapters: presets, globs or ``"re:"`` regexes
        (see the module docstring). Each entry must match at least one layer.
      exclude: entries with the same syntax; matching layers are removed.
      dropout: dropout rate on the adapter's input, applied only when an
        ``"lora_dropout"`` rng is passed to the adapted apply function.
      use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
      init: ``"default"`` (PEFT's: A kaiming-uniform, B zero; for embeddings A
        zero, B normal) or ``"gaussian"`` (A normal with std ``1/r``, B zero).
      rank_pattern: ``{pattern: rank}`` (or a sequence of pairs) overriding
        ``rank`` for the layers a pattern matches; patterns use the ``targets``
        syntax and the first matching entry wins, as in PEFT. Each pattern
        must match at least one adapted layer.
      alpha_pattern: ``{pattern: alpha}``, the same for ``alpha``.
      use_dora: weight-decomposed LoRA (DoRA, Liu et al. 2024): each adapted
        layer also trains a magnitude ``m`` per output feature (adapter key
        ``"m"``, shape ``lead + out_shape``) and computes
        ``x @ (m * V / ||V||) + bias`` with ``V = W + scale * A @ B`` and the
        column norm taken over the input axes and held constant in the
        backward pass, as PEFT does. Dense and DenseGeneral layers (linen).
        Dropout applies to the adapter's input only (PEFT's training forward
        with dropout also feeds the dropped input to the base matmul).

    >>> cfg = LoraConfig(rank=8, alpha=16, targets=("attention",))
    >>> cfg.scaling("layers_0/attn/query")
    2.0
    >>> cfg = LoraConfig(rank=8, alpha=16, rank_pattern={"layers_0/**": 4})
    >>> cfg.rank_for("layers_0/attn/query"), cfg.scaling("layers_0/attn/query")
    (4, 4.0)
    >>> LoraConfig(rank=0)
    Traceback (most recent call last):
    ...
    ValueError: LoraConfig.rank must be a positive int, got 0
    """

    rank: int = 8
    alpha: float = 8.0
    targets: tuple[Pattern, ...] = ("all-linear",)
    exclude: tuple[Pattern, ...] = ()
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "default"
    rank_pattern: tuple[tuple[Pattern, int], ...] = ()
    alpha_pattern: tuple[tuple[Pattern, float], ...] = ()
    use_dora: bool = False

    def __post_init__(self):
        for field, check in (("rank", _positive_int), ("alpha", _positive_float)):
            try:
                object.__setattr__(self, field, check(getattr(self, field)))
            except ValueError as err:
                raise ValueError(f"LoraConfig.{field} {err}") from None
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real)
                or not 0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoraConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        for field in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"LoraConfig.{field} must be a bool, got {getattr(self, field)!r}")
        if self.init not in INITS:
            raise ValueError(f"LoraConfig.init must be one of {INITS}, got {self.init!r}")
        object.__setattr__(self, "dropout", float(self.dropout))
        for field in ("targets", "exclude"):
            entries = _as_tuple(getattr(self, field), field)
            for entry in entries:
                if not (field == "targets" and entry in PRESETS):
                    compile_pattern(entry, field=field)
            object.__setattr__(self, field, entries)
        object.__setattr__(self, "rank_pattern", _pattern_table(self.rank_pattern, "rank_pattern", _positive_int))
        object.__setattr__(self, "alpha_pattern",
                           _pattern_table(self.alpha_pattern, "alpha_pattern", _positive_float))
        if not self.targets:
            raise ValueError("LoraConfig.targets must name at least one layer, preset or pattern, got ()")

    def require_plain(self, where: str):
        """Raises for options that the front end ``where`` does not implement (today: DoRA)."""
        if self.use_dora:
            raise ValueError(f"{where}: LoraConfig.use_dora is not supported here; DoRA is implemented by the "
                             f"linen front end (lora_jax.lora_apply / init_lora)")

    def scaling(self, path: str, rank: int | None = None) -> float:
        """The factor multiplying ``A @ B`` for the layer at ``path``.

        ``rank`` defaults to :meth:`rank_for`; alpha comes from :meth:`alpha_for`.
        """
        r = self.rank_for(path) if rank is None else rank
        alpha = self.alpha_for(path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def rank_for(self, path: str) -> int:
        """The rank of the adapter at ``path``: the first ``rank_pattern`` match, else ``rank``."""
        return _lookup(self.rank_pattern, path, self.rank)

    def alpha_for(self, path: str) -> float:
        """The alpha of the adapter at ``path``: the first ``alpha_pattern`` match, else ``alpha``."""
        return _lookup(self.alpha_pattern, path, self.alpha)


def _lookup(table, path: str, default):
    for pattern, value in table:
        if compile_pattern(pattern).fullmatch(path):
            return value
    return default


def _positive_int(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"must be a positive int, got {value!r}")
    return int(value)


# Scales are applied in float32: a larger alpha would make ``alpha / r`` overflow to inf there.
FLOAT32_MAX = 3.4028234663852886e38


def _positive_float(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a positive finite number, got {value!r}")
    if value > FLOAT32_MAX:
        raise ValueError(f"must be at most {FLOAT32_MAX:.4g} (float32's largest value; the scale alpha / r is "
                         f"applied in float32), got {value!r}")
    return float(value)


def _pattern_table(table, field: str, check) -> tuple:
    """``{pattern: value}`` or pairs -> a hashable tuple of ``(pattern, value)``, validated."""
    items = table.items() if isinstance(table, Mapping) else table
    out = []
    try:
        for pattern, value in items:
            compile_pattern(pattern, field=field)
            try:
                out.append((pattern, check(value)))
            except ValueError as err:
                raise ValueError(f"LoraConfig.{field}[{pattern!r}] {err}") from None
    except (TypeError, ValueError) as err:
        if isinstance(err, ValueError):
            raise
        raise ValueError(f"LoraConfig.{field} must be a mapping or a sequence of (pattern, value) pairs, "
                         f"got {table!r}") from None
    return tuple(out)


class Adapter(NamedTuple):
    """One adapter as a value: its config and its LoRA tree (``{...path: {"a", "b"}}``).

    Wherever a function takes ``lora_params, config``, an ``Adapter`` may be
    passed in the ``lora_params`` place instead (see :meth:`unpack`).

    >>> cfg = LoraConfig(rank=1)
    >>> adapter = Adapter(cfg, {"q": {"a": [[1.0]], "b": [[2.0]]}})
    >>> Adapter.unpack(adapter, None, where="merge") == (adapter.lora_params, cfg)
    True
    """

    config: LoraConfig
    lora_params: Mapping

    lora = deprecation.renamed_attribute("Adapter", "lora", "lora_params")

    @staticmethod
    def unpack(lora_params: Any, config: "LoraConfig | None", *, where: str) -> tuple[Mapping, "LoraConfig"]:
        """``(lora_params, config)`` from a tree and its config, or from an adapter value and ``None``.

        An adapter value is anything with ``.lora_params`` and ``.config``
        (:class:`Adapter`, :class:`~lora_jax.multi.Combined`,
        :class:`~lora_jax.multi.Stacked`, :class:`~lora_jax.io.peft.PeftAdapter`).
        """
        packed = hasattr(lora_params, "lora_params") and isinstance(getattr(lora_params, "config", None), LoraConfig)
        if packed:
            if config is not None and config != lora_params.config:
                raise ValueError(f"{where}: got an adapter value and a different config; pass one or the other")
            return lora_params.lora_params, lora_params.config
        if not isinstance(config, LoraConfig):
            raise TypeError(f"{where}: expected lora_params and its LoraConfig, or one Adapter(config, lora_params); "
                            f"got config={type(config).__name__}")
        return lora_params, config
