"""safetensors files: read and write named NumPy arrays, one file or a sharded folder.

Only the ``safetensors`` format is read, never pickle. Arrays come back as
NumPy (bfloat16 through ``ml_dtypes``); files are written with the
``{"format": "pt"}`` metadata that PyTorch loaders expect.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lora_jax.io.progress import progress

PT_METADATA = {"format": "pt"}
INDEX_SUFFIX = ".index.json"


def read(path: str | os.PathLike, *, show_progress: bool = False) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as ``{name: np.ndarray}``.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     write(os.path.join(d, "t.safetensors"), {"w": np.eye(2, dtype=np.float32)})
    ...     read(os.path.join(d, "t.safetensors"))["w"].tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safetensors file at {path!r}")
    with safe_open(path, framework="np") as f:
        names = list(f.keys())
        return {name: f.get_tensor(name) for name in progress(names, f"reading {os.path.basename(path)}",
                                                               enabled=show_progress)}


def write(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Writes ``tensors`` to one ``.safetensors`` file (C-contiguous NumPy copies)."""
    arrays = {name: np.ascontiguousarray(np.asarray(value)) for name, value in tensors.items()}
    save_file(arrays, os.fspath(path), metadata=dict(PT_METADATA if metadata is None else metadata))


def read_folder(folder: str | os.PathLike, stem: str = "model", *, show_progress: bool = False) -> dict[str, np.ndarray]:
    """The tensors of ``<folder>/<stem>.safetensors``, or of the shards its ``.index.json`` lists."""
    folder = os.fspath(folder)
    single = os.path.join(folder, f"{stem}.safetensors")
    index = single + INDEX_SUFFIX
    if os.path.isfile(single):
        return read(single, show_progress=show_progress)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, Mapping):
            raise ValueError(f"{index!r} has no 'weight_map' object")
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read(os.path.join(folder, shard), show_progress=show_progress))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(f"{index!r} lists tensors its shards do not hold: {missing[:5]}")
        return tensors
    pickled = [n for n in ("pytorch_model.bin", "model.bin") if os.path.isfile(os.path.join(folder, n))]
    hint = f" (found {pickled[0]}: pickle checkpoints are not read; re-save it as safetensors)" if pickled else ""
    raise FileNotFoundError(f"no {stem}.safetensors or {stem}.safetensors{INDEX_SUFFIX} in {folder!r}{hint}")


def write_folder(folder: str | os.PathLike, tensors: Mapping[str, np.ndarray], stem: str = "model", *,
                 max_shard_bytes: int | None = None) -> list[str]:
    """Writes ``tensors`` as ``<stem>.safetensors``, or as shards plus an index past ``max_shard_bytes``.

    Returns the file names written.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    names = sorted(tensors)
    sizes = {name: np.asarray(tensors[name]).nbytes for name in names}
    if max_shard_bytes is None or sum(sizes.values()) <= max_shard_bytes:
        write(os.path.join(folder, f"{stem}.safetensors"), tensors)
        return [f"{stem}.safetensors"]
    shards, current, used = [], [], 0
    for name in names:
        if current and used + sizes[name] > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += sizes[name]
    shards.append(current)
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        file = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write(os.path.join(folder, file), {name: tensors[name] for name in shard})
        files.append(file)
        weight_map.update({name: file for name in shard})
    with open(os.path.join(folder, f"{stem}.safetensors{INDEX_SUFFIX}"), "w") as f:
        json.dump({"metadata": {"total_size": int(sum(sizes.values()))}, "weight_map": weight_map}, f, indent=2)
    return files + [f"{stem}.safetensors{INDEX_SUFFIX}"]
