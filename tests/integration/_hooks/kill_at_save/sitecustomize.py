"""Test-only hook (put this directory on PYTHONPATH): kill -9 at the K-th file boundary of the final save.

With QLAUNCH_TEST_KILL_DIR=OUTPUT set, every file operation under OUTPUT from the start of the final save
(qlaunch.train.checkpoints.stage_final) on — a file opened for writing, a rename, a removal, a directory
made or removed — is a boundary, seen through Python's audit hooks just before it happens. With
QLAUNCH_TEST_KILL_AT=K the process sends itself SIGKILL at boundary K (the state after K-1 completed
operations); with QLAUNCH_TEST_KILL_LOG=FILE each boundary is appended there (to count them).
"""
import os
import signal
import sys

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # _hooks/
from on_import import PatchOnImport  # noqa: E402

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_EVENTS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "shutil.move"}
_state = {"saving": False, "count": 0}


def _is_write(event, args) -> bool:
    if event != "open":
        return event in _EVENTS
    _, mode, flags = args
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


def _audit(event, args):
    if not _state["saving"] or not (event == "open" or event in _EVENTS) or not args:
        return
    path = args[0]
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).startswith(_ROOT):
        return
    if not _is_write(event, args):
        return
    _state["count"] += 1
    if _LOG:
        with open(_LOG, "a") as f:  # outside OUTPUT: not itself a boundary
            f.write(f"{_state['count']} {event} {os.path.relpath(os.fspath(path), _ROOT)}\n")
    if _state["count"] == _KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)


def _patch(module) -> None:
    original = module.stage_final

    def stage_final(trainer, output_dir):
        _state["saving"] = True
        return original(trainer, output_dir)

    module.stage_final = stage_final


if os.environ.get("QLAUNCH_TEST_KILL_DIR"):
    _ROOT = os.path.abspath(os.environ["QLAUNCH_TEST_KILL_DIR"])
    _KILL_AT = int(os.environ.get("QLAUNCH_TEST_KILL_AT") or 0)
    _LOG = os.environ.get("QLAUNCH_TEST_KILL_LOG")
    sys.addaudithook(_audit)
    sys.meta_path.insert(0, PatchOnImport("qlaunch.train.checkpoints", _patch))
