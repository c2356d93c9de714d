"""Format and storage tests in one process: manifest round trip, version check, commit marker,
fragment reads across layouts, integrity checks, state trees."""
import json
import os

import pytest
import torch

from ucp_plugin.comm import Comm
from ucp_plugin.errors import FormatError, StateMismatchError, UnsupportedError
from ucp_plugin.format import MANIFEST, Atom, Layout, Manifest, Piece, Region, Writer
from ucp_plugin.language import Fused
from ucp_plugin.plan import local_numel, region_for
from ucp_plugin.session import SaveHeader, save_universal
from ucp_plugin.storage import Checkpoint

HEADER = SaveHeader("test", "1", "none", "0", Layout(tp=2, dp=2))


def test_manifest_round_trip_and_version():
    m = Manifest(Writer("a", "1", "0.1"), Layout(tp=2, dp=3, zero_stage=3),
                 (Atom("w", "param", (4, 2), {"kind": "partitioned", "dim": 0}, {"fp32": "float32"},
                       {"step": 3}, (Piece("fp32", "f", "k", Region(0, ((0, 2),)), 0, 4),)),),
                 iteration=7, family="gpt")
    assert Manifest.from_json(m.to_json()) == m
    newer = json.loads(m.to_json())
    newer["format_version"] = "2.0"
    with pytest.raises(FormatError, match="newer than this ucp_plugin reads.*upgrade ucp_plugin"):
        Manifest.from_json(json.dumps(newer), "x/ucp.json")
    with pytest.raises(FormatError, match="x/ucp.json: not valid JSON"):
        Manifest.from_json("{", "x/ucp.json")


def test_layout_etp_is_optional_and_round_trips():
    """``etp`` (expert-tensor-parallel size) was added in 1.0's lifetime: a manifest without it reads
    as ETP = TP; one with it keeps it; a bad value is a FormatError naming it."""
    m = Manifest(Writer("a", "1", "0.1"), Layout(tp=2, dp=2, ep=2, etp=1), ())
    assert Manifest.from_json(m.to_json()).layout == Layout(tp=2, dp=2, ep=2, etp=1)
    assert m.layout.describe() == "TP2·PP1·DP2·EP2·ETP1 ZeRO-0 float32"
    old = json.loads(m.to_json())
    del old["layout"]["etp"]
    layout = Manifest.from_json(json.dumps(old)).layout
    assert layout.etp is None and layout.expert_tp == 2 and "ETP" not in layout.describe()
    old["layout"]["etp"] = 0
    with pytest.raises(FormatError, match="bad layout: layout etp must be null"):
        Manifest.from_json(json.dumps(old), "x/ucp.json")


