"""Every bad input gets a one-line message naming the file or parameter and what to do."""
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_format_storage import write_tp2_dp2
from ucp_plugin.errors import FormatError
from ucp_plugin.storage import Checkpoint
from ucp_plugin.tools.verify import verify


def _rewrite(path, fn):
    tensors = load_file(str(path))
    save_file({k: fn(v) for k, v in tensors.items()}, str(path))


def _problems(root):
    return [str(p) for p in verify(str(root))]


def test_wrong_shape_and_dtype_are_named(tmp_path):
    write_tp2_dp2(str(tmp_path))
    shards = tmp_path / "step1" / "shards"
    _rewrite(shards / "rank-00000.safetensors", lambda t: torch.cat([t, t]))
    _rewrite(shards / "rank-00003.safetensors", lambda t: t.double())
    problems = _problems(tmp_path)
    assert any("rank-00000.safetensors: 'w/exp_avg/0' has shape [12], the manifest says [6]" in p
               for p in problems), problems
    assert any("rank-00003.safetensors: 'w/fp32/0' has dtype F64, the manifest says float32" in p
               for p in problems), problems
    assert all("\n" not in p for p in problems)


def test_missing_rank_is_refused_on_read(tmp_path):
    """Opening reads the top manifest only (format 1.1); the first read that needs a missing or
    damaged file names it."""
    write_tp2_dp2(str(tmp_path))
    step = tmp_path / "step1"
    os.remove(step / "shards" / "rank-00002.safetensors")
    with pytest.raises(FormatError, match=r"rank-00002.safetensors: tensor file is missing; the checkpoint is "
                                          r"incomplete — re-save it or restore the file"):
        Checkpoint.open(str(tmp_path)).read_atom("w", "fp32")
    os.remove(step / "index" / "rank-00002.json")
    with pytest.raises(FormatError, match=r"rank-00002.json: shard index is missing"):
        Checkpoint.open(str(tmp_path)).read_atom("w", "fp32")
    assert any("rank-00002.json: listed in the manifest but missing" in p for p in _problems(tmp_path))


def test_truncated_file_is_refused_on_read(tmp_path):
    write_tp2_dp2(str(tmp_path))
    with open(tmp_path / "step1" / "shards" / "rank-00001.safetensors", "r+b") as f:
        f.truncate(40)
    with pytest.raises(FormatError, match=r"rank-00001.safetensors: not a readable safetensors file .*truncated"):
        Checkpoint.open(str(tmp_path)).read_atom("w", "fp32")


def test_corrupt_manifest_and_state(tmp_path):
    write_tp2_dp2(str(tmp_path))
    (tmp_path / "step1" / "state" / "rank-00000.json").write_text("{nope")
    with pytest.raises(FormatError, match=r"rank-00000.json: not valid JSON .*the file is corrupt"):
        Checkpoint.open(str(tmp_path)).load_state(rank=0)
    (tmp_path / "step1" / "ucp.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(FormatError, match=r"ucp.json: not a universal checkpoint manifest"):
        Checkpoint.open(str(tmp_path))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_our_reader_never_unpickles(tmp_path, monkeypatch):
    """A pickle dropped where a tensor file belongs is reported as not safetensors, never run."""
    monkeypatch.chdir(tmp_path)
    write_tp2_dp2(str(tmp_path))
    with open(tmp_path / "step1" / "shards" / "rank-00000.safetensors", "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(FormatError, match="not a readable safetensors file"):
        Checkpoint.open(str(tmp_path)).read_atom("w", "fp32")
    assert not (tmp_path / "PWNED").exists()
