"""Run a training script and make it fail at one chosen point, the way a machine really fails.

    python tests/fail_at.py POINT SCRIPT [--key=value ...]

POINT is one of
  kill:step:N          SIGKILL right after this process's Nth optimiser step
  interrupt:step:N     SIGINT (Ctrl-C) right after this process's Nth optimiser step
  kill:save:NAME:N     SIGKILL halfway through the bytes of the Nth torch.save into NAME
  kill:rename:NAME:N   SIGKILL once the Nth NAME is fully written, before its rename into place
  full:save:NAME:N     the disk fills up halfway through the bytes of the Nth torch.save into NAME

The script runs unchanged through runpy: the hooks live here, not in the code under test.
SIGKILL gives the process no chance to clean up, like a power cut or the kernel's OOM killer.
"""
import errno
import io
import os
import runpy
import signal
import sys
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

ROOT = Path(__file__).resolve().parent.parent


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def disk_full():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def nth(count):
    """A function that is true on its `count`th call only."""
    calls = [0]

    def call():
        calls[0] += 1
        return calls[0] == count
    return call


class FailingFile:
    """A file that takes `limit` bytes, then fails as `fail` says."""

    def __init__(self, file, limit, fail):
        self.file, self.left, self.fail = file, limit, fail

    def write(self, data):
        if len(data) < self.left:
            self.left -= len(data)
            return self.file.write(data)
        self.file.write(bytes(memoryview(data)[:self.left]))
        self.file.flush()  # the half must be in the file, not in this process's buffer, when it dies
        self.fail()

    def __getattr__(self, name):
        return getattr(self.file, name)


def fail_in_save(name, count, fail):
    save, is_nth = torch.save, nth(count)

    def failing_save(obj, f, *args, **kwargs):
        if Path(getattr(f, "name", "")).name.startswith(f".{name}.") and is_nth():
            whole = io.BytesIO()
            save(obj, whole)
            f = FailingFile(f, len(whole.getvalue()) // 2, fail)
        return save(obj, f, *args, **kwargs)

    torch.save = failing_save


def kill_before_rename(name, count):
    replace, is_nth = os.replace, nth(count)

    def killing_replace(src, dst, *args, **kwargs):
        if Path(dst).name == name and is_nth():
            die()
        return replace(src, dst, *args, **kwargs)

    os.replace = killing_replace


def signal_after_step(count, signum):
    is_nth = nth(count)
    register_optimizer_step_post_hook(lambda *_: is_nth() and os.kill(os.getpid(), signum))


def install(point):
    kind, where, *rest = point.split(":")
    if (kind, where) == ("kill", "step"):
        signal_after_step(int(rest[0]), signal.SIGKILL)
    elif (kind, where) == ("interrupt", "step"):
        signal_after_step(int(rest[0]), signal.SIGINT)
    elif (kind, where) == ("kill", "save"):
        fail_in_save(rest[0], int(rest[1]), die)
    elif (kind, where) == ("kill", "rename"):
        kill_before_rename(rest[0], int(rest[1]))
    elif (kind, where) == ("full", "save"):
        fail_in_save(rest[0], int(rest[1]), disk_full)
    else:
        sys.exit(f"unknown failure point {point!r}; see {__file__}")


if __name__ == "__main__":
    point, script, *args = sys.argv[1:]
    install(point)
    sys.path.insert(0, str(ROOT))
    sys.argv = [script, *args]
    runpy.run_path(str(ROOT / script), run_name="__main__")
