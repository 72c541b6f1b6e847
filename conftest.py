"""Markdown doctests (README.md, docs/) run in a module of their own.

pytest runs a text file's examples in a bare dict named ``__main__``; ``torch.compile`` guards the
globals a compiled function reads through the module of that name, which is pytest's, so a page
that compiles a function it defines would fail there and nowhere else. Each page's examples run in
the namespace of a fresh module registered under the page's name instead, as in a user's script.
"""

import sys
import types

from _pytest.doctest import DoctestItem


def pytest_collection_modifyitems(items):
    for item in items:
        if isinstance(item, DoctestItem) and item.path.suffix == ".md":
            name = f"doctest_{item.path.stem}"
            module = types.ModuleType(name)
            module.__dict__.update({k: v for k, v in item.dtest.globs.items() if k != "__name__"})
            item.dtest.globs = module.__dict__
            sys.modules[name] = module
