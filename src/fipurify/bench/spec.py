"""Benchmark specs: a TOML file describing a grid of (attack x axes x clean size x defense x seed) runs.

A spec names the dataset, the architecture, the backdoor-training settings (any field of
:class:`fipurify.training.TrainConfig`), the attacks and defenses, the seeds and clean-set
sizes, optional extra axes (``[[grid.vary]]``, e.g. poison rates or architectures), the
table layout and, optionally, the paper's own numbers (``[paper_table]``). See
``docs/benchmarks.md`` for the format.

Every run is keyed by a stable hash of its full configuration; the backdoored model it
needs is keyed by the part of that configuration that training sees, so runs sharing a
model (and specs sharing runs) share the work.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import ConfigError

#: Bumped when the meaning of a run configuration changes, so old keys stop matching.
KEY_VERSION = 1
#: Top-level sections a spec may have.
SECTIONS = {"name", "title", "description", "extends", "salt", "only", "data", "model", "training", "attacks",
            "defenses", "grid", "table", "paper_table", "retune", "verify"}
#: Metrics a table can show; True where higher is better.
METRICS: dict[str, bool] = {"acc": True, "asr": False, "lcr": True, "der": True, "val": True, "time": False,
                            "epoch_time": False, "peak_mb": False, "acc_retuned": True, "asr_retuned": False}
#: What a post-training defense is given: "clean" (the default) is the clean images; "oracle" adds
#: each clean image again with the attack's trigger and its *true* label. The oracle is a diagnostic
#: (can the method remove the backdoor when the data points at it?), never a defense: it uses the trigger.
CLEAN_DATA = ("clean", "oracle")
#: Roots a ``[[grid.vary]]`` path may start with.
AXIS_ROOTS = ("data", "model", "training", "attack", "defense")


def stable_hash(obj: Any, length: int = 20) -> str:
    """Hex digest of ``obj``'s canonical JSON (sorted keys, no spaces): the same config, the same key."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class Entry:
    """One attack or defense of a spec: its table id, display label and key-relevant config."""
    id: str
    label: str
    config: dict[str, Any] | None


@dataclass(frozen=True)
class Axis:
    """An extra grid dimension: ``path`` in the run config takes each of ``values`` in turn."""
    name: str
    path: str
    values: tuple[Any, ...]
    labels: tuple[str, ...]


@dataclass
class Run:
    """One cell of the grid: what is trained, which defense runs, and the keys that identify them."""
    key: str
    model_key: str
    base_model_key: str
    label: str
    dims: dict[str, str]
    seed: int
    stage: str
    config: dict[str, Any] = field(repr=False)

    @property
    def attack(self) -> str:
        return self.dims["attack"]

    @property
    def defense(self) -> str:
        return self.dims["defense"]

    def model_config(self, base: bool = False) -> dict[str, Any]:
        """What training sees: the model key is the hash of this. ``base`` drops a training-time defense."""
        return model_config(self.config, base)


def model_config(run_config: dict[str, Any], base: bool = False) -> dict[str, Any]:
    """The part of a run config that determines its backdoored model."""
    out = {k: run_config[k] for k in ("data", "model", "training", "attack", "seed", "salt", "key_version")}
    d = run_config["defense"]
    if not base and d.get("stage") == "training":
        out["train_defense"] = {"name": d["name"], "options": d["options"]}
    return out