def write_tp2_dp2(root, tag="step1"):
    """Simulate 4 ranks (TP2 x DP2) each writing its ZeRO-like half of its TP shard."""
    shape, split = (6, 4), Fused(0, (2, 4))
    atom = {"fp32": torch.arange(24.0), "exp_avg": -torch.arange(24.0)}
    fills = []
    for tp_rank in range(2):
        region = region_for(split, shape, tp_rank, 2)
        n = local_numel(region, shape)
        for dp_rank, (a, b) in enumerate([(0, n // 2), (n // 2, n)]):
            fills.append((region, a, b))
    staging_roots = []
    for rank, (region, a, b) in enumerate(fills):
        from ucp_plugin.storage.writer import ShardWriter, prepare_staging
        staging = prepare_staging(root, ".stage")
        w = ShardWriter(staging, rank)
        w.add_atom(Atom("w", "param", shape, split.to_json(), {"fp32": "float32", "exp_avg": "float32"},
                            {"step": 5}))
        for state, full in atom.items():
            local = torch.zeros(local_numel(region, shape))
            from ucp_plugin.plan import fragment_of_atom
            fragment_of_atom(full, region, shape, 0, len(local), local)
            w.add("w", state, local[a:b], region, a)
        w.save_state({"rng": (1, [2.5, torch.ones(2)])})
        w.finish()
        staging_roots.append(staging)
    from ucp_plugin.storage.writer import commit
    commit(root, staging_roots[0], tag, 4, HEADER.manifest())
    return atom, shape, split


def test_write_then_read_any_layout(tmp_path):
    atom, shape, split = write_tp2_dp2(str(tmp_path))
    ck = Checkpoint.open(str(tmp_path))  # via 'latest'
    assert ck.manifest.atom("w").scalars == {"step": 5}
    assert torch.equal(ck.read_atom("w", "fp32").reshape(-1), atom["fp32"])
    before = ck.bytes_read
    region = Region.whole(shape)  # TP1: rows 0 and 1 live on different TP2 ranks
    got = ck.read_fragment("w", "exp_avg", region, 3, 8)
    assert torch.equal(got, -torch.arange(3.0, 8.0))
    assert ck.bytes_read - before == 2 * 6 * 4  # two 6-element pieces; the other six untouched
    state = ck.load_state(rank=0)
    assert state["rng"][0] == 1 and torch.equal(state["rng"][1][1], torch.ones(2))


def test_refuses_uncommitted_and_bad_paths(tmp_path):
    with pytest.raises(FormatError, match="folder is empty"):
        Checkpoint.open(str(tmp_path))
    (tmp_path / "junk").write_text("x")
    with pytest.raises(FormatError, match="junk: is a file, not a folder"):
        Checkpoint.open(str(tmp_path / "junk"))
    os.makedirs(tmp_path / "step2" / "shards")
    with pytest.raises(FormatError, match=f"step2: no {MANIFEST} here, so this is not a committed"):
        Checkpoint.open(str(tmp_path / "step2"))


def test_flipped_byte_and_missing_param(tmp_path):
    write_tp2_dp2(str(tmp_path))
    path = tmp_path / "step1" / "shards" / "rank-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    ck = Checkpoint.open(str(tmp_path))
    with pytest.raises(FormatError, match="rank-00001.safetensors: 'w/.*' chunk 0 fails its SHA-256"):
        [ck.read_atom("w", state) for state in ("exp_avg", "fp32")]
    [Checkpoint.open(str(tmp_path), verify=False).read_atom("w", s) for s in ("exp_avg", "fp32")]
    with pytest.raises(StateMismatchError, match="parameter 'v' is not in checkpoint"):
        ck.read_atom("v", "fp32")


def test_session_single_process_and_unpicklable_state(tmp_path):
    def fill(w):
        w.add_atom(Atom("b", "buffer", (3,), {"kind": "replicated", "reduce": "first"},
                            {"param": "int64"}, {}))
        w.add("b", "param", torch.tensor([1, 2, 3]), Region.whole((3,)), 0)
        w.save_state({"iteration": 3}, common=True)
    path = save_universal(Comm(), str(tmp_path), "t", HEADER, fill)
    ck = Checkpoint.open(path)
    assert ck.read_atom("b", "param").tolist() == [1, 2, 3]
    assert ck.load_state()["iteration"] == 3
    with pytest.raises(UnsupportedError, match=r"common\['fn'\]: value of type function cannot be saved"):
        save_universal(Comm(), str(tmp_path), "t2", HEADER,
                       lambda w: w.save_state({"fn": lambda: 0}, common=True))
    assert open(tmp_path / "latest").read() == "t"  # the failed save moved nothing


def test_transposed_blocks_cut_anywhere_store_canonical_pieces(tmp_path):
    """A GroupedMLP-like block (the TP-local tensor transposed) cut into DistributedOptimizer-like
    shards at arbitrary offsets: the pieces are canonical (the atom reads back whole, ucp verify
    passes), and a transposed read of any range gives the block's elements."""
    from ucp_plugin.plan import TRANSPOSED, fragment_of_atom
    from ucp_plugin.storage.writer import ShardWriter, commit, prepare_staging
    from ucp_plugin.tools.verify import verify

    shape, split = (8, 5), Fused(0, (4, 4))  # fc1 [gate; up] of ffn 4, hidden 5
    atom = torch.arange(40.0)
    cuts = [(0, 7), (7, 20), (20, 20), (20, 33), (33, 40), (0, 13), (13, 40)]  # 4 + 2 shards of TP2
    staging = prepare_staging(str(tmp_path), ".stage")
    blocks = []
    for rank, (a, b) in enumerate(cuts):
        tp_rank = 0 if rank < 5 else 1
        region = region_for(split, shape, tp_rank, 2)
        local = fragment_of_atom(atom, region, shape, 0, 20, torch.zeros(20))
        block = local.view(4, 5).t().reshape(-1)  # stored transposed: [hidden, 2*ffn/TP]
        blocks.append((region, block))
        w = ShardWriter(staging, rank)
        w.add_atom(Atom("fc1", "param", shape, split.to_json(), {"fp32": "float32"}, {"step": 1}))
        w.add("fc1", "fp32", block[a:b], region, a, order=TRANSPOSED)
        w.finish()
    commit(str(tmp_path), staging, "t", len(cuts), HEADER.manifest())
    ck = Checkpoint.open(str(tmp_path))
    assert verify(ck.path) == []
    assert torch.equal(ck.read_atom("fc1", "fp32").reshape(-1), atom)
    assert all(p.stop - p.start > 0 for p in ck.manifest.atom("fc1").pieces)
    for region, block in blocks:
        for a, b in [(0, 20), (3, 17), (9, 10)]:
            assert torch.equal(ck.read_fragment("fc1", "fp32", region, a, b, order=TRANSPOSED), block[a:b])


def test_shard_digest_covers_every_byte_hashing_each_once(tmp_path):
    """Format 1.2: a shard's listed SHA-256 is of its header and stored chunk digests ("chunks"),
    hashed while written; ``ucp verify`` re-derives it from the file and finds one flipped byte
    anywhere: in the 8-byte prefix, the header, a tensor or the digest tensor."""
    from ucp_plugin.storage.files import chunks_sha256, file_sha256, sha256_file
    from ucp_plugin.tools.verify import verify

    write_tp2_dp2(str(tmp_path))
    path = tmp_path / "step1" / "shards" / "rank-00001.safetensors"
    entry = next(f for f in Checkpoint.open(str(tmp_path)).folder.index(1, True).files
                 if f.path == "shards/rank-00001.safetensors")
    assert entry.digest == "chunks" and chunks_sha256(str(path)) == entry.sha256 != sha256_file(str(path))
    assert file_sha256(str(path), "file") == sha256_file(str(path)) and verify(str(tmp_path / "step1")) == []
    good = path.read_bytes()
    header_end = 8 + int.from_bytes(good[:8], "little")
    for at, what in [(0, "prefix"), (20, "header"), (header_end + 5, "tensor"), (len(good) - 3, "digests")]:
        data = bytearray(good)
        data[at] ^= 0x01
        path.write_bytes(bytes(data))
        problems = verify(str(tmp_path / "step1"))
        assert any(p.where.endswith("rank-00001.safetensors") for p in problems), (what, problems)
    path.write_bytes(good)
    assert verify(str(tmp_path / "step1")) == []
