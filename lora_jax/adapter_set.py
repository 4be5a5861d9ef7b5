"""`AdapterSet`: named adapters for one base model, switched, mixed and hot-swapped.

An ``AdapterSet`` is an immutable value: ``add``, ``remove``, ``replace``,
``activate`` and ``disable`` return a new set and never change the old one.
It keeps the base model's shapes (not its arrays) so that every adapter is
checked against the layer it adapts when it is added.

Serving without recompiling: :meth:`AdapterSet.resolve` and
:meth:`AdapterSet.stack` return adapters whose config has scale 1 and depends
only on the adapted layers and their ranks (each adapter's alpha is carried by
its factors; see :mod:`lora_jax.multi`). Build the apply function once from
that config and jit it; switching to another adapter of the same structure,
or hot-swapping one with :meth:`AdapterSet.replace`, then reuses the compiled
function.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from typing import Iterator

import jax.numpy as jnp

import lora_jax  # for lora_jax.io, which (with safetensors) the package loads on first use
from lora_jax import deprecation, factors
from lora_jax.config import Adapter, LoraConfig
from lora_jax.multi import Stacked, combine, stack


def _signature(base, adapter: Adapter, label: str) -> dict:
    """``{layer name: "a [..] b [..] dtype"}``: what must not change for a swap without recompiling."""
    return {g.name: f"a {list(g.node['a'].shape)} b {list(g.node['b'].shape)} {jnp.dtype(g.node['a'].dtype)}"
            for g in factors.geometry(base, adapter, label)}


def _given(where: str, lora_params, config, lora) -> Adapter:
    """The adapter an ``add``/``replace`` call names; the 0.1 order ``(config, lora)`` warns and is reordered."""
    if lora is not None or isinstance(lora_params, LoraConfig):
        deprecation.warn(f"AdapterSet.{where}(name, config, lora)", f"AdapterSet.{where}(name, lora_params, config)",
                         stacklevel=4)
        if isinstance(lora_params, LoraConfig):
            lora_params, config = config, lora_params
        lora_params = lora_params if lora is None else lora
    lora_params, config = Adapter.unpack(lora_params, config, where=f"AdapterSet.{where}")
    return Adapter(config, lora_params)


def _check_name(name) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter names must be non-empty strings, got {name!r}")
    return name


class AdapterSet:
    """Named adapters for one base model; which of them are active, with what weights.

    Args:
      base_params: the base model's params (arrays or ``jax.ShapeDtypeStruct``;
        only their shapes are kept).
      adapters: optional ``{name: Adapter or (config, lora_params)}`` to start with.

    >>> import jax.numpy as jnp
    >>> base = {"q": {"kernel": jnp.zeros((3, 2))}}
    >>> lora = {"q": {"a": jnp.ones((3, 1)), "b": jnp.ones((1, 2))}}
    >>> s = AdapterSet(base).add("formal", lora, LoraConfig(rank=1, alpha=2))
    >>> s = s.add("casual", lora, LoraConfig(rank=1, alpha=4)).activate("casual")
    >>> s.names, s.active
    (('formal', 'casual'), (('casual', 1.0),))
    >>> cfg, resolved = s.resolve()
    >>> cfg.scaling("q"), float(resolved["q"]["a"][0, 0])   # casual's scale, 4, rides on a
    (1.0, 4.0)
    >>> s.disable().resolve() is None
    True
    """

    def __init__(self, base_params, adapters: Mapping | None = None):
        self._base = factors.base_shapes(base_params)
        self._adapters: dict[str, Adapter] = {}
        self._active: tuple[tuple[str, float], ...] = ()
        for name, item in (adapters or {}).items():
            self._adapters[_check_name(name)] = self._checked(name, item)

    def _checked(self, name: str, item) -> Adapter:
        adapter = factors.as_adapter(item, f"adapter {name!r}")
        _signature(self._base, adapter, f"adapter {name!r}")
        return adapter

    def _with(self, adapters: dict, active: tuple) -> "AdapterSet":
        new = object.__new__(AdapterSet)
        new._base, new._adapters, new._active = self._base, adapters, active
        return new

    # ---- reading

    @property
    def names(self) -> tuple[str, ...]:
        """The adapters' names, in the order they were added."""
        return tuple(self._adapters)

    @property
    def active(self) -> tuple[tuple[str, float], ...]:
        """The active adapters as ``(name, weight)`` pairs; empty means the base model."""
        return self._active

    def __getitem__(self, name: str) -> Adapter:
        if name not in self._adapters:
            raise KeyError(f"no adapter {name!r} (this set holds {list(self._adapters)})")
        return self._adapters[name]

    def __contains__(self, name) -> bool:
        return name in self._adapters

    def __iter__(self) -> Iterator[str]:
        return iter(self._adapters)

    def __len__(self) -> int:
        return len(self._adapters)

    def __repr__(self) -> str:
        active = ", ".join(f"{n}={w:g}" for n, w in self._active) or "none (base)"
        return f"AdapterSet({list(self._adapters)}, active: {active})"

    # ---- changing (each returns a new set)

    def add(self, name: str, lora_params=None, config: LoraConfig | None = None, *, lora=None) -> "AdapterSet":
        """A new set with adapter ``name`` added; raises if the name is taken or it does not fit the base.

        Give ``lora_params`` and its ``config``, or one adapter value (an
        :class:`~lora_jax.config.Adapter`, a loaded PEFT adapter) with
        ``config`` omitted. ``lora=`` and the order ``(name, config, lora)``
        are the deprecated 0.1 spellings.
        """
        if _check_name(name) in self._adapters:
            raise ValueError(f"adapter {name!r} is already in the set; use replace() to swap it")
        adapter = self._checked(name, _given("add", lora_params, config, lora))
        return self._with({**self._adapters, name: adapter}, self._active)

    def replace(self, name: str, lora_params=None, config: LoraConfig | None = None, *, lora=None) -> "AdapterSet":
        """A new set with adapter ``name``'s config and weights swapped for new ones of the same shapes.

        Arguments as :meth:`add`. The new adapter must adapt the same layers
        with factors of the same shapes and dtype, so that functions compiled
        for the old one keep serving (its alpha, rsLoRA and values may
        change). Raises ``ValueError`` listing every difference otherwise.
        """
        adapter = _given("replace", lora_params, config, lora)
        old = _signature(self._base, self[name], f"adapter {name!r}")
        new = _signature(self._base, adapter, f"adapter {name!r}")
        if old != new:
            diffs = [f"{layer}: {old.get(layer, 'absent')} -> {new.get(layer, 'absent')}"
                     for layer in sorted(set(old) | set(new)) if old.get(layer) != new.get(layer)]
            raise ValueError(f"cannot swap adapter {name!r} without recompiling: its layers differ "
                             f"(old -> new): " + "; ".join(diffs)
                             + ". Remove it and add the new one instead.")
        return self._with({**self._adapters, name: adapter}, self._active)

    def remove(self, name: str) -> "AdapterSet":
        """A new set without adapter ``name`` (it is also deactivated)."""
        self[name]
        return self._with({k: v for k, v in self._adapters.items() if k != name},
                          tuple((n, w) for n, w in self._active if n != name))

    def activate(self, *names, weights=None) -> "AdapterSet":
        """A new set in which exactly these adapters are active.

        ``activate("a")``, ``activate("a", "b", weights=[1.0, -0.5])`` or
        ``activate({"a": 1.0, "b": -0.5})``. Several active adapters add their
        deltas, each times its weight (default 1).
        """
        if len(names) == 1 and isinstance(names[0], Mapping):
            if weights is not None:
                raise ValueError("activate: give weights in the mapping or in weights=, not both")
            names, weights = tuple(names[0]), tuple(names[0].values())
        if not names:
            raise ValueError("activate: name at least one adapter (disable() activates none)")
        weights = (1.0,) * len(names) if weights is None else tuple(weights)
        if len(weights) != len(names):
            raise ValueError(f"activate: {len(weights)} weights for {len(names)} adapters")
        for name, w in zip(names, weights):
            self[name]
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
                raise ValueError(f"activate: the weight of {name!r} must be a finite number, got {w!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"activate: an adapter is named twice in {list(names)}")
        return self._with(self._adapters, tuple((n, float(w)) for n, w in zip(names, weights)))

    def disable(self) -> "AdapterSet":
        """A new set with no active adapter (the base model's behaviour)."""
        return self._with(self._adapters, ())

    def load_peft(self, name: str, directory: str | os.PathLike, *, replace: bool = False, **kwargs) -> "AdapterSet":
        """Reads a PEFT adapter folder (:func:`lora_jax.io.load_peft`) and adds it, or swaps it in.

        ``replace=True`` hot-swaps adapter ``name`` (see :meth:`replace`);
        keyword arguments go to ``load_peft`` (``adapter_name``, ``dtype``,
        ``scan_layers``).
        """
        loaded = lora_jax.io.load_peft(directory, **kwargs)
        return (self.replace if replace else self.add)(name, loaded)

    # ---- using

    def resolve(self) -> Adapter | None:
        """The active adapters as one adapter (exact ``"cat"`` combination, scale 1), or ``None`` if none is active.

        The result's config depends only on the active adapters' layers and
        ranks, so a function compiled for it serves every selection of the
        same structure.
        """
        if not self._active:
            return None
        names, weights = zip(*self._active)
        return combine(self._base, [self._adapters[n] for n in names], weights, method="cat").adapter

    def stack(self, names=None) -> Stacked:
        """All adapters (or ``names``) stacked for a mixed-adapter batch; see :func:`lora_jax.multi.stack`."""
        names = self.names if names is None else tuple(names)
        return stack(self._base, {n: self[n] for n in names})
