"""Atomic output directories: write into a temporary sibling, rename into place at the end.

A run that fails or is killed leaves no partial output under the requested name, and an
existing directory is never replaced unless the user asked for it (`--overwrite`).

    with AtomicDir("out/olmoe-w4", overwrite=False) as tmp:
        write files into tmp ...
    # out/olmoe-w4 now exists, complete
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

from alphaquant.errors import UserError


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (before any work) if the output cannot be written."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise UserError(f"output.dir {str(out)!r} already exists; pass --overwrite to replace it "
                        f"or choose another output.dir")
    if out.exists() and not out.is_dir():
        raise UserError(f"output.dir {str(out)!r} exists and is not a directory")
    parent = out.parent if str(out.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"output.dir {str(out)!r} cannot be created: {str(probe)!r} is a file, not a directory; "
                        f"choose an output.dir whose parents are directories")
    if not os.access(probe, os.W_OK):
        raise UserError(f"output.dir {str(out)!r} cannot be created: {str(probe)!r} is not writable; "
                        f"choose an output.dir in a directory you can write to")
    return out


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def _owner() -> str:
    """host.pid of this process: the temp directory says who writes it."""
    return f"{socket.gethostname().replace('-', '_')}.{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:        # exists, owned by someone else
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete temp siblings `.NAME.tmp-HOST.PID-*` left by a killed run of this host (SIGKILL skips all
    cleanup): a partial checkpoint can be as large as the model. Temps of live processes and of other
    hosts (a shared file system) are left alone."""
    removed = []
    host = socket.gethostname().replace("-", "_")
    for p in path.parent.glob(_temp_prefix(path) + "*"):
        owner = p.name[len(_temp_prefix(path)):].split("-", 1)[0]
        h, _, pid = owner.rpartition(".")
        if p.is_dir() and h == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


class AtomicDir:
    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path = check_output_dir(path, overwrite)
        self.overwrite = overwrite
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.path)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(self.path)}{_owner()}-", dir=self.path.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.path.exists():
            if not self.overwrite:          # appeared while we worked
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise UserError(f"output.dir {str(self.path)!r} appeared during the run; "
                                f"the result was not written (pass --overwrite to replace it)")
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.path)
        return False
