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
from alphaquant.export.output_dir import check_output_dir, replaceable


def remove_tree(path: Path) -> None:
    """shutil.rmtree(path, ignore_errors=True), with the files at its top level unlinked by 8 threads at once:
    freeing a checkpoint's gigabytes is the file system's work per file, and on an H200 machine's ext4 the
    16 files (3.6 GB) of an OLMoE-1B-7B resume state took 0.23 s one after another, 0.04 s eight at a time."""
    from concurrent.futures import ThreadPoolExecutor
    try:
        files = [e.path for e in os.scandir(path) if e.is_file(follow_symlinks=False)]
    except OSError:
        files = []
    if len(files) > 1:
        def unlink(f):
            try:
                os.unlink(f)
            except OSError:
                pass
        with ThreadPoolExecutor(max_workers=min(8, len(files)), thread_name_prefix="remove") as pool:
            list(pool.map(unlink, files))
    shutil.rmtree(path, ignore_errors=True)


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


def _dead_owner(p: Path, prefix: str) -> bool:
    """`p` is named PREFIX + HOST.PID[-...] by a process of this host that no longer runs."""
    owner = p.name[len(prefix):].split("-", 1)[0]
    h, _, pid = owner.rpartition(".")
    host = socket.gethostname().replace("-", "_")
    return h == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid))


def _old_prefix(path: Path) -> str:
    return f".{path.name}.old-"


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete temp siblings `.NAME.tmp-HOST.PID-*` left by a killed run of this host (SIGKILL skips all
    cleanup): a partial checkpoint can be as large as the model. Temps of live processes and of other
    hosts (a shared file system) are left alone."""
    removed = []
    for p in path.parent.glob(_temp_prefix(path) + "*"):
        if p.is_dir() and _dead_owner(p, _temp_prefix(path)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def recover_interrupted_swap(path: Path) -> str | None:
    """Finish what a run killed inside an overwrite left: it renames the old checkpoint to
    `.NAME.old-HOST.PID`, the new one into place, then deletes the old one. Killed between the two
    renames, NAME is missing: the old checkpoint is renamed back (the new one is an unfinished temp
    and is removed by `remove_stale_temps`). Killed after them, the old one is deleted.
    Returns what was done, in words, or None."""
    path = Path(path)
    if not path.parent.is_dir():
        return None
    done = None
    for old in sorted(path.parent.glob(_old_prefix(path) + "*")):
        if not old.is_dir() or not _dead_owner(old, _old_prefix(path)):
            continue
        if not path.exists():
            os.replace(old, path)
            done = f"restored {path} from {old.name}, left by a run killed while replacing it"
        else:
            shutil.rmtree(old, ignore_errors=True)
            done = done or f"removed {old.name}, the checkpoint a killed run had already replaced"
    return done


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _modes_from_umask(root: Path) -> None:
    """mkdtemp makes 0700 and safetensors writes its files 0600: give the checkpoint the modes a plain
    mkdir and open would (0777 / 0666 less the umask), so a serving account can read it."""
    umask = _umask()
    os.chmod(root, 0o777 & ~umask)
    for d, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(d, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(d, name), 0o666 & ~umask)


class AtomicDir:
    """`with AtomicDir(path, overwrite) as tmp:` write into tmp; on success tmp becomes path.

    Replacing an existing directory (only an empty one or an earlier checkpoint: `check_output_dir`)
    is two renames; a SIGKILL between them is repaired by the next run (`recover_interrupted_swap`)."""

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path = Path(path)
        recover_interrupted_swap(self.path)
        self.path = check_output_dir(path, overwrite)
        self.overwrite = overwrite
        self.tmp: Path | None = None
        self.replaced: str | None = None      # what an overwrite replaced, in words

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.path)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(self.path)}{_owner()}-", dir=self.path.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        _modes_from_umask(self.tmp)
        if self.path.exists():
            ok, held = replaceable(self.path) if self.path.is_dir() else (False, "a file")
            if not self.overwrite or not ok:     # appeared (or changed) while we worked
                shutil.rmtree(self.tmp, ignore_errors=True)
                why = "pass --overwrite to replace it" if ok else "--overwrite replaces only an empty directory or an earlier AlphaQuant checkpoint"
                raise UserError(f"output.dir {str(self.path)!r} appeared during the run (it holds {held}); "
                                f"the result was not written ({why})")
            old = self.path.with_name(f"{_old_prefix(self.path)}{_owner()}")
            os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            remove_tree(old)
            self.replaced = held
            print(f"replaced {held} at {self.path}")
        else:
            os.replace(self.tmp, self.path)
        return False
