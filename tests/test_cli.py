"""The `ucp` command line on a checkpoint written by the storage layer (one process)."""
import json
import os
import subprocess
import sys

import torch

from test_format_storage import write_tp2_dp2
from ucp_plugin.cli.main import main
from ucp_plugin.storage import Checkpoint


def test_inspect_text_and_json(tmp_path, capsys):
    write_tp2_dp2(str(tmp_path))
    assert main(["inspect", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "layout     TP2·PP1·DP2 ZeRO-0 float32" in text
    assert "fused(dim=0,parts=[2, 4],num_parts=2)" in text and "1 atoms, 24 trainable" in text
    assert main(["inspect", "--json", str(tmp_path)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["atoms"][0]["name"] == "w" and d["trainable_numel"] == 24


def test_console_script_entry_point(tmp_path):
    write_tp2_dp2(str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "ucp_plugin.cli.main", "verify", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith(": OK")


def test_verify_reports_every_problem(tmp_path, capsys):
    write_tp2_dp2(str(tmp_path))
    step = tmp_path / "step1"
    os.remove(step / "shards" / "rank-00002.safetensors")
    with open(step / "shards" / "rank-00001.safetensors", "r+b") as f:
        f.truncate(100)
    (step / "shards" / "stray.bin").write_bytes(b"x")
    assert main(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "rank-00002.safetensors: listed in the manifest but missing" in out
    assert "rank-00001.safetensors: is 100 bytes, the manifest says" in out
    assert "stray.bin: unknown file" in out
    assert "rank-00001.safetensors: not a readable safetensors file" in out
    assert "4 problem(s)" in out


def test_convert_then_export(tmp_path, capsys):
    atom, shape, _ = write_tp2_dp2(str(tmp_path / "src"))
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "atoms")]) == 0
    ck = Checkpoint.open(str(tmp_path / "atoms"))
    assert [p.file for p in ck.manifest.atom("w").pieces] == ["atoms/w.safetensors"] * 2
    assert torch.equal(ck.read_atom("w", "exp_avg").reshape(-1), atom["exp_avg"])
    assert main(["verify", str(tmp_path / "atoms")]) == 0
    assert main(["export", str(tmp_path / "atoms"), str(tmp_path / "w.safetensors")]) == 0
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["w"].reshape(-1), atom["fp32"])


def test_validate_exit_codes(tmp_path, capsys):
    write_tp2_dp2(str(tmp_path))
    assert main(["validate", str(tmp_path), "--tp", "2", "--dp", "2"]) == 0
    assert main(["validate", str(tmp_path), "--tp", "4"]) == 1
    out = capsys.readouterr().out
    assert "NOT loadable on TP4·PP1·DP1" in out and "fused part of size 2 is not divisible by TP=4" in out
    assert "nearest valid layouts: TP2·PP1·DP2" in out
    # the fused atom "w" is no expert parameter: an ETP does not change its TP check
    assert main(["validate", str(tmp_path), "--tp", "2", "--dp", "2", "--etp", "1"]) == 0
    assert main(["validate", str(tmp_path), "--tp", "2", "--dp", "1", "--ep", "2", "--etp", "2"]) == 1
    assert "EP=2 must divide DP=1" in capsys.readouterr().out


def test_bad_path_is_exit_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
