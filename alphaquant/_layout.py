"""Where `alphaquant.models` and `alphaquant.callbacks` live.

The repository keeps the layout the specification fixes (alphaquant/, models/, callbacks/ side by side at the top),
but an installed AlphaQuant must not put packages called `models` or `callbacks` into site-packages, where they
would shadow a user's own. So the wheel installs them as `alphaquant.models` and `alphaquant.callbacks`
(pyproject's package-dir), every import inside AlphaQuant uses those names, and two small import hooks keep a
checkout working the same way:

- `CheckoutFinder` maps `alphaquant.models` / `alphaquant.callbacks` onto the checkout's top-level folders when
  AlphaQuant runs from a checkout that is not installed (`PYTHONPATH=. python bench/e2e.py`);
- `alias_top_level("models")`, called by models/__init__.py when a checkout imports it by its top-level name
  (`from models.olmoe.modeling_olmoe import OlmoeForCausalLM`, as the specification writes it), makes `models.X`
  the very module object `alphaquant.models.X`, so a class is never loaded twice under two names.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

SUBPACKAGES = ("models", "callbacks")
_ROOT = Path(__file__).resolve().parent.parent


def checkout_root() -> Path | None:
    """The checkout holding this alphaquant/, or None when AlphaQuant is installed (its subpackages inside it)."""
    here = Path(__file__).resolve().parent
    if (here / "models").is_dir():
        return None                                   # installed from a wheel: alphaquant/models/ is real
    if (_ROOT / "train_quant.py").is_file() and all((_ROOT / n / "__init__.py").is_file() for n in SUBPACKAGES):
        return _ROOT
    return None


class CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds `alphaquant.<sub>` (the package itself; its submodules follow its __path__) in a checkout."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, sub = fullname.partition(".")
        if prefix != "alphaquant" or sub not in SUBPACKAGES:
            return None
        folder = self.root / sub
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def install_checkout_finder() -> None:
    root = checkout_root()
    if root is None or any(isinstance(f, CheckoutFinder) for f in sys.meta_path):
        return
    sys.meta_path.append(CheckoutFinder(root))        # last: an editable install's own finder answers first


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module):
        pass                                          # already executed under its alphaquant.* name


class _AliasFinder(importlib.abc.MetaPathFinder):
    """`models.X` -> the module `alphaquant.models.X` (same object)."""

    def __init__(self, top: str):
        self.top = top

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(self.top + "."):
            return None
        real = "alphaquant." + fullname
        if importlib.util.find_spec(real) is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(real))


def alias_top_level(top: str) -> None:
    """Make the top-level package `top` (being imported from a checkout) the same module as `alphaquant.<top>`."""
    if not any(isinstance(f, _AliasFinder) and f.top == top for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder(top))
    sys.modules[top] = importlib.import_module("alphaquant." + top)
