"""The Ray backend of ``fipurify bench``: the same rows as the local process pool, resume, --only, --timeout."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")  # in the dev extra, so CI runs this

from fipurify.bench.runner import BenchOptions, run_bench  # noqa: E402
from fipurify.bench.spec import load_spec  # noqa: E402
from fipurify.cli import main  # noqa: E402

# tests/test_bench.py's TINY pattern (width-4 PreActResNet18, synthetic data, 1 epoch), with a little
# more data and a smaller step so that the numbers differ between runs (not all at chance level).
TINY = """
name = "tiny-ray"

[data]
name = "synthetic"
reserve = 40
options = { n = 400, num_classes = 4, image_size = 16 }

[model]
arch = "preactresnet18"
width = 4

[training]
epochs = 1
lr = 0.02
batch_size = 16
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
name = "none"

[[defenses]]
name = "ft"
options = { epochs = 1, batch_size = 16 }

[[defenses]]
name = "ffip"
options = { epochs = 1, batch_size = 16 }
"""

COMPARED = ("acc", "asr", "lcr", "der", "acc_before", "asr_before")


def _rows(db: Path) -> dict[str, dict]:
    con = sqlite3.connect(str(db))
    con.row_factory = sqlite3.Row
    try:
        return {r["label"]: dict(r) for r in con.execute("SELECT * FROM results")}
    finally:
        con.close()


def _bench(tmp: Path, name: str, *extra: str) -> list[str]:
    return ["bench", str(tmp / "tiny.toml"), "--db", str(tmp / f"{name}.sqlite"), "--cache", str(tmp / f"cache-{name}"),
            "--threads", "1", "--quiet", "--backend", "ray", *extra]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance with two CPUs; the runner uses it as it is (and leaves it running)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_backend_stores_the_local_backends_numbers_and_resumes(tmp_path, local_ray, capsys):
    (tmp_path / "tiny.toml").write_text(TINY)
    spec = load_spec(tmp_path / "tiny.toml")

    # Reference: the local process pool.
    ref = BenchOptions(db=tmp_path / "local.sqlite", cache=tmp_path / "cache-local", jobs=2, threads=1, progress=False)
    assert run_bench(spec, ref)["ok"] == 6
    expected = _rows(ref.db)

    # Ray, part 1: --only ft trains both models (once each) and purifies their ft runs.
    assert main(_bench(tmp_path, "ray", "--jobs", "2", "--only", "ft")) == 0
    first = _rows(tmp_path / "ray.sqlite")
    assert sorted(first) == ["badnets/ft/n20/s0", "blend/ft/n20/s0"]
    models = sorted(p.name for p in (tmp_path / "cache-ray").glob("*.safetensors"))
    assert models == sorted(p.name for p in (tmp_path / "cache-local").glob("*.safetensors")) and len(models) == 2
    capsys.readouterr()

    # Part 2, resumed: finished runs and cached models are skipped, the rest run.
    assert main(_bench(tmp_path, "ray", "--jobs", "2")) == 0
    err = capsys.readouterr().err
    assert "2 already done, 4 to run, 0 models to train" in err, err
    rows = _rows(tmp_path / "ray.sqlite")
    assert sorted(rows) == sorted(expected)
    for label, row in first.items():  # not repeated
        assert (rows[label]["finished_at"], rows[label]["attempts"]) == (row["finished_at"], 1)
    for label, want in expected.items():  # same seeds -> the same numbers
        got = rows[label]
        assert got["status"] == "ok" and got["run_key"] == want["run_key"], label
        assert {k: got[k] for k in COMPARED} == {k: want[k] for k in COMPARED}, label
    assert len({r["acc"] for r in rows.values()}) > 2  # the comparison can tell runs apart
    purified = [r for r in rows.values() if r["defense"] != "none"]
    assert all(r["threads"] == 1 and r["code_hash"] for r in purified)
    assert all(str(tmp_path / "cache-ray") in r["details"] for r in purified)  # names the driver's cached file

    # Nothing left: the third call runs nothing.
    assert main(_bench(tmp_path, "ray")) == 0
    assert "6 already done, 0 to run" in capsys.readouterr().err


@pytest.mark.slow
def test_ray_backend_timeout_fails_the_run_and_its_model(tmp_path, local_ray):
    (tmp_path / "tiny.toml").write_text(TINY)
    assert main(_bench(tmp_path, "t", "--only", "badnets/ft/*", "--timeout", "0.2")) == 1
    rows = _rows(tmp_path / "t.sqlite")
    assert list(rows) == ["badnets/ft/n20/s0"] and rows["badnets/ft/n20/s0"]["status"] == "failed"
    assert "timed out after" in rows["badnets/ft/n20/s0"]["error"]
    assert not list((tmp_path / "cache-t").glob("*.safetensors"))


def test_backend_ray_without_ray_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny.toml").write_text(TINY)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(_bench(tmp_path, "none")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fipurify: error: --backend ray needs Ray") and "\n" not in err, err
    assert not (tmp_path / "none.sqlite").exists()
    assert main(["bench", str(tmp_path / "tiny.toml"), "--db", str(tmp_path / "x.sqlite"), "--address", "auto"]) == 2
    assert "use it with --backend ray" in capsys.readouterr().err


def test_importing_fipurify_and_the_local_backend_does_not_import_ray():
    code = ("import sys, fipurify, fipurify.cli, fipurify.bench, fipurify.bench.runner, fipurify.bench.commands; "
            "from fipurify.cli import build_parser; build_parser(); assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
