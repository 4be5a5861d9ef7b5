"""The README's code example runs and its printed headline is what it claims."""

import pathlib
import re

import jax

from tests.tolerances import assert_close

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_merge_matches(capsys):
    text = README.read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    claimed = re.search(r'"(trainable [\d.]+% \([\d,]+ / [\d,]+\))"', code).group(1)
    assert claimed in capsys.readouterr().out
    unmerged = scope["apply"](scope["base"], scope["lora"], scope["ids"])
    assert_close(scope["logits"], unmerged, what="merged vs unmerged logits")
    jax.tree.map(lambda a, b: assert_close(a, b, what="unmerge(merge(W))"), scope["restored"], scope["base"])
