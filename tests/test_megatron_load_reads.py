"""What a megatron load reads. With the DistributedOptimizer a DP rank keeps 1/DP of every trained
parameter's fp32 master and optimizer states, and now reads only that: megatron's own all-gather
(``optimizer_view.assemble_model_params``) assembles the model parameters, so over a DP group every
stored byte is read once. Frozen parameters are in no optimizer shard and are read whole by every
rank. (Before, every DP rank read its whole local fp32 weights: at DP2 with Adam that is 4/3 of the
checkpoint.) Real megatron-core, gloo, one launch of 2 ranks; reads unverified so that what is read
is exactly what is copied (verification reads whole SHA-256 chunks, which two ranks may share)."""
import pytest
import torch

from campaign import GPT, MIXTRAL, SAVE_AFTER, SETTINGS, ok, rel, run_campaign
from ucp_plugin.storage import Checkpoint

pytestmark = pytest.mark.slow
FROZEN = ("embedding.position_embeddings.weight",)
CASES = {  # name: (family, model, saved at, loaded at (DP2, the DistributedOptimizer), frozen)
    "gpt-TP2->DP2-frozen": ("gpt", GPT, {"tp": 2}, {"dp": 2}, FROZEN),
    "mixtral-TP2SP->DP2": ("mixtral", MIXTRAL, {"tp": 2, "sp": True}, {"dp": 2}, ()),  # experts: expert-DP 2
}


def _runs(root) -> list[dict]:
    runs = []
    for name, (family, model, source, target, frozen) in CASES.items():
        common = dict(family=family, model=model, settings=SETTINGS, root=str(root / name), frozen=frozen)
        runs.append({"id": f"save:{name}", "kind": "save", "world": 2, "after": None,
                     "args": dict(common, layout=source, save_after=SAVE_AFTER)})
        runs.append({"id": f"load:{name}", "kind": "load", "world": 2, "after": f"save:{name}",
                     "args": dict(common, layout=target, verify=False)})
    return runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_campaign(_runs(tmp_path_factory.mktemp("mg-reads")), "mg_read_workers:run_plan")


def _stored(path: str) -> dict[str, int]:
    """Tensor bytes stored per atom kind (param: fp32 master + optimizer states; frozen; buffer)."""
    out: dict[str, int] = {}
    for atom in Checkpoint.open(path).manifest.atoms:
        for p in atom.pieces:
            size = torch.empty((), dtype=getattr(torch, atom.states[p.state])).element_size()
            out[atom.kind] = out.get(atom.kind, 0) + (p.stop - p.start) * size
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_distributed_optimizer_load_reads_each_byte_once_per_dp_group(runs, name):
    saved, loaded = ok(runs, f"save:{name}"), ok(runs, f"load:{name}")
    assert loaded["iteration"] == SAVE_AFTER
    diff = rel(loaded["losses"], saved["losses"][SAVE_AFTER:])
    assert diff < 1e-5, f"{name}: relative loss difference {diff:.2e}"  # model params assembled right
    stored = _stored(saved["path"])
    dp = CASES[name][3]["dp"]
    per_rank = [r["bytes_read"] for r in runs[f"load:{name}"]]
    # trained parameters once over the DP group; frozen ones and buffers by every rank
    expected = stored["param"] + dp * (stored.get("frozen", 0) + stored.get("buffer", 0))
    print(f"{name}: bytes read per rank {per_rank}, stored {stored}; the whole-weights loader read "
          f"{(stored['param'] + (dp - 1) * stored['param'] / 3 + dp * stored.get('frozen', 0)) / sum(per_rank):.2f}x")
    assert sum(per_rank) == expected, (per_rank, stored)
    assert bool(stored.get("frozen")) == bool(CASES[name][4])  # the frozen case does have frozen atoms
