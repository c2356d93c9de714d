"""What the reader fetches: exactly the elements a fragment needs without verification, whole
verification chunks with it (row-parallel resharding is the worst case: every row is a short run)."""
import pytest
import torch

from ucp_plugin.format import Atom, Layout
from ucp_plugin.language import Partitioned
from ucp_plugin.plan import local_numel, region_for
from ucp_plugin.session import SaveHeader
from ucp_plugin.storage import Checkpoint, ShardWriter, commit, prepare_staging

SHAPE, SPLIT = (200, 96), Partitioned(1)  # a row-parallel weight: 200 rows, columns split over TP


def _write(root: str, dtype: torch.dtype) -> torch.Tensor:
    full = torch.randn(SHAPE).to(dtype)
    staging = prepare_staging(root, ".stage")
    for rank in range(2):
        w = ShardWriter(staging, rank)
        w.add_atom(Atom("w", "param", SHAPE, SPLIT.to_json(), {"fp32": str(dtype).split(".")[1]}, {}))
        w.add("w", "fp32", full[:, rank * 48:(rank + 1) * 48], region_for(SPLIT, SHAPE, rank, 2), 0)
        w.finish()
    header = SaveHeader("test", "1", "none", "0", Layout(tp=2))
    commit(root, staging, "ck", 2, header.manifest())
    return full


def _read_tp4(path: str, verify: bool) -> tuple[list[torch.Tensor], int, int]:
    ck = Checkpoint.open(path, verify)
    parts, needed = [], 0
    for rank in range(4):
        region = region_for(SPLIT, SHAPE, rank, 4)
        n = local_numel(region, SHAPE)
        parts.append(ck.read_fragment("w", "fp32", region, 0, n, torch.float32).view(200, 24))
        needed += n
    return parts, needed, ck.bytes_read


def test_unverified_reads_fetch_the_needed_runs_and_sub_page_gaps_only(tmp_path, monkeypatch):
    from ucp_plugin.storage import reader

    for dtype in (torch.float32, torch.bfloat16):
        root = tmp_path / str(dtype)
        root.mkdir()
        full = _write(str(root), dtype)
        size = torch.empty(0, dtype=dtype).element_size()
        exact, needed, fetched = _read_tp4(str(root / "ck"), verify=False)
        for rank, part in enumerate(exact):
            assert torch.equal(part, full[:, rank * 24:(rank + 1) * 24].float())
        # each TP4 rank needs 24 of the 48 columns of every stored row: 24-element gaps, under a
        # page, so one read spans its 200 runs and the 199 gaps between them
        assert fetched == 4 * (199 * 48 + 24) * size
        with monkeypatch.context() as m:
            m.setattr(reader, "PAGE", 1)  # no gap is small enough to join: exactly the needed runs
            again, _, fetched_runs = _read_tp4(str(root / "ck"), verify=False)
        assert fetched_runs == needed * size and all(torch.equal(a, b) for a, b in zip(exact, again))
        checked, _, fetched_verified = _read_tp4(str(root / "ck"), verify=True)
        assert all(torch.equal(a, b) for a, b in zip(exact, checked))
        # verification fetches whole chunks: each TP4 rank reads half of every TP2 row
        assert needed * size < fetched_verified <= 2 * needed * size


def test_parallel_reads_fill_a_view_of_a_trainable_buffer(tmp_path, monkeypatch):
    """The thread pool's reads copy into a slice of a leaf that requires grad (a ZeRO partition)."""
    from ucp_plugin.storage import reader

    monkeypatch.setattr(reader, "PARALLEL_ELEMS", 1)
    full = _write(str(tmp_path), torch.float32)
    ck = Checkpoint.open(str(tmp_path / "ck"), True)
    region = region_for(SPLIT, SHAPE, 0, 1)
    flat = torch.zeros(SHAPE[0] * SHAPE[1] + 7, requires_grad=True)
    with torch.no_grad():
        view = flat[7:]
    ck.read_fragment("w", "fp32", region, 0, view.numel(), torch.float32, out=view)
    assert torch.equal(flat[7:].detach().view(SHAPE), full)


