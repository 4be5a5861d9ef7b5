"""Module names across the PyTorch / Flax boundary, and stacking of scanned layers.

PyTorch names a module ``model.layers.0.self_attn.q_proj``; Flax linen names
the same module ``model/layers_0/self_attn/q_proj`` (a list attribute's entries
become ``<name>_<i>``), except for names PyTorch itself spells with an
underscore and a number (:data:`LITERAL_NAMES`, GPT-2's ``ln_1``). A model
whose decoder layers are one ``nn.scan`` holds them stacked under
``model/layers`` with a leading layer axis; ``stack_layers`` and
``unstack_layers`` convert trees (params or adapters) between the two.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import numpy as np

from lora_jax.tree import get_path, set_path

_INDEXED = re.compile(r"^(.*)_(\d+)$")
#: Module names that end in ``_<digits>`` in PyTorch itself, not list entries: GPT-2's block norms.
LITERAL_NAMES = frozenset({"ln_1", "ln_2"})
#: PyTorch names of transformers' ``Conv1D`` layers, whose weights are stored ``[in, out]`` (GPT-2's blocks,
#: under ``transformer.`` or at the root of a bare ``GPT2Model``).
CONV1D_MODULES = re.compile(r"(.*\.)?h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)")


def is_conv1d(module: str) -> bool:
    """Whether the PyTorch module ``module`` is a ``Conv1D`` layer (PEFT's ``fan_in_fan_out`` layout).

    >>> is_conv1d("transformer.h.0.attn.c_attn"), is_conv1d("model.layers.0.self_attn.q_proj")
    (True, False)
    """
    return CONV1D_MODULES.fullmatch(module) is not None


def to_flax(name: str) -> str:
    """``"model.layers.0.self_attn.q_proj"`` -> ``"model/layers_0/self_attn/q_proj"``.

    >>> to_flax("model.layers.12.mlp.up_proj")
    'model/layers_12/mlp/up_proj'
    >>> to_flax("lm_head")
    'lm_head'
    """
    out: list[str] = []
    for segment in name.split("."):
        if segment.isdigit() and out:
            out[-1] = f"{out[-1]}_{segment}"
        else:
            out.append(segment)
    return "/".join(out)


def to_torch(path: str) -> str:
    """The inverse of :func:`to_flax`: ``"model/layers_0/mlp"`` -> ``"model.layers.0.mlp"``.

    >>> to_torch("model/layers_3/self_attn/o_proj")
    'model.layers.3.self_attn.o_proj'
    >>> to_torch("transformer/h_0/ln_1")
    'transformer.h.0.ln_1'
    """
    out = []
    for segment in path.split("/"):
        match = None if segment in LITERAL_NAMES else _INDEXED.match(segment)
        out.extend(match.groups() if match else (segment,))
    return ".".join(out)


def stack_layers(tree: Mapping, container: tuple[str, ...] = ("model",), name: str = "layers") -> dict:
    """Stacks ``<container>/<name>_<i>`` subtrees into one ``<container>/<name>`` with a leading axis.

    The layers must be numbered ``0..n-1`` and have identical structure and shapes.

    >>> t = {"model": {"layers_0": {"w": np.zeros(2)}, "layers_1": {"w": np.ones(2)}}}
    >>> stack_layers(t)["model"]["layers"]["w"].tolist()
    [[0.0, 0.0], [1.0, 1.0]]
    """
    parent = _get(tree, container)
    indexed = {}
    for key in parent:
        match = _INDEXED.match(key)
        if match and match.group(1) == name:
            indexed[int(match.group(2))] = parent[key]
    if sorted(indexed) != list(range(len(indexed))) or not indexed:
        raise ValueError(f"{'/'.join(container)}: expected {name}_0 .. {name}_<n-1>, found {sorted(parent)}")
    layers = [indexed[i] for i in range(len(indexed))]
    first = jax.tree_util.tree_structure(layers[0])
    for i, layer in enumerate(layers[1:], 1):
        if jax.tree_util.tree_structure(layer) != first:
            raise ValueError(f"{'/'.join(container)}/{name}_{i} does not have the structure of {name}_0; "
                             f"scanned layers must all hold the same adapters")
    try:
        stacked = jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *layers)
    except ValueError as err:
        raise ValueError(f"{'/'.join(container)}/{name}_*: shapes differ between layers ({err}); scanned "
                         f"layers need equal ranks") from None
    rest = {k: v for k, v in parent.items() if not (_INDEXED.match(k) and _INDEXED.match(k).group(1) == name)}
    return set_path(tree, container, {**rest, name: stacked})


def unstack_layers(tree: Mapping, container: tuple[str, ...] = ("model",), name: str = "layers") -> dict:
    """The inverse of :func:`stack_layers`: splits the leading axis into ``<name>_<i>`` subtrees.

    >>> t = {"model": {"layers": {"w": np.arange(4).reshape(2, 2)}}}
    >>> unstack_layers(t)["model"]["layers_1"]["w"].tolist()
    [2, 3]
    """
    parent = _get(tree, container)
    if name not in parent:
        raise ValueError(f"{'/'.join(container)} has no stacked {name!r} subtree (found {sorted(parent)})")
    stacked = parent[name]
    counts = {leaf.shape[0] for leaf in jax.tree.leaves(stacked)}
    if len(counts) != 1:
        raise ValueError(f"{'/'.join(container)}/{name}: leaves disagree on the layer count {sorted(counts)}")
    (n,) = counts
    rest = {k: v for k, v in parent.items() if k != name}
    rest.update({f"{name}_{i}": jax.tree.map(lambda leaf, i=i: leaf[i], stacked) for i in range(n)})
    return set_path(tree, container, rest)


def _get(tree, path):
    try:
        node = get_path(tree, path)
    except KeyError:
        node = None
    if not isinstance(node, Mapping):
        raise ValueError(f"tree has no {'/'.join(path)!r} subtree")
    return node