@dataclass
class Spec:
    """A parsed, validated spec. :meth:`runs` expands its grid."""
    name: str
    title: str
    description: str
    data: dict[str, Any]
    model: dict[str, Any]
    training: dict[str, Any]
    attacks: list[Entry]
    defenses: list[Entry]
    seeds: list[int]
    clean_sizes: list[int]
    axes: list[Axis]
    table: dict[str, Any]
    paper_table: dict[str, Any]
    salt: str = ""
    only: list[str] = field(default_factory=list)  # keep only grid cells these patterns select (see matches)
    #: ``[retune]``: after each purification, the retuning attack (:mod:`fipurify.retune`) with these
    #: settings; part of the run key, so such runs are apart from the plain ones.
    retune: dict[str, Any] | None = None
    #: ``[verify]``: a clean-data detector on the model before and after each purification
    #: (:mod:`fipurify.detection.verify`); part of the run key, like ``retune``.
    verify: dict[str, Any] | None = None
    source: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def dims(self) -> list[str]:
        """Row dimensions of the spec's tables, in order (``[table] rows`` or the default order)."""
        default = ["attack"] + [a.name for a in self.axes]
        if len(self.clean_sizes) > 1:
            default.append("clean_size")
        default.append("defense")
        order = self.table.get("rows")
        if order is None:
            return default
        if sorted(order) != sorted(default):
            raise ConfigError(f"spec {self.name}: [table] rows must list exactly {', '.join(default)}; "
                              f"got {', '.join(map(str, order))}")
        return list(order)

    def runs(self) -> list[Run]:
        """Every run of the grid, in a fixed order (attack, axes, clean size, defense, seed)."""
        runs = []
        combos = list(itertools.product(*[range(len(a.values)) for a in self.axes]))
        for att in self.attacks:
            for combo in combos:
                for clean in self.clean_sizes:
                    for dfn in self.defenses:
                        for seed in self.seeds:
                            run = self._run(att, combo, clean, dfn, seed)
                            if run is not None:
                                runs.append(run)
        runs = [r for r in runs if matches(r, self.only)]
        keys = [r.key for r in runs]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"spec {self.name}: two grid cells have the same configuration "
                              "(duplicate attacks, defenses, seeds or axis values?)")
        return runs

    def _run(self, att: Entry, combo: tuple[int, ...], clean: int, dfn: Entry, seed: int) -> Run | None:
        """The run of one grid cell; None for a repeat (an axis that does not apply, past its first value)."""
        cfg: dict[str, Any] = {
            "key_version": KEY_VERSION, "salt": self.salt, "data": copy.deepcopy(self.data),
            "model": copy.deepcopy(self.model), "training": copy.deepcopy(self.training),
            "attack": copy.deepcopy(att.config), "defense": copy.deepcopy(dfn.config),
            "clean_size": int(clean), "seed": int(seed)}
        if self.retune is not None:
            cfg["retune"] = dict(self.retune)
        if self.verify is not None:
            cfg["verify"] = copy.deepcopy(self.verify)
        dims = {"attack": att.id}
        for axis, i in zip(self.axes, combo):
            applied = _apply(cfg, axis.path, axis.values[i])
            if not applied and i > 0:
                return None
            dims[axis.name] = axis.labels[i] if applied else "-"
        if len(self.clean_sizes) > 1:
            dims["clean_size"] = str(clean)
        dims["defense"] = dfn.id
        _check_training(cfg["training"], self.name)
        stage = cfg["defense"]["stage"]
        model_key = stable_hash(model_config(cfg))
        base_key = stable_hash(model_config(cfg, base=True))
        label = "/".join([dims["attack"]] + [f"{a.name}={dims[a.name]}" for a in self.axes]
                         + [dims["defense"], f"n{clean}", f"s{seed}"])
        return Run(stable_hash(cfg), model_key, base_key, label, dims, int(seed), stage, cfg)

    def entry_labels(self) -> dict[str, dict[str, str]]:
        """Display labels: ``{"attack": {id: label}, "defense": {id: label}}``."""
        return {"attack": {e.id: e.label for e in self.attacks}, "defense": {e.id: e.label for e in self.defenses}}


# --------------------------------------------------------------------------- loading
def _toml_loads(text: str, where: str) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise ConfigError("reading benchmark specs needs Python 3.11 (tomllib) or the tomli package") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML ({e})") from None


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: tables merge key by key, everything else (lists too) is replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_spec_dict(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The spec file as a dict with ``extends`` resolved (paths relative to the including file)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"spec {path.name}: 'extends' loops back to itself")
    if not path.is_file():
        raise ConfigError(f"spec file not found: {path}")
    doc = _toml_loads(path.read_text(encoding="utf-8"), str(path))
    refs = doc.pop("extends", [])
    refs = [refs] if isinstance(refs, str) else refs
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise ConfigError(f"{path.name}: 'extends' must be a file name or a list of them")
    merged: dict[str, Any] = {}
    for ref in refs:  # later files override earlier ones, the including file overrides them all
        merged = _deep_merge(merged, read_spec_dict(path.parent / ref, _seen + (path,)))
    merged.pop("name", None)  # a variant never inherits its base's name
    return _deep_merge(merged, doc)


def find_spec(ref: str | Path, search: Iterable[Path] = ()) -> Path:
    """A spec path: ``ref`` itself, or ``benchmarks/specs/<ref>.toml`` in the current folder or the checkout."""
    p = Path(ref)
    if p.is_file():
        return p
    name = p.name if p.suffix == ".toml" else f"{p.name}.toml"
    folders = [Path.cwd() / "benchmarks" / "specs", *search]
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            folders.append(parent / "benchmarks" / "specs")
            break
    folders = list(dict.fromkeys(f.resolve() for f in folders))  # the checkout is often the cwd
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    known = sorted({f.stem for folder in folders if folder.is_dir() for f in folder.glob("*.toml")})
    hint = f"; known specs: {', '.join(known)}" if known else ""
    raise ConfigError(
        f"no spec {ref!r}: not a file, and no {name} in {', '.join(str(f) for f in folders)}{hint}"
    )


