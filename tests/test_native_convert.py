"""``ucp convert NATIVE_DIR OUT``: plain DeepSpeed checkpoints (ZeRO-2 and ZeRO-3 fp32, ZeRO-1 bf16 through
DeepSpeed's BF16_Optimizer; DP2) converted offline without torch or DeepSpeed. The rank files as read
must equal ``torch.load``'s; the result must verify, hold exactly what the plugin reads from the
native checkpoint (every atom state, scalars, training state), be byte for byte what the plain
composition of the library's pieces writes (``NativeSource.read`` + ``atom_files.write_atom``:
manifest and every file), resume after an interruption without redoing finished atoms, and stay
within the stated memory bound on a model whose largest parameter is 13.2 M elements."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.ds_harness import ds_config as C
from ucp_plugin.testing.launcher import run_workers

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = {"vocab": 200_000, "d": 66}  # wte and head: 13.2 M elements each (53 MB fp32)
SOURCES = {"z2": (C(2, "fp32", 2), None), "z3": (C(3, "fp32", 2), None), "big_z2": (C(2, "fp32", 2), BIG),
           "bf16_z1": (C(1, "bf16", 2, grad_accum_dtype="fp32"), None)}  # BF16_Optimizer: bf16 weights


def _env() -> dict:
    return {"PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    runs = [dict(config=cfg, steps=2, save_dir=str(root / n), model=model) for n, (cfg, model) in SOURCES.items()]
    run_workers(2, "tests.ds_harness:train_many", {"runs": runs}, timeout=900, env=_env(), log_dir=str(root / "log"))
    return {n: str(root / n / "global_step2") for n in SOURCES}


def _same(native_dir: str, converted: str) -> None:
    from ucp_plugin.deepspeed.sources import open_source
    a, b = open_source(native_dir), open_source(converted)
    assert a.atoms.keys() == b.atoms.keys()
    for name, m in a.atoms.items():
        assert (m.kind, m.shape, m.states, m.scalars) == (b.atoms[name].kind, b.atoms[name].shape,
                                                           b.atoms[name].states, b.atoms[name].scalars), name
        for s in m.states:
            assert torch.equal(a.read(name, s, 0, m.numel, torch.float32), b.read(name, s, 0, m.numel, torch.float32))
    assert a.common_state()["engine"] == b.common_state()["engine"]
    assert a.common_state()["optimizer"] == b.common_state()["optimizer"]


def _reference(native_dir: str, out: str) -> None:
    """The conversion without its shortcuts: zero-filled reads, a plain fsynced write per atom, the
    digests computed again from the tensors and the file."""
    from ucp_plugin.format import MANIFEST, Manifest
    from ucp_plugin.storage.files import atomic_write_text
    from ucp_plugin.tools import native_convert as N
    from ucp_plugin.storage.atom_files import write_atom
    source = N._source(native_dir)
    os.makedirs(os.path.join(out, "atoms"))
    done = [write_atom(out, a, {s: source.read(a.name, s, 0, a.numel, getattr(torch, d)) for s, d in a.states.items()})
            for a in sorted(source.atoms.values(), key=lambda a: a.name)]
    head = N.header(source)
    manifest = Manifest(head.writer, head.layout, tuple(a for a, _ in done),
                        tuple(f for _, f in done) + tuple(N._state_files(source, out)), iteration=head.iteration,
                        state_ranks=0)
    atomic_write_text(os.path.join(out, MANIFEST), manifest.to_json())


def _files(folder: str) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(folder) for f in names}


@pytest.mark.parametrize("name,workers", [("z2", 1), ("z3", 2), ("bf16_z1", 2)])
def test_converted_equals_native(native, tmp_path, name, workers):
    from ucp_plugin.cli.main import main
    from ucp_plugin.tools.verify import verify
    out = str(tmp_path / "out")
    assert main(["convert", native[name], out, "--workers", str(workers)]) == 0
    assert verify(out) == []
    _same(native[name], out)
    _reference(native[name], str(tmp_path / "ref"))
    got, ref = _files(out), _files(str(tmp_path / "ref"))
    assert sorted(got) == sorted(ref)  # no temporary file left behind
    assert got["ucp.json"] == ref["ucp.json"]
    assert all(got[k] == ref[k] for k in ref)


CONVERT = """
import sys
from ucp_plugin.cli.main import main
rc = main(["convert", sys.argv[1], sys.argv[2]])
print(rc, sorted(m for m in ("torch", "deepspeed") if m in sys.modules))
"""


def test_reads_what_torch_load_reads_and_converts_without_torch(native, tmp_path):
    """The rank files read by ``ptfile`` (NumPy) equal ``torch.load`` of them, DeepSpeed's own classes
    included; and ``ucp convert`` of a native checkpoint imports neither torch nor DeepSpeed."""
    from ucp_plugin.dsfiles.native import CLASSES
    from ucp_plugin.dsfiles.ptfile import PtFile, as_torch
    for name in ("z2", "z3", "bf16_z1"):
        for f in sorted(os.listdir(native[name])):
            path = os.path.join(native[name], f)
            got, want = as_torch(PtFile(path, CLASSES).obj), torch.load(path, weights_only=False)
            _same_tensors(got, want, f)
    r = subprocess.run([sys.executable, "-c", CONVERT, native["z3"], str(tmp_path / "out")], capture_output=True,
                       text=True, env={**os.environ, **_env()}, timeout=600)
    assert r.stdout.split("\n")[-2] == "0 []", r.stdout + r.stderr


def _same_tensors(got, want, where: str) -> None:
    """Every tensor of ``want`` (nested in dicts, lists and DeepSpeed's objects) equals ``got``'s."""
    if torch.is_tensor(want):
        assert torch.is_tensor(got) and got.dtype == want.dtype and got.shape == want.shape, where
        assert torch.equal(got, want), where
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for k in want:
            _same_tensors(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            _same_tensors(a, b, f"{where}[{i}]")
    elif isinstance(want, int):  # ZeroStageEnum: an int enum
        assert int(got) == int(want), where
    elif hasattr(want, "__dict__"):
        _same_tensors(vars(got), vars(want), where)
    else:
        assert got == want, where


def test_missing_elements_are_an_error():
    """Buffers are allocated uninitialised: a state the rank files do not fully cover must fail, naming it."""
    from ucp_plugin.errors import FormatError
    from ucp_plugin.format import Atom
    from ucp_plugin.tools.native_convert import Reader

    class Partial:  # a source whose saved fragments miss the last element
        path = "ckpt"

        def view(self, name, state):
            return None

        def fill(self, out, name, state):
            out[:-1] = 1.0
            return out.size - 1

    atom = Atom("layer.weight", "param", (2, 3), {}, {"fp32": "float32"})
    with pytest.raises(FormatError, match=r"ckpt: parameter 'layer.weight' \(fp32\): the rank files hold 5 of its 6"):
        Reader(Partial(), 1 << 20).atom(atom)


def test_resumes_after_interruption(native, tmp_path, monkeypatch):
    from ucp_plugin.tools import native_convert as N
    out, real, calls = str(tmp_path / "out"), N.write_atom, []

    def dying(*args, **kwargs):
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(args[1].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(N, "write_atom", dying)
    with pytest.raises(KeyboardInterrupt):
        N.convert_native(native["z2"], out)
    assert not os.path.exists(os.path.join(out, "ucp.json"))  # not committed
    first = {n: os.stat(os.path.join(out, N.atom_file(n))).st_mtime_ns for n in calls}
    monkeypatch.setattr(N, "write_atom", real)
    N.convert_native(native["z2"], out)
    assert {n: os.stat(os.path.join(out, N.atom_file(n))).st_mtime_ns for n in calls} == first  # kept
    _same(native["z2"], out)


# VmHWM, not ru_maxrss: Linux carries a parent's peak RSS into ru_maxrss across fork and exec, so a
# child of this (torch-loaded) test process would report at least the parent's peak
PROBE = """
import json, sys
from ucp_plugin.tools import native_convert as N
src = N._source(sys.argv[1])
if sys.argv[2] != "-":
    N.convert_native(sys.argv[1], sys.argv[2])
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_kib": int(hwm.split()[1])}))
"""


def test_peak_memory_within_bound(native, tmp_path):
    """Peak RSS above the baseline (interpreter + imports + the opened source) <= (S + 2) x the largest
    parameter's fp32 bytes (S = 3 states: fp32, exp_avg, exp_avg_sq)."""
    def peak(out: str) -> int:
        r = subprocess.run([sys.executable, "-c", PROBE, native["big_z2"], out], capture_output=True, text=True,
                           env={**os.environ, **_env()}, timeout=600, check=True)
        return json.loads(r.stdout.strip().splitlines()[-1])["peak_kib"] * 1024
    largest = BIG["vocab"] * BIG["d"] * 4
    extra = peak(str(tmp_path / "out")) - peak("-")
    print(f"peak RSS above baseline: {extra / largest:.2f} x the largest parameter")  # shown with -s
    assert extra <= 5 * largest, (extra / largest)
