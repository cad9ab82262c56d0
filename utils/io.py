"""Writes that are never seen half-done: write beside the target, then rename over it."""
import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

from utils.errors import UserError

TEMP_SUFFIX = ".tmp"
# mkstemp makes files only their owner can read; a finished file gets what open() would give it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _cannot_write(path, err):
    return UserError(f"cannot write {path}: {err.strerror or err}; the {path.name} there before, if any, is unchanged")


def _os_error(err):
    """The operating system's error behind `err`, or None. torch.save, failing again as it closes
    its archive, reports a full disk as a RuntimeError raised while handling the OSError."""
    while err is not None:
        # Pillow raises OSError without an errno for its own complaints, which are not the disk's.
        if isinstance(err, OSError) and err.errno is not None:
            return err
        err = err.__context__
    return None


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in the target's folder; on success rename it to `path`.

    The same folder matters: a rename across file systems is a copy, which can be interrupted.
    An error from the operating system (a full disk, a read-only folder) becomes a UserError that
    names the file, since the fix is on the user's side and nothing was replaced."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        os.fchmod(fd, 0o666 & ~_UMASK)
        os.close(fd)
    except OSError as err:
        raise _cannot_write(path, err) from None
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        cause = _os_error(err) if isinstance(err, Exception) else None
        if cause:
            raise _cannot_write(path, cause) from None
        raise


def remove_temp_files(folder):
    """Delete the temporary files that writes killed before their rename left under `folder`;
    returns their paths. They are never complete, so nothing is lost."""
    leftovers = sorted(Path(folder).rglob(f".*{TEMP_SUFFIX}")) if Path(folder).is_dir() else []
    for path in leftovers:
        path.unlink()
    return leftovers


@contextlib.contextmanager
def verified_download(root, download, digest, expected, mismatch):
    """Yield (the file `download(folder)` fetched, its digest, a staging folder) once the digest is
    `expected`, else raise a UserError starting with `mismatch`. Everything happens beside `root`;
    on success the staging folder replaces `root` in one rename, and a failure or a mismatch leaves
    nothing there that looks like data."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{root.name}.") as tmp:
        fetched = download(Path(tmp))
        got = digest(fetched)
        if got != expected:
            raise UserError(f"{mismatch} (expected {expected}, got {got}); refusing to unpack it")
        staging = Path(tmp) / "unpacked"
        staging.mkdir()
        yield fetched, got, staging
        if root.exists():  # a leftover without its finished mark is an old partial copy
            shutil.rmtree(root)
        os.replace(staging, root)


def write_json(path, obj):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def exclusive_lock(path, what):
    """Hold an exclusive lock on the file `path`, which names this process, for the duration; a
    UserError if another process holds it. The kernel drops the lock of a killed process, so
    a file that a killed run left behind blocks nobody."""
    path = Path(path)
    made_folder = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{what} is in use by another run (process {holder}); wait for it to end, "
                            "or choose another --experiment_name") from None
        # The holder before us may have removed the file as we opened it: then ours is a lock on
        # nothing, and the next run would lock a new file; try again on the file now there.
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.unlink(path)
        os.close(fd)
        if made_folder:
            with contextlib.suppress(OSError):  # not empty: it holds what the run wrote
                path.parent.rmdir()
