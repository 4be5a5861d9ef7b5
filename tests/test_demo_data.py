"""The demo's corpora, byte tokens and batches, and the shipped byte-level base model."""

import ast
import io
import json
import os
import tokenize

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.app.demo import data
from lora_jax.app.demo.pretrain import BASE_CONFIG, BASE_DIR, TOKENIZER_KEY, load_base, make_eval, pretrain
from lora_jax.models.llama import LlamaConfig

N_MODULES = 20
SHARED_DOC = "Compute nothing much at all, the same words in every file."
PROSE_LOSS_BOUND = 1.9   # nats/byte on held-out prose; the shipped model measures 1.36 (code: 2.01)


def _module_source(i: int) -> str:
    return f'''"""Module mod_{i:02d} talks about the colour number {i} in plain words."""
# a comment with the marker COMMENT_{i:02d}
import os


def func_{i:02d}(x):
    """Return the value of x plus {i} for module number {i}.

    >>> func_{i:02d}(1)
    {i + 1}
    """
    y = x + {i}  # TRAILING_{i:02d}
    return y


class Thing{i:02d}:
    """A thing that keeps the number {i} around for later use."""

    def method(self):
        """{SHARED_DOC}"""
        return "# not a comment, a string"
'''


@pytest.fixture
def fake_stdlib(tmp_path):
    """A tiny library: N_MODULES known modules, a package, files that must be skipped, one broken file."""
    for i in range(N_MODULES):
        (tmp_path / f"mod_{i:02d}.py").write_text(_module_source(i))
    for skipped in ("test", "tests", "idlelib", "site-packages", "encodings"):
        (tmp_path / skipped).mkdir()
        (tmp_path / skipped / "inside.py").write_text(f'"""SKIPPED_{skipped} words that must not appear."""\n')
    (tmp_path / "broken.py").write_text('"""BROKEN module with words."""\ndef f(:\n')
    return tmp_path


def _names(paths):
    return {p.removesuffix(".py") for p in paths}


def test_encode_decode_round_trip_non_ascii():
    text = "naïve café — 日本語, Ωμέγα 🐍\n\ttab"
    ids = data.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text.encode("utf-8")),)
    assert 0 <= ids.min() and ids.max() < 256
    assert data.decode(ids) == text
    assert data.decode(jnp.asarray(ids)) == text
    assert np.array_equal(data.encode(text.encode("utf-8")), ids)
    assert data.decode(ids[:-1].tolist() + [0xFF]).endswith("\ufffd")   # invalid UTF-8 is replaced
    with pytest.raises(ValueError, match="256"):
        data.decode([256])


def test_split_is_by_file_and_disjoint(fake_stdlib):
    held = {f"mod_{i:02d}" for i in range(N_MODULES) if data.is_heldout(f"mod_{i:02d}.py")}
    assert 0 < len(held) < N_MODULES          # the fixture's names do exercise both splits
    for corpus in (data.prose_corpus(stdlib=fake_stdlib), data.code_corpus(stdlib=fake_stdlib)):
        assert _names(corpus.heldout_files) == held
        assert _names(corpus.train_files) == {f"mod_{i:02d}" for i in range(N_MODULES)} - held
        for i in range(N_MODULES):
            marker = f"mod_{i:02d} " if corpus.name == "prose" else f"func_{i:02d}("
            inside, outside = ((corpus.heldout, corpus.train) if f"mod_{i:02d}" in held
                               else (corpus.train, corpus.heldout))
            assert marker.encode() in inside and marker.encode() not in outside


def test_prose_corpus_holds_the_docstrings_and_nothing_else(fake_stdlib):
    corpus = data.prose_corpus(stdlib=fake_stdlib)
    text = (corpus.train + b"\n\n" + corpus.heldout).decode()
    for i in range(N_MODULES):
        assert f"Module mod_{i:02d} talks about the colour number {i} in plain words." in text
        assert f"Return the value of x plus {i} for module number {i}." in text
        assert f"A thing that keeps the number {i} around for later use." in text
    assert ">>>" not in text and "import os" not in text and "COMMENT_" not in text
    assert "SKIPPED_" not in text and "BROKEN" not in text
    # A paragraph seen once is not repeated, and never reaches the held-out split from train.
    assert text.count(SHARED_DOC) == 1 and SHARED_DOC.encode() in corpus.train
    assert "broken.py" not in corpus.train_files + corpus.heldout_files


