"""What an output directory may be: checked before any weight is read, so a run can never destroy user data.

A quantizer is handed a model, a tokenizer and data files, and writes one directory. The checks:

* the path is not empty, and resolves (a symlink loop is refused, `~` is expanded by the config);
* it is not `/`, the home directory, the current directory or any directory above them (replacing
  one of those would take everything under it);
* it is not, does not contain and does not lie inside any input (`model.path`, `model.tokenizer`,
  the calibration and evaluation data);
* an existing directory is replaced only with `--overwrite`, and only when it is empty or an
  earlier AlphaQuant checkpoint (it holds `alphaquant_recipe.json` and nothing but the files a
  checkpoint holds); anything else is refused with what is in it;
* the nearest existing parent is a writable directory (found now, not after the run).

    check_output_dir("outputs/olmoe-w4", overwrite=True, inputs={"model.path": "demo/olmoe-tiny"})
"""
from __future__ import annotations

import os
from pathlib import Path

from alphaquant.errors import UserError

MARKER = "alphaquant_recipe.json"          # written into every checkpoint; what marks a directory as ours
# Subdirectories a checkpoint of ours has: anything else (a .git, the user's data) means it is not ours.
CHECKPOINT_SUBDIRS = {"plots"}


def resolve(path: str | os.PathLike, key: str) -> Path:
    """Absolute, symlink-free path (the path need not exist); a symlink loop is a UserError naming `key`."""
    try:
        return Path(os.path.abspath(path)).resolve(strict=False)
    except (RuntimeError, OSError) as e:          # RuntimeError: "Symlink loop from ..." (Python 3.11)
        raise UserError(f"{key} {str(path)!r} cannot be resolved ({e}); choose a path without a symlink loop") from None


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _listing(entries: list[str], n: int = 4) -> str:
    shown = ", ".join(repr(e) for e in sorted(entries)[:n])
    return shown + (f" and {len(entries) - n} more" if len(entries) > n else "")


def is_checkpoint(path: Path) -> bool:
    """An earlier AlphaQuant checkpoint: our marker file, and no subdirectory a checkpoint does not have."""
    if not (path / MARKER).is_file():
        return False
    return all(not e.is_dir() or e.name in CHECKPOINT_SUBDIRS for e in path.iterdir())


def replaceable(path: Path) -> tuple[bool, str]:
    """(may --overwrite replace `path`, what it holds in words)."""
    entries = [e.name for e in path.iterdir()]
    if not entries:
        return True, "an empty directory"
    if is_checkpoint(path):
        return True, f"an earlier AlphaQuant checkpoint ({len(entries)} entries)"
    return False, f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'} that are not an AlphaQuant checkpoint ({_listing(entries)})"


def check_output_dir(path: str | os.PathLike, overwrite: bool, inputs: dict[str, str | os.PathLike | None] | None = None,
                     key: str = "output.dir") -> Path:
    """The output directory as given (a Path), or a UserError saying why it must not be written."""
    if path is None or str(path).strip() == "":
        raise UserError(f"{key} is empty; set it to the directory the checkpoint should be written to")
    out = Path(path)
    real = resolve(out, key)
    for what, protected in (("the root directory", Path("/")), ("your home directory", Path.home()),
                            ("the current directory", Path.cwd())):
        protected = resolve(protected, key)
        if _inside(protected, real):
            rel = "is" if protected == real else "contains"
            raise UserError(f"{key} {str(path)!r} {rel} {what} ({protected}); AlphaQuant writes its checkpoint "
                            f"into a directory of its own: choose a new directory such as outputs/<name>")
    for input_key, p in (inputs or {}).items():
        if p is None or str(p) == "":
            continue
        src = resolve(p, input_key)
        if not src.exists():                      # a hub id or a dataset name, not a path here
            continue
        if _inside(src, real) or _inside(real, src):
            rel = "is" if src == real else ("contains" if _inside(src, real) else "lies inside")
            raise UserError(f"{key} {str(path)!r} {rel} {input_key} ({src}); the output must not touch the "
                            f"run's inputs: choose an output.dir outside them")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UserError(f"{key} {str(path)!r} exists and is not a directory; choose another {key}")
        ok, held = replaceable(out)
        if not overwrite:
            raise UserError(f"{key} {str(path)!r} already exists (it holds {held}); pass --overwrite to replace "
                            f"an earlier AlphaQuant checkpoint or choose another {key}")
        if not ok:
            raise UserError(f"{key} {str(path)!r} holds {held}; --overwrite replaces only an empty directory "
                            f"or an earlier AlphaQuant checkpoint, so choose another {key}")
    probe = real.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{key} {str(path)!r} cannot be created: {str(probe)!r} is a file, not a directory; "
                        f"choose an {key} whose parents are directories")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{key} {str(path)!r} cannot be created: {str(probe)!r} is not writable; "
                        f"choose an {key} in a directory you can write to")
    return out


def run_inputs(cfg) -> dict:
    """The input paths of a run that an output directory must stay clear of, by config key."""
    return {"model.path": cfg.model.path, "model.tokenizer": cfg.model.tokenizer,
            "calibration.dataset": cfg.calibration.dataset, "eval.dataset": cfg.eval.dataset}
