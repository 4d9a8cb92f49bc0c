"""`specscope diagnose` end to end through the CLI, and the Python `diagnose` function."""

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from specscope import store
from specscope.cli import _register, app
from specscope.models.builtin import TRANSFORMER, language_batches
from specscope.errors import ConfigError

_register()


def invoke(*args):
    return CliRunner().invoke(app, ["diagnose", *args])


def test_transformer_table_run_and_embedding_closed_form(tmp_path):
    res = invoke("--steps", "4", "--every", "2", "--out", str(tmp_path), "--seed", "3")
    assert res.exit_code == 0, res.output
    for text in ("blocks.0.attn.q", "blocks.1.mlp.down", "embed", "closed_form", "verdict", "nr/st"):
        assert text in res.output
    (run_dir,) = (tmp_path / "diagnose").iterdir()
    df = store.load(run_dir)
    assert sorted(df[df.metric == "stable_rank"].step.unique()) == [0, 2]
    assert set(df[df.metric == "loss"].step) == {0, 1, 2, 3}
    emb = df[(df.metric == "stable_rank") & (df.layer == "embed")].set_index("step")
    batches = language_batches(3, TRANSFORMER["vocab_size"], TRANSFORMER["seq_len"])
    for step in range(3):
        ids = next(batches)[:, :-1]
        if step in emb.index:
            n, cmax = ids.numel(), torch.bincount(ids.flatten()).max().item()
            assert emb.loc[step, "value"] == pytest.approx(n / cmax, rel=1e-12)
            assert emb.loc[step, "rows"] == n
    assert store.list_runs(tmp_path).status.tolist() == ["complete"]