def test_code_corpus_has_no_comments_or_docstrings_and_parses(fake_stdlib):
    corpus = data.code_corpus(stdlib=fake_stdlib)
    for split in (corpus.train, corpus.heldout):
        source = split.decode()
        tree = ast.parse(source)          # files are joined by blank lines: still one valid module
        docs = [ast.get_docstring(n) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        assert docs and all(d is None for d in docs)
        kinds = {tok.type for tok in tokenize.generate_tokens(io.StringIO(source).readline)}
        assert tokenize.COMMENT not in kinds
        assert "COMMENT_" not in source and "TRAILING_" not in source and "talks about" not in source
        assert "# not a comment, a string" in source          # '#' inside strings survives
        assert "SKIPPED_" not in source and "BROKEN" not in source
    for i in range(N_MODULES):
        assert f"def func_{i:02d}(x):\n    y = x + {i}\n    return y".encode() in corpus.train + corpus.heldout


def test_max_bytes_caps_both_splits(fake_stdlib):
    full = data.code_corpus(stdlib=fake_stdlib)
    one_file = len(data.strip_docstrings(_module_source(0)).encode())
    cap = 3 * one_file + 10
    capped = data.code_corpus(cap, heldout_bytes=one_file + 5, stdlib=fake_stdlib)
    assert 2 * one_file <= len(capped.train) <= cap < len(full.train)
    assert 0 < len(capped.heldout) <= one_file + 5 and len(capped.heldout_files) == 1
    assert set(capped.train_files) < set(full.train_files)
    with pytest.raises(ValueError, match="no file fits"):
        data.prose_corpus(10, stdlib=fake_stdlib)


def test_real_stdlib_files_and_extraction():
    files = data.stdlib_files()
    assert "os.py" in files and "json/decoder.py" in files
    assert not [f for f in files if f.split("/")[0] in data.SKIP_DIRS or "/tests/" in f or "/test/" in f]
    held = [f for f in files if data.is_heldout(f)]
    assert 0.05 < len(held) / len(files) < 0.15
    with open(os.path.join(data.stdlib_root(), "random.py"), "rb") as f:
        source = f.read()
    code = data.strip_docstrings(source)
    ast.parse(code)
    assert tokenize.COMMENT not in {t.type for t in tokenize.generate_tokens(io.StringIO(code).readline)}
    assert "def shuffle(self, x" in code
    prose = data.docstring_prose(source)
    assert "Random number generator base class" in prose and "def " not in prose


def test_train_batches_are_seeded_contiguous_windows():
    rng = np.random.default_rng(0)
    text = bytes(rng.integers(0, 256, size=5000, dtype=np.uint8))     # every 16-byte window is unique

    def first(seed, n=3):
        stream = data.train_batches(text, seq_len=16, batch_size=4, seed=seed)
        return [next(stream) for _ in range(n)]

    a, b, c = first(0), first(0), first(1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    stream = data.train_batches(text, seq_len=16, batch_size=4, seed=0)
    batches = [next(stream) for _ in range(5)]
    assert not np.array_equal(batches[0], batches[1])
    for batch in batches:
        assert batch.shape == (4, 16) and batch.dtype == np.int32
        for row in batch:
            start = text.find(row.astype(np.uint8).tobytes())
            assert start >= 0 and np.array_equal(data.encode(text[start:start + 16]), row)
    with pytest.raises(ValueError, match="seq_len"):
        next(data.train_batches(b"short", seq_len=16, batch_size=1, seed=0))


def test_eval_windows_are_fixed_and_evenly_spaced():
    text = bytes(np.random.default_rng(0).integers(0, 256, size=1024, dtype=np.uint8))   # unique windows
    w = data.eval_windows(text, seq_len=8, batch_size=3, n_batches=2)
    assert w.shape == (2, 3, 8) and w.dtype == np.int32
    assert np.array_equal(w, data.eval_windows(text, seq_len=8, batch_size=3, n_batches=2))
    flat = w.reshape(-1, 8)
    starts = [text.find(row.astype(np.uint8).tobytes()) for row in flat]
    assert starts[0] == 0 and starts[-1] == len(text) - 8
    assert np.ptp(np.diff(starts)) <= 1                     # evenly spaced, up to rounding


def test_corpus_repr_does_not_dump_the_text():
    corpus = data.Corpus("prose", b"x" * 10_000, b"y" * 100, "somewhere")
    assert "xxx" not in repr(corpus) and "10000 B train" in corpus.summary()


@pytest.mark.slow
def test_pretrain_is_deterministic_per_seed(tmp_path):
    rng = np.random.default_rng(0)
    prose = data.Corpus("prose", bytes(rng.integers(97, 123, 3000, dtype=np.uint8)), b"held out words " * 20)
    code = data.Corpus("code", b"x = 1\n" * 100, b"y = 2\n" * 100)
    tiny = LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2)
    run = lambda seed, out: pretrain(tmp_path / out, steps=3, seq_len=16, batch_size=2, seed=seed, eval_every=3,
                                     config=tiny, prose=prose, code=code, show_progress=False)
    a, b = run(0, "a"), run(0, "b")
    read = lambda out: (tmp_path / out / "model.safetensors").read_bytes()
    assert read("a") == read("b")
    assert a["final"] == b["final"] and a["history"] == b["history"]
    assert a["tokens_seen"] == 3 * 16 * 2
    assert json.loads((tmp_path / "a" / "pretrain_log.json").read_text())["final"] == a["final"]


def test_shipped_base_model_loads_and_knows_prose_better_than_code():
    with open(os.path.join(BASE_DIR, "config.json")) as f:
        hf = json.load(f)
    assert hf[TOKENIZER_KEY] == "bytes" and hf["dtype"] == "bfloat16" and hf["model_type"] == "llama"
    module, params = load_base()
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(module.config, field) == getattr(BASE_CONFIG, field), field
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == 1_869_504
    # A few held-out files of the real library (never trained on), read directly: no full extraction.
    root = data.stdlib_root()
    held = [f for f in data.stdlib_files() if data.is_heldout(f)][:8]
    sources = [open(os.path.join(root, f), "rb").read() for f in held]
    prose = "\n\n".join(data.docstring_prose(s) for s in sources).encode()
    code = "\n\n".join(data.strip_docstrings(s) for s in sources).encode()
    evaluate = make_eval(module)
    windows = lambda text: data.eval_windows(text, seq_len=128, batch_size=8, n_batches=2)
    prose_loss, code_loss = evaluate(params, windows(prose)), evaluate(params, windows(code))
    assert prose_loss < PROSE_LOSS_BOUND < np.log(256)
    assert prose_loss + 0.3 < code_loss
