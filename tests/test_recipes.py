"""The recipes, shortened, so they cannot rot: real launches, real checkpoints, real plots."""
import csv
import json
import os

import pytest

from recipes.main import run

pytestmark = pytest.mark.slow


def test_gpt_recipe_zero2_dp2_to_zero3_dp1(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(__file__)))
    code = run("gpt", "zero2-dp2", "zero3-dp1", steps=3, resume_steps=3, out=str(tmp_path),
               model=dict(seq=16, d_model=32, heads=2, layers=2, ffn=64))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "-> OK" in out and "layout     TP1·PP1·DP2 ZeRO-2 float32" in out
    with open(tmp_path / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    data = json.loads((tmp_path / "losses.json").read_text())
    assert data["max_rel_diff"] <= 1e-5 and len(data["resumed"]) == 3
    assert (tmp_path / "losses.png").stat().st_size > 10_000


@pytest.mark.parametrize("family,layout_a,layout_b", [("llama", "tp2-pp2", "tp1-dp4"),
                                                       ("mixtral", "ep2-dp2", "tp2-sp"),
                                                       # Megatron-DeepSpeed engine -> megatron's optimizer
                                                       ("llama", "tp2-dp2-zero1", "tp2-pp2")])
def test_megatron_recipes(tmp_path, monkeypatch, capsys, family, layout_a, layout_b):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(__file__)))
    code = run(family, layout_a, layout_b, steps=2, resume_steps=2, out=str(tmp_path))
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"resumed on {layout_b} vs uninterrupted on {layout_a}" in out and "-> OK" in out
    assert json.loads((tmp_path / "losses.json").read_text())["max_rel_diff"] <= 1e-5
