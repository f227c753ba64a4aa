"""The one atomic file write: a reader, or a process killed at any moment, sees the previous file
or the new one, never a torn one.

The bytes go to a temporary file in the same folder (a rename is atomic only within one file
system), are flushed to disk, and the file is renamed over the target; the folder is then
flushed too, so that the rename itself survives a power cut. A write that fails removes its
temporary file and leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fcnseg.errors import UserError


class AtomicWriteError(UserError, OSError):
    """A file could not be written: one sentence naming it, with the ``OSError``'s ``errno``.

    It is both a ``UserError`` (scripts print it as one line) and an ``OSError`` (callers that
    treat a failed write as a warning keep catching ``OSError``).
    """

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(code, message)

    def __str__(self) -> str:
        return self.strerror


def temporary_pattern(path: str | Path) -> str:
    """The glob pattern of the temporary files ``atomic_path`` creates for ``path`` (in its
    folder), e.g. to remove those that a killed write left behind."""
    return f".{Path(path).name}.*.tmp*"


@contextlib.contextmanager
def atomic_path(path: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """A temporary path in ``path``'s folder to write to, which then takes the name ``path``.

    The temporary name ends in ``path``'s own extension (``.foo.png.k2x9.tmp.png``), so writers
    that choose the format by the name (``PIL.Image.save``) write the right one. The folder is
    created if missing; the file gets the mode any new file would (not ``mkstemp``'s 0600).

    Args:
        path: the file to write.
        replace: replace a file named ``path``. When false the name is taken by a hard link,
            which fails where a file of that name exists (even one that appeared during the
            write), and ``FileExistsError`` is raised with ``path`` kept as it was.

    Raises:
        AtomicWriteError: the folder or the file could not be written (a read-only folder, a
            full disk); the message names ``path`` and says that it is unchanged.
        FileExistsError: ``replace`` is false and ``path`` exists.
        Exception: whatever the body raised, once the temporary file is removed.
    """
    path = Path(path)
    tmp: Path | None = None
    taken = False  # replace is false and a file has the name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent
        )
        tmp = Path(name)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
        finally:
            os.close(fd)
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may have closed its own handle unflushed
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            tmp = None
        else:
            taken = not _link_new(tmp, path)  # the temporary name is removed below
    except OSError as err:
        raise AtomicWriteError(err.errno, _failure(path, err)) from err
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
    if taken:
        raise FileExistsError(errno.EEXIST, "file exists; it is kept", str(path))
    _fsync_folder(path.parent)


def write_atomic(path: str | Path, data: bytes | str, *, replace: bool = True) -> Path:
    """Writes ``data`` (``str`` as UTF-8) to ``path`` atomically (see ``atomic_path``).

    Returns:
        ``path`` as a ``Path``.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_path(path, replace=replace) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


def _link_new(tmp: Path, path: Path) -> bool:
    """Gives the file ``tmp`` the name ``path`` unless a file has that name (then false)."""
    try:
        os.link(tmp, path)  # unlike a rename, a link never replaces a file
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: check, then rename
        if path.exists() or path.is_symlink():
            return False
        os.replace(tmp, path)
    return True


def _failure(path: Path, err: OSError) -> str:
    kept = f"the previous {path.name} is unchanged" if path.is_file() else "nothing was written"
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        why = f"{blocker} is a file, not a folder"
    elif err.errno == errno.ENOSPC:
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MB free"
        except OSError:
            free = "free space unknown"
        why = f"no space left on device, {free}"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = f"the folder {path.parent} is read-only" if _read_only(path.parent) else None
        why = why or err.strerror
    else:
        why = err.strerror or " ".join(str(err).split())[:200]
    return f"cannot write {path} ({why}); {kept}"


def _read_only(folder: Path) -> bool:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK)


def _fsync_folder(folder: Path) -> None:
    """Makes a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it
    os.umask(mask)
    return mask
