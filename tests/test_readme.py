"""The README's self-contained examples (marked `<!-- tested ... -->`) run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"<!-- tested[^>]*-->\n```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_marks_its_runnable_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs(i, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared
    namespace: dict = {"__name__": f"readme_block_{i}"}
    try:
        exec(compile(BLOCKS[i], f"README.md block {i}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    if "coupling_ratios" in BLOCKS[i]:  # the SED example: three finite positive ratios and a window that filled
        assert namespace["sed"].full and len(namespace["R"]) == 3
        assert all(0 < r < float("inf") for r in namespace["R"])
