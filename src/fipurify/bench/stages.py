"""What one benchmark task does: train a backdoored model (cached), or purify one and measure it.

Names resolve through the registries (:func:`fipurify.attacks.create`,
:func:`fipurify.defenses.create`, the training-time defenses), so a newly registered
attack or defense needs no change here. Used by :mod:`fipurify.bench.worker` in a
fresh process per task.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import os
import platform
import resource
import socket
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import ConfigError, ModelFileError


# --------------------------------------------------------------------------- environment
def source_fingerprint() -> str:
    """First 12 hex digits of a SHA-256 over the fipurify package's Python sources as they are on disk now."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


#: The code this process imported: taken at import time, so a runner's fork server (which
#: imports once) stamps every result with the code that really ran, even if files change later.
CODE_HASH = source_fingerprint()


def rss_mb() -> float:
    """This process's resident memory now (MB); NaN where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def environment(device: str, threads: int | None) -> dict[str, Any]:
    """Versions, host and device of this process, for the results row."""
    import torch

    from ..version import __version__

    dev = device
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return {"fipurify_version": __version__, "torch_version": torch.__version__,
            "python_version": platform.python_version(), "code_hash": CODE_HASH,
            "host": socket.gethostname(), "device": dev,
            "threads": threads if threads is not None else torch.get_num_threads()}


def setup_torch(threads: int | None, deterministic: bool) -> None:
    """Thread count and deterministic kernels, before any work (results must not depend on scheduling)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


class LockBusy(RuntimeError):
    """Another process holds the lock (raised by ``file_lock(path, wait=False)``)."""


@contextlib.contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created); released when the block ends or the process dies.

    With ``wait=False`` a lock held elsewhere raises :class:`LockBusy` at once instead of blocking.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError as e:
            raise LockBusy(f"{path} is held by another process") from e
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def lock_is_free(path: Path) -> bool:
    """Whether no other process holds ``file_lock(path)`` right now (a probe; it may change a moment later)."""
    if not path.exists():
        return True
    try:
        with file_lock(path, wait=False):
            return True
    except LockBusy:
        return False


# --------------------------------------------------------------------------- registries
def _training_time():
    """The training-time defenses module, or None when this version has none."""
    try:
        return importlib.import_module("fipurify.defenses.training_time")
    except ModuleNotFoundError as e:
        if e.name == "fipurify.defenses.training_time":
            return None
        raise


def has_training_defense(name: str) -> bool:
    """Whether ``name`` is a registered training-time defense (e.g. abl, cbd)."""
    mod = _training_time()
    return mod is not None and name.lower() in mod.available_training_defenses()


def make_attack(cfg: dict[str, Any] | None, seed: int):
    """The attack of a run config (None for a clean model), seeded with the run seed."""
    from .. import attacks

    if cfg is None:
        return None
    kw = dict(cfg.get("options") or {})
    kw.setdefault("seed", seed)
    if cfg.get("mode") is not None:
        kw.setdefault("mode", cfg["mode"])
    return attacks.create(cfg["name"], target=cfg.get("target", 0), poison_rate=cfg.get("poison_rate"), **kw)


def make_train_config(training: dict[str, Any], seed: int):
    """A TrainConfig from the spec's [training] table (any of its fields) and the run seed."""
    from ..training import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    bad = sorted(set(training) - known)
    if bad:
        raise ConfigError(f"unknown [training] field(s) {', '.join(bad)}; TrainConfig has: {', '.join(sorted(known))}")
    return TrainConfig(**{**training, "seed": seed}).validate()


def make_defense(cfg: dict[str, Any], dataset: str, seed: int):
    """A post-training defense from the registry, with the dataset's preset where one exists."""
    from ..purification import defense_for

    opts = dict(cfg.get("options") or {})
    opts.setdefault("seed", seed)
    return defense_for(cfg["name"], dataset, **opts)


def load_bundle(data: dict[str, Any], seed: int, root: str | None):
    """Training part, clean reserve and test set of a run (the reserve split is seeded by the run)."""
    from ..workflow import load_data

    return load_data(data["name"], root, data.get("reserve", 0.1), seed, data.get("train_limit"),
                     **(data.get("options") or {}))


# --------------------------------------------------------------------------- model cache
def model_path(cache: str | Path, model_cfg: dict[str, Any], model_key: str) -> Path:
    """Where the model of ``model_cfg`` is cached: a readable name plus the content key."""
    a = model_cfg.get("attack")
    m = model_cfg["model"]
    parts = [model_cfg["data"]["name"], a["name"] if a else "clean", f"{m['arch']}-w{m.get('width') or 'd'}",
             f"e{model_cfg['training'].get('epochs', 'd')}", f"s{model_cfg['seed']}"]
    if model_cfg.get("train_defense"):
        parts.append(model_cfg["train_defense"]["name"])
    name = "_".join(str(p).replace("/", "-") for p in parts)
    return Path(cache) / f"{name}_{model_key[:12]}.safetensors"


