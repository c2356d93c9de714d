"""Format 1.1 metadata: rank 0's commit reads metadata only, a load opens only the files holding
what it keeps, and 1.0 checkpoints still read. Single process, real files."""
import builtins
import json
import os

import torch

from ucp_plugin.deepspeed.sources import UcpSource
from ucp_plugin.format import FORMAT_VERSION, Atom, Layout, Manifest, Region
from ucp_plugin.language import Replicated
from ucp_plugin.plan import zero as Z
from ucp_plugin.session import SaveHeader
from ucp_plugin.storage import Checkpoint, ShardWriter, commit, prepare_staging
from ucp_plugin.tools.verify import verify

PARAMS = [("emb", (64, 16)), ("fc", (48, 16)), ("bias", (48,)), ("out", (16, 48))]
DP = 4
HEADER = SaveHeader("test", "1", "none", "0", Layout(dp=DP, zero_stage=2))
SPLIT = Replicated().to_json()


def _full():
    g = torch.Generator().manual_seed(0)
    return {n: {s: torch.randn(shape, generator=g) for s in ("fp32", "exp_avg")} for n, shape in PARAMS}


def _layout():
    return Z.plan_zero([[(n, torch.Size(s).numel()) for n, s in PARAMS]], DP, Z.ZERO_FLAT)


def _save_zero2(root: str, full: dict) -> str:
    """What the DeepSpeed adapter writes at ZeRO-2 DP4: each rank its flat partition's fragments."""
    staging = prepare_staging(root, ".stage")
    shapes = dict(PARAMS)
    for b in _layout().buffers:
        w = ShardWriter(staging, b.rank)
        for f in b.fragments:
            w.add_atom(Atom(f.name, "param", shapes[f.name], SPLIT, {"fp32": "float32", "exp_avg": "float32"},
                            {"step": 3}))
            for state, t in full[f.name].items():
                w.add(f.name, state, t.reshape(-1)[f.param_offset:f.param_offset + f.length],
                      Region.whole(shapes[f.name]), f.param_offset)
        w.save_state({"rank": b.rank})
        w.finish()
    return staging


def test_commit_reads_no_shard_or_state_bytes(tmp_path, monkeypatch):
    staging = _save_zero2(str(tmp_path), _full())
    opened = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    def spy_os_open(path, *a, **k):
        opened.append(str(path))
        return real_os_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    commit(str(tmp_path), staging, "t", DP, HEADER.manifest())
    monkeypatch.undo()
    data = [p for p in opened if f"{os.sep}shards{os.sep}" in p or f"{os.sep}state{os.sep}" in p]
    assert data == [] and any("index" in p for p in opened), opened
    # the sizes and SHA-256 the ranks computed while writing are what `ucp verify` recomputes
    assert verify(str(tmp_path / "t")) == []
    top = json.loads((tmp_path / "t" / "ucp.json").read_text())
    assert top["format_version"] == FORMAT_VERSION and "pieces" not in top["atoms"][0]
    assert [f["path"] for f in top["files"]] == [f"index/rank-{r:05d}.json" for r in range(DP)]


def test_same_layout_load_opens_its_own_shard_only(tmp_path):
    full = _full()
    commit(str(tmp_path), _save_zero2(str(tmp_path), full), "t", DP, HEADER.manifest())
    for rank in range(DP):
        source = UcpSource(Checkpoint.open(str(tmp_path / "t")))
        for b in _layout().for_rank(rank):
            for f in b.fragments:
                for state, t in full[f.name].items():
                    got = source.read(f.name, state, f.param_offset, f.param_offset + f.length, torch.float32)
                    assert torch.equal(got, t.reshape(-1)[f.param_offset:f.param_offset + f.length])
        ck = source.checkpoint
        assert ck.files_opened == [f"shards/rank-{rank:05d}.safetensors"], (rank, ck.files_opened)
        assert ck.bytes_read == 2 * 4 * sum(f.length for b in _layout().for_rank(rank) for f in b.fragments)
        # top manifest + the indexes naming its atoms + one tensor header + chunk digests
        assert ck.metadata_bytes < 8 * 1024, ck.metadata_bytes


def test_format_1_0_checkpoints_still_read(tmp_path):
    full = _full()
    commit(str(tmp_path), _save_zero2(str(tmp_path), full), "t", DP, HEADER.manifest())
    folder = tmp_path / "t"
    whole = Checkpoint.open(str(folder)).manifest  # every index read: the 1.0 form of the same checkpoint
    assert all(p.digest_at >= 0 for a in whole.atoms for p in a.pieces)
    # rewrite it as format 1.0 (pieces and hex digests inline), as a 1.0 writer did
    from dataclasses import replace
    ck = Checkpoint.open(str(folder))
    atoms = []
    for a in whole.atoms:
        pieces = []
        for p in a.pieces:
            n = -(-(p.stop - p.start) // p.chunk_elems)
            pieces.append(replace(p, digest_at=-1, digests=tuple(d.hex() for d in ck._digests(p, 0, n))))
        atoms.append(replace(a, pieces=tuple(pieces), shards=()))
    old = replace(whole, atoms=tuple(atoms), index=None, format_version="1.0")
    (folder / "ucp.json").write_text(old.to_json())
    assert Manifest.from_json((folder / "ucp.json").read_text()).format_version == "1.0"
    for name, _ in PARAMS:
        assert torch.equal(Checkpoint.open(str(folder)).read_atom(name, "exp_avg"), full[name]["exp_avg"])