def test_pool_reads_straight_into_slices_of_a_trainable_buffer(tmp_path, monkeypatch):
    """A batch of two unaligned ranges on the pool, each read straight into a slice of a leaf that
    requires grad, with partial chunks at both ends copied out of the bounce buffer."""
    from ucp_plugin.plan.reads import ReadItem
    from ucp_plugin.storage import reader

    monkeypatch.setattr(reader, "PARALLEL_ELEMS", 1)
    full = _write_flat(str(tmp_path))
    ck = Checkpoint.open(str(tmp_path / "ck"))
    region = region_for(Partitioned(0), (10_000,), 0, 1)
    flat = torch.zeros(9000, requires_grad=True)
    items = [ReadItem("v", "fp32", region, 1001, 5001), ReadItem("v", "fp32", region, 5001, 9001)]
    with torch.no_grad():
        outs = [flat[0:4000], flat[4000:8000]]
    ck.execute_batch(ck.plan_batch(items), outs)
    assert torch.equal(flat[:8000].detach(), full[1001:9001]) and (flat[8000:] == 0).all()


def _write_flat(root: str, n: int = 10_000) -> torch.Tensor:
    """One 1-D atom saved whole by one rank (chunks of 1,250 elements: n / 8)."""
    full = torch.randn(n)
    staging = prepare_staging(root, ".stage")
    w = ShardWriter(staging, 0)
    w.add_atom(Atom("v", "param", (n,), {"kind": "replicated"}, {"fp32": "float32"}, {}))
    w.add("v", "fp32", full, region_for(Partitioned(0), (n,), 0, 1), 0)
    w.finish()
    commit(root, staging, "ck", 1, SaveHeader("test", "1", "none", "0", Layout()).manifest())
    return full


def test_verified_read_of_a_slice_with_partial_edge_chunks(tmp_path):
    """Elements 1000..8000 into the middle of a larger buffer: chunks 1..5 lie inside and are read
    straight into it, chunks 0 and 6 are partial and go through the bounce buffer; whole chunks only
    are read, and nothing outside the destination slice is written."""
    full = _write_flat(str(tmp_path))
    ck = Checkpoint.open(str(tmp_path / "ck"))
    assert ck.atom("v").pieces[0].chunk_elems == 1250
    buf = torch.full((7200,), -1.0)
    region = region_for(Partitioned(0), (10_000,), 0, 1)
    ck.read_fragment("v", "fp32", region, 1000, 8000, out=buf[100:7100])
    assert torch.equal(buf[100:7100], full[1000:8000])
    assert (buf[:100] == -1).all() and (buf[7100:] == -1).all()
    assert ck.bytes_read == 7 * 1250 * 4  # chunks 0..6, whole


def test_corrupt_byte_in_a_chunk_read_in_place_raises_naming_the_file(tmp_path):
    from ucp_plugin.errors import FormatError
    from ucp_plugin.storage.files import TensorFile

    _write_flat(str(tmp_path))
    ck = Checkpoint.open(str(tmp_path / "ck"))
    piece = ck.atom("v").pieces[0]
    path = tmp_path / "ck" / piece.file
    at = TensorFile(str(path)).offset(piece.key) + (3 * 1250 + 17) * 4  # inside chunk 3
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    region = region_for(Partitioned(0), (10_000,), 0, 1)
    with pytest.raises(FormatError, match=f"{piece.file}: 'v/.*' chunk 3 fails its SHA-256 check"):
        ck.read_fragment("v", "fp32", region, 1000, 8000, out=torch.empty(7000))
    ok = Checkpoint.open(str(tmp_path / "ck"), verify=False)  # the check is what caught it
    ok.read_fragment("v", "fp32", region, 1000, 8000, out=torch.empty(7000))
