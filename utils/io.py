"""Writes that are never seen half-done: write beside the target, then rename over it."""
import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from utils.errors import UserError

TEMP_SUFFIX = ".tmp"
# What atomic_path's mkstemp names a temporary file of `name`: the target's name, 8 random letters.
_TEMP_NAME = re.compile(rf"^\.(.+)\.[a-z0-9_]{{8}}{re.escape(TEMP_SUFFIX)}$")
# mkstemp makes files only their owner can read; a finished file gets what open() would give it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _cannot_write(path, err):
    return UserError(f"cannot write {path}: {err.strerror or err}; the {path.name} there before, if any, is unchanged")


def make_folder(path):
    """Make the folder `path` and its parents; a UserError naming it when the operating system
    cannot (a file in its place or above it, a read-only or virtual file system)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            why = f"{existing} is a file, not a folder"
        elif err.errno == errno.ENOENT:  # /proc and /sys have no folders to make, yet say "no such file"
            why = f"the file system at {existing} does not let folders be made in it"
        else:
            why = err.strerror or str(err)
        raise UserError(f"cannot make the folder {path}: {why}; choose another output folder") from None
    return path


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
    make_folder(path.parent)
    try:
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


def temp_target(path):
    """The name of the file whose half-written copy `path` would be, or None when it is no
    temporary file of atomic_path's."""
    match = _TEMP_NAME.match(Path(path).name)
    return match[1] if match else None


def remove_temp_files(folder, owned):
    """Delete the temporary files that writes killed before their rename left under `folder`;
    returns their paths. Only the half-written copy of a file the caller writes counts: `owned`
    is asked about its target's path relative to `folder`, so that a user's own `.x.tmp` is kept."""
    folder = Path(folder)
    leftovers = []
    for path in sorted(folder.rglob(f".*{TEMP_SUFFIX}")) if folder.is_dir() else []:
        target = temp_target(path)
        if target and path.is_file() and not path.is_symlink() and owned(path.parent.relative_to(folder) / target):
            leftovers.append(path)
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
    make_folder(root.parent)
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


_LOCK_TEXT = re.compile(rb"^(\d+\n)?$")  # what exclusive_lock writes: its holder's pid, or nothing yet


def _refuse_a_foreign_lock_file(path):
    """A UserError when something not made by exclusive_lock has the lock's name: a user's own
    file there would otherwise be truncated, then deleted."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    foreign = not stat.S_ISREG(info.st_mode) or info.st_size > 32
    if not foreign:
        with open(path, "rb") as f:
            foreign = not _LOCK_TEXT.match(f.read(33))
    if foreign:
        raise UserError(f"{path} is not a lock file this project made, so it is left alone; "
                        "move it, or choose another --experiment_name")


@contextlib.contextmanager
def exclusive_lock(path, what):
    """Hold an exclusive lock on the file `path`, which names this process, for the duration; a
    UserError if another process holds it. The kernel drops the lock of a killed process, so
    a file that a killed run left behind blocks nobody."""
    path = Path(path)
    made_folder = not path.parent.exists()
    make_folder(path.parent)
    _refuse_a_foreign_lock_file(path)
    while True:
        # O_NOFOLLOW and O_NONBLOCK: a link or a FIFO put in the lock's place is refused, not followed or waited on.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666 & ~_UMASK)
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
