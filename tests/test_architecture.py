"""The package's structure rules, checked on its source: no private names across modules, no hidden imports."""

import ast
import textwrap

from bench import architecture

# Imports inside a function that defer an optional heavy dependency (or the application) on purpose.
DEFERRED = {
    "lora_jax.io.progress",       # rich, only when a bar is drawn
    "lora_jax.app.cli",           # the commands (JAX), only when one runs: --help loads no JAX
    "lora_jax.app.cli_data",      # tokenizers, only for a model folder with tokenizer.json
    "lora_jax.app.demo.report",   # matplotlib and rich, only when the report is drawn
    "lora_jax.app.demo.study",    # matplotlib, only when a figure is drawn
}


def test_no_module_imports_another_modules_private_names():
    assert architecture.private_imports(architecture.modules(architecture.ROOT)) == []


def test_imports_inside_functions_only_defer_optional_dependencies():
    found = architecture.imports_inside_functions(architecture.modules(architecture.ROOT))
    assert sorted({place.split(":")[0] for place in found} - DEFERRED) == []


def test_private_import_detector_sees_both_spellings():
    mods = {
        "lora_jax": ast.parse(""),
        "lora_jax.a": ast.parse("def _hidden(): pass\n"),
        "lora_jax.b": ast.parse(textwrap.dedent("""
            from lora_jax.a import _hidden
            from lora_jax import a as mod_a
            from . import a
            def f():
                return mod_a._hidden(), a._also, a.public, a.__name__
        """)),
    }
    assert architecture.private_imports(mods) == ["lora_jax.b: lora_jax.a._also", "lora_jax.b: lora_jax.a._hidden"]


def test_function_lengths_count_nested_definitions():
    tree = ast.parse("def outer():\n    def inner():\n        return 1\n    return inner\n")
    assert architecture.functions(tree) == [("outer", 4), ("outer.inner", 2)]
