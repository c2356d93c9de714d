"""``dsfiles.ptfile``: ``torch.save`` files read without torch and without running code. What it reads
must equal ``torch.load`` (dtypes, shapes, strided views, shared storages, 0-d, bfloat16, ZeRO-3's
recorded tensor class); anything outside the allowlist, a tensor pointing outside its storage and the
legacy format are refused with the file named."""
from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import torch

from ucp_plugin.dsfiles.ptfile import PtFile, _rebuild_tensor, as_torch
from ucp_plugin.errors import FormatError, UnsupportedError


def _equal(a, b) -> None:
    if torch.is_tensor(b):
        assert torch.is_tensor(a) and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b)
    elif isinstance(b, dict):
        assert type(a) is type(b) and list(a) == list(b)
        for k in b:
            _equal(a[k], b[k])
    elif isinstance(b, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _equal(x, y)
    else:
        assert a == b


def test_reads_what_torch_load_reads(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    obj = {"f32": base, "t": base.t(), "row": base[1], "bf16": torch.randn(5, 3).to(torch.bfloat16),
           "i64": torch.tensor([3, -1]), "scalar": torch.tensor(7.5), "bool": torch.tensor([True, False]),
           "f16": torch.ones(2, dtype=torch.float16), "empty": torch.zeros(0, 3),
           "param": torch.nn.Parameter(torch.ones(3)), "shapes": collections.OrderedDict(w=torch.Size([4, 6])),
           "plain": [1, 2.5, "x", None, (True,)]}
    path = str(tmp_path / "x.pt")
    torch.save(obj, path)
    got = PtFile(path).obj
    assert isinstance(got["f32"], np.ndarray) and got["shapes"]["w"] == (4, 6)
    assert np.shares_memory(got["f32"], got["t"])  # one storage, as torch.load keeps it
    want = torch.load(path, weights_only=True)
    want["param"] = want["param"].data
    _equal(as_torch(got), want)


def test_refuses_globals_outside_the_allowlist(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"f": os.getcwd}, path)
    with pytest.raises(FormatError, match=r"evil\.pt: refused or unreadable \(global posix\.getcwd is not allowed\)"):
        PtFile(path)


def test_refuses_a_forged_tensor(tmp_path):
    """A pickle that hands ``_rebuild_tensor_v2`` a string instead of a storage is refused, not run."""
    import zipfile
    path, forged = str(tmp_path / "x.pt"), str(tmp_path / "forged.pt")
    torch.save({"w": torch.ones(2)}, path)
    # protocol 2: _rebuild_tensor_v2("abc", 0, (1,), (1,), False) (GLOBAL, MARK, args, TUPLE, REDUCE)
    call = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(X\x03\x00\x00\x00abcK\x00K\x01\x85K\x01\x85\x89tR."
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(forged, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info, call if info.filename.endswith("data.pkl") else src.read(info))
    with pytest.raises(FormatError, match=r"forged\.pt: refused or unreadable \('str' object has no attribute"):
        PtFile(forged)


def test_refuses_a_tensor_outside_its_storage():
    with pytest.raises(ValueError, match="lies outside its storage"):
        _rebuild_tensor(np.zeros(4, np.float32), 0, (3,), (2,))
    with pytest.raises(ValueError, match="lies outside its storage"):
        _rebuild_tensor(np.zeros(4, np.float32), 1, (2, 2), (-1, 1))
    assert _rebuild_tensor(np.arange(4, dtype=np.float32), 1, (3,), (1,)).tolist() == [1, 2, 3]


def test_refuses_the_legacy_format_and_damage(tmp_path):
    legacy = str(tmp_path / "legacy.pt")
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsupportedError, match=r"legacy\.pt: torch's legacy format"):
        PtFile(legacy)
    path = str(tmp_path / "cut.pt")
    torch.save({"w": torch.ones(1000)}, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(FormatError, match=r"cut\.pt"):
        PtFile(path)
