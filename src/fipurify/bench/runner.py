"""The benchmark runner: expand a spec, skip finished runs, train missing models, run defenses.

Every task (training one backdoored model, purifying one) runs in a fresh worker process
(:mod:`fipurify.bench.worker`), up to ``jobs`` at a time; a defense starts as soon as its
model exists. Workers are forked from a fork server that has imported torch and
fipurify once, so a task starts in a fraction of a second instead of re-importing. Results are committed one run at a time, model files are written
atomically, and finished runs are skipped, so a runner killed at any moment and started
again loses nothing finished and repeats no finished run. Each run is held under a lock
file while it runs; a runner skips runs another runner holds and comes back to them, so
several runners can share one database and split its work.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..devices import resolve_device
from ..errors import ConfigError
from . import stages
from .adopt import adopt as adopt_models
from .spec import Run, Spec, matches
from .store import ResultStore, utc_now
from .worker import BUSY


@dataclass
class BenchOptions:
    """How to run a spec. ``threads`` per worker defaults to $OMP_NUM_THREADS, else cores / jobs."""
    db: Path
    cache: Path
    data_root: str | None = None
    jobs: int = 1
    threads: int | None = None
    device: str = "auto"
    deterministic: bool = True
    only: list[str] = field(default_factory=list)
    shard: tuple[int, int] | None = None
    dry_run: bool = False
    timeout: float | None = None
    progress: bool = True
    adopt: list[Path] = field(default_factory=list)  # model files trained elsewhere to reuse (see bench.adopt)
    rerun: list[str] = field(default_factory=list)  # patterns (as ``only``) of finished runs to run again
    backend: str = "local"  # "local" (this module's process pool) or "ray" (bench.ray_backend)
    address: str | None = None  # the Ray cluster to join (backend "ray"); None: start a local instance

    def validate(self) -> "BenchOptions":
        if self.jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {self.jobs}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.shard is not None and not 0 <= self.shard[0] < self.shard[1]:
            raise ConfigError(f"--shard i/n needs 0 <= i < n, got {self.shard[0]}/{self.shard[1]}")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError("--timeout must be positive")
        if self.backend not in ("local", "ray"):
            raise ConfigError(f"--backend must be local or ray, got {self.backend!r}")
        if self.address and self.backend != "ray":
            raise ConfigError("--address names a Ray cluster: use it with --backend ray")
        return self


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``: this machine runs part ``i`` (0-based) of ``n``."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise ConfigError(f"--shard takes i/n (e.g. 0/3), got {text!r}")
    return int(m.group(1)), int(m.group(2))


# --------------------------------------------------------------------------- selection
def shard_of(runs: list[Run], shard: tuple[int, int] | None) -> set[str]:
    """Run keys of part ``i`` of ``n``.

    Runs sharing a backdoored model go to the same part (it is trained once), unless
    there are fewer models than parts; then runs are spread by their own key.
    """
    if shard is None:
        return {r.key for r in runs}
    i, n = shard
    groups = sorted({r.base_model_key for r in runs})
    if len(groups) >= n:
        part = {g: j % n for j, g in enumerate(groups)}
        return {r.key for r in runs if part[r.base_model_key] == i}
    return {r.key for r in runs if int(r.key, 16) % n == i}


def select(spec: Spec, opts: BenchOptions) -> list[Run]:
    """The spec's runs picked by ``--shard`` and ``--only``, in grid order."""
    runs = spec.runs()
    keep = shard_of(runs, opts.shard)
    return [r for r in runs if r.key in keep and matches(r, opts.only)]


# --------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """What a bench invocation will do."""
    runs: list[Run]
    done: set[str]
    pending: list[Run]
    models: dict[str, dict[str, Any]]  # model key -> {"config", "path", "cached"}

    def to_train(self) -> list[str]:
        return [k for k, m in self.models.items() if not m["cached"]]


