"""A distributed checkpoint's `.metadata` is read without running code from it (torch reads it with pickle.load)."""

import os
import pickle

import pytest
import torch

from specscope.errors import RunStoreError
from specscope.train import distributed as D


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    m(torch.randn(5, 3)).sum().backward()
    opt.step()
    return m, opt


class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_hostile_metadata_runs_no_code_and_is_one_clear_error(tmp_path):
    m, opt = _model()
    D.save(tmp_path / "ck", m, opt, extra={"step": 3})
    marker = tmp_path / "pwned"
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(_Hostile(marker)))
    with pytest.raises(RunStoreError, match=r"\.metadata is corrupt or tampered with .*system.*delete the checkpoint") as e:
        D.load(tmp_path / "ck", *_model())
    assert not marker.exists()
    assert "\n" not in str(e.value) and str(tmp_path / "ck" / ".metadata") in str(e.value)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("damage", ["truncate", "other_object", "missing"])
def test_a_damaged_or_foreign_metadata_is_one_clear_error(tmp_path, damage):
    m, opt = _model()
    D.save(tmp_path / "ck", m, opt)
    meta = tmp_path / "ck" / ".metadata"
    if damage == "truncate":
        meta.write_bytes(meta.read_bytes()[:100])
    elif damage == "other_object":
        meta.write_bytes(pickle.dumps({"storage_data": {}}))
    else:
        meta.unlink()
    with pytest.raises(RunStoreError, match=r"checkpoint metadata .*\.metadata"):
        D.load(tmp_path / "ck", *_model())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_genuine_checkpoint_still_round_trips(tmp_path):
    m, opt = _model()
    D.save(tmp_path / "ck", m, opt, extra={"step": 3})
    torch.manual_seed(1)
    m2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt2 = torch.optim.Adam(m2.parameters(), lr=0.1)
    assert D.load(tmp_path / "ck", m2, opt2) == {"step": 3}
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])
