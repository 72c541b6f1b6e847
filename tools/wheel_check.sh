#!/usr/bin/env bash
# Builds hyperfunc's wheel, installs it in a clean virtual environment (torch first, the README's version)
# and runs the quick start's imports and one hypergradient from it, outside the source tree.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$root"
python -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q torch==2.13.0
"$work/venv/bin/python" -m pip install -q "$work"/dist/hyperfunc-*.whl
cd "$work"
"$work/venv/bin/python" - <<'PY'
import importlib.resources

import torch
import torchopt  # noqa: F401 (the quick start's imports)
from tensordict import TensorDict

import hyperfunc as hf

assert "site-packages" in hf.__file__, hf.__file__
assert importlib.resources.files("hyperfunc").joinpath("py.typed").is_file(), "py.typed missing from the wheel"
loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - x) ** 2).sum() + h["l2"] * (p["w"] ** 2).sum(),
                    hf.optim.sgd(lr=0.1), steps=20, full_batch=True)
res = hf.unroll(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())(
    TensorDict({"l2": torch.tensor(0.5)}, []), TensorDict({"w": torch.zeros(1)}, []), torch.ones(1), torch.zeros(1))
print(f"hyperfunc {hf.__version__} from the wheel: unroll dF/dl2 = {res.grads['l2'].item():.4f}")
PY