def load_spec(ref: str | Path) -> Spec:
    """Read and validate a spec file (a path or a name under ``benchmarks/specs``)."""
    path = find_spec(ref)
    doc = read_spec_dict(path)
    doc.setdefault("name", path.stem)
    return parse_spec(doc, source=str(path))


def parse_spec(doc: dict[str, Any], source: str | None = None) -> Spec:
    """Validate a spec dict (as read from TOML, ``extends`` already resolved)."""
    doc = copy.deepcopy(doc)
    name = str(doc.get("name") or (Path(source).stem if source else ""))
    if not name:
        raise ConfigError("a spec needs a name")
    where = f"spec {name}"
    unknown = sorted(set(doc) - SECTIONS)
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(unknown)}; known: {', '.join(sorted(SECTIONS))}")
    doc["name"] = name
    data = _data(doc.get("data"), where)
    model = _model(doc.get("model"), where)
    training = _table(doc.get("training", {}), f"{where} [training]")
    if "seed" in training:
        raise ConfigError(f"{where}: [training] must not set seed; list seeds in [grid] seeds = [...]")
    grid = _table(doc.get("grid", {}), f"{where} [grid]")
    bad = sorted(set(grid) - {"seeds", "clean_sizes", "vary"})
    if bad:
        raise ConfigError(f"{where}: unknown [grid] key(s) {', '.join(bad)}; known: seeds, clean_sizes, vary")
    seeds = _int_list(grid.get("seeds", [0]), f"{where}: grid.seeds", minimum=0)
    if "clean_sizes" not in grid:
        raise ConfigError(f"{where}: [grid] needs clean_sizes = [...] (clean images given to each defense)")
    clean_sizes = _int_list(grid["clean_sizes"], f"{where}: grid.clean_sizes", minimum=1)
    attacks = _entries(doc.get("attacks"), "attacks", where, _attack_config)
    defenses = _entries(doc.get("defenses"), "defenses", where, _defense_config)
    axes = [_axis(a, where) for a in grid.get("vary", [])]
    names = ["attack", "defense", "clean_size"] + [a.name for a in axes]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: grid.vary axis names must differ from each other and from "
                          "attack, defense, clean_size")
    table = _table(doc.get("table", {}), f"{where} [table]")
    for m in table.get("columns", []):
        if m not in METRICS:
            raise ConfigError(f"{where}: unknown table column {m!r}; known: {', '.join(METRICS)}")
    paper = _table(doc.get("paper_table", {}), f"{where} [paper_table]")
    for row in paper.get("rows", []):
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: paper_table.rows must be tables")
    spec = Spec(name=name, title=str(doc.get("title", name)), description=str(doc.get("description", "")),
                data=data, model=model, training=training, attacks=attacks, defenses=defenses, seeds=seeds,
                clean_sizes=clean_sizes, axes=axes, table=table, paper_table=paper,
                salt=str(doc.get("salt", "")), only=_only(doc.get("only", []), where), source=source, raw=doc,
                retune=_retune(doc.get("retune"), where), verify=_verify(doc.get("verify"), where))
    dims = spec.dims()  # validates [table] rows
    if "pivot" in table and table["pivot"] not in dims:
        raise ConfigError(f"{where}: [table] pivot must be one of the row dimensions {', '.join(dims)}")
    if spec.only:
        every = dataclasses.replace(spec, only=[]).runs()
        idle = [p for p in spec.only if not any(matches(r, [p]) for r in every)]
        if idle:
            raise ConfigError(f"{where}: only = [...] pattern(s) {', '.join(map(repr, idle))} select no run "
                              f"(runs are labelled like {every[0].label!r})")
    return spec


def _only(v: Any, where: str) -> list[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(p, str) and p for p in v):
        raise ConfigError(f"{where}: only must be a list of run patterns, e.g. [\"none\", \"ft\", \"badnets/*\"]")
    return list(v)


def matches(run: Run, patterns: list[str]) -> bool:
    """Whether ``run`` is selected by ``patterns`` (none: all).

    A pattern with ``*``/``?``/``[`` is a glob on the whole label
    (``attack/axis=value/defense/nSIZE/sSEED``); a plain word must equal one part of it.
    """
    if not patterns:
        return True
    parts = run.label.split("/")
    for p in patterns:
        if any(c in p for c in "*?[") and fnmatch.fnmatchcase(run.label, p):
            return True
        if p in parts or p == run.key or p == run.label:
            return True
    return False


