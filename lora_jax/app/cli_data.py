"""The inputs of the ``lora-jax`` command: paths, model and adapter folders, tokenizers, training text.

Kept apart from :mod:`lora_jax.app.cli_commands` (the commands) and
:mod:`lora_jax.app.cli_args` (their parser). Every problem a user can fix
surfaces here as a :class:`~lora_jax.app.cli_args.CliError` whose message
names the file (and the line, for JSONL) at fault.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import core
from lora_jax.app.cli_args import CliError
from lora_jax.io import fields, load_peft
from lora_jax.io.names import to_torch
from lora_jax.models import from_pretrained
from lora_jax.tree import adapter_nodes, get_path, weight_name

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_KEY = "lora_jax_tokenizer"   # config.json key naming a built-in tokenizer


# ---- paths

def existing_dir(path: str, option: str) -> str:
    """``path`` if it is a folder, else a :class:`CliError` (code 2) naming the option."""
    if not os.path.exists(path):
        raise CliError(f"{option} {path!r}: no such folder", code=2)
    if not os.path.isdir(path):
        raise CliError(f"{option} {path!r} is a file, expected a folder", code=2)
    return path


def existing_file(path: str, option: str) -> str:
    """``path`` if it is a file, else a :class:`CliError` (code 2) naming the option."""
    if not os.path.exists(path):
        raise CliError(f"{option} {path!r}: no such file", code=2)
    if os.path.isdir(path):
        raise CliError(f"{option} {path!r} is a folder, expected a file", code=2)
    return path


def read_json(path: str) -> dict:
    """A JSON object from ``path``, read strictly (:func:`lora_jax.io.fields.read_json`); a malformed file
    is a :class:`CliError` (exit 1) naming the file."""
    try:
        return fields.read_json(path)
    except fields.ConfigFieldError as err:
        raise CliError(str(err)) from None


# ---- model and adapter folders

def folder_bytes(folder: str, suffix: str = ".safetensors") -> int:
    """The bytes of the files in ``folder`` whose names end with ``suffix``."""
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(suffix))


def load_model(model_dir: str, *, show_progress: bool = False):
    """``(module, params, config.json dict)`` of a Hugging Face model folder, with errors that name the folder."""
    existing_dir(model_dir, "--model")
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise CliError(f"--model {model_dir!r} is not a Hugging Face model folder (no config.json)", code=2)
    hf = read_json(config_path)
    try:
        module, params = from_pretrained(model_dir, show_progress=show_progress)
    except (ValueError, FileNotFoundError) as err:
        raise CliError(f"--model {model_dir}: {err}") from err
    return module, params, hf


def load_adapter(adapter_dir: str, option: str = "--adapter"):
    """The :class:`~lora_jax.io.PeftAdapter` in ``adapter_dir``, after checking that it is a PEFT folder."""
    existing_dir(adapter_dir, option)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not os.path.isfile(os.path.join(adapter_dir, name)):
            # PEFT saves an adapter not named "default" into a sub-folder named after it.
            subs = sorted(d for d in os.listdir(adapter_dir) if os.path.isfile(os.path.join(adapter_dir, d, name)))
            hint = f"; it has adapters in sub-folders: {', '.join(subs)}" if subs else ""
            raise CliError(f"{option} {adapter_dir!r} is not a PEFT adapter folder (no {name}){hint}", code=2)
    read_json(os.path.join(adapter_dir, "adapter_config.json"))
    return load_peft(adapter_dir)


def check_adapter_fits(lora, base, adapter_dir: str) -> None:
    """Raises :class:`CliError` unless every adapter has a layer in ``base`` with a weight of matching shape."""
    for path, node in adapter_nodes(lora).items():
        where = f"adapter {adapter_dir!r} does not fit the base model: layer {to_torch('/'.join(path))!r}"
        try:
            base_node = get_path(base, path)
            w = base_node[weight_name(base_node, path)]
        except (KeyError, ValueError):
            raise CliError(f"{where} does not exist in the base model") from None
        a, b = np.shape(node["a"]), np.shape(node["b"])
        try:
            core.split_shape(np.shape(w), a, b)
        except ValueError:
            raise CliError(f"{where}: A {list(a)} and B {list(b)} (lora_jax layout [in, r], [r, out]) do not fit "
                           f"its weight {list(np.shape(w))} ([in, out]); was it trained on another model?") from None


def load_fitting_adapter(base, adapter_dir: str | None):
    """``(lora, config)`` read from ``adapter_dir`` and checked against ``base``; ``(None, None)`` without one."""
    if adapter_dir is None:
        return None, None
    adapter = load_adapter(adapter_dir)
    check_adapter_fits(adapter.lora_params, base, adapter_dir)
    return jax.tree.map(jnp.asarray, adapter.lora_params), adapter.config


def eos_token_id(model_dir: str, hf_config: Mapping) -> int | None:
    """The end-of-sequence id of ``generation_config.json``, else of ``config.json`` (the first of a list)."""
    gen_path = os.path.join(model_dir, "generation_config.json")
    gen = read_json(gen_path) if os.path.isfile(gen_path) else {}
    eos = gen.get("eos_token_id", hf_config.get("eos_token_id"))
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return eos if isinstance(eos, int) and not isinstance(eos, bool) else None


# ---- tokenizers

class ByteTokenizer:
    """UTF-8 bytes as token ids (0-255), for models trained on raw bytes.

    >>> tok = ByteTokenizer()
    >>> tok.encode("hi!")
    [104, 105, 33]
    >>> tok.decode([104, 105, 33])
    'hi!'
    """

    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` library."""

    name = TOKENIZER_FILE

    def __init__(self, path: str):
        from tokenizers import Tokenizer   # deferred: optional (the app extra), only for a tokenizer.json

        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as err:  # the library raises a bare Exception on malformed files
            raise CliError(f"{path}: not a readable tokenizers file ({str(err).splitlines()[0]})") from None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(model_dir: str, hf_config: Mapping):
    """The tokenizer of a model folder: its ``tokenizer.json``, else the one ``config.json`` names.

    A folder whose ``config.json`` holds ``"lora_jax_tokenizer": "bytes"`` and
    no ``tokenizer.json`` uses :class:`ByteTokenizer`.
    """
    path = os.path.join(model_dir, TOKENIZER_FILE)
    if os.path.isfile(path):
        return HFTokenizer(path)
    builtin = hf_config.get(TOKENIZER_KEY)
    if builtin == ByteTokenizer.name:
        return ByteTokenizer()
    if builtin is not None:
        raise CliError(f"{model_dir}: config.json names the tokenizer {builtin!r}; the only built-in one is "
                       f"'bytes'")
    raise CliError(f"{model_dir}: no {TOKENIZER_FILE} (and config.json sets no \"{TOKENIZER_KEY}\"), so there is "
                   f"no way to turn text into token ids; copy the model's {TOKENIZER_FILE} into the folder")


