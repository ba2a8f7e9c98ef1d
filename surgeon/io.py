"""Writing and reading run files safely: atomic writes, JSON, safetensors.

Everything here is below the pipeline: the trainer, merging, sweeps and reports write through
it. A write goes to a temporary file in the same folder, is fsynced and then renamed over the
target, so a SIGKILL at any moment leaves the old file or the new one, never a torn one.

Every file gets the mode a plain ``open(path, "w")`` would give it (``0o666`` less the umask):
some writers (safetensors) create their files ``0o600``, and a run's files should not differ in
who may read them.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from surgeon.errors import UserError


def file_mode() -> int:
    """The permission bits of a newly created file: ``0o666`` less the process umask."""
    try:  # Linux reports the umask without changing it (changing it races with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def set_file_mode(path: Path) -> None:
    """Give ``path`` (a file, or every file under a folder) the mode of :func:`file_mode`."""
    path, mode = Path(path), file_mode()
    for p in [path] if path.is_file() else (q for q in path.rglob("*") if q.is_file()):
        os.chmod(p, mode)


def atomic_write(path: Path, write, verify=None) -> None:
    """``write(tmp_path)`` then fsync and rename over ``path`` (same folder, so rename is atomic);
    the file gets the umask's mode (:func:`file_mode`) whatever ``write`` created it with.

    ``verify(tmp_path)``, if given, reads the written file back before the rename and raises if
    it is not what was meant: a bad write (a full disk, a bug) then never replaces a good file.
    An interrupt (Ctrl-C) or any error at any point leaves the old file, and no temporary one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


#: errno values that mean "this place cannot be written" (a user's to fix, not a bug).
UNWRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})


def writable_dir(path: Path, what: str) -> Path:
    """Create ``path`` (with its parents) if needed and prove a file can be written in it.

    Raises:
        UserError: naming the path and the reason: below a regular file, read-only, no
            permission, no space, ``/proc``...
    """
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot create the {what}: {parent} is a file, not a folder", where=str(path),
                                hint="choose a path below a folder")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".surgeon-write-test-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"x")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write the {what}: {exc.strerror or exc}", where=str(path),
                        hint="choose a folder you can write to (--out), or fix its permissions") from None
    return path


def write_text(path: Path, text: str) -> None:
    """Atomically write UTF-8 text."""
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def json_default(obj):
    """JSON for the values a run logs besides plain data: tensors and numpy scalars (by their
    ``item``/``tolist``, without importing torch), paths."""
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "numel") and hasattr(obj, "tolist"):  # a torch tensor
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: Path, data) -> None:
    """Atomically write pretty JSON."""
    write_text(path, json.dumps(data, indent=2, allow_nan=False, default=json_default) + "\n")


def read_json(path: Path) -> dict:
    """A JSON file; an unreadable or invalid one raises :class:`UserError` naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {Path(path).name}: {exc}", where=str(path)) from None


def finite_or_none(x):
    """JSON has no NaN: non-finite numbers are written as null."""
    if x is None:
        return None
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None


def save_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Atomically write ``tensors`` (contiguous CPU copies) as safetensors."""
    # safetensors.torch imports torch: only callers that hold tensors get here.
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


def load_tensors(path: Path) -> dict:
    """Read a safetensors file; a missing or corrupt file raises :class:`UserError` naming it."""
    # safetensors.torch imports torch: only callers that want tensors get here.
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError("file not found", where=str(path))
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse error means a corrupt file
        raise UserError(f"cannot read tensors: {exc}", where=str(path),
                        hint="the file is corrupt or truncated") from None