def model_lock(path: Path) -> Path:
    """The lock file that guards training the model cached at ``path``."""
    return path.with_name(path.name + ".lock")


def cached_model_meta(path: Path, model_key: str) -> dict[str, Any] | None:
    """The metadata of the cached model at ``path`` if it is the one ``model_key`` names, else None."""
    from ..io import read_metadata

    if not path.is_file():
        return None
    try:
        meta = read_metadata(path)["metadata"]
    except ModelFileError:
        return None
    return meta if (meta.get("bench") or {}).get("model_key") == model_key else None


# --------------------------------------------------------------------------- training
def _fit(bundle, arch: str, attack, train_cfg, width, device: str, train_defense: dict[str, Any] | None,
         seed: int, log: Callable[[str], None], checkpoint: Path, **arch_kw):
    """Train through :func:`fipurify.workflow.train_backdoored`, the one definition of a backdoored model.

    A training-time defense (``train_defense``) is built from the registry and passed on;
    plain training is resumable from ``checkpoint``.
    """
    from ..workflow import train_backdoored

    kw: dict[str, Any] = {"device": device}
    if train_defense is not None:
        kw["defense"] = _training_time().create_training_defense(
            train_defense["name"], **{"seed": seed, **(train_defense.get("options") or {})})
    else:
        kw["checkpoint"] = checkpoint
    return train_backdoored(bundle, arch, attack, train_cfg, width, progress=False, log=log, **kw, **arch_kw)


def train(model_cfg: dict[str, Any], model_key: str, cache: str | Path, *, data_root: str | None = None,
          device: str = "cpu", log: Callable[[str], None] = print,
          locked: bool = False) -> tuple[Path, dict[str, Any], bool]:
    """Train the model of ``model_cfg`` unless it is cached; returns ``(path, metadata, trained_now)``.

    A lock file beside the model (:func:`model_lock`) makes concurrent runners (sharing a
    cache folder) train it once; the file is written atomically, so a killed run leaves no
    half model. Plain training writes its state beside the model after every epoch
    (:func:`fipurify.train_state.beside`) and a killed run continues from it when rerun; the
    state file is removed once the model is saved. ``locked=True`` says the caller already
    holds that lock (the bench worker takes it without waiting); otherwise this waits for it.
    """
    import torch

    from .. import train_state
    from ..io import save_model

    path = model_path(cache, model_cfg, model_key)
    with contextlib.nullcontext() if locked else file_lock(model_lock(path)):
        meta = cached_model_meta(path, model_key)
        if meta is not None:
            return path, meta, False
        seed = int(model_cfg["seed"])
        bundle = load_bundle(model_cfg["data"], seed, data_root)
        attack = make_attack(model_cfg["attack"], seed)
        n_classes = bundle.dataset_info.get("num_classes")
        target = getattr(attack, "target", None)  # a class index; a sentence for the trigger-word attack
        if attack is not None and n_classes is not None and isinstance(target, int) and not 0 <= target < n_classes:
            raise ConfigError(f"attack target {target} is out of range for {n_classes} classes")
        cfg = make_train_config(model_cfg["training"], seed)
        m = model_cfg["model"]
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        state = train_state.beside(path)
        done_before = train_state.epochs_done(state)
        model, meta = _fit(bundle, m["arch"], attack, cfg, m.get("width"), device, model_cfg.get("train_defense"),
                           seed, log, state, **(m.get("options") or {}))
        epochs = [float(h["seconds"]) for h in meta["history"] if "seconds" in h]
        # a resumed training: this call's wall time plus the epochs run before it
        seconds = time.perf_counter() - t0 + sum(epochs[:done_before])
        meta["bench"] = {"model_key": model_key, "model_config": model_cfg, "train_seconds": seconds,
                         **({"resumed_after_epoch": done_before} if done_before else {}),
                         "epoch_seconds": epochs, "peak_rss_mb": peak_rss_mb(),
                         "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if device.startswith("cuda") else None,
                         **environment(device, None)}
        save_model(model.cpu(), path, meta)
        state.unlink(missing_ok=True)
        return path, meta, True


