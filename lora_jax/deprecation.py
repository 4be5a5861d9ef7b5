"""Deprecated names and argument orders: one warning format, removal in 0.3.

Release 0.2 renamed a few public names and put every function's arguments in
one order (``base_params, lora_params, config``; see the README's API
section). The old spellings keep working for one release and warn with a
:class:`DeprecationWarning` that names the replacement.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

REMOVED_IN = "0.3"


def warn(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warns that ``old`` is deprecated in favour of ``new``.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn("f(x, y)", "f(y, x)", stacklevel=2)
    >>> str(caught[0].message)
    'f(x, y) is deprecated and will be removed in lora_jax 0.3; use f(y, x)'
    """
    warnings.warn(f"{old} is deprecated and will be removed in lora_jax {REMOVED_IN}; use {new}",
                  DeprecationWarning, stacklevel=stacklevel)


def renamed(fn: Callable, old: str, new: str) -> Callable:
    """A wrapper of ``fn`` under its old name ``old`` that warns on every call.

    >>> import warnings
    >>> old_max = renamed(max, "biggest", "max")
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     old_max(1, 3)
    3
    """

    @functools.wraps(fn)
    def alias(*args, **kwargs):
        warn(old, new)
        return fn(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old.rsplit(".", 1)[-1]
    alias.__doc__ = f"Deprecated alias of ``{new}`` (removed in {REMOVED_IN})."
    return alias


def renamed_attribute(owner: str, old: str, new: str) -> property:
    """A read-only property ``old`` of the class ``owner`` serving the attribute ``new`` with a warning.

    >>> import warnings
    >>> class Box:
    ...     size = 3
    ...     length = renamed_attribute("Box", "length", "size")
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     Box().length
    3
    """

    def getter(self):
        warn(f"{owner}.{old}", f"{owner}.{new}")
        return getattr(self, new)

    return property(getter, doc=f"Deprecated name of ``{new}`` (removed in {REMOVED_IN}).")


def module_getattr(module: str, aliases: dict[str, tuple[Callable[[], Any], str]]) -> Callable[[str], Any]:
    """A PEP 562 ``__getattr__`` serving the old module-level names ``aliases`` with a warning.

    ``aliases`` maps an old name to ``(getter, new spelling)``; the getter is
    called on access, so the alias never appears in ``dir()`` or ``__all__``.
    """

    def __getattr__(name: str):
        if name in aliases:
            getter, new = aliases[name]
            warn(f"{module}.{name}", new)
            return getter()
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
