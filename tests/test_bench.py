"""Benchmark runner, results store and report: grid expansion, kill-and-resume, concurrent writers, rendering."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fipurify.bench.report import build_table
from fipurify.bench.render import to_csv, to_html, to_json, to_markdown, write_report
from fipurify.bench.spec import load_spec, parse_spec, stable_hash
from fipurify.bench.store import ResultStore
from fipurify.errors import ConfigError

# A tiny synthetic benchmark: width-4 PreActResNet18, 1 epoch, 2 attacks x 2 defenses.
TINY = """
name = "tiny"
title = "Tiny synthetic benchmark"

[data]
name = "synthetic"
reserve = 40
options = { n = 200, num_classes = 4, image_size = 16 }

[model]
arch = "preactresnet18"
width = 4

[training]
epochs = 1
lr = 0.05
batch_size = 32
augment = false

[grid]
seeds = [0]
clean_sizes = [20]

[[attacks]]
name = "badnets"
poison_rate = 0.2

[[attacks]]
name = "blend"
poison_rate = 0.2

[[defenses]]
name = "ft"
options = { epochs = 1, batch_size = 16 }

[[defenses]]
name = "ffip"
options = { epochs = 1, batch_size = 16 }
"""


def _doc(**over):
    doc = {"name": "g", "data": {"name": "synthetic", "reserve": 40}, "model": {"arch": "preactresnet18", "width": 4},
           "training": {"epochs": 1}, "grid": {"seeds": [0, 1], "clean_sizes": [10, 20]},
           "attacks": [{"name": "badnets", "poison_rate": 0.1}, {"name": "none"}],
           "defenses": [{"name": "none"}, {"name": "ft"}, {"name": "ffip", "options": {"epochs": 1}},
                        {"name": "abl", "stage": "training", "options": {"isolation_epochs": 1}}]}
    doc.update(over)
    return doc


# --------------------------------------------------------------------------- spec / grid
def test_spec_only_keeps_the_selected_cells_with_the_same_keys():
    full = parse_spec(_doc())
    sub = parse_spec(_doc(only=["ft", "badnets/ffip/*"]))
    want = [r for r in full.runs() if r.defense == "ft" or (r.attack == "badnets" and r.defense == "ffip")]
    assert [r.key for r in sub.runs()] == [r.key for r in want] and len(want) == 12
    with pytest.raises(ConfigError, match="'fft' select no run"):
        parse_spec(_doc(only=["ft", "fft"]))
    with pytest.raises(ConfigError, match="list of run patterns"):
        parse_spec(_doc(only=[3]))


def test_shipped_table1_core_is_a_view_of_table1():
    core, full = load_spec("table1-core"), load_spec("table1")
    keys = {r.key for r in full.runs()}
    assert {r.key for r in core.runs()} <= keys
    core_defenses = {"none", "ft", "ft-sam", "anp", "i-bau", "ffip", "sau", "fst", "nft", "bti-dbf"}
    assert {r.defense for r in core.runs()} == core_defenses
    assert len(core.runs()) == len(full.attacks) * len(core_defenses)


def test_grid_expansion_keys_and_models():
    spec = parse_spec(_doc(grid={"seeds": [0, 1], "clean_sizes": [10, 20],
                                 "vary": [{"path": "attack.poison_rate", "values": [0.1, 0.3]}]}))
    runs = spec.runs()
    # (badnets x 2 poison rates + the clean model once) x clean sizes x defenses x seeds
    assert len(runs) == (2 + 1) * 2 * 4 * 2
    assert len({r.key for r in runs}) == len(runs)
    assert spec.dims() == ["attack", "poison_rate", "clean_size", "defense"]
    # Same spec, same keys; labels and ids are display only.
    again = parse_spec(_doc(grid=spec.raw["grid"],
                            attacks=[{"name": "badnets", "poison_rate": 0.1, "label": "BadNets"}, {"name": "none"}]))
    assert [r.key for r in again.runs()] == [r.key for r in runs]
    # Any option that changes what is run changes the key.
    other = parse_spec(_doc(grid=spec.raw["grid"], training={"epochs": 2}))
    assert not {r.key for r in other.runs()} & {r.key for r in runs}
    # The clean model ignores the poison-rate axis; every backdoored cell uses the rate it names.
    bad = [r for r in runs if r.attack == "badnets"]
    assert {r.config["attack"]["poison_rate"] for r in bad} == {0.1, 0.3}
    assert {r.dims["poison_rate"] for r in runs if r.attack == "none"} == {"-"}
    # Post-training defenses and "none" share the backdoored model of their cell; a training-time
    # defense has its own model, and its base is that shared model.
    cell = [r for r in bad if r.seed == 0 and r.config["clean_size"] == 10 and r.dims["poison_rate"] == "0.1"]
    post = {r.defense: r for r in cell}
    assert post["none"].model_key == post["ft"].model_key == post["ffip"].model_key
    assert post["abl"].model_key != post["ft"].model_key and post["abl"].base_model_key == post["ft"].model_key
    assert post["abl"].stage == "training" and post["none"].stage == "none"
    # Clean sizes do not change the backdoored model; seeds do.
    assert len({r.model_key for r in bad if r.defense == "ft"}) == 2 * 2  # poison rates x seeds
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})


def test_spec_errors_and_extends(tmp_path):
    with pytest.raises(ConfigError, match="smoothness_penaltyy"):
        parse_spec(_doc(training={"smoothness_penaltyy": 1.0})).runs()
    with pytest.raises(ConfigError, match="seeds"):
        parse_spec(_doc(training={"seed": 3}))
    with pytest.raises(ConfigError, match="id"):
        parse_spec(_doc(defenses=[{"name": "ft"}, {"name": "ft"}]))
    with pytest.raises(ConfigError, match="clean_sizes"):
        parse_spec(_doc(grid={"seeds": [0]}))
    (tmp_path / "base.toml").write_text(TINY)
    (tmp_path / "big.toml").write_text('extends = "base.toml"\n[model]\nwidth = 8\n[grid]\nseeds = [0, 1]\n')
    base, big = load_spec(tmp_path / "base.toml"), load_spec(tmp_path / "big.toml")
    assert big.name == "big" and big.model["width"] == 8 and big.model["arch"] == "preactresnet18"
    assert big.clean_sizes == base.clean_sizes == [20] and big.seeds == [0, 1]
    assert len(big.runs()) == 2 * len(base.runs())
    # A misspelt name lists the shipped specs once each, so the user sees what to type.
    with pytest.raises(ConfigError, match="known specs: .*table1") as err:
        load_spec("tabel1")
    assert str(err.value).count("table1,") == 1


def test_shipped_specs_parse():
    specs = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "specs").glob("*.toml"))
    names = {p.stem for p in specs}
    for name in ("table1", "table7", "table8", "table9", "table10", "table11", "table12", "table13", "table14",
                 "fig4", "table16", "table17", "attacks", "attacks-gtsrb", "baselines"):
        assert name in names and f"{name}-paper" in names
    for p in specs:
        spec = load_spec(p)
        assert spec.runs()
    t7 = load_spec(specs[0].parent / "table7.toml")
    assert {"fip", "ffip", "ffip-no-trf", "ffip-no-lr", "ft"} <= {d.id for d in t7.defenses}
    assert t7.paper_table["rows"] and load_spec(specs[0].parent / "table7-paper.toml").model["width"] == 64
    # Specs that share a run share its key (labels and table layout do not count), so the attack suite
    # trains the models Table 1 purifies, and the baseline table is a subset of Table 1's runs.
    t1 = {r.key for r in load_spec(specs[0].parent / "table1.toml").runs()}
    assert {r.key for r in load_spec(specs[0].parent / "baselines.toml").runs()} <= t1
    suite = {r.model_key for r in load_spec(specs[0].parent / "attacks.toml").runs() if r.attack != "none"}
    assert suite == {r.model_key for r in load_spec(specs[0].parent / "table1.toml").runs()}


# --------------------------------------------------------------------------- store
def _row(key: str, status: str = "ok", **kw):
    return {"run_key": key, "spec": "s", "config": {"k": key}, "status": status, **kw}


def _writer(path: str, prefix: str, n: int) -> None:
    store = ResultStore(path)
    for i in range(n):
        store.record(_row(f"{prefix}-{i}", acc=i / n))
    store.close()


def test_store_concurrent_writers_lose_nothing(tmp_path):
    db = str(tmp_path / "r.sqlite")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(db, f"p{j}", 30)) for j in range(4)]
    threads = [threading.Thread(target=_writer, args=(db, f"t{j}", 30)) for j in range(3)]
    for w in procs + threads:
        w.start()
    for w in procs + threads:
        w.join(60)
    assert all(p.exitcode == 0 for p in procs)
    with ResultStore(db) as store:
        keys = store.status()
        assert len(keys) == 7 * 30 and set(keys.values()) == {"ok"}
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # An ok result is never replaced; a failed one is, and the attempt is counted.
        assert store.record(_row("p0-0", status="failed", error="late duplicate")) is False
        assert store.get("p0-0")["status"] == "ok"
        store.record(_row("x", status="failed", error="boom"))
        assert store.record(_row("x", acc=0.5)) is True
        got = store.get("x")
        assert got["status"] == "ok" and got["attempts"] == 2 and got["error"] is None
        assert got["config"] == {"k": "x"}


def test_store_merge(tmp_path):
    a, b = ResultStore(tmp_path / "a.sqlite"), ResultStore(tmp_path / "b.sqlite")
    a.record(_row("1", acc=0.1))
    a.record(_row("2", status="failed", error="oom"))
    b.record(_row("2", acc=0.2))
    b.record(_row("3", acc=0.3))
    b.record(_row("1", acc=0.9))
    b.save_spec("s", {"name": "s"})
    b.close()
    assert a.merge_from(tmp_path / "b.sqlite") == 2
    assert {k: a.get(k)["acc"] for k in "123"} == {"1": 0.1, "2": 0.2, "3": 0.3}
    assert "s" in a.specs()
    a.close()


# --------------------------------------------------------------------------- report
REPORT_SPEC = TINY.replace('[[defenses]]\nname = "ft"', '[[defenses]]\nname = "none"\n\n[[defenses]]\nname = "ft"') \
    .replace("seeds = [0]", "seeds = [0, 1]") + """