def encode_checked(tokenizer, text: str, vocab_size: int, what: str) -> np.ndarray:
    """``tokenizer.encode(text)`` as int32, refusing ids the model's embedding table does not have."""
    ids = np.asarray(tokenizer.encode(text), dtype=np.int32)
    if ids.size and int(ids.max()) >= vocab_size:
        bad = int(ids.max())
        hint = " (non-ASCII bytes?)" if tokenizer.name == ByteTokenizer.name else ""
        raise CliError(f"{what}: the tokenizer produced id {bad}{hint}, but the model's vocabulary has only "
                       f"{vocab_size} entries")
    return ids


# ---- training text

def read_documents(path: str) -> list[str]:
    """The texts of a data file: a ``.jsonl`` file's ``"text"`` fields, else the whole file as one text.

    Blank JSONL lines are skipped; any other line must be a JSON object with a
    string ``"text"``, or a :class:`CliError` names its line number.
    """
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read()
    except UnicodeDecodeError as err:
        raise CliError(f"{path}: not UTF-8 text (byte {err.start})") from None
    if not path.lower().endswith(".jsonl"):
        return [content] if content else []
    docs = []
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CliError(f"{path}, line {lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            found = f"keys {sorted(record)}" if isinstance(record, dict) else type(record).__name__
            raise CliError(f"{path}, line {lineno}: expected an object with a \"text\" string, found {found}")
        docs.append(record["text"])
    return docs


def tokenize_documents(tokenizer, docs: Sequence[str], vocab_size: int, path: str) -> np.ndarray:
    """All documents' token ids, one after the other, as one int32 stream."""
    parts = [encode_checked(tokenizer, doc, vocab_size, path) for doc in docs]
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def fingerprint(tokens: np.ndarray) -> str:
    """A short hash of a token stream, to tell whether a resumed run sees the same data.

    >>> fingerprint(np.arange(3, dtype=np.int32))
    '3:ad5dc1478de0'
    """
    digest = hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int32).tobytes()).hexdigest()[:12]
    return f"{len(tokens)}:{digest}"


def window_batch(tokens: np.ndarray, *, seed: int, step: int, batch_size: int, seq_len: int) -> np.ndarray:
    """The batch of training step ``step``: ``batch_size`` random windows of ``seq_len + 1`` tokens.

    The windows depend on ``(seed, step)`` alone, never on earlier steps, so a
    run resumed at any step sees exactly the batches of an uninterrupted run.

    >>> toks = np.arange(100, dtype=np.int32)
    >>> b = window_batch(toks, seed=0, step=3, batch_size=2, seq_len=4)
    >>> b.shape, bool((np.diff(b, axis=1) == 1).all())
    ((2, 5), True)
    >>> bool((b == window_batch(toks, seed=0, step=3, batch_size=2, seq_len=4)).all())
    True
    """
    span = seq_len + 1
    if len(tokens) < span:
        raise CliError(f"the data holds {len(tokens)} tokens, fewer than --seq-len + 1 = {span}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - span + 1, size=batch_size)
    return np.stack([tokens[s:s + span] for s in starts])
