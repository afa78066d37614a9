"""Importing the examples and the NumPy references by path: neither ``examples/`` nor
``tests/`` is a package, and the tests use the examples' own models and data."""

import importlib.util
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
EXAMPLES = TESTS.parent / "examples"


def load_module(path: Path):
    """Import the file at ``path`` as a module named after it (once)."""
    path = Path(path)
    if path.stem in sys.modules and getattr(sys.modules[path.stem], "__file__", None) == str(path):
        return sys.modules[path.stem]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    # Registered before execution: dataclasses look their module up by name.
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def load_example(name: str):
    """The script ``examples/<name>.py`` as a module (its ``main`` is not run)."""
    return load_module(EXAMPLES / f"{name}.py")


def load_reference(name: str):
    """A NumPy reference implementation, ``tests/<name>.py``."""
    return load_module(TESTS / f"{name}.py")