def _retune(v: Any, where: str) -> dict[str, Any] | None:
    """``[retune]`` checked (:class:`fipurify.retune.RetuneConfig`), without ``seed`` (each run's own seed is used)."""
    if v is None:
        return None
    from ..retune import RetuneConfig

    v = _table(v, f"{where} [retune]")
    if "seed" in v:
        raise ConfigError(f"{where}: [retune] must not set seed; each run retunes with its own seed")
    try:
        cfg = RetuneConfig.from_dict(v)
    except ConfigError as e:
        raise ConfigError(f"{where} [retune]: {e}") from None
    return {k: getattr(cfg, k) for k in ("epochs", "lr", "poison_fraction", "batch_size")}


def _verify(v: Any, where: str) -> dict[str, Any] | None:
    """``[verify]``: ``detector`` (a registered clean-data detector, default neural-cleanse) and its ``options``."""
    if v is None:
        return None
    from ..detection.registry import DETECTORS

    v = _table(v, f"{where} [verify]")
    bad = sorted(set(v) - {"detector", "options"})
    if bad:
        raise ConfigError(f"{where}: unknown [verify] key(s) {', '.join(bad)}; known: detector, options")
    name = str(v.get("detector", "neural-cleanse"))
    if name not in DETECTORS:
        raise ConfigError(f"{where}: [verify] detector {name!r} is not registered; known: {', '.join(sorted(DETECTORS))}")
    return {"detector": name, "options": dict(_table(v.get("options", {}), f"{where} [verify] options"))}


def _table(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ConfigError(f"{where} must be a table")
    return v


def _int_list(v: Any, where: str, minimum: int) -> list[int]:
    if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise ConfigError(f"{where} must be a non-empty list of integers")
    if any(x < minimum for x in v) or len(set(v)) != len(v):
        raise ConfigError(f"{where}: values must be distinct and >= {minimum}")
    return list(v)


def _data(v: Any, where: str) -> dict[str, Any]:
    d = _table(v if v is not None else {}, f"{where} [data]")
    if "name" not in d:
        raise ConfigError(f"{where}: [data] needs name = \"cifar10\" (or gtsrb, synthetic, ...)")
    bad = sorted(set(d) - {"name", "reserve", "train_limit", "options"})
    if bad:
        raise ConfigError(f"{where}: unknown [data] key(s) {', '.join(bad)}; known: name, reserve, train_limit, options")
    reserve = d.get("reserve", 0.1)
    if isinstance(reserve, bool) or not isinstance(reserve, (int, float)) or reserve <= 0:
        raise ConfigError(f"{where}: data.reserve must be a positive count or a fraction")
    return {"name": str(d["name"]).lower(), "reserve": reserve, "train_limit": d.get("train_limit"),
            "options": _table(d.get("options", {}), f"{where} data.options")}


def _model(v: Any, where: str) -> dict[str, Any]:
    m = _table(v if v is not None else {}, f"{where} [model]")
    bad = sorted(set(m) - {"arch", "width", "options"})
    if bad:
        raise ConfigError(f"{where}: unknown [model] key(s) {', '.join(bad)}; known: arch, width, options")
    return {"arch": str(m.get("arch", "preactresnet18")), "width": m.get("width"),
            "options": _table(m.get("options", {}), f"{where} model.options")}


def _attack_config(e: dict[str, Any], where: str) -> dict[str, Any] | None:
    bad = sorted(set(e) - {"name", "id", "label", "target", "poison_rate", "mode", "options"})
    if bad:
        raise ConfigError(f"{where}: unknown attack key(s) {', '.join(bad)}; known: name, id, label, target, "
                          "poison_rate, mode, options (attack-specific settings go in options)")
    if str(e["name"]).lower() in ("none", "clean"):
        return None
    return {"name": str(e["name"]).lower(), "target": int(e.get("target", 0)), "poison_rate": e.get("poison_rate"),
            "mode": None if e.get("mode") is None else str(e["mode"]),  # None: the attack's (or alias's) own
            "options": _table(e.get("options", {}), f"{where} options")}


def _defense_config(e: dict[str, Any], where: str) -> dict[str, Any]:
    bad = sorted(set(e) - {"name", "id", "label", "options", "stage", "clean_data"})
    if bad:
        raise ConfigError(f"{where}: unknown defense key(s) {', '.join(bad)}; "
                          f"known: name, id, label, options, stage, clean_data")
    name = str(e["name"]).lower()
    stage = "none" if name == "none" else str(e.get("stage", "post"))
    if stage not in ("none", "post", "training"):
        raise ConfigError(f"{where}: defense stage must be 'post' (purifies a trained model) or 'training'")
    out = {"name": name, "options": _table(e.get("options", {}), f"{where} options"), "stage": stage}
    if "clean_data" in e:  # only when given, so the keys of every existing run stay as they were
        if e["clean_data"] not in CLEAN_DATA or stage != "post":
            raise ConfigError(f"{where}: clean_data must be one of {', '.join(CLEAN_DATA)} "
                              f"(post-training defenses only), got {e['clean_data']!r}")
        out["clean_data"] = e["clean_data"]
    return out


def _entries(v: Any, kind: str, where: str, make) -> list[Entry]:
    if not isinstance(v, list) or not v:
        raise ConfigError(f"{where}: needs at least one [[{kind}]] entry")
    out, seen = [], set()
    for i, e in enumerate(v):
        if isinstance(e, str):
            e = {"name": e}
        if not isinstance(e, dict) or "name" not in e:
            raise ConfigError(f"{where}: {kind}[{i}] needs a name")
        cfg = make(e, f"{where} {kind}[{i}] ({e['name']})")
        eid = str(e.get("id", e["name"])).lower()
        if eid in seen:
            raise ConfigError(f"{where}: two {kind} have id {eid!r}; give one of them id = \"...\"")
        seen.add(eid)
        out.append(Entry(eid, str(e.get("label", e.get("id", e["name"]))), cfg))
    return out


def _axis(a: Any, where: str) -> Axis:
    a = _table(a, f"{where} grid.vary")
    path, values = a.get("path"), a.get("values")
    if not isinstance(path, str) or path.split(".")[0] not in AXIS_ROOTS:
        raise ConfigError(f"{where}: grid.vary path must start with one of {', '.join(AXIS_ROOTS)}, got {path!r}")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: grid.vary {path} needs a non-empty list of values")
    vals, labels = [], []
    for v in values:
        if isinstance(v, dict):
            v = dict(v)
            labels.append(str(v.pop("id", None) or json.dumps(v, sort_keys=True)))
        else:
            labels.append(str(v))
        vals.append(v)
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{where}: grid.vary {path} has repeated values")
    return Axis(str(a.get("name") or path.split(".")[-1]), path, tuple(vals), tuple(labels))


def _apply(cfg: dict[str, Any], path: str, value: Any) -> bool:
    """Set ``path`` in ``cfg`` to ``value`` (a table value replaces the whole table there).

    False where the top-level section is absent (an axis on ``attack.*`` for the clean model).
    """
    parts = path.split(".")
    node = cfg
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            if node is cfg:
                return False
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"grid.vary path {path}: {p} is not a table")
        node = nxt
    if node is cfg and cfg.get(parts[-1]) is None and parts[-1] == "attack":
        return False
    node[parts[-1]] = copy.deepcopy(value)
    return True


