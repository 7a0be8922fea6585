"""The README's notebook example runs as written."""

import os
import re

import numpy as np

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_notebook_example_runs():
    text = open(README).read()
    section = text[text.index("## In a notebook") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README is ours
    losses = np.asarray(scope["step_losses"])
    assert losses.shape == (2,) and np.all(np.isfinite(losses))
    first = next(iter(np.asarray(x) for x in __import__("jax").tree.leaves(scope["new_params"])))
    assert first.shape[0] == 2  # one parameter set per learning rate
    assert not np.allclose(first[0], first[1])
