"""Bad arguments to the pairing and the verdict rule: one ConfigError naming the problem and the fix, at the
Monitor's construction (never mid-training, never a silent wrong selection)."""

import re

import pytest
import torch
from torch import nn

from specscope.errors import ConfigError
from specscope.probe import Interleaved, Monitor, verdict
from specscope.probe.advice import advice_table


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("include", ["fc1", "f*", "*"])
def test_a_bare_string_include_is_refused_not_read_letter_by_letter(include):
    """include="fc1" was the patterns 'f', 'c', '1' (an error naming letters); include="*" and "f*" selected by accident."""
    with pytest.raises(ConfigError, match=re.escape(f"include={include!r}: give a list of layer-name patterns")) as e:
        Monitor(Net(), include=include)
    assert f"include=[{include!r}]" in str(e.value)
    assert Monitor(Net(), include=[include]).layers  # the list form the message names works


@pytest.mark.parametrize("include", [[5], [None], ["fc1", 2]])
def test_a_pattern_that_is_no_string_is_a_config_error(include):
    with pytest.raises(ConfigError, match="give a list of layer-name patterns"):  # was a TypeError from fnmatch
        Monitor(Net(), include=include)


def test_include_may_be_any_iterable_of_patterns():
    assert Monitor(Net(), include=(p for p in ["fc1"])).layers == ["fc1"]


@pytest.mark.parametrize("spec, problem", [
    (Interleaved(("q", "q"), heads=1), r"part names \['q', 'q'\] must be distinct"),
    (Interleaved(("", "k"), heads=1), r"part names \['', 'k'\] must be distinct non-empty"),
    (Interleaved((1, 2), heads=1), r"part names \[1, 2\]"),
    (Interleaved("qk", heads=1), r"Interleaved\('qk', \.\.\.\) takes its part names as a list"),
    ({"a": True, "b": 5}, r"sizes \{'a': True\} must be positive integers"),
])
def test_split_part_names_and_sizes_are_checked_for_interleaved_too(spec, problem):
    """Interleaved parts were not checked: ("q", "q") recorded two weights named 'fc2.q', "qk" split into letters; a size
    True passed as one row."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    with pytest.raises(ConfigError, match=problem):
        Monitor(model, split={"0": spec})


@pytest.mark.parametrize("shape", [(5, 0), (0, 3)])
def test_a_weight_with_a_zero_size_dimension_is_refused_at_construction(shape):
    """A [6, 0] weight crashed the forward of the first measured step (a reshape error), or the end of the step (an empty
    gradient matrix), and split={...} of one divided by zero."""
    model = nn.Sequential(nn.Linear(shape[1], shape[0]), nn.Linear(3, 1))
    with pytest.raises(ConfigError, match=rf"'0' \({shape[0]}, {shape[1]}\) have a dimension of size 0.*exclude=\['0'\]"):
        Monitor(model)
    with pytest.raises(ConfigError, match="dimension of size 0"):
        Monitor(model, split={"0": ["a", "b"]} if shape[0] % 2 == 0 else None)
    mon = Monitor(model, exclude=["0"])  # the fix the message names
    assert mon.layers == ["1"]


@pytest.mark.parametrize("margin", [-0.5, -1, float("nan"), float("inf"), True, "0.25"])
def test_verdict_refuses_a_margin_that_is_not_a_finite_number_at_least_0(margin):
    """verdict(1.0, margin=-0.5) said "spectral" for a ratio of 1; margin=-1 divided by zero."""
    with pytest.raises(ConfigError, match=r"verdict\(margin=.*\) must be a finite number >= 0"):
        verdict(1.0, margin)
    with pytest.raises(ConfigError, match=r"advice\(margin="):
        advice_table({}, {}, window=1, margin=margin)
    assert verdict(1.0, 0) == "undecided" and verdict(1.3) == "spectral"