# --------------------------------------------------------------------------- purification
def _reported_seconds(secs: Any, wall: float) -> float:
    """The defense's own total time when it reports one (it may exclude set-up it does not count), else wall time."""
    if isinstance(secs, dict) and isinstance(secs.get("total"), (int, float)):
        return float(secs["total"])
    if isinstance(secs, (int, float)) and not isinstance(secs, bool):
        return float(secs)
    return wall


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def model_row(meta: dict[str, Any]) -> dict[str, Any]:
    """Result fields that come from the backdoored model itself (its metrics and training cost)."""
    b = meta.get("bench") or {}
    m = meta.get("metrics") or {}
    return {"acc_before": m.get("acc"), "asr_before": m.get("asr"), "lcr_before": m.get("lcr"),
            "train_seconds": b.get("train_seconds"), "train_epoch_seconds": _mean(b.get("epoch_seconds") or []),
            "train_device": b.get("device")}


class Meter:
    """Wall time and memory of the block it wraps (the defense call): peak RSS, its rise over the
    resident memory at entry, and the GPU peak on a CUDA ``device`` (synchronised at both ends)."""

    def __init__(self, device: str):
        self.device = device
        self.wall = self.peak = self.base_rss = float("nan")

    @contextlib.contextmanager
    def __call__(self) -> Iterator["Meter"]:
        import torch

        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.base_rss = rss_mb()
        t0 = time.perf_counter()
        yield self
        if cuda:
            torch.cuda.synchronize()
        self.wall = time.perf_counter() - t0
        self.peak = peak_rss_mb()

    def gpu_peak_mb(self) -> float | None:
        import torch

        return torch.cuda.max_memory_allocated() / 2 ** 20 if self.device.startswith("cuda") else None


def purify(run_config: dict[str, Any], path: Path, *, data_root: str | None = None,
           device: str = "cpu") -> dict[str, Any]:
    """Purify the cached model at ``path`` as ``run_config`` says; returns the result fields.

    The purification itself is :func:`fipurify.purification.purify_model` (the one purify
    path); around it this adds what the runner records: memory and timing (:class:`Meter`),
    the clean validation accuracy before and after, and the ``clean_data = "oracle"``
    capacity check. The clean set is drawn from the model's own clean reserve (never
    trained on), seeded by the run; the test set and attack come from the model's metadata;
    "before" is the model's metrics recorded at training time.
    """
    from ..datasets import draw_clean_subset
    from ..io import load_model
    from ..purification import purify_model
    from ..workflow import reload_data

    model, meta = load_model(path)
    seed = int(run_config["seed"])
    bundle = reload_data(meta, data_root)
    clean, clean_idx = draw_clean_subset(bundle.reserve, int(run_config["clean_size"]), seed, return_indices=True)
    validation = clean_validation_set(bundle.reserve, clean_idx, seed)
    val_before = _accuracy(model, validation) if validation is not None else None
    if run_config["defense"].get("clean_data") == "oracle":
        clean = oracle_clean_set(clean, meta)
    defense = make_defense(run_config["defense"], bundle.dataset_info["name"], seed)
    model = model.to(device)
    meter = Meter(device)
    verify = None
    if run_config.get("verify"):  # the detector before and after ([verify] specs): clean data only
        from ..detection.verify import PurificationCheck

        check = run_config["verify"]

        def verify(m, c):
            return PurificationCheck(m, c, check["detector"], **check.get("options", {})).after
    result = purify_model(model, meta, defense, clean, test=bundle, before=meta["metrics"], meter=meter,
                          verify=verify)
    after = result.after
    val_acc = _accuracy(result.model, validation) if validation is not None else None
    report = defense.report or {}
    hist = report.get("history") or []
    secs = report.get("seconds") or {}
    details = {"defense_report": {k: v for k, v in report.items() if k != "history"},
               "purify_epoch_seconds": [h.get("seconds") for h in hist],
               "train_epoch_seconds": (meta.get("bench") or {}).get("epoch_seconds"),
               "purify_wall_seconds": meter.wall, "n_clean": len(clean), "model_file": str(path),
               "val_before": val_before, "n_test": after.get("n_clean"), "n_backdoor": after.get("n_backdoor")}
    if "detector" in result.report:
        details["verify"] = {k: v for k, v in result.report["detector"].items() if k not in ("before", "after")}
    if run_config.get("retune") and meta.get("attack"):  # post-purification robustness ([retune] specs)
        from ..attacks import from_spec
        from ..retune import RetuneConfig, retuned_metrics

        details["retune"] = retuned_metrics(result.model, clean, from_spec(meta["attack"]), bundle.test,
                                            RetuneConfig.from_dict({**run_config["retune"], "seed": seed}))
    if after.get("metric") is not None:  # a task with its own metrics (mAP; CT, AT BLEU): all of them
        details["metrics_after"] = {k: v for k, v in after.items() if not k.startswith("n_")}
    return {**model_row(meta), "acc": after["acc"], "asr": after["asr"], "lcr": after["lcr"], "der": result.der,
            "val_acc": val_acc, "purify_seconds": _reported_seconds(secs, meter.wall),
            "purify_epoch_seconds": _mean([h["seconds"] for h in hist if "seconds" in h]),
            "peak_rss_mb": meter.peak, "purify_peak_mb": max(meter.peak - meter.base_rss, 0.0),
            "gpu_peak_mb": meter.gpu_peak_mb(), "details": details}


