import torch
import pytest

from specscope.data.text import load_corpus, sample_batch, stdlib_files, unigram_loss
from specscope.errors import ConfigError


def test_stdlib_corpus_is_deterministic_and_split_by_file():
    a = load_corpus(max_bytes=400_000)
    b = load_corpus(max_bytes=400_000)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert len(a.val) > 0 and len(a.train) > 10 * len(a.val) / 2
    files = stdlib_files()
    assert files == sorted(files) and not any("site-packages" in str(f) for f in files)
    assert 0 < unigram_loss(a) < 8  # bytes: at most log(256) = 5.55 nats


def test_user_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 200)
    c = load_corpus(tmp_path / "a.txt")
    assert c.n_files == 1 and len(c.val) > 0
    x, y = sample_batch(c.train, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ConfigError, match="not a file or a folder"):
        load_corpus(tmp_path / "missing")
