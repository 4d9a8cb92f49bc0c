"""The README section "Which layers of my Hugging Face / Lightning model want Muon?" runs as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("lightning")

README = Path(__file__).resolve().parents[2] / "README.md"
TITLE = "## Which layers of my Hugging Face / Lightning model want Muon?"
MARK = "<!-- run by tests/integrations/test_readme_section.py -->"


def blocks(lang: str) -> list[str]:
    text = README.read_text()
    section = text[text.index(TITLE):]
    section = section[: section.index("\n## ", len(TITLE))]
    return re.findall(re.escape(MARK) + rf"\n```{lang}\n(.*?)```", section, flags=re.S)


def test_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write their checkpoints and logs under the working directory
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "readme_hf_lightning"}
    try:
        for i, code in enumerate(blocks("python")):  # one namespace: the Lightning block reuses model and data
            exec(compile(code, f"README.md HF/Lightning block {i}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    assert len(blocks("python")) == 2
    advice = namespace["callback"].monitor.advice()
    assert set(advice.measurements) == {2} and "model.model.layers.0.self_attn.q_proj" in set(advice.layer)
    assert set(namespace["monitor"].advice().measurements) == {2}
    assert (tmp_path / "out" / "checkpoint-10" / "specscope_monitor.pt").is_file()
    algos = {g["algorithm"] for g in namespace["trainer"].optimizers[0].param_groups}
    assert algos == {"muon", "adamw"}


def test_shell_lines_run(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from specscope.cli import _register, app

    _register()
    monkeypatch.chdir(tmp_path)
    (code,) = blocks("bash")
    lines = [ln for ln in code.splitlines() if ln.strip()]
    assert len(lines) == 2
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] == "specscope"
        res = CliRunner().invoke(app, argv[1:])
        assert res.exit_code == 0, (line, res.output)
        assert "verdict" in res.output
