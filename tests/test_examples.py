"""Every example runs in --quick mode and writes a sane table and plot."""

import importlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

CASES = {
    "sinusoid_anil": (
        ["sinusoid_anil"],
        ["FO", "one_step", "HyperDistill(γ=0.9), θ refit every 50", "N.IFT(5,10)", "drmad", "unroll"],
    ),
    "online_distill": (
        ["online_distill"],
        [
            "online one-step (γ=0, θ=1)",
            "HyperDistill (γ=0.9, θ refit every 2)",
            "HyperDistill (γ=0.9, θ refit every 1)",
        ],
    ),
    "synthetic_1d": (
        ["table2_clean", "table3_noisy", "fig2_inner_iterations", "table3_tau_study"],
        ["HPO-SGLD", "IFT-CG", "RMD"],
    ),
    "shaban_toy": (["truncation_error", "trajectories"], []),
    "hypercleaning": (["hypercleaning"], ["truncate(1)", "truncate(5)", "distill(0.9)"]),
    "fewshot_digits": (["fewshot_digits"], ["FO", "one_step", "distill(γ=0.99), offline, θ refit every 50"]),
    "maml_conv_bn": (["maml_conv_bn", "lslr"], ["no meta-training", "MAML", "FOMAML", "ANIL", "MAML++ LSLR"]),
    "warpgrad": (["warpgrad"], ["no meta-training", "FO", "one_step", "N.IFT(5,10)", "drmad"]),
    "meta_weight_net": (["meta_weight_net"], ["no meta-training", "one_step", "HyperDistill(γ=0.99), θ = 1", "drmad"]),
    "lr_schedule": (
        ["lr_schedule"],
        ["unroll (exact)", "forward (exact)", "truncate(10)", "one_step", "online one_step", "distill(0.99, θ=1)"],
    ),
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


def test_quickstart_trains_and_evaluates(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--iterations", "3"])
    importlib.import_module("quickstart").main()
    before, after = map(float, re.findall(r"(\d+\.\d+) before, (\d+\.\d+) after", capsys.readouterr().out)[0])
    assert math.isfinite(after) and after < before  # 3 Adam steps already help on average


def _run(*args: str, processes: int = 1) -> str:
    """The last line printed by examples/distributed_meta.py, run by torchrun with ``processes`` ranks."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command = [*launcher, str(EXAMPLES / "distributed_meta.py"), "--quick", *args]
    out = subprocess.run(
        command, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    return out.stdout.strip().splitlines()[-1]


def test_distributed_example_two_processes_print_the_single_process_line():
    """Uneven shards (3 tasks over 2 ranks): the same 12 digits as one process (float64)."""
    one = _run("--meta-batch", "3")
    assert one.startswith("final meta-validation loss")
    assert _run("--meta-batch", "3", processes=2) == one


def test_distributed_example_resume_is_exact_per_rank(tmp_path):
    """6 iterations equal 3, save, load in fresh processes, 3 more: bit for bit, on each of 2 ranks."""
    import torch

    straight, first, resumed = (str(tmp_path / name) for name in ("straight", "first", "resumed"))
    _run("--iterations", "6", "--save", straight, processes=2)
    _run("--iterations", "3", "--save", first, processes=2)
    _run("--iterations", "6", "--resume", first, "--save", resumed, processes=2)
    for rank in range(2):
        a = torch.load(f"{straight}.rank{rank}.pt", weights_only=True)
        b = torch.load(f"{resumed}.rank{rank}.pt", weights_only=True)
        c = torch.load(f"{first}.rank{rank}.pt", weights_only=True)
        assert a.keys() == b.keys() and int(a["['iteration']"]) == 6
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
        assert not torch.equal(a["['hparams']['body']['0']['weight']"], c["['hparams']['body']['0']['weight']"])
