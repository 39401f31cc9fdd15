"""Loading a resume directory runs no code from it (issue 14 item 8): a crafted meta.pt, RNG file,
DCP `.metadata` or DCP non-tensor entry whose pickle would create a marker file is refused with a
ConfigError naming the file, and the marker does not appear. Each payload is first shown to be live
(plain pickle creates the marker), so the refusals cannot pass by accident."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from rlp_engine.config import ConfigError
from rlp_engine.engine.checkpoint import CheckpointStore, load_tensors, save_tensors
from rlp_engine.engine.dcp_check import check_dcp_dir, read_metadata


class _Payload:
    """Unpickling this writes `marker` (what a malicious checkpoint would do instead)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _assert_live(payload: _Payload, tmp_path) -> None:
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists(), "the payload does not run code: the test below would prove nothing"


def _model_and_opt(seed: int):
    torch.manual_seed(seed)
    model = nn.Linear(5, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(4, 5)).square().sum().backward()
    opt.step()
    return model, opt


def _saved_store(tmp_path):
    model, opt = _model_and_opt(0)
    store = CheckpointStore(tmp_path / "resume")
    path = store.save({"loop": {"step": 1}}, {"m": model}, [opt])
    return store, path


@pytest.mark.parametrize("name", ["meta.pt", "rng-rank0.pt"])
def test_crafted_meta_or_rng_file_is_refused_and_not_run(tmp_path, name):
    store, path = _saved_store(tmp_path)
    marker = tmp_path / "ran"
    _assert_live(_Payload(marker), tmp_path)
    torch.save({"loop": {"step": 1}, "x": _Payload(marker)}, path / name)
    with pytest.raises(ConfigError, match=rf"{name}.*weights_only=True"):
        if name == "meta.pt":
            store.latest()
        else:
            model, opt = _model_and_opt(1)
            store.restore(path, {"m": model}, [opt])
    assert not marker.exists()


def test_genuine_dcp_dir_passes_and_round_trips(tmp_path):
    model, opt = _model_and_opt(0)
    save_tensors(tmp_path / "state", {"m": model}, [opt])
    check_dcp_dir(tmp_path / "state")
    assert type(read_metadata(tmp_path / "state" / ".metadata")).__name__ == "Metadata"
    other, other_opt = _model_and_opt(1)
    load_tensors(tmp_path / "state", {"m": other}, [other_opt])
    assert torch.equal(other.weight, model.weight)
    assert other_opt.state_dict()["param_groups"][0]["lr"] == 0.01


def test_crafted_dcp_metadata_is_refused_and_not_run(tmp_path):
    _, path = _saved_store(tmp_path)
    marker = tmp_path / "ran"
    _assert_live(_Payload(marker), tmp_path)
    meta_file = path / "state" / ".metadata"
    meta = pickle.loads(meta_file.read_bytes())  # the genuine one, with a payload riding along
    meta.planner_data = {"x": _Payload(marker)}
    meta_file.write_bytes(pickle.dumps(meta))
    model, opt = _model_and_opt(1)
    with pytest.raises(ConfigError, match=r"\.metadata is not a checkpoint .* \(builtins\.exec"):
        load_tensors(path / "state", {"m": model}, [opt])
    assert not marker.exists()


def test_crafted_dcp_bytes_entry_is_refused_and_not_run(tmp_path):
    """An optimizer hyperparameter (a non-tensor entry, which DCP reads with weights_only=False)
    pointed at a pickle that runs code."""
    _, path = _saved_store(tmp_path)
    marker = tmp_path / "ran"
    _assert_live(_Payload(marker), tmp_path)
    state = path / "state"
    evil = state / "__9_0.distcp"
    torch.save(_Payload(marker), evil)
    meta = pickle.loads((state / ".metadata").read_bytes())
    index = next(k for k in meta.storage_data if k.fqn == "optim.param_groups.0.lr")
    info = meta.storage_data[index]
    info.relative_path, info.offset, info.length = evil.name, 0, evil.stat().st_size
    (state / ".metadata").write_bytes(pickle.dumps(meta))
    model, opt = _model_and_opt(1)
    with pytest.raises(ConfigError, match=r"__9_0\.distcp is not a checkpoint.*optim\.param_groups\.0\.lr"):
        load_tensors(state, {"m": model}, [opt])
    assert not marker.exists()


def test_metadata_of_another_type_or_missing_is_refused(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(ConfigError, match="holds a dict, not a DCP Metadata"):
        check_dcp_dir(tmp_path)
    (tmp_path / ".metadata").unlink()
    with pytest.raises(ConfigError, match=r"no \.metadata file"):
        check_dcp_dir(tmp_path)
