"""The one purify path (fipurify.purification), the Defense template method, and the curvature package's place.

The bit-identical test pins purified weights recorded with the code *before* the template
method and the one purify path were introduced (the defenses as of commit ebc30d7): the same seed must give
the same numbers, bit for bit. The hashes hold on the machine they were recorded on; where
this platform trains the shared fixture to other bits (another CPU kernel, another torch),
the comparison is skipped rather than failed.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
from pathlib import Path

import pytest
import torch

from fipurify import defenses
from fipurify.defenses.base import Defense, Step
from fipurify.purification import Purification, defense_for, purify_model
from fipurify.workflow import DataBundle

#: sha256[:16] over the sorted state dict of the conftest ``tiny_backdoor`` model, as recorded.
FIXTURE_STATE = "275861c6f664fc3e"

#: method -> sha256[:16] of its purified state dict (options epochs=2, seed=3), recorded before the change.
RECORDED = {"ffip": "c90ce6e597ee64f1", "fip": "af1c63929ae94012", "ft": "a969d83eec8c6a7a",
            "i-bau": "9cb93f873bb3aa3e", "awm": "8fdf795b618140de", "rnp": "2dde1170bb474799",
            "nad": "9d83b4329369c0c4", "fst": "0a08c96acaefdd26", "sau": "b46b5371c58d289a",
            "ft-sam": "5e609b90136df67c", "fp": "ada722edb3f5b6a6"}


def state_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("method", sorted(RECORDED))
def test_purified_weights_are_bit_identical_to_the_recorded_ones(tiny_backdoor, method):
    model = tiny_backdoor["model"]
    if state_hash(model) != FIXTURE_STATE:
        pytest.skip("this platform trains the fixture to other bits; the recorded hashes do not apply")
    torch.manual_seed(12345)  # whatever the global state, the defense seeds itself
    purified = defenses.create(method, epochs=2, seed=3).purify(model, tiny_backdoor["reserve"], progress=False)
    assert state_hash(purified) == RECORDED[method]
    assert state_hash(model) == FIXTURE_STATE  # the input model is left unchanged


def _bundle(tb) -> tuple[DataBundle, dict]:
    meta = {"attack": tb["attack"].to_spec(), "dataset": {"name": "synthetic"}}
    return DataBundle(tb["train"], tb["reserve"], tb["test"], {}, {"name": "synthetic"}), meta


def test_purify_model_reports_before_after_and_der(tiny_backdoor):
    from fipurify.metrics import defense_effectiveness_rate, evaluate

    bundle, meta = _bundle(tiny_backdoor)
    calls = []

    def verify(model, clean):
        calls.append(("before", len(clean)))
        return lambda purified: calls.append(("after", purified)) or {"checked": True}

    @contextlib.contextmanager
    def meter():
        calls.append("metered")
        yield

    res = purify_model(tiny_backdoor["model"], meta, "ft", tiny_backdoor["reserve"], options={"epochs": 1},
                       test=bundle, verify=verify, meter=meter)
    assert isinstance(res, Purification) and res.model is not tiny_backdoor["model"]
    assert calls[0] == ("before", len(tiny_backdoor["reserve"])) and calls[1] == "metered" and calls[2][0] == "after"
    rep = res.report
    assert rep["detector"] == {"checked": True} and rep["method"] == "ft" and rep["clean_size"] == 120
    assert rep["before"] == evaluate(tiny_backdoor["model"], tiny_backdoor["test"], tiny_backdoor["backdoor_test"])
    assert rep["after"] == evaluate(res.model, tiny_backdoor["test"], tiny_backdoor["backdoor_test"])
    assert res.der == rep["der"] == defense_effectiveness_rate(rep["before"], rep["after"])
    assert res.wall_seconds > 0 and res.defense.report["config"]["epochs"] == 1


def test_purify_model_takes_given_before_metrics_and_no_evaluation(tiny_backdoor):
    bundle, meta = _bundle(tiny_backdoor)
    given = {"acc": 0.5, "asr": None, "lcr": None}
    res = purify_model(tiny_backdoor["model"], meta, defense_for("ft", "synthetic", epochs=1),
                       tiny_backdoor["reserve"], test=bundle, before=given)
    assert res.before is given and res.der is None and res.after["asr"] is not None
    plain = purify_model(tiny_backdoor["model"], meta, defense_for("ft", None, epochs=1), tiny_backdoor["reserve"])
    assert plain.before is None and plain.after is None and "der" not in plain.report
    with pytest.raises(TypeError, match="options"):
        purify_model(tiny_backdoor["model"], meta, defense_for("ft"), tiny_backdoor["reserve"], options={"epochs": 1})


def test_defense_for_uses_the_dataset_preset_only_where_one_exists():
    assert defense_for("ffip", "cifar10", seed=1).config.epochs == defenses.PAPER_PRESETS["cifar10"]["epochs"]
    assert defense_for("ffip", "synthetic").config == defenses.create("ffip").config
    assert defense_for("i-bau", "cifar10").config == defenses.create("i-bau", dataset="cifar10").config


def test_template_method_splits_copies_seeds_and_reports(tiny_backdoor):
    seen = {}

    class Probe(Defense):
        name = "probe"

        def _purify(self, model, train_set, holdout, *, progress, callback):
            seen.update(model=model, n=len(train_set), holdout=len(holdout), draw=torch.rand(1))
            return Step(model, [{"epoch": 1, "seconds": 0.5}], 7, {"setup": 0.25}, {"note": "x"})

    d = Probe(seed=5, holdout=0.25)
    out = d.purify(tiny_backdoor["model"], tiny_backdoor["reserve"], progress=False)
    assert out is seen["model"] and out is not tiny_backdoor["model"]
    assert (seen["n"], seen["holdout"]) == (90, 30)
    torch.manual_seed(5)
    assert torch.equal(seen["draw"], torch.rand(1))  # the step ran seeded with config.seed
    r = d.report
    assert (r["method"], r["n_clean_train"], r["n_holdout"], r["n_trainable"], r["note"]) == ("probe", 90, 30, 7, "x")
    assert list(r["seconds"]) == ["total", "setup", "train"] and r["seconds"]["train"] == 0.5
    assert r["history"] == [{"epoch": 1, "seconds": 0.5}]

    class Nothing(Defense):
        name = "nothing"

    with pytest.raises(NotImplementedError):
        Nothing().purify(tiny_backdoor["model"], tiny_backdoor["reserve"])


def test_curvature_imports_point_down():
    """fipurify.curvature imports only itself, fipurify.errors and fipurify.tasks (the likelihood it
    takes the Fisher of; never defenses, training or analysis)."""
    root = Path(__import__("fipurify.curvature", fromlist=["x"]).__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 or node.module in ("errors", "tasks"), f"{path.name} imports ..{node.module}"
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                assert not node.module.startswith("fipurify"), f"{path.name} imports {node.module}"