def make_plan(spec: Spec, opts: BenchOptions, store: ResultStore) -> Plan:
    """Selected runs, those already finished, and the models the rest need."""
    runs = select(spec, opts)
    done = store.finished([r.key for r in runs])
    pending = [r for r in runs if r.key not in done]
    models: dict[str, dict[str, Any]] = {}
    for r in pending:
        for key, cfg in _models_of(r):
            if key not in models:
                path = stages.model_path(opts.cache, cfg, key)
                models[key] = {"config": cfg, "path": path,
                               "cached": stages.cached_model_meta(path, key) is not None}
    return Plan(runs, done, pending, models)


def _models_of(run: Run) -> list[tuple[str, dict[str, Any]]]:
    """(key, config) of every model ``run`` needs: its own, and for a training-time defense the undefended one."""
    out = [(run.base_model_key, run.model_config(base=True))]
    if run.model_key != run.base_model_key:
        out.append((run.model_key, run.model_config()))
    return out


def describe(spec: Spec, plan: Plan, opts: BenchOptions, out: TextIO) -> None:
    """The plan in words (``--dry-run``)."""
    print(f"spec {spec.name}: {len(plan.runs)} runs selected, {len(plan.done)} already done, "
          f"{len(plan.pending)} to run; {len(plan.models)} models needed, {len(plan.to_train())} to train "
          f"(cache {opts.cache}, results {opts.db})", file=out)
    for key in plan.to_train():
        print(f"  train {plan.models[key]['path'].name}", file=out)
    for r in plan.pending:
        print(f"  run   {r.label}  [{r.key}]", file=out)


# --------------------------------------------------------------------------- execution
@dataclass
class _Task:
    kind: str          # "train" or "purify"
    key: str           # model key or run key
    label: str
    proc: Any = None   # multiprocessing.Process
    log: Path | None = None
    started: float = 0.0
    device: str = ""   # where it runs (one GPU of several: see place())


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)[:80]


def _tail(path: Path | None, n: int = 1) -> str:
    if path is None or not path.is_file():
        return ""
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("error: ")]
    return (errs[-1][len("error: "):] if errs else " | ".join(lines[-n:]))[:500]


