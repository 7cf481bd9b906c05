"""Adopt backdoored models trained elsewhere into the bench cache, so the runner does not train them again.

A model file qualifies only when its own metadata says it was trained exactly as a model
of the spec would be: same dataset and clean reserve, architecture and width, every
training setting, seed and attack (every attack argument, not only the name). Anything
else is reported with the first differences found and left alone. The adopted copy gets
the runner's ``bench`` metadata (model key and config, the original training time), is
written atomically, and the original file is not touched.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable

from ..errors import FipurifyError
from . import stages

# Fields of an attack spec that are filled in when the attack meets the data (num_classes;
# a generator attack's image_shape and trained generator file) or derived from its arguments
# (the trigger, checked again by attacks.from_spec on load, which also checks the generator).
_DERIVED_ATTACK_FIELDS = ("num_classes", "trigger", "image_shape", "generator")


@dataclass
class Adoption:
    """What happened to one candidate file."""
    source: Path
    model_key: str | None = None
    target: Path | None = None
    status: str = "no-match"        # adopted, cached (already there), no-match, unreadable
    reasons: tuple[str, ...] = ()


def _diff(prefix: str, want: Any, have: Any) -> list[str]:
    return [] if want == have else [f"{prefix}: spec {want!r}, file {have!r}"]


def attack_problems(cfg: dict[str, Any] | None, have: dict[str, Any] | None, seed: int) -> list[str]:
    if cfg is None or have is None:
        return [] if cfg is None and have is None else [f"attack: spec {cfg and cfg['name']!r}, file {have and have.get('name')!r}"]
    try:
        want = stages.make_attack(cfg, seed).to_spec()
    except FipurifyError as e:
        return [f"attack: cannot build the spec's {cfg['name']} attack ({e})"]
    out = []
    for k in sorted(set(want) | set(have)):
        if k not in _DERIVED_ATTACK_FIELDS:
            out += _diff(f"attack.{k}", want.get(k), have.get(k))
    return out


def _training_problems(training: dict[str, Any], have: dict[str, Any] | None, seed: int) -> list[str]:
    from ..training import TrainConfig

    if not isinstance(have, dict):
        return ["training: the file records no train_config"]
    want = asdict(stages.make_train_config(training, seed))
    base = TrainConfig()
    defaults = {f.name: getattr(base, f.name) for f in fields(TrainConfig)}
    out = []
    for k, v in want.items():
        # A field the file lacks was added after it was trained; it behaved as the default.
        got = have.get(k, defaults.get(k))
        if isinstance(v, tuple):
            v = list(v)
        if isinstance(got, tuple):
            got = list(got)
        out += _diff(f"training.{k}", v, got)
    return out


def problems(doc: dict[str, Any], model_cfg: dict[str, Any]) -> list[str]:
    """Why the model file with fipurify document ``doc`` is not the model ``model_cfg`` describes ([] if it is)."""
    meta = doc.get("metadata") or {}
    seed = int(model_cfg["seed"])
    data, model = model_cfg["data"], model_cfg["model"]
    out: list[str] = []
    if model_cfg.get("train_defense") or meta.get("training_defense"):
        out.append("training-time defenses are not adopted")
    reserve = meta.get("clean_reserve") or {}
    ds = meta.get("dataset") or {}
    out += _diff("data.name", data["name"], ds.get("name"))
    out += _diff("data.options", data.get("options") or {}, ds.get("load_kwargs") or {})
    out += _diff("data.reserve", data.get("reserve", 0.1), reserve.get("requested"))
    out += _diff("data.train_limit", data.get("train_limit"), (reserve.get("train_limit") or {}).get("n"))
    out += _diff("data.reserve_seed", seed, reserve.get("seed"))
    out += _diff("model.arch", model["arch"], doc.get("arch"))
    kw = doc.get("arch_kwargs") or {}
    if model.get("width") is not None:
        out += _diff("model.width", model["width"], kw.get("width"))
    for k, v in (model.get("options") or {}).items():
        out += _diff(f"model.{k}", v, kw.get(k))
    out += _diff("seed", seed, meta.get("seed"))
    if out:  # cheap checks first: building the attack may load cached generators
        return out
    out += _training_problems(model_cfg["training"], meta.get("train_config"), seed)
    out += attack_problems(model_cfg["attack"], meta.get("attack"), seed)
    return out


def adopt(models: dict[str, dict[str, Any]], files: Iterable[str | Path], *, dry_run: bool = False) -> list[Adoption]:
    """Copy every file in ``files`` that is one of ``models`` (key -> {"config", "path"}) to its cache path.

    ``models`` is what :func:`fipurify.bench.runner.make_plan` lists. Returns one
    :class:`Adoption` per file; with ``dry_run`` nothing is written.
    """
    from ..io import load_model, read_metadata, save_model

    out = []
    for f in files:
        src = Path(f)
        try:
            doc = read_metadata(src)
        except FipurifyError as e:
            out.append(Adoption(src, status="unreadable", reasons=(str(e),)))
            continue
        best: Adoption | None = None
        for key, m in models.items():
            why = problems(doc, m["config"])
            if not why:
                target = Path(m["path"])
                if stages.cached_model_meta(target, key) is not None:
                    best = Adoption(src, key, target, "cached")
                    break
                if not dry_run:
                    model, meta = load_model(src)  # safetensors only, and checks the tensors' hash
                    hist = meta.get("history") or []
                    # A file from another runner (e.g. on a GPU machine) keeps its training
                    # cost and environment (device, versions, code hash); our key and config win.
                    prior = {k: v for k, v in (meta.get("bench") or {}).items()
                             if k not in ("model_key", "model_config", "adopted_from")}
                    meta["bench"] = {"train_seconds": meta.get("train_seconds"),
                                     "epoch_seconds": [float(h["seconds"]) for h in hist if "seconds" in h],
                                     **prior, "model_key": key, "model_config": m["config"],
                                     "adopted_from": str(src.resolve())}
                    save_model(model, target, meta)
                best = Adoption(src, key, target, "adopted")
                break
            if best is None or len(why) < len(best.reasons):
                best = Adoption(src, key, None, "no-match", tuple(why))
        out.append(best or Adoption(src, reasons=("the spec needs no model",)))
    return out
