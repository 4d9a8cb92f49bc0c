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


def test_a_folder_of_fewer_files_than_val_every_holds_out_the_end_of_its_text(tmp_path):
    """Every 20th file goes to validation: six files gave none, and the corpus was refused as "too small to split
    (32542/0 bytes)". The last 1/20 of their joined text is validation, as for one file."""
    for i in range(6):
        (tmp_path / f"m{i}.py").write_text(f"# module {i}\n" + "x = 1\n" * 200)
    c = load_corpus(tmp_path)
    joined = b"\n".join((tmp_path / f"m{i}.py").read_bytes() for i in range(6))
    assert c.n_files == 6 and len(c.val) == len(joined) // 20
    assert bytes(c.train.tolist()) + bytes(c.val.tolist()) == joined


@pytest.mark.parametrize("kw, word", [(dict(val_every=0), "val_every"), (dict(val_every=-1), "val_every"),
                                      (dict(val_every=1), "val_every"), (dict(val_every=2.5), "val_every"),
                                      (dict(max_bytes=-10), "max_bytes"), (dict(max_bytes=0), "max_bytes"),
                                      (dict(max_bytes=100.5), "max_bytes")])
def test_load_corpus_refuses_bad_arguments(tmp_path, kw, word):
    (tmp_path / "a.txt").write_text("hello world " * 200)
    with pytest.raises(ConfigError, match=word):
        load_corpus(tmp_path / "a.txt", **kw)


def test_load_corpus_reads_only_max_bytes_and_names_unreadable_files(tmp_path, monkeypatch):
    import builtins

    (tmp_path / "a.txt").write_bytes(bytes(range(256)) * 40)
    asked = []
    real_open = builtins.open

    class Spy:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def read(self, n=-1):
            asked.append(n)
            return self.fh.read(n)

    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: Spy(real_open(f, *a, **k)) if str(f).endswith("a.txt") else real_open(f, *a, **k))
    c = load_corpus(tmp_path / "a.txt", max_bytes=1000)
    assert asked == [1000] and len(c.train) + len(c.val) == 1000
    monkeypatch.undo()
    full = bytes(range(256)) * 40
    assert bytes(c.train.tolist()) + bytes(c.val.tolist()) == full[:1000]
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.txt").write_text("x" * 500)
    (d / "b.txt").write_text("y" * 500)

    def fail(f, *a, **k):
        raise PermissionError(13, "Permission denied", str(f))

    monkeypatch.setattr(builtins, "open", fail)
    with pytest.raises(ConfigError, match="a.txt"):
        load_corpus(d, val_every=2)


@pytest.mark.parametrize("batch_size, seq_len, word", [(0, 8, "batch_size"), (-2, 8, "batch_size"), (2.5, 8, "batch_size"),
                                                       (2, 0, "seq_len"), (2, -4, "seq_len"), (2, 4.0, "seq_len")])
def test_sample_batch_refuses_bad_sizes(batch_size, seq_len, word):
    with pytest.raises(ConfigError, match=word):
        sample_batch(torch.arange(100, dtype=torch.uint8), batch_size, seq_len, torch.Generator().manual_seed(0))


def test_a_sequence_longer_than_the_split_names_the_longest_that_fits():
    tokens, g = torch.arange(7, dtype=torch.uint8), torch.Generator().manual_seed(0)
    x, y = sample_batch(tokens, 3, 5, g)  # the longest that fits: seq_len + 1 = 6 tokens, one start short of the end
    assert x.shape == y.shape == (3, 5) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ConfigError, match="sequence length 6 does not fit a corpus split of 7 tokens .*lower seq_len to at most 5, or use a larger corpus"):
        sample_batch(tokens, 3, 6, g)


def test_a_corpus_folder_leaves_out_hidden_folders_and_bytecode(tmp_path):
    """A folder holding a git repository trained on .git's binary objects (only hidden *files* were left out)."""
    from specscope.data.text import load_corpus

    (tmp_path / "a.txt").write_text("def f():\n    return 1\n" * 50)
    (tmp_path / ".git" / "objects").mkdir(parents=True)
    (tmp_path / ".git" / "objects" / "pack").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\x00\x01" * 500)
    corpus = load_corpus(tmp_path)
    text = bytes(torch.cat([corpus.train, corpus.val]).tolist())
    assert text == (tmp_path / "a.txt").read_bytes()


def test_a_corpus_too_large_for_memory_names_max_bytes(tmp_path, monkeypatch):
    """A 100 GB file read whole failed as the CLI's "out of memory … with steps=1: lower these sizes"."""
    from specscope.data import text
    from specscope.errors import ConfigError

    (tmp_path / "big.txt").write_text("x" * 1000)

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(text, "_split", no_memory)
    with pytest.raises(ConfigError, match=r"big.txt \(1000 bytes in 1 file\(s\)\) does not fit in memory; set max_bytes"):
        text.load_corpus(tmp_path / "big.txt")
