"""One benchmark task in a fresh process.

The runner starts each task with :func:`entry` in a process forked from a fork server
that has torch and fipurify imported but has run nothing (so a task starts in well under
a second); ``python -m fipurify.bench.worker TASK.json`` runs a task by hand. A fresh
process per task gives each run its own peak-memory figure and the same starting state
whatever ran before it, and a crash or out-of-memory kill takes down only that run. A purification task writes its own result row (ok or failed) in one
transaction before it exits, so a result is kept even if the runner that started the
task is killed meanwhile. Exit status: 0 done, 1 failed (and recorded), 2 bad task,
75 (``BUSY``) the run (or the model to train) is held by another runner, so nothing was done.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any


BUSY = 75  # EX_TEMPFAIL: try again later


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_train(task: dict[str, Any]) -> int:
    """Train (or find cached) the model of the task."""
    from . import stages

    try:
        path, meta, trained = stages.train(task["model_config"], task["model_key"], task["cache"],
                                           data_root=task.get("data_root"), device=task["device"], log=_log,
                                           locked=bool(task.get("lock")))
    except Exception as e:
        traceback.print_exc()
        _log(f"error: {type(e).__name__}: {e}")
        return 1
    m = meta["metrics"]
    _log(f"{'trained' if trained else 'found'} {path}: acc {m['acc']:.4f} asr {m['asr']}")
    return 0


def run_purify(task: dict[str, Any]) -> int:
    """Purify one model and record the result (ok or failed) in the results store."""
    from . import stages
    from .store import ResultStore, utc_now

    row = dict(task["row"])
    with ResultStore(task["db"]) as store:
        if store.finished([row["run_key"]]):
            _log("already done by another process")
            return 0
        row["started_at"] = utc_now()
        try:
            fields = stages.purify(task["run_config"], Path(task["model_path"]), data_root=task.get("data_root"),
                                   device=task["device"])
            row.update(fields, status="ok", error=None)
        except Exception as e:
            traceback.print_exc()
            row.update(status="failed", error=f"{type(e).__name__}: {e}")
        row.update(stages.environment(task["device"], task.get("threads")))
        store.record(row)
    if row["status"] != "ok":
        _log(f"error: {row['error']}")
        return 1
    _log(f"ok: acc {row['acc']:.4f} asr {row['asr']}")
    return 0


def run_task(task: dict[str, Any], log_path: str | None = None) -> int:
    """Run one task dict (``kind`` train or purify); returns the exit status.

    A task with a ``lock`` file runs only while it holds that lock. If another runner holds it,
    this returns ``BUSY`` at once, before ``log_path`` (the holder's log too) is touched: waiting
    would idle this slot and keep two runners that share a database in lockstep, so the runner
    puts the run back in its queue and takes another one.
    """
    from . import stages

    with contextlib.ExitStack() as held:
        if task.get("lock"):
            try:
                held.enter_context(stages.file_lock(Path(task["lock"]), wait=False))
            except stages.LockBusy:
                return BUSY
        if log_path:
            _redirect_output(log_path)
        stages.setup_torch(task.get("threads"), task.get("deterministic", True))
        if str(task.get("device", "")).startswith("cuda:"):  # one GPU of several: make it the current one,
            import torch                                      # so synchronize and peak-memory stats are its own
            torch.cuda.set_device(task["device"])
        if task["kind"] == "train":
            return run_train(task)
        if task["kind"] == "purify":
            return run_purify(task)
        _log(f"unknown task kind {task['kind']!r}")
        return 2


def _redirect_output(log_path: str) -> None:
    import os

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _exit_with(pid: int, every: float = 2.0) -> None:
    """End this process once process ``pid`` (the runner) is gone, so a killed runner leaves no worker running."""
    import os
    import threading

    def watch() -> None:
        while True:
            time.sleep(every)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(3)  # nothing to clean up: results are committed in one transaction or not at all
            except PermissionError:
                pass

    threading.Thread(target=watch, daemon=True, name="runner-watch").start()


def entry(task: dict[str, Any], log_path: str) -> None:
    """Process target: run the task with stdout and stderr sent to ``log_path``, exit with its status."""
    import os

    if task.get("runner_pid"):
        _exit_with(int(task["runner_pid"]))
    if task.get("threads"):
        os.environ["OMP_NUM_THREADS"] = str(task["threads"])
    try:
        code = run_task(task, log_path)
    except BaseException:
        traceback.print_exc()
        code = 2
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        _log("usage: python -m fipurify.bench.worker TASK.json")
        return 2
    return run_task(json.loads(Path(argv[0]).read_text(encoding="utf-8")))


if __name__ == "__main__":
    sys.exit(main())
