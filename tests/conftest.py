"""The tests mirror the package (``tests/transforms/test_reverse.py`` for ``hyperfunc/transforms/reverse.py``);
the shared problems (``problems.py``) and the contract tables stay at this level, importable from every folder."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