def _check_training(training: dict[str, Any], spec: str) -> None:
    from dataclasses import fields

    from ..training import TrainConfig

    known = {f.name for f in fields(TrainConfig)} - {"seed"}
    bad = sorted(set(training) - known)
    if bad:
        raise ConfigError(f"spec {spec}: unknown [training] field(s) {', '.join(bad)}; "
                          f"TrainConfig has: {', '.join(sorted(known))}")


# --------------------------------------------------------------------------- registry checks
def unknown_names(spec: Spec) -> dict[str, list[str]]:
    """Attack and defense names the registries do not know (yet): ``{"attacks": [...], "defenses": [...]}``."""
    from .. import attacks, defenses
    from . import stages

    known_attacks = set(attacks.available())
    known_post = set(defenses.available())
    bad_a = [e.id for e in spec.attacks if e.config is not None and e.config["name"] not in known_attacks]
    bad_d = []
    for e in spec.defenses:
        name, stage = e.config["name"], e.config["stage"]
        if (stage == "post" and name not in known_post) or (stage == "training" and not stages.has_training_defense(name)):
            bad_d.append(e.id)
    return {"attacks": bad_a, "defenses": bad_d}


def without(spec: Spec, attack_ids: Iterable[str] = (), defense_ids: Iterable[str] = ()) -> Spec:
    """A copy of ``spec`` without the given attacks and defenses."""
    a, d = set(attack_ids), set(defense_ids)
    out = copy.copy(spec)
    out.attacks = [e for e in spec.attacks if e.id not in a]
    out.defenses = [e for e in spec.defenses if e.id not in d]
    if not out.attacks or not out.defenses:
        raise ConfigError(f"spec {spec.name}: nothing left to run without the unknown attacks/defenses")
    return out
