"""Every example runs in --quick mode and writes a sane table and plot."""

import importlib
import math
import re
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

CASES = {
    "sinusoid_anil": (["sinusoid_anil"], ["FO", "one_step", "HyperDistill (γ=0.9)", "drmad", "unroll"]),
    "online_distill": (["online_distill"], ["online one-step (γ=0, θ=1)", "HyperDistill (γ=0.9)"]),
    "synthetic_1d": (["table2_clean", "table3_noisy", "fig2_inner_iterations"], ["HPO-SGLD", "IFT-CG", "RMD"]),
    "shaban_toy": (["truncation_error", "trajectories"], []),
    "hypercleaning": (["hypercleaning"], ["truncate(1)", "truncate(5)", "distill(0.9)"]),
    "fewshot_digits": (["fewshot_digits"], ["FO", "one_step", "HyperDistill (γ=0.99)"]),
    "maml_conv_bn": (["maml_conv_bn"], ["no meta-training", "MAML", "FOMAML", "ANIL"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_example_quick(name, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--quick", "--out", str(tmp_path)])
    importlib.import_module(name).main()
    tables, rows = CASES[name]
    for table in tables:
        text = (tmp_path / f"{table}.md").read_text()
        for row in rows:
            if table == tables[0]:
                assert f"| {row} |" in text, (row, text)
        numbers = [float(x) for x in re.findall(r"-?\d+\.\d+(?:e[-+]\d+)?", text)]
        assert numbers and all(math.isfinite(x) for x in numbers), text
    assert list(tmp_path.glob("*.png")), "no plot written"
