#!/usr/bin/env bash
# The whole suite on one torch version, in a fresh virtual environment of its own:
#   tools/compat.sh 2.14.1            (the newest torch whose wheel installs without a large download here)
#   PIP_CONSTRAINT=/dev/null tools/compat.sh 2.15.0   (lifts a machine-wide pip cap on torch for this install)
# The last lines it prints are pytest's summary; docs/compat.md holds the table of its last runs.
set -euo pipefail
version=${1:?usage: tools/compat.sh TORCH_VERSION [pytest arguments]}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${COMPAT_VENV:-${TMPDIR:-/tmp}/hyperfunc-torch-$version}
[ -x "$venv/bin/python" ] || python -m venv "$venv"
"$venv/bin/python" -m pip install -q "torch==$version"
"$venv/bin/python" -m pip install -q -e "$root[test,examples,dev]"
cd "$root"
"$venv/bin/python" -c 'import tensordict, torch, torchopt as o; print(f"torch {torch.__version__}, tensordict {tensordict.__version__}, torchopt {o.__version__}")'
"$venv/bin/python" -m pytest "$@"
