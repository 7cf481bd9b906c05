"""Run a benchmark plan on a Ray cluster: ``fipurify bench SPEC --backend ray [--address ADDR]``.

The same runs as the local process pool (:class:`fipurify.bench.runner.Runner`), with Ray
tasks instead of forked processes:

* **Results** stay with the driver (the machine running ``fipurify bench``): only the driver
  opens the SQLite store. A task returns its result row; the driver writes it in one
  transaction. Finished runs are skipped on the next call exactly as with the local backend.
* **Models** travel through Ray's object store, so no shared file system is needed: a
  training task trains into a temporary folder on its node and returns the model file's
  bytes; the driver writes them atomically into its own model cache (``--cache``, the same
  cache and file names as the local backend) and puts them into the object store once per
  model for the purify tasks that need it, which write them to a temporary file on their
  node. Models already in the driver's cache are not trained again (resume, ``--adopt``).
* Each task runs in a fresh Ray worker process (``max_calls=1``), as the local backend runs
  each task in a fresh process: every run starts from the same state and its peak memory is
  its own. ``--threads T`` sets torch's threads in a task and reserves ``num_cpus=T`` for
  it; ``--jobs N`` caps the tasks in flight; ``--timeout S`` cancels (kills) a task after S
  seconds and records it as failed; ``--device cuda`` reserves one GPU per task.
* Datasets are read on the node that runs a task (``--data-root``, else that node's
  ``$FIPURIFY_DATA``), and fipurify must be installed on every node.

Ray is an optional dependency (``pip install 'fipurify[ray]'``); this module imports it only
when a Ray runner is created, and the local backend never imports it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from ..errors import ConfigError
from . import stages
from .runner import BenchOptions, Plan, Runner, _env_threads, _models_of, _safe
from .spec import Run, Spec
from .store import ResultStore, utc_now

RAY_MISSING = "--backend ray needs Ray, which is not installed: pip install 'fipurify[ray]' (or: pip install ray)"


def require_ray() -> None:
    """Raise a one-line :class:`ConfigError` when Ray is not installed (without importing it)."""
    try:
        found = importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["ray"] = None
        found = False
    if not found:
        raise ConfigError(RAY_MISSING)


def import_ray():
    require_ray()
    try:
        import ray
    except ImportError as e:
        raise ConfigError(f"{RAY_MISSING} ({e})") from None
    return ray


# --------------------------------------------------------------------------- tasks (run in Ray workers)
def _setup(payload: dict[str, Any]) -> None:
    threads = payload.get("threads")
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    stages.setup_torch(threads, payload.get("deterministic", True))


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def train_task(payload: dict[str, Any]) -> dict[str, Any]:
    """Train one model into a temporary folder on this node; return its file's bytes (or the error)."""
    lines: list[str] = []
    log: Callable[[str], None] = lines.append
    _setup(payload)
    with tempfile.TemporaryDirectory(prefix="fipurify-ray-train-") as tmp:
        try:
            path, meta, _ = stages.train(payload["model_config"], payload["model_key"], tmp,
                                         data_root=payload.get("data_root"), device=payload["device"], log=log)
            data = path.read_bytes()
        except Exception as e:
            lines.append(traceback.format_exc().rstrip())
            lines.append(f"error: {_error(e)}")
            return {"ok": False, "error": _error(e), "log": "\n".join(lines)}
    m = meta["metrics"]
    lines.append(f"trained {path.name}: acc {m['acc']:.4f} asr {m['asr']}")
    return {"ok": True, "data": data, "log": "\n".join(lines)}


def purify_task(payload: dict[str, Any], model: bytes) -> dict[str, Any]:
    """Purify one run with the model file ``model`` (bytes from the object store); return its result row."""
    _setup(payload)
    row = dict(payload["row"], started_at=utc_now())
    log = ""
    with tempfile.TemporaryDirectory(prefix="fipurify-ray-purify-") as tmp:
        path = Path(tmp) / payload["model_name"]
        path.write_bytes(model)
        try:
            fields = stages.purify(payload["run_config"], path, data_root=payload.get("data_root"),
                                   device=payload["device"])
            if isinstance(fields.get("details"), dict):  # name the driver's cached file, not this temporary copy
                fields["details"]["model_file"] = payload["model_file"]
            row.update(fields, status="ok", error=None)
        except Exception as e:
            log = traceback.format_exc().rstrip() + f"\nerror: {_error(e)}"
            row.update(status="failed", error=_error(e))
    row.update(stages.environment(payload["device"], payload.get("threads")))
    row["finished_at"] = utc_now()
    if row["status"] == "ok":
        log = f"ok: acc {row['acc']:.4f} asr {row['asr']}"
    return {"row": row, "log": log}


# --------------------------------------------------------------------------- driver
@dataclass
class _Task:
    kind: str              # "train" or "purify"
    key: str               # model key or run key
    label: str
    ref: Any               # the task's ObjectRef
    held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # the lock the driver holds for it
    started: float = field(default_factory=time.monotonic)