#: Clean reserve images set aside (disjoint from the defense's clean set) to report clean validation
#: accuracy, the figure a user can select settings by without test data.
VALIDATION_SIZE = 1000


def clean_validation_set(reserve, clean_idx, seed: int):
    """Up to :data:`VALIDATION_SIZE` reserve images outside the defense's clean set (seeded), or None."""
    import numpy as np

    rest = np.setdiff1d(np.arange(len(reserve)), np.asarray(clean_idx))
    if len(rest) == 0:
        return None
    rng = np.random.default_rng([int(seed), 7919])
    pick = np.sort(rng.choice(rest, size=min(VALIDATION_SIZE, len(rest)), replace=False))
    return reserve.subset(pick, name=f"{reserve.name}-validation")


def _accuracy(model, data) -> float:
    """The clean metric of ``data``'s task (accuracy for classifiers, mAP, BLEU/100)."""
    from ..tasks import task_of

    return task_of(data).score(model, data)


class OracleSet:
    """The capacity-check data (spec ``clean_data = "oracle"``): the clean images, then each of them
    again with ``attack``'s trigger and its *true* label. A diagnostic, never a defense: it uses the
    trigger, to ask whether a method *can* remove the backdoor when the data points at it."""

    def __init__(self, clean, attack):
        self.clean, self.attack = clean, attack
        self.num_classes = getattr(clean, "num_classes", None)

    def __len__(self) -> int:
        return 2 * len(self.clean)

    def __getitem__(self, i: int):
        x, y = self.clean[i % len(self.clean)]
        return (x, y) if i < len(self.clean) else (self.attack.apply_trigger(x), y)


def oracle_clean_set(clean, meta: dict[str, Any]) -> OracleSet:
    """:class:`OracleSet` of ``clean`` with the attack recorded in a model's metadata."""
    from .. import attacks

    spec = meta.get("attack")
    if not spec:
        raise ConfigError("clean_data = 'oracle' needs a backdoored model (this one has no attack)")
    return OracleSet(clean, attacks.from_spec(spec))


def no_defense_row(meta: dict[str, Any]) -> dict[str, Any]:
    """The result of the "none" defense: the backdoored model as it is."""
    m = meta["metrics"]
    return {**model_row(meta), "acc": m.get("acc"), "asr": m.get("asr"), "lcr": m.get("lcr"), "der": None,
            "purify_seconds": None, "details": {"train_epoch_seconds": (meta.get("bench") or {}).get("epoch_seconds")}}


def training_defense_row(base_meta: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The result of a training-time defense: the defended model against the undefended one."""
    from ..metrics import defense_effectiveness_rate

    before, after = base_meta["metrics"], meta["metrics"]
    b = meta.get("bench") or {}
    der = defense_effectiveness_rate(before, after) if before.get("asr") is not None else None
    return {**model_row(base_meta), "acc": after.get("acc"), "asr": after.get("asr"), "lcr": after.get("lcr"),
            "der": der, "purify_seconds": b.get("train_seconds"), "purify_epoch_seconds": _mean(b.get("epoch_seconds") or []),
            "peak_rss_mb": b.get("peak_rss_mb"), "gpu_peak_mb": b.get("gpu_peak_mb"),
            "details": {"training_defense": meta.get("training_defense"),
                        "defended_train_epoch_seconds": b.get("epoch_seconds")}}


def check_entries(spec) -> None:
    """Build every attack and defense of ``spec`` once, so a bad option stops the run before any work."""
    from ..errors import FipurifyError

    dataset = spec.data["name"]
    for e in spec.attacks:
        try:
            make_attack(e.config, 0)
        except FipurifyError as err:
            raise ConfigError(f"spec {spec.name}, attack {e.id}: {err}") from None
    for e in spec.defenses:
        cfg = e.config
        try:
            if cfg["stage"] == "post":
                make_defense(cfg, dataset, 0)
            elif cfg["stage"] == "training":
                _training_time().create_training_defense(cfg["name"], **{"seed": 0, **cfg["options"]})
        except FipurifyError as err:
            raise ConfigError(f"spec {spec.name}, defense {e.id}: {err}") from None