class Runner:
    """Runs a plan with up to ``jobs`` worker processes; see the module docstring."""

    def __init__(self, spec: Spec, opts: BenchOptions, store: ResultStore, out: TextIO = sys.stderr):
        self.spec, self.opts, self.store, self.out = spec, opts.validate(), store, out
        self.work = opts.db.with_name(opts.db.name + ".work")
        self.device = resolve_device(opts.device)
        self.devices = device_slots(self.device)
        self._live: list[_Task] = []  # started tasks, to place the next one on the least busy GPU
        self.threads = opts.threads or _env_threads() or max(1, (os.cpu_count() or 1) // opts.jobs)
        self.counts = {"ok": 0, "failed": 0, "skipped": 0, "trained": 0}
        self.poll_seconds = 2.0  # how often to look again when every queued run is held elsewhere
        self.ctx = _context()

    # ---------------------------------------------------------------- tasks
    def _start(self, task: _Task, payload: dict[str, Any]) -> None:
        from .worker import entry

        self._live = [t for t in self._live if t.proc is not None and t.proc.exitcode is None]
        task.device = place(self.devices, [t.device for t in self._live])
        self._live.append(task)
        payload.update(kind=task.kind, device=task.device, threads=self.threads, runner_pid=os.getpid(),
                       deterministic=self.opts.deterministic, data_root=self.opts.data_root)
        task.log = self.work / "logs" / f"{task.kind}-{_safe(task.label)}-{task.key[:8]}.log"
        task.log.parent.mkdir(parents=True, exist_ok=True)
        task.proc = self.ctx.Process(target=entry, args=(payload, str(task.log)), daemon=False)
        task.proc.start()
        task.started = time.monotonic()

    def _base_row(self, run: Run) -> dict[str, Any]:
        return {"run_key": run.key, "spec": self.spec.name, "label": run.label, "model_key": run.model_key,
                "attack": run.attack, "defense": run.defense, "seed": run.seed,
                "clean_size": run.config["clean_size"], "config": run.config}

    def _record(self, run: Run, fields: dict[str, Any], status: str, error: str | None = None) -> None:
        row = {**self._base_row(run), **fields, "status": status, "error": error, "started_at": utc_now()}
        if status == "ok":
            row.update(stages.environment(self.device, self.threads))
        else:
            row.update(host=stages.environment(self.device, self.threads)["host"], device=self.device)
        self.store.record(row)
        self.counts["ok" if status == "ok" else "failed"] += 1

    # ---------------------------------------------------------------- main loop
    def run(self, plan: Plan) -> dict[str, int]:
        """Execute ``plan``; returns counts of ok / failed / skipped runs and trained models."""
        from tqdm.auto import tqdm

        self.store.save_spec(self.spec.name, self.spec.raw, self.spec.source)
        ready = {k for k, m in plan.models.items() if m["cached"]}
        failed_models: dict[str, str] = {}
        train_queue = [k for k in plan.to_train()]
        waiting = list(plan.pending)
        purify_queue: list[Run] = []
        running: list[_Task] = []
        runs_by_key = {r.key: r for r in plan.pending}
        bar = tqdm(total=len(plan.pending) + len(train_queue), desc=self.spec.name, unit="task",
                   disable=not self.opts.progress, file=self.out, dynamic_ncols=True)
        try:
            while train_queue or waiting or purify_queue or running:
                self._release_ready(waiting, purify_queue, ready, failed_models, plan, bar)
                while len(running) < self.opts.jobs and (train_queue or purify_queue):
                    key = self._next_model(train_queue, plan, ready, bar)
                    if key is not None:
                        m = plan.models[key]
                        task = _Task("train", key, m["path"].stem)
                        self._start(task, {"model_config": m["config"], "model_key": key, "cache": str(self.opts.cache),
                                           "lock": str(stages.model_lock(m["path"]))})
                    else:
                        run = self._next_free(purify_queue, bar)
                        if run is None:  # every queued model and run is held by another runner
                            break
                        task = _Task("purify", run.key, run.label)
                        self._start(task, {"row": self._base_row(run), "run_config": run.config, "db": str(self.opts.db),
                                           "model_path": str(plan.models[run.base_model_key]["path"]),
                                           "lock": str(self._lock(run))})
                    running.append(task)
                if not running:
                    if waiting and not (train_queue or purify_queue):
                        # Runs whose models turned up meanwhile (trained by another runner) go on at
                        # the top of the loop; the rest have lost their model from the cache.
                        for run in [r for r in waiting if not all(k in ready for k, _ in _models_of(r))]:
                            waiting.remove(run)
                            self._record(run, {}, "failed", "its model is neither cached nor being trained")
                            bar.update(1)
                    elif train_queue or purify_queue:  # all held elsewhere: look again when one may have finished
                        time.sleep(self.poll_seconds)
                    continue
                multiprocessing.connection.wait([t.proc.sentinel for t in running], timeout=1.0)
                for task in list(running):
                    rc = task.proc.exitcode
                    if rc is None and self.opts.timeout and time.monotonic() - task.started > self.opts.timeout:
                        task.proc.kill()
                        task.proc.join()
                        rc = task.proc.exitcode
                        with open(task.log, "a") as f:
                            f.write(f"error: timed out after {self.opts.timeout:.0f}s\n")
                    if rc is None:
                        continue
                    task.proc.join()
                    running.remove(task)
                    if rc == BUSY:  # taken by another runner since we looked: queue it again
                        if task.kind == "train":
                            train_queue.append(task.key)
                        else:
                            purify_queue.append(runs_by_key[task.key])
                        continue
                    bar.update(1)
                    if task.kind == "train":
                        m = plan.models[task.key]
                        if stages.cached_model_meta(m["path"], task.key) is not None:
                            ready.add(task.key)
                            self.counts["trained"] += 1
                        else:
                            failed_models[task.key] = _tail(task.log) or f"worker exited with status {rc}"
                            bar.write(f"model {m['path'].name} failed: {failed_models[task.key]} (log: {task.log})")
                    else:
                        self._after_purify(runs_by_key[task.key], task, rc, bar)
        except BaseException:
            for task in running:  # leave no worker behind on Ctrl-C
                task.proc.terminate()
            for task in running:
                task.proc.join(timeout=10)
                if task.proc.exitcode is None:
                    task.proc.kill()
            raise
        finally:
            bar.close()
        return self.counts

    def _lock(self, run: Run) -> Path:
        return self.work / "locks" / f"{run.key}.lock"

    def _next_model(self, queue: list[str], plan: Plan, ready: set[str], bar) -> str | None:
        """Take the first queued model that is neither cached nor being trained by another runner.

        A model another runner trained meanwhile leaves the queue as ready; one it is training
        now stays queued, so this runner trains or purifies something else instead of waiting.
        """
        for key in list(queue):
            path = plan.models[key]["path"]
            if stages.cached_model_meta(path, key) is not None:
                queue.remove(key)
                ready.add(key)
                bar.update(1)
            elif stages.lock_is_free(stages.model_lock(path)):
                queue.remove(key)
                return key
        return None

    def _next_free(self, queue: list[Run], bar) -> Run | None:
        """Take the first queued run that is neither finished nor held by another runner.

        Runs finished elsewhere leave the queue (counted as skipped); runs another runner holds
        stay in it, so two runners sharing a database split the work instead of waiting on
        each other's current run.
        """
        done = self.store.finished(r.key for r in queue)  # one query for the queue, not one per run
        for run in list(queue):
            if run.key in done:
                queue.remove(run)
                self.counts["skipped"] += 1
                bar.update(1)
            elif stages.lock_is_free(self._lock(run)):
                queue.remove(run)
                return run
        return None

    def _release_ready(self, waiting: list[Run], purify_queue: list[Run], ready: set[str],
                       failed_models: dict[str, str], plan: Plan, bar) -> None:
        """Move the waiting runs whose models are all trained to the purify queue (runs that need no
        worker finish here); runs whose model failed to train are recorded as failed."""
        for run in list(waiting):
            needs = [k for k, _ in _models_of(run)]
            bad = [failed_models[k] for k in needs if k in failed_models]
            if bad:
                waiting.remove(run)
                self._record(run, {}, "failed", f"training the model failed: {bad[0]}")
                bar.update(1)
            elif all(k in ready for k in needs):
                waiting.remove(run)
                if run.stage == "post":
                    purify_queue.append(run)
                else:
                    self._finish_in_parent(run, plan)
                    bar.update(1)

    def _after_purify(self, run: Run, task: _Task, rc: int, bar) -> None:
        row = self.store.get(run.key)
        if row is None:  # the worker died before it could write (killed, out of memory, ...)
            why = _tail(task.log) or (f"worker killed by signal {-rc}" if rc < 0 else f"worker exited with status {rc}")
            self._record(run, {}, "failed", f"{why} (log: {task.log})")
            bar.write(f"{run.label} failed: {why}")
        else:
            self._count_row(run, row, task.log, bar)

    def _count_row(self, run: Run, row: dict[str, Any], log: Path | None, bar) -> None:
        """Count a run's stored row as ok or failed and show it on the progress bar."""
        if row["status"] == "ok":
            self.counts["ok"] += 1
            asr = "-" if row["asr"] is None else f"{100 * row['asr']:.1f}"
            bar.set_postfix_str(f"{run.label}: ACC {100 * row['acc']:.1f} ASR {asr}")
        else:
            self.counts["failed"] += 1
            bar.write(f"{run.label} failed: {row['error']} (log: {log})")

    def _finish_in_parent(self, run: Run, plan: Plan) -> None:
        """Runs that need no worker: "none" (the model as it is) and training-time defenses."""
        base = stages.cached_model_meta(plan.models[run.base_model_key]["path"], run.base_model_key)
        try:
            if run.stage == "none":
                fields = stages.no_defense_row(base)
            else:
                meta = stages.cached_model_meta(plan.models[run.model_key]["path"], run.model_key)
                fields = stages.training_defense_row(base, meta)
        except Exception as e:  # a model file without the expected metadata
            self._record(run, {}, "failed", f"{type(e).__name__}: {e}")
            return
        self._record(run, fields, "ok")


#: Modules the fork server imports once, so that forked workers start without importing them.
PRELOAD = ["fipurify.bench.worker", "fipurify.bench.stages", "fipurify.workflow", "fipurify.defenses",
           "fipurify.attacks", "fipurify.metrics"]


def _context():
    """Fork-server processes where the platform has them (Linux, macOS), else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def _env_threads() -> int | None:
    v = os.environ.get("OMP_NUM_THREADS", "")
    return int(v) if v.isdigit() and int(v) > 0 else None


def device_slots(device: str) -> list[str]:
    """The devices runs may be placed on: every visible GPU for a plain ``cuda``, else ``device`` alone."""
    import torch

    if device == "cuda" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [device]


def place(devices: list[str], busy: list[str]) -> str:
    """The device of ``devices`` with the fewest running tasks (``busy`` lists theirs); the first on a tie."""
    return min(devices, key=lambda d: (busy.count(d), devices.index(d)))




_MAX_MISS_LINES = 3  # a folder's worth of other models should not bury the adopted ones


def report_adoptions(results, out: TextIO) -> int:
    """One line per adopted (or already cached) file, the first few misses with their closest
    differences, then a count of the rest; returns how many were copied into the cache."""
    n = 0
    misses = []
    for a in results:
        if a.status in ("adopted", "cached"):
            n += a.status == "adopted"
            print(f"  {a.status:8s} {a.source} -> {a.target.name}", file=out)
        else:
            misses.append(a)
    for a in misses[:_MAX_MISS_LINES]:
        why = "; ".join(a.reasons[:3]) + (" ..." if len(a.reasons) > 3 else "")
        print(f"  {a.status:8s} {a.source}: {why}", file=out)
    if len(misses) > _MAX_MISS_LINES:
        print(f"  ... and {len(misses) - _MAX_MISS_LINES} more file(s) that are no model of this spec", file=out)
    return n


def _interrupt_on_sigterm() -> None:
    """Treat SIGTERM (kill, a batch scheduler's stop) like Ctrl-C, so the runner stops its workers first."""
    import signal
    import threading

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def run_bench(spec: Spec, opts: BenchOptions, out: TextIO = sys.stderr) -> dict[str, int]:
    """Plan and run ``spec`` (or only describe it with ``opts.dry_run``); returns the counts."""
    opts.validate()
    with ResultStore(opts.db) as store:
        if opts.rerun:
            again = [r.key for r in select(spec, opts) if matches(r, opts.rerun)]
            if opts.dry_run:
                print(f"would forget {len(store.status(again))} stored result(s) matching --rerun", file=out)
            else:
                print(f"forgot {store.forget(again)} stored result(s) matching --rerun", file=out)
        plan = make_plan(spec, opts, store)
        if opts.adopt:
            if report_adoptions(adopt_models(plan.models, opts.adopt, dry_run=opts.dry_run), out):
                plan = make_plan(spec, opts, store)
        if opts.dry_run:
            describe(spec, plan, opts, out)
            return {"ok": 0, "failed": 0, "skipped": 0, "trained": 0, "pending": len(plan.pending)}
        if opts.backend == "ray":  # imported only here, so the local backend never imports ray
            from .ray_backend import RayRunner
            runner = RayRunner(spec, opts, store, out)
        else:
            runner = Runner(spec, opts, store, out)
        _interrupt_on_sigterm()
        print(f"spec {spec.name}: {len(plan.runs)} runs, {len(plan.done)} already done, {len(plan.pending)} to run, "
              f"{len(plan.to_train())} models to train; {opts.jobs} job(s) x {runner.threads} thread(s) on "
              f"{runner.device}", file=out)
        counts = runner.run(plan)
    print(f"spec {spec.name}: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} done elsewhere, "
          f"{counts['trained']} models trained; results in {opts.db}", file=out)
    return counts
