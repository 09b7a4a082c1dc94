"""The README's Python examples run, in order, as a user would paste them."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")


def python_blocks_text() -> str:
    return "".join(python_blocks())


def python_blocks():
    with open(README) as handle:
        text = handle.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow  # the examples train models
def test_readme_examples_run(capsys):
    blocks = python_blocks()
    assert len(blocks) >= 4
    namespace = {"__name__": "__readme__"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as exc:  # report which block broke
            raise AssertionError(f"README python block {i + 1} failed: {exc!r}\n{block}") from exc
    printed = capsys.readouterr().out
    assert "['quadrant']" in printed
    # print_trainable_parameters prints what the README shows.
    shown = re.search(r"# (trainable params: .*)", python_blocks_text()).group(1)
    assert shown in printed
