"""Sharded LoRA on JAX's SPMD engine: base layouts by rule, adapters that follow them.

The frozen base is laid out over a :class:`jax.sharding.Mesh` by *rules*:
``(regex, PartitionSpec)`` pairs tried in order on each leaf's ``/``-joined
path (``re.search``); the first match decides. A rule's spec names the last
dims of the weight (``P("data", None)`` on a kernel ``[in, out]``); dims in
front of it, such as the layer axis of ``nn.scan``, are not sharded. The
presets of :func:`rules` (``"dp"``, ``"fsdp"``, ``"tp"``, ``"fsdp_tp"``) end
with a catch-all that replicates what no other rule names (norms, biases of
row-parallel layers); a custom rule set without one raises on an unmatched leaf.

Each adapter follows its base layer (:func:`lora_shardings`): ``A``
``[lead..., in..., r]`` takes the weight's lead and input-dim specs, ``B``
``[lead..., r, out...]`` its lead and output-dim specs, and the rank axis is
replicated, for every kind (Dense, DenseGeneral, Einsum, Conv, Embed) since
they all split their weight as ``lead + in + out``. The optimizer state
follows the adapters (:func:`opt_state_shardings`). The training step is
:func:`lora_jax.train`'s step under ``jax.jit`` with these shardings; XLA's
partitioner inserts the collectives, which :func:`collectives` counts.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lora_jax import deprecation, train
from lora_jax.config import LoraConfig
from lora_jax.hlo import KINDS, Collective, Collectives, collectives  # noqa: F401 - re-exported
from lora_jax.tree import adapted_layers, adapter_nodes, get_path, merge, set_path, unmerge

Rule = tuple[str, P]
_AxisType = getattr(jax.sharding, "AxisType", None)   # JAX >= 0.5; before it every axis is Auto
STRATEGIES = ("dp", "fsdp", "tp", "fsdp_tp")
#: Megatron's split of a Llama block: column-parallel layers shard their output dim, row-parallel their input dim.
#: Phi-3's fused qkv_proj/gate_up_proj split their output dim like the others; a shard may then hold parts of
#: both q and k (or gate and up), which XLA computes correctly, with more communication than a head-aligned split.
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "qkv_proj", "gate_up_proj")
ROW = ("o_proj", "down_proj")


def _layer(names) -> str:
    return r"(^|/)(" + "|".join(names) + r")/"


def rules(strategy: str, *, data: str = "data", model: str = "model") -> tuple[Rule, ...]:
    """The preset rule set of a strategy, for mesh axes named ``data`` and ``model``.

    * ``"dp"``: every weight replicated (only the batch is split, over ``data``).
    * ``"fsdp"``: every kernel/embedding sharded over ``data`` on its
      second-to-last dim (a Dense kernel's input dim, an embedding's
      vocabulary); XLA gathers each weight where it is used.
    * ``"tp"``: Megatron tensor parallelism over ``model`` for Llama's names:
      ``q/k/v/gate/up_proj`` (and Phi-3's fused ``qkv_proj``/``gate_up_proj``)
      column-parallel (output dim), ``o/down_proj``
      row-parallel (input dim), ``lm_head`` over the vocabulary (output dim),
      ``embed_tokens`` vocabulary-parallel (first dim); other weights replicated.
    * ``"fsdp_tp"``: ``"tp"``, with the other dim of those weights sharded
      over ``data``, and any other kernel/embedding as in ``"fsdp"``.

    >>> pattern, spec = rules("tp")[0]
    >>> pattern, tuple(spec)
    ('(^|/)(q_proj|k_proj|v_proj|gate_proj|up_proj|qkv_proj|gate_up_proj)/kernel$', (None, 'model'))
    """
    f, m = (data if strategy == "fsdp_tp" else None), model    # f: the FSDP dim of a TP weight
    fsdp_all = ((r"(^|/)(kernel|embedding)$", P(data, None)),)
    tp = ((_layer(COLUMN) + "kernel$", P(f, m)),
          (_layer(COLUMN) + "bias$", P(m)),
          (_layer(ROW) + "kernel$", P(m, f)),
          (r"(^|/)lm_head/kernel$", P(f, m)),
          (r"(^|/)lm_head/bias$", P(m)),
          (r"(^|/)embed_tokens/embedding$", P(m, f)))
    presets = {"dp": (), "fsdp": fsdp_all, "tp": tp, "fsdp_tp": tp + fsdp_all}
    if strategy not in presets:
        raise ValueError(f"unknown sharding strategy {strategy!r}; presets: {STRATEGIES}")
    return presets[strategy] + ((".*", P()),)


def make_mesh(shape: Sequence[int], names: Sequence[str] = ("data", "model"), *, devices=None) -> Mesh:
    """``jax.make_mesh`` with ``Auto`` axes (sharding left to XLA's propagation, as these helpers expect).

    >>> make_mesh((1, 1)).shape
    OrderedDict([('data', 1), ('model', 1)])
    """
    auto = {} if _AxisType is None else {"axis_types": (_AxisType.Auto,) * len(names)}
    return jax.make_mesh(tuple(shape), tuple(names), devices=devices, **auto)


def _path_str(keypath) -> str:
    return jax.tree_util.keystr(keypath, simple=True, separator="/")


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _check_mesh(mesh) -> None:
    types = getattr(mesh, "axis_types", None) or ()
    explicit = [n for n, t in zip(mesh.axis_names, types) if _AxisType is not None and t == _AxisType.Explicit]
    if explicit:
        raise ValueError(f"mesh axes {explicit} are Explicit; these helpers leave the layout of intermediates to "
                         "XLA and need Auto axes: build the mesh with lora_jax.sharding.make_mesh or "
                         "jax.make_mesh(..., axis_types=(jax.sharding.AxisType.Auto,) * n)")


def _full_spec(spec: P, shape, where: str, mesh=None) -> tuple:
    """``spec`` aligned to the last dims of ``shape`` (leading dims unsharded), checked against ``mesh``."""
    spec = tuple(spec)
    if len(spec) > len(shape):
        raise ValueError(f"{where}: spec {P(*spec)} has {len(spec)} entries but the leaf has shape {list(shape)}")
    full = (None,) * (len(shape) - len(spec)) + spec
    if mesh is not None:
        sizes = dict(mesh.shape)
        for dim, entry in zip(shape, full):
            size = int(np.prod([sizes[a] for a in _axes(entry)], dtype=np.int64))
            if dim % size:
                raise ValueError(f"{where}: shape {list(shape)} does not divide over spec {P(*full)}: dim {dim} "
                                 f"is not divisible by {size} (mesh axes {dict(sizes)})")
    return full


def base_shardings(base_params, mesh, rule_set: str | Sequence[Rule]) -> Any:
    """A ``NamedSharding`` for every leaf of ``base_params`` (arrays or ``ShapeDtypeStruct``s).

    Args:
      base_params: the frozen params.
      mesh: a ``Mesh`` (or ``AbstractMesh``) with ``Auto`` axes.
      rule_set: a preset name (see :func:`rules`) or a sequence of ``(regex, PartitionSpec)``.

    Raises:
      ValueError: a rule names an axis the mesh lacks; a leaf matches no rule;
        a dim does not divide by its mesh axes (the message names the path,
        the shape and the spec).

    >>> import jax.numpy as jnp
    >>> mesh = jax.sharding.AbstractMesh((2, 1), ("data", "model"))
    >>> base = {"q_proj": {"kernel": jnp.zeros((4, 6))}, "norm": {"weight": jnp.ones(4)}}
    >>> sh = base_shardings(base, mesh, "fsdp_tp")
    >>> tuple(sh["q_proj"]["kernel"].spec), tuple(sh["norm"]["weight"].spec)
    (('data', 'model'), (None,))
    """
    rule_set = rules(rule_set) if isinstance(rule_set, str) else tuple(rule_set)
    _check_mesh(mesh)
    for pattern, spec in rule_set:
        missing = [a for entry in spec for a in _axes(entry) if a not in mesh.axis_names]
        if missing:
            raise ValueError(f"rule {pattern!r} -> {spec} names mesh axes {missing}, but the mesh has "
                             f"{tuple(mesh.axis_names)}")
    compiled = [(re.compile(pattern), spec) for pattern, spec in rule_set]

    def one(keypath, leaf):
        path = _path_str(keypath)
        for pattern, spec in compiled:
            if pattern.search(path):
                return NamedSharding(mesh, P(*_full_spec(spec, np.shape(leaf), f"param {path!r}", mesh)))
        raise ValueError(f"param {path!r} matches no sharding rule; add one (a final ('.*', P()) replicates "
                         f"the rest)")

    return jax.tree_util.tree_map_with_path(one, base_params)


def _spec_of(sharding) -> P:
    return sharding if isinstance(sharding, P) else sharding.spec


def _like(sharding, spec: tuple):
    return P(*spec) if isinstance(sharding, P) else NamedSharding(sharding.mesh, P(*spec))


def lora_shardings(base_params, lora_params, shardings=None) -> Any:
    """The shardings of the adapters: each follows the weight it adapts.

    ``A`` ``[lead..., in..., r]`` gets the weight's specs of its lead and input
    dims, ``B`` ``[lead..., r, out...]`` those of its lead and output dims; the
    rank axis is replicated.

    Args:
      base_params: the frozen params (arrays or ``ShapeDtypeStruct``s; their
        shapes tell each weight's lead/in/out split).
      lora_params: the adapters (arrays or ``ShapeDtypeStruct``s).
      shardings: ``base_params``' shardings (``NamedSharding`` or
        ``PartitionSpec`` leaves); by default each base leaf's own ``.sharding``.

    Returns:
      A tree like ``lora_params`` of the same kind of leaf as ``shardings``.

    Raises:
      ValueError: an adapter with no layer in the base, adapter shapes that do
        not fit their weight, or a leaf of ``lora_params`` outside an adapter.

    >>> import jax.numpy as jnp
    >>> base = {"q": {"kernel": jnp.zeros((8, 6))}}
    >>> lora = {"q": {"a": jnp.zeros((8, 2)), "b": jnp.zeros((2, 6))}}
    >>> sh = lora_shardings(base, lora, {"q": {"kernel": P("data", "model")}})
    >>> tuple(sh["q"]["a"]), tuple(sh["q"]["b"])
    (('data', None), (None, 'model'))
    """
    if adapter_nodes(base_params) and not adapter_nodes(lora_params):   # the order of 0.1: (lora_params, base_params)
        deprecation.warn("lora_shardings(lora_params, base_params, ...)",
                         "lora_shardings(base_params, lora_params, ...)")
        base_params, lora_params = lora_params, base_params
    if shardings is None:
        shardings = jax.tree.map(lambda leaf: getattr(leaf, "sharding", None), base_params)
    out: dict = {}
    for path, weight, base_node, node, (lead, in_shape, _) in adapted_layers(base_params, lora_params):
        name = "/".join(path)
        w_shape = np.shape(base_node[weight])
        sharding = get_path(shardings, path + (weight,))
        if not isinstance(sharding, (NamedSharding, P)):
            raise ValueError(f"layer {name!r}: its {weight} has sharding {sharding!r}; expected a NamedSharding "
                             "or PartitionSpec (place the base with base_shardings first, or pass shardings)")
        spec = tuple(_spec_of(sharding))
        if len(spec) > len(w_shape):
            raise ValueError(f"layer {name!r}: its {weight} {list(w_shape)} has a sharding of {len(spec)} dims")
        spec += (None,) * (len(w_shape) - len(spec))     # JAX's convention: missing trailing dims are unsharded
        cut, n_lead = len(lead) + len(in_shape), len(lead)
        out = set_path(out, path, {**{k: None for k in node},
                                   "a": _like(sharding, spec[:cut] + (None,)),
                                   "b": _like(sharding, spec[:n_lead] + (None,) + spec[cut:]),
                                   # DoRA's magnitude runs along the output features, like b's columns.
                                   **({"m": _like(sharding, spec[:n_lead] + spec[cut:])} if "m" in node else {})})
    extra = [_path_str(kp) for kp, leaf in jax.tree_util.tree_flatten_with_path(out, is_leaf=lambda x: x is None)[0]
             if leaf is None]
    if extra or jax.tree.structure(lora_params) != jax.tree.structure(out):
        raise ValueError("lora params hold leaves outside adapter nodes {'a', 'b'}: "
                         + (", ".join(extra) or "the tree's structure differs from its adapters'"))
    return out


def _replicated(example):
    return P() if isinstance(example, P) else NamedSharding(example.mesh, P())


def opt_state_shardings(optimizer: optax.GradientTransformation, lora_params, lora_sharding) -> Any:
    """Shardings of ``optimizer.init(lora_params)``: each state leaf follows its adapter leaf.

    A state leaf follows the adapter leaf whose key path ends its own (optax
    keeps per-parameter statistics in trees shaped like the params) and whose
    shape it has; scalars (step counts) are replicated.

    Raises:
      ValueError: a non-scalar state leaf matches no adapter leaf (e.g. a
        factored second moment); pass the shardings of such states yourself.

    >>> import jax.numpy as jnp
    >>> lora = {"q": {"a": jnp.zeros((8, 2)), "b": jnp.zeros((2, 6))}}
    >>> sh = opt_state_shardings(optax.adam(1e-3), lora, {"q": {"a": P("x", None), "b": P(None, "y")}})
    >>> tuple(sh[0].count), tuple(sh[0].mu["q"]["b"])
    ((), (None, 'y'))
    """
    params = jax.tree_util.tree_flatten_with_path(lora_params)[0]
    shardings = jax.tree_util.tree_flatten_with_path(lora_sharding, is_leaf=lambda x: isinstance(x, P))[0]
    if [kp for kp, _ in params] != [kp for kp, _ in shardings]:
        raise ValueError("lora_sharding does not mirror lora_params (derive it with lora_shardings)")
    table = {tuple(kp): (np.shape(leaf), sharding) for (kp, leaf), (_, sharding) in zip(params, shardings)}
    replicated = _replicated(next(iter(table.values()))[1])

    def one(keypath, leaf):
        keypath = tuple(keypath)
        for k in range(len(keypath)):
            hit = table.get(keypath[k:])
            if hit is not None and hit[0] == np.shape(leaf):
                return hit[1]
        if np.ndim(leaf) == 0:
            return replicated
        raise ValueError(f"optimizer state leaf {_path_str(keypath)!r} of shape {list(np.shape(leaf))} follows "
                         "no adapter leaf; give its sharding explicitly")

    return jax.tree_util.tree_map_with_path(one, jax.eval_shape(optimizer.init, lora_params))


@dataclasses.dataclass(frozen=True)
class Plan:
    """The shardings of one sharded LoRA run: its ``base_params``, ``lora_params``, ``opt_state`` and ``batch``."""

    mesh: Any
    base_params: Any
    lora_params: Any
    opt_state: Any
    batch: NamedSharding

    base = deprecation.renamed_attribute("Plan", "base", "base_params")
    lora = deprecation.renamed_attribute("Plan", "lora", "lora_params")

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def place(self, base_params, lora_params, opt_state):
        """``(base_params, lora_params, opt_state)`` put on their shardings (a copy; the inputs stay valid).

        Each process passes the same full values (as when every host loads the
        same checkpoint); for arrays too large for one host, create them under
        ``jax.jit`` with ``out_shardings`` instead.
        """
        return jax.device_put((base_params, lora_params, opt_state), (self.base_params, self.lora_params, self.opt_state),
                              may_alias=False)

    def abstract(self, lora_params, opt_state):
        """``(lora_params, opt_state)`` as ``jax.ShapeDtypeStruct`` leaves on this plan's shardings.

        What :meth:`lora_jax.io.Checkpointer.restore` needs to read a
        checkpoint straight onto this plan's mesh, whatever mesh or process
        count saved it (``ckpt.restore(TrainState(*plan.abstract(lora, opt), 0))``);
        nothing is allocated.
        """
        as_struct = lambda leaf, sharding: jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding)
        return (jax.tree.map(as_struct, lora_params, self.lora_params),
                jax.tree.map(as_struct, opt_state, self.opt_state))

    def local_rows(self, global_batch):
        """This process's rows of ``global_batch``: those its devices hold under :attr:`batch` (all, with one process).

        For scripts where every process builds the same global batch (same data,
        same seed) and keeps its own part: ``plan.shard_batch(plan.local_rows(batch))``.
        The leading axis must split evenly over the batch's mesh axes.

        >>> import jax.numpy as jnp, optax
        >>> lora = {"q_proj": {"a": jnp.zeros((4, 2)), "b": jnp.zeros((2, 6))}}
        >>> p = plan(make_mesh((1, 1)), {"q_proj": {"kernel": jnp.zeros((4, 6))}}, lora, optax.sgd(0.1), "fsdp")
        >>> p.local_rows(np.arange(8).reshape(4, 2)).shape    # one process: every row
        (4, 2)
        """
        def rows(x):
            x = np.asarray(x)
            parts = int(np.prod([self.mesh.shape[a] for a in _axes(self.batch.spec[0])]))
            if x.ndim == 0 or x.shape[0] % parts:
                raise ValueError(f"the global batch's leading axis ({x.shape[:1]}) must split evenly over the "
                                 f"{parts} devices of mesh axes {_axes(self.batch.spec[0])}")
            index = self.batch.addressable_devices_indices_map(x.shape[:1])
            spans = sorted({i[0].indices(x.shape[0])[:2] for i in index.values()})
            if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
                raise ValueError(f"this process's devices hold rows {spans} of the batch, not one contiguous block; "
                                 f"order the mesh's devices by process (make_mesh does)")
            return x[spans[0][0]:spans[-1][1]]
        return jax.tree.map(rows, global_batch)

    def shard_batch(self, local_batch):
        """The global batch from this process's rows (all of them with one process).

        Uses ``jax.make_array_from_process_local_data``: with several
        processes, each passes its own rows and the global batch is their
        concatenation along the leading axis.
        """
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.batch, np.asarray(x)), local_batch)


def plan(mesh, base_params, lora_params, optimizer: optax.GradientTransformation,
         rule_set: str | Sequence[Rule], *, batch_axes: str | tuple[str, ...] = "data") -> Plan:
    """Shardings for a run: the base by ``rule_set``, the adapters and optimizer state following it.

    The batch's leading axis is split over ``batch_axes``. Inputs may be
    abstract (``jax.eval_shape``); nothing is computed.

    >>> import jax.numpy as jnp, optax
    >>> base = {"q_proj": {"kernel": jnp.zeros((4, 6))}}
    >>> lora = {"q_proj": {"a": jnp.zeros((4, 2)), "b": jnp.zeros((2, 6))}}
    >>> p = plan(make_mesh((1, 1)), base, lora, optax.sgd(0.1), "fsdp_tp")
    >>> tuple(p.lora_params["q_proj"]["a"].spec), tuple(p.batch.spec)
    (('data', None), ('data',))
    """
    base = base_shardings(base_params, mesh, rule_set)
    lora = lora_shardings(base_params, lora_params, base)
    batch_axes = batch_axes if isinstance(batch_axes, str) else tuple(batch_axes)
    return Plan(mesh, base, lora, opt_state_shardings(optimizer, lora_params, lora), NamedSharding(mesh, P(batch_axes)))


def make_sharded_train_step(apply: Callable, loss_fn: Callable, optimizer: optax.GradientTransformation,
                            shardings: Plan, *, has_aux: bool = False, donate: bool = True) -> Callable:
    """:func:`lora_jax.make_train_step`'s step, jitted with the shardings of ``shardings``.

    ``step(lora, opt_state, base, batch, rng=None) -> (lora, opt_state, metrics)``:
    the arguments must be placed on (or be globals with) the plan's shardings,
    and the new adapters and optimizer state come back on them; the metrics
    are replicated. ``step.lower(...)`` gives the compiled program (for
    :func:`collectives`).
    """
    s = shardings
    return train.jit_step(train.step_function(apply, loss_fn, optimizer, has_aux), donate=donate,
                          in_shardings=(s.lora_params, s.opt_state, s.base_params, s.batch, s.replicated),
                          out_shardings=(s.lora_params, s.opt_state, s.replicated))


def _placement(tree):
    return jax.tree.map(lambda leaf: leaf.sharding, tree)


def make_sharded_merge(config: LoraConfig, base_sharding, *, donate: bool = False,
                       inverse: bool = False) -> Callable:
    """``jax.jit`` of ``merge(base, lora)`` (``unmerge`` with ``inverse``) whose result keeps ``base_sharding``.

    Each ``A @ B`` product is formed shard by shard where its weight lives:
    its only contraction is the rank axis, which is replicated, so no weight
    is gathered. With ``donate`` the base's buffers are reused for the result.
    The returned function has ``.lower(base, lora)`` for :func:`collectives`.
    """
    fn = unmerge if inverse else merge
    return jax.jit(lambda b, l: fn(b, l, config), out_shardings=base_sharding,
                   donate_argnums=(0,) if donate else ())


def sharded_merge(base_params, lora_params, config: LoraConfig, *, donate: bool = False) -> Any:
    """:func:`lora_jax.merge` on a sharded base; each merged weight keeps its weight's sharding.

    >>> import jax.numpy as jnp
    >>> base = {"q": {"kernel": jnp.zeros((4, 3))}}
    >>> lora = {"q": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3))}}
    >>> sharded_merge(base, lora, LoraConfig(rank=2, alpha=4))["q"]["kernel"][0]
    Array([4., 4., 4.], dtype=float32)
    """
    return _cached_merge(config, *_flat_placement(base_params), donate)(base_params, lora_params)


def _flat_placement(tree):
    leaves, treedef = jax.tree.flatten(_placement(tree))
    return treedef, tuple(leaves)


@functools.lru_cache(maxsize=16)
def _cached_merge(config, treedef, leaves, donate):
    # one jitted function per (config, layout): repeated merges (adapter switching) compile once
    return make_sharded_merge(config, jax.tree.unflatten(treedef, leaves), donate=donate)