[paper_table]
source = "Test paper, Table 99"
rows = [ { attack = "badnets", defense = "ffip", asr = 1.86, acc = 89.32 }, { defense = "ffip", time = 20.8 } ]
"""

# (attack, defense) -> per-seed (acc, asr, lcr, seconds)
VALUES = {
    ("badnets", "none"): [(0.90, 1.00, 0.00, None), (0.92, 1.00, 0.00, None)],
    ("badnets", "ft"): [(0.80, 0.50, 0.40, 10.0), (0.82, 0.40, 0.50, 12.0)],
    ("badnets", "ffip"): [(0.85, 0.05, 0.80, 5.0), (0.87, 0.07, 0.84, 7.0)],
    ("blend", "none"): [(0.91, 1.00, 0.00, None), (0.91, 1.00, 0.00, None)],
    ("blend", "ft"): [(0.88, 0.30, 0.60, 9.0), (0.88, 0.30, 0.60, 9.0)],
}  # blend/ffip failed


@pytest.fixture()
def fixture_db(tmp_path):
    spec = parse_spec({**__import__("tomllib").loads(REPORT_SPEC)})
    store = ResultStore(tmp_path / "r.sqlite")
    store.save_spec(spec.name, spec.raw)
    for run in spec.runs():
        vals = VALUES.get((run.attack, run.defense))
        base = {"run_key": run.key, "spec": spec.name, "label": run.label, "attack": run.attack,
                "defense": run.defense, "seed": run.seed, "config": run.config, "device": "cpu", "host": "h"}
        if vals is None:
            store.record({**base, "status": "failed", "error": "DataError: boom"})
            continue
        acc, asr, lcr, secs = vals[run.seed]
        store.record({**base, "status": "ok", "acc": acc, "asr": asr, "lcr": lcr, "purify_seconds": secs,
                      "der": None if secs is None else (max(0, 1 - asr) - max(0, 0.91 - acc) + 1) / 2,
                      "train_seconds": 100.0, "fipurify_version": "0.1.0",
                      "train_device": "cpu" if run.attack == "badnets" else "cuda (GPU X)"})
    yield spec, store
    store.close()


def test_report_aggregates_marks_best_and_shows_paper(fixture_db, tmp_path):
    spec, store = fixture_db
    t = build_table(spec, store)
    rows = {(r.dims["attack"], r.dims["defense"]): r for r in t.rows}
    ffip = rows[("badnets", "ffip")]
    assert ffip.cells["acc"].mean == pytest.approx(0.86) and ffip.cells["acc"].std == pytest.approx(0.014142, abs=1e-5)
    assert ffip.best == {"acc", "asr", "lcr", "der", "time"} and not rows[("badnets", "ft")].best
    assert not rows[("blend", "ft")].best  # blend/ffip failed: one candidate, nothing to compare
    assert ffip.paper == {"asr": 1.86, "acc": 89.32, "time": 20.8}
    assert rows[("blend", "ffip")].n_ok == 0 and len(t.failed) == 2
    assert not rows[("badnets", "none")].best  # no defense is never "best"

    md = to_markdown(t)
    assert "| badnets | ffip | **86.00 ± 1.41** | 89.32 | **6.00 ± 1.41** | 1.86 | **82.00 ± 2.83** | " \
           "**94.50 ± 0.00** | **6.0 ± 1.4** | 20.8 | 2 |" in md
    assert "| blend | ffip | - | - | - | - | - | - | - | 20.8 | 0/2 |" in md
    assert "Test paper, Table 99" in md
    assert "DataError: boom" in md
    # two seeds x two attacks = four models, each counted once; defense seconds summed over finished runs
    assert t.compute == {"train_seconds": 400.0, "n_models": 4, "purify_seconds": 52.0,
                         "train_by_device": {"cpu": [200.0, 2], "cuda (GPU X)": [200.0, 2]}}
    assert ("Compute behind the finished runs: 400 s training 4 backdoored model(s) (200 s for 2 on cpu, "
            "200 s for 2 on cuda (GPU X)) and 52 s of defense time") in md
    html = to_html(t, {"fig.png": b"\x89PNG fake"})
    assert '<td class="best">6.00 ± 1.41</td>' in html and "data:image/png;base64," in html
    assert "<style>" in html and "89.32" in html
    recs = list(csv.DictReader(io.StringIO(to_csv(t))))
    r = next(x for x in recs if x["attack"] == "badnets" and x["defense"] == "ffip")
    assert float(r["asr_mean"]) == pytest.approx(0.06) and r["asr_best"] == "True" and float(r["acc_paper"]) == 89.32
    doc = json.loads(to_json(t))
    j = next(x for x in doc["rows"] if x["attack"] == "blend" and x["defense"] == "ft")
    assert j["acc_mean"] == pytest.approx(0.88) and j["acc_std"] == pytest.approx(0.0) and j["n"] == 2
    assert doc["paper_source"] == "Test paper, Table 99" and len(doc["failed"]) == 2

    paths = write_report(t, tmp_path / "out")
    names = {p.name for p in paths}
    assert {"tiny.md", "tiny.html", "tiny.csv", "tiny.json", "tiny-runtime.png"} <= names
    page = (tmp_path / "out" / "tiny.html").read_text()
    assert "data:image/png;base64,iVBOR" in page  # the runtime chart, embedded


def test_report_cli_from_database(fixture_db, tmp_path, capsys):
    from fipurify.cli import main

    spec, store = fixture_db
    assert main(["report", str(store.path), "--out", str(tmp_path / "rep"), "--no-figures", "--format", "md,json"]) == 0
    assert "**6.00 ± 1.41**" in capsys.readouterr().out
    assert (tmp_path / "rep" / "tiny.md").is_file() and not (tmp_path / "rep" / "tiny.html").exists()
    assert main(["report", str(store.path), "--format", "pdf"]) == 2

    # The README block: replaced between its markers, the rest of the file untouched; no markers -> clear error.
    readme = tmp_path / "README.md"
    readme.write_text("# Doc\n\nintro\n\n<!-- report:tiny -->\nold table\n<!-- /report:tiny -->\n\nafter\n")
    assert main(["report", str(store.path), "--out", str(tmp_path / "rep"), "--no-figures", "--format", "md",
                 "--readme", str(readme), "--quiet"]) == 0
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# Doc\n\nintro\n") and text.endswith("\nafter\n")
    assert "#### Tiny synthetic benchmark" in text and "**6.00 ± 1.41**" in text
    assert text.index("<!-- report:tiny -->") < text.index("**6.00") < text.index("<!-- /report:tiny -->")
    capsys.readouterr()
    (tmp_path / "other.md").write_text("no markers\n")
    assert main(["report", str(store.path), "--out", str(tmp_path / "rep"), "--format", "md",
                 "--readme", str(tmp_path / "other.md"), "--quiet"]) == 2
    assert "<!-- report:tiny -->" in capsys.readouterr().err


# --------------------------------------------------------------------------- runner
def _bench(tmp: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fipurify.cli", "bench", str(tmp / "tiny.toml"), "--db", str(tmp / f"{name}.sqlite"),
            "--cache", str(tmp / f"cache-{name}"), "--threads", "1", "--quiet", *extra]


def _ok_rows(db: Path) -> dict[str, tuple]:
    if not db.exists():
        return {}
    con = sqlite3.connect(str(db), timeout=30)
    try:
        return {r[0]: r[1:] for r in con.execute(
            "SELECT run_key, acc, asr, lcr, der, acc_before, asr_before, finished_at, attempts FROM results "
            "WHERE status = 'ok'")}
    except sqlite3.OperationalError:  # the runner is still creating the tables
        return {}
    finally:
        con.close()


@pytest.mark.slow  # starts fipurify bench runner processes
def test_killed_and_resumed_run_matches_uninterrupted(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # Reference: uninterrupted, two workers at a time.
    ref = subprocess.run(_bench(tmp_path, "ref", "--jobs", "2"), env=env, capture_output=True, text=True, timeout=240)
    assert ref.returncode == 0, ref.stderr
    expected = _ok_rows(tmp_path / "ref.sqlite")
    assert len(expected) == 4

    # Interrupted: SIGKILL the runner and its workers as soon as the first result is committed.
    db = tmp_path / "run.sqlite"
    proc = subprocess.Popen(_bench(tmp_path, "run"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while not _ok_rows(db) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = _ok_rows(db)
    assert 1 <= len(first) < 4, "kill the run between its first and its last result"

    again = subprocess.run(_bench(tmp_path, "run"), env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    assert f"{len(first)} already done" in again.stderr
    final = _ok_rows(db)
    con = sqlite3.connect(str(db))
    assert con.execute("SELECT COUNT(*), COUNT(DISTINCT run_key) FROM results").fetchone() == (4, 4)
    from fipurify.bench.stages import CODE_HASH, source_fingerprint

    # every row names the code that produced it (the sources did not change meanwhile)
    assert {r[0] for r in con.execute("SELECT DISTINCT code_hash FROM results")} == {CODE_HASH}
    assert CODE_HASH == source_fingerprint() and len(CODE_HASH) == 12
    con.close()
    assert set(final) == set(expected)
    for key, row in first.items():  # finished runs were not repeated
        assert final[key] == row
    for key in expected:  # same seeds -> the same numbers as the uninterrupted run
        assert final[key][:6] == expected[key][:6]


# --------------------------------------------------------------------------- adopting models trained elsewhere
def test_adopt_reuses_only_an_exactly_matching_model(tmp_path):
    from fipurify.bench.adopt import adopt
    from fipurify.bench.runner import BenchOptions, make_plan
    from fipurify.bench import stages
    from fipurify.io import load_model, save_model

    (tmp_path / "tiny.toml").write_text(TINY)
    spec = load_spec(tmp_path / "tiny.toml")
    with ResultStore(tmp_path / "r.sqlite") as store:
        plan = make_plan(spec, BenchOptions(db=tmp_path / "r.sqlite", cache=tmp_path / "cache"), store)
    assert len(plan.models) == 2 and not any(m["cached"] for m in plan.models.values())
    key, m = next((k, m) for k, m in plan.models.items() if m["config"]["attack"]["name"] == "badnets")

    # A model trained outside the runner (as `fipurify train` would): no bench metadata.
    path, meta, _ = stages.train(m["config"], key, tmp_path / "elsewhere", log=lambda s: None)
    model, meta = load_model(path)
    del meta["bench"]
    plain = save_model(model, tmp_path / "mine.safetensors", meta)
    other = dict(meta, train_config={**meta["train_config"], "epochs": 2})
    changed = save_model(model, tmp_path / "longer.safetensors", other)
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04not a model")

    files = [plain, changed, tmp_path / "junk.safetensors"]
    dry = adopt(plan.models, files, dry_run=True)
    assert [a.status for a in dry] == ["adopted", "no-match", "unreadable"], dry
    assert not m["path"].exists()  # a dry run writes nothing

    got = adopt(plan.models, files)
    assert got[0].status == "adopted" and got[0].model_key == key and got[0].target == m["path"]
    assert any("training.epochs: spec 1, file 2" in r for r in got[1].reasons)
    adopted = stages.cached_model_meta(m["path"], key)
    assert adopted is not None and adopted["bench"]["adopted_from"] == str(plain.resolve())
    back, _ = load_model(m["path"])
    assert all((a == b).all() for a, b in zip(back.state_dict().values(), model.state_dict().values()))
    assert adopt(plan.models, [plain])[0].status == "cached"
    # A file from another runner (a GPU machine, say) keeps its training cost and device.
    gpu = save_model(model, tmp_path / "gpu.safetensors",
                     {**meta, "bench": {"model_key": "theirs", "train_seconds": 12.5, "epoch_seconds": [12.5],
                                        "device": "cuda (GPU X)"}})
    with ResultStore(tmp_path / "r.sqlite") as store:
        plan2 = make_plan(spec, BenchOptions(db=tmp_path / "r.sqlite", cache=tmp_path / "cache2"), store)
    assert adopt(plan2.models, [gpu])[0].status == "adopted"
    b = stages.cached_model_meta(plan2.models[key]["path"], key)["bench"]
    assert (b["model_key"], b["train_seconds"], b["device"]) == (key, 12.5, "cuda (GPU X)")
    assert stages.model_row({"bench": b})["train_device"] == "cuda (GPU X)"
    with ResultStore(tmp_path / "r.sqlite") as store:
        plan = make_plan(spec, BenchOptions(db=tmp_path / "r.sqlite", cache=tmp_path / "cache"), store)
    assert plan.to_train() == [k for k in plan.models if k != key]


def _descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow  # starts fipurify bench runner processes
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_runner_leaves_no_worker_behind(tmp_path, sig):
    # A long training task, so the kill lands while the worker is busy.
    (tmp_path / "tiny.toml").write_text(TINY.replace("epochs = 1\nlr", "epochs = 200\nlr"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_bench(tmp_path, "k", "--only", "badnets"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    logs = tmp_path / "k.sqlite.work" / "logs"
    deadline = time.monotonic() + 60
    while not (logs.is_dir() and any(logs.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    workers = _descendants(proc.pid)
    assert workers, "the runner started no worker"
    proc.send_signal(sig)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in workers if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"workers still running after the runner got signal {sig}"


def test_forget_and_rerun_drop_only_the_matching_results(fixture_db, tmp_path):
    import io as _io

    from fipurify.bench.runner import BenchOptions, run_bench

    spec, store = fixture_db
    ok_before = store.finished()
    ft_keys = [r.key for r in spec.runs() if r.defense == "ft"]
    opts = BenchOptions(db=store.path, cache=tmp_path / "cache", dry_run=True, rerun=["ft"])
    out = _io.StringIO()
    run_bench(spec, opts, out=out)
    assert f"would forget {len(ft_keys)} stored result(s)" in out.getvalue()
    assert store.finished() == ok_before  # a dry run forgets nothing
    assert store.forget(ft_keys) == len(ft_keys)
    assert store.finished() == ok_before - set(ft_keys)
    assert store.forget(ft_keys) == 0


def test_adopt_matches_a_generator_attack_by_its_options_not_its_trained_generator():
    """image_shape and the generator file are filled in by prepare(); the spec cannot know them."""
    from fipurify.bench.adopt import attack_problems
    from fipurify.bench import stages

    cfg = {"name": "lira", "poison_rate": 0.1, "options": {"eps": 0.02}}
    have = stages.make_attack(cfg, 0).to_spec()
    have.update(image_shape=[3, 32, 32], num_classes=10,
                generator={"file": "lira-0123.safetensors", "sha256": "ab" * 32})
    assert attack_problems(cfg, have, 0) == []
    assert attack_problems({**cfg, "options": {"eps": 0.05}}, have, 0) == ["attack.eps: spec 0.05, file 0.02"]


def test_adoption_report_lists_adopted_files_and_counts_the_misses(tmp_path):
    import io as _io

    from fipurify.bench.adopt import Adoption
    from fipurify.bench.runner import report_adoptions

    got = [Adoption(tmp_path / "a.safetensors", "k", tmp_path / "cache" / "a-k.safetensors", "adopted")]
    got += [Adoption(tmp_path / f"m{i}.safetensors", None, None, "no-match", (f"seed: spec 0, file {i}",))
            for i in range(5)]
    out = _io.StringIO()
    assert report_adoptions(got, out) == 1
    lines = out.getvalue().splitlines()
    assert lines[0].strip().startswith("adopted") and lines[0].endswith("a-k.safetensors")
    assert len(lines) == 5 and "seed: spec 0, file 2" in lines[3]
    assert lines[4].strip() == "... and 2 more file(s) that are no model of this spec"


@contextlib.contextmanager
def _held_elsewhere(lock: Path):
    """Hold ``lock`` as another runner working on that run or model would."""
    import fcntl

    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(held.fileno(), fcntl.LOCK_UN)


def _start_runner(tmp: Path) -> subprocess.Popen:
    """A ``--jobs 1`` runner on the tiny spec in the background (database ``run.sqlite``, cache ``cache-run``)."""
    return subprocess.Popen(_bench(tmp, "run", "--jobs", "1"), env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _ok_rows_once(db: Path, n: int, proc: subprocess.Popen, limit: float = 200) -> dict[str, tuple]:
    """The finished rows once there are ``n`` of them (or the runner ended, or ``limit`` s passed)."""
    deadline = time.monotonic() + limit
    while len(_ok_rows(db)) < n and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    return _ok_rows(db)


@pytest.mark.slow  # starts fipurify bench runner processes
def test_runners_sharing_a_database_skip_a_held_run_instead_of_waiting(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    first = load_spec(tmp_path / "tiny.toml").runs()[0]  # the run a runner takes first
    db = tmp_path / "run.sqlite"
    with _held_elsewhere(db.with_name(db.name + ".work") / "locks" / f"{first.key}.lock"):
        proc = _start_runner(tmp_path)
        others = _ok_rows_once(db, 3, proc)
        # The one free slot went to the three free runs; the held one was neither run nor waited on.
        assert len(others) == 3 and first.key not in others, "the runner waited on the held run"
        assert proc.poll() is None  # it keeps the held run queued
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    final = _ok_rows(db)
    assert len(final) == 4 and final[first.key][6] > max(r[6] for r in others.values())  # ran once released


@pytest.mark.slow  # starts fipurify bench runner processes
def test_runners_sharing_a_cache_train_another_model_instead_of_waiting(tmp_path):
    """While another runner trains the first model (its lock held), a runner trains and
    purifies the second one, then trains the first itself once the lock is free."""
    from fipurify.bench import stages

    (tmp_path / "tiny.toml").write_text(TINY)
    runs = load_spec(tmp_path / "tiny.toml").runs()
    first = runs[0]
    path = stages.model_path(tmp_path / "cache-run", first.model_config(base=True), first.base_model_key)
    db = tmp_path / "run.sqlite"
    blocked = {r.key for r in runs if r.base_model_key == first.base_model_key}
    with _held_elsewhere(stages.model_lock(path)):
        proc = _start_runner(tmp_path)
        others = _ok_rows_once(db, 2, proc)
        assert len(others) == 2 and not blocked & set(others), "the runner waited on the held model"
        assert not path.exists() and proc.poll() is None  # the held model stays queued, untrained
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    final = _ok_rows(db)
    assert len(final) == 4 and blocked <= set(final) and path.is_file()


@pytest.mark.slow  # starts fipurify bench runner processes
def test_a_model_trained_elsewhere_while_queued_is_used_not_retrained(tmp_path):
    from fipurify.bench.runner import BenchOptions, Runner, make_plan

    (tmp_path / "tiny.toml").write_text(TINY)
    spec = load_spec(tmp_path / "tiny.toml")
    opts = BenchOptions(db=tmp_path / "a.sqlite", cache=tmp_path / "cache", threads=1, progress=False)
    with ResultStore(opts.db) as store:
        plan = make_plan(spec, opts, store)
        assert len(plan.to_train()) == 2
        # Another runner trains every model between our plan and our start.
        other = BenchOptions(db=tmp_path / "b.sqlite", cache=tmp_path / "cache", threads=1, progress=False,
                             only=["ft"])
        with ResultStore(other.db) as other_store:
            Runner(spec, other, other_store).run(make_plan(spec, other, other_store))
        counts = Runner(spec, opts, store).run(plan)
    assert counts["trained"] == 0 and counts["ok"] == 4, counts


def test_a_worker_whose_run_is_held_returns_busy_and_leaves_the_log_alone(tmp_path):
    from fipurify.bench import stages
    from fipurify.bench.worker import BUSY, run_task

    log = tmp_path / "run.log"
    log.write_text("the holder's progress\n")
    task = {"kind": "purify", "lock": str(tmp_path / "run.lock"), "row": {}, "db": str(tmp_path / "x.sqlite")}
    with stages.file_lock(tmp_path / "run.lock", wait=False):
        assert not stages.lock_is_free(tmp_path / "run.lock")
        assert run_task(task, str(log)) == BUSY
    assert log.read_text() == "the holder's progress\n" and not (tmp_path / "x.sqlite").exists()
    assert stages.lock_is_free(tmp_path / "run.lock")


def test_report_notes_explain_only_the_columns_shown():
    from fipurify.bench.render import units_note

    assert units_note(["acc", "asr"]) == "; ACC and ASR in %"
    assert units_note(["asr", "acc", "der"]) == "; ASR, ACC and DER in %"
    assert "time = purification seconds" in units_note(["time"]) and "%" not in units_note(["time"])


def test_oracle_clean_data_and_validation_accuracy_in_a_purify_run(tmp_path):
    """A defense entry with ``clean_data = "oracle"`` (the capacity check) gets the clean images plus
    their triggered copies with true labels; every run reports clean validation accuracy on reserve
    images disjoint from its clean set; entries without the key keep their old run keys."""
    from fipurify.bench import stages

    import tomllib

    doc = tomllib.loads(TINY)
    doc["attacks"] = doc["attacks"][:1]
    doc["defenses"] = [{"name": "ft", "options": {"epochs": 1, "batch_size": 16}},
                       {"name": "ft", "id": "oracle", "clean_data": "oracle", "options": {"epochs": 1, "batch_size": 16}}]
    runs = parse_spec(doc).runs()
    plain, oracle = runs
    assert "clean_data" not in plain.config["defense"] and oracle.config["defense"]["clean_data"] == "oracle"
    assert plain.key == parse_spec(tomllib.loads(TINY)).runs()[0].key  # unchanged key without the new field
    path, meta, _ = stages.train(plain.model_config(), plain.model_key, tmp_path, log=lambda m: None)
    rows = {r.dims["defense"]: stages.purify(r.config, path) for r in runs}
    for row in rows.values():
        assert 0 <= row["val_acc"] <= 1 and row["details"]["val_before"] is not None
    assert rows["ft"]["details"]["n_clean"] == 20 and rows["oracle"]["details"]["n_clean"] == 40
    with pytest.raises(ConfigError, match="clean_data"):
        parse_spec({**doc, "defenses": [{"name": "ft", "clean_data": "test"}]})


def test_runs_are_placed_on_the_least_busy_gpu(monkeypatch):
    import torch

    from fipurify.bench.runner import device_slots, place

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    gpus = device_slots("cuda")
    assert gpus == ["cuda:0", "cuda:1", "cuda:2"]
    assert device_slots("cuda:1") == ["cuda:1"] and device_slots("cpu") == ["cpu"]
    busy: list[str] = []
    for _ in range(4):
        busy.append(place(gpus, busy))
    assert busy == ["cuda:0", "cuda:1", "cuda:2", "cuda:0"]
    assert place(gpus, ["cuda:0", "cuda:2", "cuda:0"]) == "cuda:1"


def test_a_verify_spec_records_the_detector_before_and_after_each_purification(tmp_path):
    """``[verify]`` runs the named clean-data detector on the model before and after the defense (new run
    keys, same models) and stores its summary under ``details["verify"]``; a bad section fails at parse."""
    from fipurify.bench import stages

    import tomllib

    doc = tomllib.loads(TINY)
    doc["attacks"] = doc["attacks"][:1]
    doc["defenses"] = [{"name": "ft", "options": {"epochs": 1, "batch_size": 16}}]
    plain = parse_spec(doc).runs()[0]
    nc = {"max_steps": 20, "batch_size": 16, "stop_patience": 5, "refine_steps": 10}
    run = parse_spec({**doc, "verify": {"detector": "neural-cleanse", "options": nc}}).runs()[0]
    assert run.key != plain.key and run.model_key == plain.model_key
    assert run.config["verify"] == {"detector": "neural-cleanse", "options": nc}
    path, _, _ = stages.train(run.model_config(), run.model_key, tmp_path, log=lambda m: None)
    v = stages.purify(run.config, path)["details"]["verify"]
    assert v["method"] == "neural-cleanse" and isinstance(v["flagged_before"], bool)
    assert isinstance(v["flagged_after"], bool) and v["proxy_asr_before"] is not None
    assert "before" not in v and "after" not in v  # the summary, not both full reports
    with pytest.raises(ConfigError, match="not registered"):
        parse_spec({**doc, "verify": {"detector": "nope"}})
    with pytest.raises(ConfigError, match="unknown \\[verify\\] key"):
        parse_spec({**doc, "verify": {"detector": "uap", "steps": 3}})


def test_a_killed_model_training_resumes_where_it_stopped(tmp_path, monkeypatch):
    """The runner's model training writes its state after every epoch; killed after epoch 1 of 2, the
    rerun continues from it (same weights as an uninterrupted run), records that it resumed, counts the
    earlier epoch's time, and removes the state file once the model is saved."""
    import tomllib

    from fipurify import train_state
    from fipurify.bench import stages
    import torch

    from fipurify.io import load_model

    doc = tomllib.loads(TINY)
    doc["training"]["epochs"] = 2
    run = parse_spec(doc).runs()[0]
    cfg, key = run.model_config(), run.model_key
    straight, _, _ = stages.train(cfg, key, tmp_path / "a", log=lambda m: None)

    real_save = train_state.save

    def save_then_die(path, **kw):
        real_save(path, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_state, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        stages.train(cfg, key, tmp_path / "b", log=lambda m: None)
    path = stages.model_path(tmp_path / "b", cfg, key)
    assert not path.exists() and train_state.epochs_done(train_state.beside(path)) == 1
    monkeypatch.setattr(train_state, "save", real_save)
    lines: list[str] = []
    resumed, meta, trained = stages.train(cfg, key, tmp_path / "b", log=lines.append)
    assert trained and meta["bench"]["resumed_after_epoch"] == 1 and any("resuming after epoch 1" in s for s in lines)
    assert not train_state.beside(path).exists()
    assert meta["bench"]["train_seconds"] >= sum(meta["bench"]["epoch_seconds"])
    a, b = load_model(straight)[0].state_dict(), load_model(resumed)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_report_carries_rows_of_an_earlier_report_for_runs_not_in_the_store(fixture_db, tmp_path, capsys):
    """A store lost with its machine: the committed JSON report fills the rows none of whose runs is in
    the new store, marked as carried; rows with runs (finished or failed) come from the store."""
    from fipurify.bench.report import load_carry
    from fipurify.cli import main

    spec, store = fixture_db
    earlier = json.loads(to_json(build_table(spec, store)))
    (tmp_path / "old.json").write_text(json.dumps(earlier))
    fresh = ResultStore(tmp_path / "new.sqlite")
    fresh.save_spec(spec.name, spec.raw)
    for row in store.rows([r.key for r in spec.runs()]):  # the new machine reran only blend / ft
        if (row["attack"], row["defense"]) == ("blend", "ft"):
            fresh.record({**row, "acc": 0.70})
    t = build_table(spec, fresh, load_carry(tmp_path / "old.json", spec))
    rows = {(r.dims["attack"], r.dims["defense"]): r for r in t.rows}
    assert rows[("blend", "ft")].cells["acc"].mean == pytest.approx(0.70) and rows[("blend", "ft")].carried_from is None
    ffip = rows[("badnets", "ffip")]
    assert ffip.carried_from == earlier["generated_at"] and ffip.n_ok == 2
    assert ffip.cells["acc"].mean == pytest.approx(0.86) and ffip.cells["acc"].std == pytest.approx(0.014142, abs=1e-5)
    assert "asr" in ffip.best  # carried rows compete for best like the others
    assert rows[("blend", "ffip")].carried_from is None  # it had no finished run before either
    assert t.n_ok == 2 and t.n_carried == 8 and not any(m.startswith("badnets/") for m in t.missing)
    md = to_markdown(t)
    assert "| badnets | ffip | **86.00 ± 1.41** |" in md and "| 2† |" in md and "| blend | ft | 70.00 ± 0.00 |" in md
    assert f"generated {earlier['generated_at']}" in md and "8 carried from an earlier report" in md
    doc = json.loads(to_json(t))
    assert next(r for r in doc["rows"] if r["defense"] == "ffip" and r["attack"] == "badnets")["carried_from"] \
        == earlier["generated_at"]
    # carried again: the original date stays
    again = build_table(spec, fresh, load_carry_doc := json.loads(to_json(t)))
    assert {r.carried_from for r in again.rows if r.carried_from} == {earlier["generated_at"]}
    assert load_carry_doc["n_carried"] == 8
    fresh.close()

    # the CLI: --carry; a report of another spec or a file that is not one is refused in one line
    out = tmp_path / "rep"
    assert main(["report", str(tmp_path / "new.sqlite"), "--carry", str(tmp_path / "old.json"), "--out", str(out),
                 "--no-figures", "--format", "md", "--quiet"]) == 0
    assert "2†" in (out / "tiny.md").read_text()
    (tmp_path / "other.json").write_text(json.dumps({**earlier, "spec": "other"}))
    (tmp_path / "bad.json").write_text("{not json")
    for bad, msg in (("other.json", "reports spec 'other'"), ("bad.json", "not a readable JSON report")):
        capsys.readouterr()
        assert main(["report", str(tmp_path / "new.sqlite"), "--carry", str(tmp_path / bad), "--out", str(out),
                     "--format", "md", "--quiet"]) == 2
        assert msg in capsys.readouterr().err