def test_mlp_and_user_factory(tmp_path, monkeypatch):
    res = invoke("--model", "mlp", "--steps", "2", "--out", str(tmp_path))
    assert res.exit_code == 0 and "layers.2" in res.output, res.output
    (tmp_path / "my_factory.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build(seed):
            torch.manual_seed(seed)
            model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
            batches = iter([(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(3)])
            return model, batches, lambda m, b: (m(b[0]) - b[1]).square().mean()

        def bad():
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    res = invoke("--model", "my_factory:build", "--steps", "3", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    assert "│ 2 " in res.output and "│ 0 " in res.output  # both Linear layers of the user's model
    res = invoke("--model", "my_factory:build", "--steps", "4", "--out", str(tmp_path))
    assert isinstance(res.exception, ConfigError) and "ended after 3 batches" in str(res.exception)
    for spec, msg in [("nonsense", "module:function"), ("no_such_mod_xyz:f", "cannot import"),
                      ("my_factory:missing", "no function"), ("my_factory:bad", "must return")]:
        res = invoke("--model", spec, "--steps", "1", "--out", str(tmp_path))
        assert isinstance(res.exception, ConfigError) and msg in str(res.exception), (spec, res.exception)
    sys.modules.pop("my_factory", None)


def test_python_diagnose_function():
    from specscope.probe import diagnose

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    batches = ((torch.randn(16, 4), torch.randn(16, 2)) for _ in range(5))
    seen = []
    res = diagnose(model, batches, lambda m, b: (m(b[0]) - b[1]).square().mean(), 5, sink=seen.extend)
    assert list(res.advice.layer) == ["0", "2"] and set(res.advice.measurements) == {5}
    assert len(res.losses) == 5 and seen == res.records


def test_a_nan_loss_is_named_as_the_loss_and_a_root_weight_by_its_name():
    from specscope.errors import NonFiniteError
    from specscope.probe import diagnose

    model = torch.nn.Linear(4, 3)  # a bare module: its weight is "weight", never the whole-model layer ""
    batches = [torch.randn(16, 4)] * 3
    res = diagnose(model, iter(batches), lambda m, b: m(b).square().mean(), 2)
    assert list(res.advice.layer) == ["weight"] and all(r.layer == "weight" for r in res.records if r.metric != "loss")
    calls = []

    def inf_at_step_1(m, b):
        calls.append(0)
        return m(b).square().mean() * (float("inf") if len(calls) == 2 else 1.0)

    with pytest.raises(NonFiniteError, match=r"non-finite loss \(inf\) at step 1"):
        diagnose(model, iter(batches), inf_at_step_1, 3)


# -- real models, options, literal names --------------------------------------------------------------

def summary_of(tmp_path) -> dict:
    import json

    (run_dir,) = (tmp_path / "diagnose").iterdir()
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("name", ["gpt2", "bert", "mixtral"])
def test_hf_builtin_configs_print_every_measured_weight_in_full(name, tmp_path):
    pytest.importorskip("transformers")
    res = invoke("--model", f"hf:{name}", "--steps", "2", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    verdicts = summary_of(tmp_path)["verdicts"]
    assert len(verdicts) >= 2
    lines = res.output.splitlines()
    for layer in verdicts:  # each name whole, on one line of the table
        assert any(f"│ {layer} " in line for line in lines), layer
    if name == "bert":
        assert "bert.encoder.layer.1.attention.output.dense" in verdicts
    if name == "mixtral":  # each expert of each stack a row of its own, its name's brackets printed as typed
        assert {f"model.layers.{i}.mlp.experts.{w}[{e}]" for i in (0, 1) for w in ("gate_up_proj", "down_proj")
                for e in range(4)} <= set(verdicts)


def test_hf_local_folder_trains_its_saved_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    from specscope.models.hf import SEQ, batches, corpus_bytes, tiny_configs

    torch.manual_seed(5)
    saved = transformers.LlamaForCausalLM(tiny_configs(transformers)["llama"])
    saved.save_pretrained(tmp_path / "my-llama")
    res = invoke("--model", f"hf:{tmp_path / 'my-llama'}", "--steps", "1", "--out", str(tmp_path / "runs"), "--seed", "3")
    assert res.exit_code == 0, res.output
    (run_dir,) = (tmp_path / "runs" / "diagnose").iterdir()
    df = store.load(run_dir)
    first = next(batches(corpus_bytes().long(), 3, SEQ, None))
    with torch.no_grad():
        expected = saved(**first).loss.item()
    assert df[df.metric == "loss"].value.item() == pytest.approx(expected, rel=1e-6)  # the saved weights, not a fresh init


def write_fused_factory(folder: Path) -> None:
    """fused_factory:build — an nn.Sequential with a fused qkv (8 -> 24), hostile names and a layer to exclude."""
    (folder / "fused_factory.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build(seed):
            torch.manual_seed(seed)
            model = nn.Sequential()
            model.add_module("qkv", nn.Linear(8, 24))
            model.add_module(":llama:", nn.Linear(24, 8))
            model.add_module("[bold]out[/bold]", nn.Linear(8, 2))
            model.add_module("skip", nn.Linear(2, 2))
            batches = iter([(torch.randn(16, 8), torch.randn(16, 2)) for _ in range(3)])
            return model, batches, lambda m, b: (m(b[0]) - b[1]).square().mean()
    """))


def test_options_current_directory_and_literal_names(tmp_path, monkeypatch):
    write_fused_factory(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    res = invoke("--model", "fused_factory:build", "--steps", "2", "--out", str(tmp_path), "--estimator", "gram",
                 "--split", "qkv=q,k,v", "--exclude", "skip")
    sys.modules.pop("fused_factory", None)
    assert res.exit_code == 0, res.output
    assert set(summary_of(tmp_path)["verdicts"]) == {"qkv.q", "qkv.k", "qkv.v", ":llama:", "[bold]out[/bold]"}
    assert "│ :llama: " in res.output and "│ [bold]out[/bold] " in res.output  # literal, no emoji, no markup
    assert "│ gram " in res.output and "skip" not in res.output


def test_a_split_cutting_across_fused_blocks_warns_on_one_line_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    from specscope.cli import main

    write_fused_factory(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["specscope", "diagnose", "--model", "fused_factory:build", "--steps", "1",
                                      "--out", str(tmp_path), "--split", "qkv=q,k", "--exclude", "skip"])
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None)
    finally:
        sys.modules.pop("fused_factory", None)
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("warning:")]
    assert "'qkv'" in line and "cut across the 3 blocks of 8" in line and "--split PATTERN=q:12,k:12" in line
    assert set(summary_of(tmp_path)["verdicts"]) == {"qkv.q", "qkv.k", ":llama:", "[bold]out[/bold]"}


def test_bad_options_and_models_exit_2_with_one_line(tmp_path, monkeypatch, capsys):
    from specscope.cli import main

    (tmp_path / "empty").mkdir()
    cases = [(["--model", "hf:no-such-model"], "no local folder"),
             (["--model", f"hf:{tmp_path / 'empty'}"], "cannot load"),
             (["--split", "qkv"], "PATTERN=q,k,v"),
             (["--split", "qkv=q:1,k"], "PATTERN=q,k,v"),
             (["--split", "qkv=q:a,k:b"], "integers"),
             (["--estimator", "svd", "--steps", "1"], "--estimator 'svd': choose one of gram, power, exact"),
             (["--exclude", ".*"], "exclude patterns ['.*'] match no weight"),  # a regex where fnmatch is meant
             (["--exclude", "*"], "exclude=['*'] leaves no weight to measure"),
             (["--split", "nosuch=q,k"], "split patterns ['nosuch'] match no weight"),
             (["--out", str(tmp_path / "afile")], "is a file, not a folder"),
             (["--lr", "-1"], "--lr -1.0: the AdamW learning rate must be a number > 0 that float32 holds"),
             (["--lr", "nan"], "--lr nan"), (["--lr", "0"], "--lr 0.0"),
             (["--seed", "-1"], "--seed -1: use an integer in [0, 2^63)"),
             (["--seed", str(2**70)], "use an integer in [0, 2^63)"),
             (["--steps", "0"], "'--steps'"),
             (["--bogus"], "No such option: --bogus (the options: --estimator, --every, --exclude, --lr, --model, --out,"),
             (["--stepz", "3"], "No such option: --stepz (did you mean --steps?)"),  # not --seed or --help
             (["--split", "blocks.0.attn.q=q,q,v"], "must be distinct"),
             (["--split", "qkv=q:8,q:8"], "a part is named twice"),
             (["--out", ""], "--out is empty; give a path")]
    (tmp_path / "afile").write_text("")
    for args, msg in cases:
        if any(a.startswith("hf:") for a in args):
            pytest.importorskip("transformers")
        out = [] if "--out" in args else ["--out", str(tmp_path)]  # a case's own --out, given once
        monkeypatch.setattr(sys, "argv", ["specscope", "diagnose", *out, *args])
        with pytest.raises(SystemExit) as exit_:
            main()
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and msg in err and len(err.splitlines()) == 1 and err.startswith("error:"), (args, err)
    assert not (tmp_path / "diagnose").exists()  # every one fails before a run directory is made


def test_a_model_folder_or_module_that_fails_is_one_line_and_runs_no_folder_code(tmp_path, monkeypatch, capsys):
    """A folder whose config.json names its own Python file (auto_map) is refused without running or asking about
    it (transformers would prompt on a terminal) — also where the model type is one transformers knows, which it
    built as its own class, ignoring the folder's code, and trained; a factory module that fails to import, a
    relative name and a builtin are one line each."""
    import json

    from specscope.cli import main
    from specscope.models.hf import tiny_configs

    transformers = pytest.importorskip("transformers")
    evil = tmp_path / "evil_model"
    evil.mkdir()
    marker = tmp_path / "ran"
    (evil / "config.json").write_text('{"model_type": "evil", "architectures": ["EvilModel"], "auto_map": '
                                      '{"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}')
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    known = tmp_path / "llama_with_code"
    transformers.LlamaForCausalLM(tiny_configs(transformers)["llama"]).save_pretrained(known)
    config = json.loads((known / "config.json").read_text())
    (known / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "evil.EvilModel"}}))
    (known / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    capsys.readouterr()  # save_pretrained's progress bar
    (tmp_path / "broken_factory.py").write_text("def f(:\n")
    (tmp_path / "raising_factory.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.chdir(tmp_path)
    cases = [([f"hf:{evil}"], "its config.json names Python code of its own (auto_map)"),
             ([f"hf:{known}"], "its config.json names Python code of its own (auto_map)"), (["broken_factory:f"], "importing 'broken_factory' raised SyntaxError"),
             (["raising_factory:f"], "raised RuntimeError: boom at import"), ([".fac:f"], "is a relative module name"),
             (["builtins:dict"], "has no inspectable signature"), (["os:sep"], "os.sep is a str, not a function")]
    for model, msg in cases:
        monkeypatch.setattr(sys, "argv", ["specscope", "diagnose", "--out", str(tmp_path / "out"), "--model", *model])
        monkeypatch.setattr(sys, "stdin", open(os.devnull))  # a prompt would read this: nothing to accept
        with pytest.raises(SystemExit) as exit_:
            main()
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and msg in err and err.startswith("error:"), (model, err)
    assert not marker.exists()
    assert not (tmp_path / "out" / "diagnose").exists()


def test_a_factory_that_breaks_its_contract_is_one_line(tmp_path, monkeypatch, capsys):
    from specscope.cli import main

    (tmp_path / "badf.py").write_text(textwrap.dedent("""
        import torch

        def needs_args(a, b):
            pass

        def boom(seed):
            raise RuntimeError("boom in user code")

        def detached(seed=0):
            model = torch.nn.Linear(4, 2)
            return model, iter([torch.randn(8, 4)] * 3), lambda m, b: m(b).sum().detach()

        def not_scalar(seed=0):
            model = torch.nn.Linear(4, 2)
            return model, iter([torch.randn(8, 4)] * 3), lambda m, b: m(b)

        def nan_loss(seed=0):
            model = torch.nn.Linear(4, 2)
            return model, iter([torch.randn(8, 4)] * 3), lambda m, b: m(b).sum() * float("nan")

        def nan_later(seed=0):
            model, calls = torch.nn.Linear(4, 2), []
            def loss_fn(m, b):
                calls.append(1)
                return m(b).sum() * (float("nan") if len(calls) > 1 else 1.0)
            return model, iter([torch.randn(8, 4)] * 3), loss_fn

        def gen(seed=0):
            model = torch.nn.Linear(4, 2)
            def batches():
                while True:
                    yield torch.randn(8, 4)
            return model, batches, lambda m, b: m(b).sum()  # the function, not batches()

        def no_params(seed=0):
            return torch.nn.ReLU(), iter([torch.randn(8, 4)] * 3), lambda m, b: m(b).sum()

        def frozen(seed=0):
            model = torch.nn.Linear(4, 2).requires_grad_(False)
            return model, iter([torch.randn(8, 4)] * 3), lambda m, b: m(b).sum()
    """))
    monkeypatch.chdir(tmp_path)
    cases = {"needs_args": "needs ['a', 'b']; a factory takes no argument or only `seed`",
             "boom": "the factory raised RuntimeError: boom in user code",
             "detached": "loss_fn returned a tensor of shape () that does not require grad",
             "not_scalar": "loss_fn returned a tensor of shape (8, 2)",
             "gen": "the factory's batches (function) cannot be iterated; return an iterator or iterable of batches",
             "no_params": "the model has no parameters, so there is nothing to train and measure",
             "frozen": "the model has no trainable weight with ≥ 2 dims",
             "nan_loss": "non-finite loss (nan) at step 0; check the model's initialization and its data (no update had been made yet, so --lr is not the cause)",
             "nan_later": "non-finite loss (nan) at step 1; lower --lr"}  # last: the one case that leaves a run
    for fn, msg in cases.items():
        monkeypatch.setattr(sys, "argv", ["specscope", "diagnose", "--model", f"badf:{fn}", "--steps", "2",
                                          "--out", str(tmp_path / "runs")])
        with pytest.raises(SystemExit) as exit_:
            main()
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and msg in err and len(err.splitlines()) == 1, (fn, err)
        runs = list((tmp_path / "runs" / "diagnose").glob("*")) if (tmp_path / "runs").exists() else []
        assert len(runs) == (fn == "nan_later"), (fn, runs)  # a fault before step 0 is recorded: no run
        if fn != "nan_later":  # nor an empty runs/diagnose/ folder (a NaN loss at step 0 left one)
            assert not (tmp_path / "runs" / "diagnose").exists(), fn
    (run,) = (tmp_path / "runs" / "diagnose").glob("*")  # step 0 recorded, then the fault: the run stays, failed
    assert store.Run.open(run).status == "failed"
    sys.modules.pop("badf", None)


def test_table_folds_long_names_instead_of_cutting_them():
    import pandas as pd
    from rich.console import Console

    from specscope.cli.commands.diagnose import verdict_table

    long = "model.layers.0.self_attn.q_proj." * 3 + "weight"
    df = pd.DataFrame([{"layer": long, "stable_rank": 2.0, "nuclear_rank": 3.0, "spectral_advantage": 1.5,
                        "verdict": "unmeasured", "estimator": "power", "rows": 64}])
    console = Console(width=80, record=True)
    console.print(verdict_table(df, "t"))
    text = console.export_text()
    pieces = [line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")]
    assert "…" not in text and long in "".join(pieces) and len(pieces) > 1  # folded over lines, whole
    grid = [line for line in text.splitlines() if line.startswith(("┏", "┃", "┡", "│", "└"))]
    assert grid and all(line.endswith(("┓", "┃", "┩", "│", "┘")) for line in grid)  # no column cut off
    assert "medians over the measured steps" in " ".join(text.split())  # the caption says what the numbers are
    assert "rows" in text and "unmeasured" in text


def test_the_verdict_table_shows_control_characters_in_names_as_escapes():
    """A module name from user code can hold ESC sequences or a right-to-left override: printed, they would
    recolour the terminal or reorder the row; the table shows them as visible escapes."""
    import pandas as pd
    from rich.console import Console

    from specscope.cli.commands.diagnose import verdict_table

    name = "mlp\x1b[31m.\u202eevil\x07.weight"
    df = pd.DataFrame([{"layer": name, "stable_rank": 2.0, "nuclear_rank": 3.0, "spectral_advantage": 1.5,
                        "verdict": "spectral", "estimator": "gram", "rows": 64}])
    console = Console(width=200, record=True)
    console.print(verdict_table(df, "t\x1b]0;title\x07"))
    text = console.export_text()
    assert "\x1b" not in text and "\u202e" not in text and "\x07" not in text
    assert "mlp\\x1b[31m.\\u202eevil\\x07.weight" in text and "t\\x1b]0;title\\x07" in text


def test_hf_local_folder_uses_its_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "def", "return", "self", "import", "if", "else", "for", "in", "class", "None", "=", "(", ")", ":"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    small = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(words), n_positions=64, bos_token_id=0, eos_token_id=0)
    folder = tmp_path / "word-gpt2"
    transformers.GPT2LMHeadModel(small).save_pretrained(folder)
    res = invoke("--model", f"hf:{folder}", "--steps", "1", "--out", str(tmp_path / "runs"))
    assert isinstance(res.exception, ConfigError) and "no tokenizer" in str(res.exception)  # 15 ids cannot hold bytes
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    res = invoke("--model", f"hf:{folder}", "--steps", "2", "--out", str(tmp_path / "runs"))
    assert res.exit_code == 0, res.output


def test_report_rewrites_a_diagnose_run(tmp_path):
    assert invoke("--model", "mlp", "--steps", "2", "--out", str(tmp_path)).exit_code == 0
    (run_dir,) = (tmp_path / "diagnose").iterdir()
    page = run_dir / "report.html"
    page.unlink()
    res = CliRunner().invoke(app, ["report", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert "diagnose mlp" in page.read_text()
    page.unlink()
    res = CliRunner().invoke(app, ["report", run_dir.name, "--root", str(tmp_path)])  # the id `runs` prints
    assert res.exit_code == 0 and page.is_file(), res.output


def test_report_of_a_failed_diagnose_run_says_so_and_does_not_offer_a_resume(tmp_path):
    """It warned "`specscope run --resume RUN` finishes it" (which says: unknown lab 'diagnose') and titled the page
    as if the run had finished."""
    from specscope import store

    assert invoke("--model", "mlp", "--steps", "2", "--out", str(tmp_path)).exit_code == 0
    (run_dir,) = (tmp_path / "diagnose").iterdir()
    store.Run.open(run_dir).set_status("failed")
    res = CliRunner().invoke(app, ["report", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert "--resume" not in res.output and "a diagnose run does not resume: run `specscope diagnose` again" in res.output
    assert "<title>FAILED RUN, RECORDS SO FAR — diagnose mlp" in (run_dir / "report.html").read_text()


def test_report_of_a_run_a_users_own_loop_recorded_is_the_per_weight_page(tmp_path):
    """A callback's run= (store.Run.create(root, "hf", ...)) names no lab: `specscope report` gives it diagnose's
    per-weight page (it said: unknown lab 'hf'); a Run left open says how it completes."""
    from specscope.probe import Monitor

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    monitor = Monitor(model, every=1)
    for close in (True, False):
        run = store.Run.create(tmp_path / "runs", "hf", {"steps": 2})
        for step in range(2):
            with monitor.step(step + 2 * (not close)):
                model(torch.randn(64, 16)).square().mean().backward()
            model.zero_grad()
            for record in monitor.pop_records():
                run.append(record)
        if close:
            run.close()
        else:
            run.flush()
            run.set_status("incomplete")
        res = CliRunner().invoke(app, ["report", str(run.path)])
        assert res.exit_code == 0, res.output
        page = (run.path / "report.html").read_text()
        assert f"<title>{'' if close else 'INCOMPLETE RUN, RECORDS SO FAR — '}hf — {run.id}" in page and "spectral" in page
        assert close or "complete once its Run is closed (run.close())" in res.output


def test_the_readme_factory_runs_and_a_wrong_loss_signature_is_one_line(tmp_path, monkeypatch, capsys):
    import re

    from specscope.cli import main

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    (block,) = re.findall(r"```python\n# mypkg/mymodule.py\n(.*?)```", readme, flags=re.S)
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "mymodule.py").write_text(block)
    (tmp_path / "mypkg" / "wrong.py").write_text(block.replace("lambda m, b: F.cross_entropy(m(b[0]), b[1])", "F.cross_entropy"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        res = invoke("--model", "mypkg.mymodule:factory", "--steps", "2", "--out", str(tmp_path / "runs"))
        assert res.exit_code == 0, res.output
        assert "│ 0 " in res.output and "│ 2 " in res.output  # both Linear layers in the table
        monkeypatch.setattr(sys, "argv", ["specscope", "diagnose", "--model", "mypkg.wrong:factory", "--steps", "1",
                                          "--out", str(tmp_path / "runs")])
        with pytest.raises(SystemExit) as exit_:
            main()
    finally:
        for name in ("mypkg", "mypkg.mymodule", "mypkg.wrong"):
            sys.modules.pop(name, None)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "loss_fn(model, batch) raised TypeError" in err, err


def test_printed_ratio_sits_on_the_same_side_of_the_verdict_bounds():
    from specscope.cli.commands.diagnose import _fmt_ratio
    from specscope.probe.advice import verdict

    for x in (1.2504, 1.2496, 0.79999, 0.80001, 2.345, 1.0):
        assert verdict(float(_fmt_ratio(x))) == verdict(x), x
    assert _fmt_ratio(2.345) == "2.35" and _fmt_ratio(1.2504) == "1.2504"


def test_a_bad_margin_is_refused_before_training_and_log_spaced_measuring_works():
    import torch

    from specscope.errors import ConfigError
    from specscope.probe.diagnose import diagnose

    model = torch.nn.Linear(4, 4)
    batches = [torch.randn(3, 4)] * 3
    loss = lambda m, x: m(x).square().sum()  # noqa: E731
    before = model.weight.detach().clone()
    with pytest.raises(ConfigError, match=r"diagnose\(margin=-1\) must be a finite number >= 0"):
        diagnose(model, batches, loss, 3, margin=-1)
    assert torch.equal(model.weight, before)  # refused before any step (it used to fail after the last one)
    result = diagnose(model, batches, loss, 3, every=None, log_spaced=True)  # was a TypeError comparing None < 1
    assert list(result.advice["measurements"]) == [3] and len(result.losses) == 3  # steps 0, 1, 2 are log-spaced


def _diagnose_module(tmp_path, monkeypatch, capsys, name: str, source: str, *args: str) -> tuple[int, str]:
    """`specscope diagnose --model NAME:factory ARGS` on a module of `source` written to tmp_path: (exit code, stderr)."""
    from specscope.cli import main

    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["specscope", "diagnose", "--model", f"{name}:factory", *args,
                                      "--out", str(tmp_path / "runs")])
    try:
        with pytest.raises(SystemExit) as exit_:
            main()
    finally:
        sys.modules.pop(name, None)
    return exit_.value.code, capsys.readouterr().err.strip()


def test_a_factory_whose_batches_raise_is_one_line(tmp_path, monkeypatch, capsys):
    """A batch iterator that raised (a broken data file) was a traceback, exit 1, and a failed run directory; a
    raising loss_fn was already one line."""
    code, err = _diagnose_module(tmp_path, monkeypatch, capsys, "badbatches",
                                 "import torch, torch.nn as nn\n"
                                 "def factory(seed=0):\n"
                                 "    def batches():\n"
                                 "        yield torch.randn(4, 8)\n"
                                 "        raise ValueError('shard 2 is corrupt')\n"
                                 "    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), batches(), "
                                 "lambda m, b: m(b).square().mean()\n", "--steps", "3")
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("error: ") and "batch iterator raised ValueError: shard 2 is corrupt" in err


def test_a_factory_that_fails_before_its_first_record_leaves_no_folder(tmp_path, monkeypatch, capsys):
    """No run was kept, but the --out folder made for it was (an empty `runs/`); a folder that was there stays."""
    source = ("import torch, torch.nn as nn\n"
              "def factory(seed=0):\n"
              "    def batches():\n"
              "        raise ValueError('no shards found')\n"
              "        yield\n"
              "    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), batches(), lambda m, b: m(b).square().mean()\n")
    code, err = _diagnose_module(tmp_path, monkeypatch, capsys, "nobatches", source, "--steps", "3")
    assert code == 2 and "no shards found" in err and not (tmp_path / "runs").exists()
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    code, err = _diagnose_module(tmp_path, monkeypatch, capsys, "nobatches", source, "--steps", "3")
    assert code == 2 and sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["mine"]


def test_resuming_a_diagnose_run_says_what_it_is(tmp_path, monkeypatch, capsys):
    """`run --resume` on a diagnose run said "unknown lab 'diagnose'"."""
    import json

    from specscope.cli import main
    from specscope.store import Run

    with Run.create(tmp_path, "diagnose", {"model": "mlp"}) as run:
        run.log(0, {"loss": 1.0})
    meta = json.loads((run.path / "config.json").read_text())
    (run.path / "config.json").write_text(json.dumps({**meta, "status": "interrupted"}))  # stopped before its end
    monkeypatch.setattr(sys, "argv", ["specscope", "run", "--resume", str(run.path)])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "made by `specscope diagnose`" in err and len(err.strip().splitlines()) == 1


def test_a_factory_that_calls_sys_exit_is_one_line_not_a_silent_success(tmp_path, monkeypatch, capsys):
    code, err = _diagnose_module(tmp_path, monkeypatch, capsys, "exiting", "import sys\ndef factory():\n    sys.exit(0)\n")
    assert code == 2 and err == ("error: --model 'exiting:factory': the factory called sys.exit(0); a factory returns "
                                 "(model, batches, loss_fn)")


def test_a_damaged_hf_folder_is_one_line_and_leaves_no_run(tmp_path):
    """A cut safetensors file, a config.json of negative sizes, a tokenizer of ids past the model's vocabulary: each
    ended in a traceback (exit 1), the last after making a failed run directory."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from specscope.models.hf import tiny_configs

    cut = tmp_path / "cut"
    transformers.LlamaForCausalLM(tiny_configs(transformers)["llama"]).save_pretrained(cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    negative = tmp_path / "negative"
    transformers.LlamaForCausalLM(tiny_configs(transformers)["llama"]).save_pretrained(negative)
    config = json.loads((negative / "config.json").read_text())
    (negative / "config.json").write_text(json.dumps({**config, "hidden_size": -4}))
    wide = tmp_path / "wide-tokenizer"
    words = {f"w{i}": 300 + i for i in range(5)} | {"[UNK]": 299}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.LlamaForCausalLM(tiny_configs(transformers)["llama"]).save_pretrained(wide)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(wide)
    for folder, says in ((cut, "cannot load a causal- or masked-LM from that folder"),
                         (negative, "cannot load a causal- or masked-LM from that folder"),
                         (wide, "the folder's tokenizer gives ids up to")):
        res = invoke("--model", f"hf:{folder}", "--steps", "1", "--out", str(tmp_path / "runs"))
        assert isinstance(res.exception, ConfigError) and says in str(res.exception), (folder, res.exception)
        assert not (tmp_path / "runs" / "diagnose").exists()
