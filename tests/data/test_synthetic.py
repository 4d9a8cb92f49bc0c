"""Synthetic data: sizes that are not positive whole numbers are refused with the argument's name."""

import pytest

from specscope.data.synthetic import rf_regression, sparse_regression
from specscope.errors import ConfigError


@pytest.mark.parametrize("kw, word", [(dict(dim=0), "dim"), (dict(width=-3), "width"), (dict(samples=2.5), "samples"),
                                      (dict(outputs=True), "outputs")])
def test_rf_regression_refuses_bad_sizes(kw, word):
    args = {**dict(dim=4, width=8, samples=6, outputs=2), **kw}
    with pytest.raises(ConfigError, match=word):
        rf_regression(args["dim"], args["width"], args["samples"], args["outputs"], "relu", 0)


@pytest.mark.parametrize("kw, word", [(dict(dim=-1), "dim"), (dict(samples=0), "samples"), (dict(samples=3.0), "samples"),
                                      (dict(support=1.5), "support"), (dict(support=0), "support")])
def test_sparse_regression_refuses_bad_sizes(kw, word):
    args = {**dict(dim=4, samples=6, seed=0), **kw}
    with pytest.raises(ConfigError, match=word):
        sparse_regression(args.pop("dim"), args.pop("samples"), args.pop("seed"), **args)


def test_valid_sizes_still_work():
    assert rf_regression(4, 8, 6, 2, "relu", 0).A.shape == (8, 6)
    X, y = sparse_regression(4, 6, 0)
    assert X.shape == (6, 4) and y.shape == (6, 1)
