"""safetensors files: read and write named NumPy arrays, one file or a sharded folder.

Only the ``safetensors`` format is read, never pickle. Arrays come back as
NumPy (bfloat16 through ``ml_dtypes``); files are written with the
``{"format": "pt"}`` metadata that PyTorch loaders expect. Every failure to
read is a :class:`SafetensorsFileError` naming the file, and the loaders of
model weights and adapters ask :func:`read` to refuse tensors that are not
floating point or not finite (:class:`BadTensorError`, naming file and tensor).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from lora_jax.io.fields import read_json
from lora_jax.io.progress import progress

PT_METADATA = {"format": "pt"}
INDEX_SUFFIX = ".index.json"


class SafetensorsFileError(ValueError):
    """A ``.safetensors`` file or shard index that cannot be read; the message names the file."""


class BadTensorError(ValueError):
    """A weight that is not floating point, or holds NaN/Inf; the message names the file and the tensor."""


def is_float_dtype(dtype) -> bool:
    """True for real floating-point dtypes, ``ml_dtypes`` ones (bfloat16, float8) included.

    >>> is_float_dtype(np.float16), is_float_dtype(ml_dtypes.bfloat16), is_float_dtype(np.int32)
    (True, True, False)
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return True
    try:
        return dtype.kind == "V" and ml_dtypes.finfo(dtype) is not None
    except ValueError:
        return False


def check_tensor(path: str, name: str, value: np.ndarray, *, check_finite: bool = True):
    """Raises :class:`BadTensorError` unless ``value`` is floating point (and, by default, finite).

    ``np.isfinite(x).all()`` once per tensor, on the host: cheap next to reading the file.

    >>> check_tensor("a.safetensors", "w", np.array([1.0, np.nan]))
    Traceback (most recent call last):
    ...
    lora_jax.io.tensors.BadTensorError: a.safetensors: tensor 'w' holds non-finite values (1 NaN, 0 Inf); \
pass check_finite=False to load it anyway
    """
    if not is_float_dtype(value.dtype):
        raise BadTensorError(f"{path}: tensor {name!r} has dtype {value.dtype.name}, not a floating-point dtype; "
                             f"weights and adapters must be float (was the header's dtype changed?)")
    if check_finite and not np.isfinite(value).all():
        as64 = np.asarray(value, np.float64)
        raise BadTensorError(f"{path}: tensor {name!r} holds non-finite values ({int(np.isnan(as64).sum())} NaN, "
                             f"{int(np.isinf(as64).sum())} Inf); pass check_finite=False to load it anyway")


def read(path: str | os.PathLike, *, show_progress: bool = False, require_float: bool = False,
         check_finite: bool = False) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as ``{name: np.ndarray}``.

    Args:
      path: the file.
      show_progress: a progress bar while reading.
      require_float: refuse (:class:`BadTensorError`) a tensor whose dtype is
        not floating point (int8, bool, a header relabelled ``I32``).
      check_finite: with ``require_float``, also refuse NaN and Inf values.

    Raises :class:`SafetensorsFileError` (a ``ValueError``) naming the file
    when it is not a readable safetensors file.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     write(os.path.join(d, "t.safetensors"), {"w": np.eye(2, dtype=np.float32)})
    ...     read(os.path.join(d, "t.safetensors"))["w"].tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safetensors file at {path!r}")
    try:
        with safe_open(path, framework="np") as f:
            names = list(f.keys())
            tensors = {name: f.get_tensor(name) for name in progress(names, f"reading {os.path.basename(path)}",
                                                                      enabled=show_progress)}
    except (SafetensorError, OSError, TypeError) as err:
        raise SafetensorsFileError(f"{path}: not a readable safetensors file ({err})") from None
    if require_float:
        for name, value in tensors.items():
            check_tensor(path, name, value, check_finite=check_finite)
    return tensors


def write(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Writes ``tensors`` to one ``.safetensors`` file (C-contiguous NumPy copies)."""
    arrays = {name: np.ascontiguousarray(np.asarray(value)) for name, value in tensors.items()}
    save_file(arrays, os.fspath(path), metadata=dict(PT_METADATA if metadata is None else metadata))
    # safetensors (0.8) creates the file readable by its owner only; give it the permissions of any new
    # file (0o666 less the umask), so that a model or adapter written for others can be read by them.
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _shard_file(index: str, tensor: str, shard) -> str:
    """The shard name of one ``weight_map`` entry, refused unless a relative path inside the folder."""
    if not isinstance(shard, str) or not shard.endswith(".safetensors"):
        raise SafetensorsFileError(f"{index}: weight_map entry {tensor!r} -> {shard!r} is not a .safetensors "
                                   f"file name")
    parts = shard.replace("\\", "/").split("/")
    if os.path.isabs(shard) or shard.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise SafetensorsFileError(f"{index}: weight_map entry {tensor!r} -> {shard!r} points outside the "
                                   f"model folder; shards must be relative paths inside it")
    return shard


def _read_shards(folder: str, index: str, read_kwargs: dict) -> dict[str, np.ndarray]:
    """The tensors of the shards ``index`` lists; each tensor in exactly the shard the index names."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, Mapping):
        raise SafetensorsFileError(f"{index} has no 'weight_map' object")
    weight_map = {name: _shard_file(index, name, shard) for name, shard in weight_map.items()}
    shards = sorted(set(weight_map.values()))
    absent = [shard for shard in shards if not os.path.isfile(os.path.join(folder, shard))]
    if absent:
        raise FileNotFoundError(f"{index} lists shard files that are not in {folder!r}: {absent[:5]}")
    tensors, source = {}, {}
    for shard in shards:
        for name, value in read(os.path.join(folder, shard), **read_kwargs).items():
            if name in source:
                raise SafetensorsFileError(f"{index}: tensor {name!r} is stored in two shards, {source[name]!r} "
                                           f"and {shard!r}")
            if weight_map.get(name) != shard:
                raise SafetensorsFileError(f"{index}: shard {shard!r} holds tensor {name!r}, which the index maps "
                                           f"to {weight_map.get(name)!r}")
            tensors[name], source[name] = value, shard
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise SafetensorsFileError(f"{index} lists tensors its shards do not hold: {missing[:5]}")
    return tensors


def read_folder(folder: str | os.PathLike, stem: str = "model", *, show_progress: bool = False,
                require_float: bool = False, check_finite: bool = False) -> dict[str, np.ndarray]:
    """The tensors of ``<folder>/<stem>.safetensors``, or of the shards its ``.index.json`` lists.

    ``require_float`` and ``check_finite`` are passed to :func:`read` for each
    file. An index entry pointing outside ``folder`` (``../x``, an absolute
    path) and a tensor stored in two shards are refused
    (:class:`SafetensorsFileError`, naming the index and the entry).
    """
    folder = os.fspath(folder)
    single = os.path.join(folder, f"{stem}.safetensors")
    index = single + INDEX_SUFFIX
    read_kwargs = dict(show_progress=show_progress, require_float=require_float, check_finite=check_finite)
    if os.path.isfile(single):
        return read(single, **read_kwargs)
    if os.path.isfile(index):
        return _read_shards(folder, index, read_kwargs)
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
