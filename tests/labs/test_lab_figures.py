"""Every lab's figures of a run interrupted before its first record: `specscope report` draws them without an
error or a warning (matplotlib's "No artists with labels found to put in legend" was printed for four of them)."""

import warnings

import pandas as pd
import pytest

from specscope import labs
from specscope.store.readers import LOAD_COLUMNS

WITH_FIGURES = [name for name in labs.names() if hasattr(labs.get(name), "figures")]


def empty_metrics() -> pd.DataFrame:
    kinds = {"step": "int64", "rows": "int64", "value": "float64"}
    return pd.DataFrame({c: pd.Series(dtype=kinds.get(c, "object")) for c in LOAD_COLUMNS})


@pytest.mark.parametrize("name", WITH_FIGURES)
def test_figures_of_a_run_with_no_records_warn_nothing(name):
    import matplotlib.pyplot as plt

    lab = labs.get(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figures = lab.figures(empty_metrics(), lab.Config())
    plt.close("all")
    assert isinstance(figures, dict)