def _hold(lock: Path) -> contextlib.ExitStack | None:
    """Take ``lock`` without waiting (an ExitStack releasing it), or None when another runner holds it."""
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(stages.file_lock(lock, wait=False))
    except stages.LockBusy:
        return None
    return stack


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RayRunner(Runner):
    """Runs a plan as Ray tasks, at most ``jobs`` at a time; see the module docstring.

    Connects to ``opts.address`` (``auto``: the cluster this machine belongs to), or, without
    one, starts a private local Ray instance with this machine's CPUs (stopped at the end).
    A Ray already initialised in this process (``ray.init(...)`` by the caller) is used as it is.
    """

    def __init__(self, spec: Spec, opts: BenchOptions, store: ResultStore, out: TextIO = sys.stderr):
        self.spec, self.opts, self.store, self.out = spec, opts.validate(), store, out
        self.work = opts.db.with_name(opts.db.name + ".work")
        self.counts = {"ok": 0, "failed": 0, "skipped": 0, "trained": 0}
        self.poll_seconds = 2.0
        self.ray = ray = import_ray()
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            kw: dict[str, Any] = {"log_to_driver": False}
            if opts.address:
                ray.init(address=opts.address, **kw)
            else:
                ray.init(address="local", include_dashboard=False, **kw)
        try:
            res = ray.cluster_resources()
            cpus, gpus = int(res.get("CPU", 0)), int(res.get("GPU", 0))
            node_cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
            self.device, self.gpus = self._device(opts.device, gpus)
            self.threads = opts.threads or _env_threads() or max(1, min(cpus // opts.jobs, max(node_cpus, default=1)))
            where = opts.address or "a local instance"
            print(f"ray: {where}, {len(node_cpus)} node(s), {cpus} CPU(s), {gpus} GPU(s); each task reserves "
                  f"{self.threads} CPU(s)" + (f" and {self.gpus} GPU" if self.gpus else ""), file=out)
            if node_cpus and self.threads > max(node_cpus):
                print(f"ray: warning: no node has {self.threads} CPUs (largest: {max(node_cpus)}); tasks wait "
                      "until one joins - lower --threads", file=out)
        except BaseException:
            self.close()
            raise
        self._train = ray.remote(max_calls=1, max_retries=0)(train_task)
        self._purify = ray.remote(max_calls=1, max_retries=0)(purify_task)

    @staticmethod
    def _device(device: str, gpus: int) -> tuple[str, int]:
        """The device tasks use and the GPUs each reserves (Ray hands a task its GPU as ``cuda``)."""
        if device == "auto":
            device = "cuda" if gpus else "cpu"
        if device.startswith("cuda"):
            if not gpus:
                raise ConfigError(f"--device {device}: the Ray cluster has no GPU")
            return "cuda", 1
        if device not in ("cpu", "mps"):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
        return device, 0

    def close(self) -> None:
        if self.owns_ray and self.ray.is_initialized():
            self.ray.shutdown()
        self.owns_ray = False

    # ---------------------------------------------------------------- helpers
    def _payload(self, **kw: Any) -> dict[str, Any]:
        return {"device": self.device, "threads": self.threads, "deterministic": self.opts.deterministic,
                "data_root": self.opts.data_root, **kw}

    def _submit(self, fn, *args) -> Any:
        return fn.options(num_cpus=self.threads, num_gpus=self.gpus).remote(*args)

    def _log_path(self, kind: str, label: str, key: str) -> Path:
        path = self.work / "logs" / f"{kind}-{_safe(label)}-{key[:8]}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # ---------------------------------------------------------------- main loop
    def run(self, plan: Plan) -> dict[str, int]:
        """Execute ``plan``; returns counts of ok / failed / skipped runs and trained models."""
        from tqdm.auto import tqdm

        ray = self.ray
        self.store.save_spec(self.spec.name, self.spec.raw, self.spec.source)
        ready = {k for k, m in plan.models.items() if m["cached"]}
        failed_models: dict[str, str] = {}
        train_queue = list(plan.to_train())
        waiting = list(plan.pending)
        purify_queue: list[Run] = []
        running: dict[Any, _Task] = {}  # ObjectRef -> task
        runs_by_key = {r.key: r for r in plan.pending}
        uses = Counter(r.base_model_key for r in plan.pending if r.stage == "post")  # purify runs left per model
        shared: dict[str, Any] = {}  # model key -> ObjectRef of its file's bytes
        bar = tqdm(total=len(plan.pending) + len(train_queue), desc=self.spec.name, unit="task",
                   disable=not self.opts.progress, file=self.out, dynamic_ncols=True)
        try:
            while train_queue or waiting or purify_queue or running:
                self._release_ready(waiting, purify_queue, ready, failed_models, plan, bar)
                while len(running) < self.opts.jobs and (train_queue or purify_queue):
                    task = self._start_next(plan, train_queue, purify_queue, ready, uses, shared, bar)
                    if task is None:  # every queued model and run is held by another runner
                        break
                    running[task.ref] = task
                if not running:
                    if waiting and not (train_queue or purify_queue):
                        for run in [r for r in waiting if not all(k in ready for k, _ in _models_of(r))]:
                            waiting.remove(run)
                            self._record(run, {}, "failed", "its model is neither cached nor being trained")
                            bar.update(1)
                    elif train_queue or purify_queue:
                        time.sleep(self.poll_seconds)
                    continue
                done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                for ref in done:
                    task = running.pop(ref)
                    try:
                        self._finish(task, plan, ready, failed_models, runs_by_key, bar)
                    finally:
                        task.held.close()
                if self.opts.timeout:
                    for ref, task in list(running.items()):
                        if time.monotonic() - task.started > self.opts.timeout:
                            del running[ref]
                            ray.cancel(ref, force=True)
                            try:
                                self._failed(task, f"timed out after {self.opts.timeout:.0f}s", plan,
                                             failed_models, runs_by_key, bar)
                            finally:
                                task.held.close()
        except BaseException:
            for ref in running:  # leave no task behind on Ctrl-C
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise
        finally:
            for task in running.values():
                task.held.close()
            bar.close()
            self.close()
        return self.counts

    def _start_next(self, plan: Plan, train_queue: list[str], purify_queue: list[Run], ready: set[str],
                    uses: Counter, shared: dict[str, Any], bar) -> _Task | None:
        """Submit the next model to train, else the next run to purify, holding its lock; None if all are held."""
        while True:
            key = self._next_model(train_queue, plan, ready, bar)
            if key is None:
                break
            m = plan.models[key]
            held = _hold(stages.model_lock(m["path"]))
            if held is None:  # taken by another runner since we looked
                train_queue.append(key)
                break
            if stages.cached_model_meta(m["path"], key) is not None:  # finished by another runner meanwhile
                held.close()
                ready.add(key)
                bar.update(1)
                continue
            ref = self._submit(self._train, self._payload(model_config=m["config"], model_key=key))
            return _Task("train", key, m["path"].stem, ref, held)
        run = self._next_free(purify_queue, bar)
        if run is None:
            return None
        held = _hold(self._lock(run))
        if held is None:
            purify_queue.append(run)
            return None
        key = run.base_model_key
        path = plan.models[key]["path"]
        if key not in shared:
            shared[key] = self.ray.put(path.read_bytes())
        ref = self._submit(self._purify, self._payload(row=self._base_row(run), run_config=run.config,
                                                       model_name=path.name, model_file=str(path)), shared[key])
        uses[key] -= 1
        if uses[key] <= 0:  # the tasks keep the object alive; the driver needs it no more
            shared.pop(key, None)
        return _Task("purify", run.key, run.label, ref, held)

    def _finish(self, task: _Task, plan: Plan, ready: set[str], failed_models: dict[str, str],
                runs_by_key: dict[str, Run], bar) -> None:
        try:
            res = self.ray.get(task.ref)
        except Exception as e:  # the worker died (killed, out of memory, a lost node) or the task could not run
            self._failed(task, _error(e).splitlines()[0][:500], plan, failed_models, runs_by_key, bar)
            return
        log = self._log_path(task.kind, task.label, task.key)
        log.write_text(res.get("log", "") + "\n")
        bar.update(1)
        if task.kind == "train":
            m = plan.models[task.key]
            if res["ok"]:
                _write_atomically(m["path"], res["data"])
            if res["ok"] and stages.cached_model_meta(m["path"], task.key) is not None:
                ready.add(task.key)
                self.counts["trained"] += 1
            else:
                failed_models[task.key] = res.get("error") or "the returned model file is not the expected one"
                bar.write(f"model {m['path'].name} failed: {failed_models[task.key]} (log: {log})")
            return
        run, row = runs_by_key[task.key], res["row"]
        if not self.store.record(row):  # another runner stored an ok row meanwhile
            self.counts["skipped"] += 1
        else:
            self._count_row(run, row, log, bar)

    def _failed(self, task: _Task, why: str, plan: Plan, failed_models: dict[str, str],
                runs_by_key: dict[str, Run], bar) -> None:
        """A task that returned nothing (timed out, cancelled, its worker died)."""
        log = self._log_path(task.kind, task.label, task.key)
        log.write_text(f"error: {why}\n")
        bar.update(1)
        if task.kind == "train":
            failed_models[task.key] = why
            bar.write(f"model {plan.models[task.key]['path'].name} failed: {why}")
        else:
            run = runs_by_key[task.key]
            self._record(run, {}, "failed", f"{why} (log: {log})")
            bar.write(f"{run.label} failed: {why}")
