"""The retuning attack (post-purification robustness): its poisoned images, its mechanism, the bench's [retune]."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fipurify import attacks, models
from fipurify.datasets.synthetic import synthetic
from fipurify.errors import ConfigError, DataError
from fipurify.metrics import evaluate
from fipurify.retune import RetuneConfig, poisoned_subset, retuned_metrics, retuning_attack
from fipurify.training import TrainConfig, train_model


@pytest.fixture(scope="module")
def clean_model():
    """A tiny model trained on clean synthetic data only: it has no backdoor to begin with."""
    train = synthetic(n=400, num_classes=4, image_size=16, seed=0, split="train")
    torch.manual_seed(0)
    model = models.create("preactresnet18", num_classes=4, width=4, input_size=16)
    train_model(model, train, TrainConfig(epochs=4, lr=0.05, batch_size=32, seed=0, augment=False),
                progress=False, log=None)
    return model.eval()


def test_poisoned_subset_is_the_attacks_trigger_and_target_on_a_seeded_share():
    clean = synthetic(n=100, num_classes=4, image_size=16, seed=0, split="reserve")
    attack = attacks.create("badnets", target=0, poison_rate=0.1, seed=0)
    sub = poisoned_subset(clean, attack, 0.05, seed=3)
    assert len(sub) == 5
    labels = [int(sub[i][1]) for i in range(len(sub))]
    assert labels == [0] * 5  # relabelled to the target
    source = attack.backdoor_test_set(clean)
    for i, j in enumerate(sub.indices):  # the attack's own triggered images, none of the target class
        assert torch.equal(sub[i][0], source[j][0])
    assert list(poisoned_subset(clean, attack, 0.05, seed=3).indices) == list(sub.indices)  # seeded
    assert len(poisoned_subset(clean, attack, 0.001, seed=0)) == 1  # at least one image
    only_target = clean.subset(np.flatnonzero(np.asarray([int(clean[i][1]) for i in range(len(clean))]) == 0))
    with pytest.raises(DataError, match="outside the target class"):
        poisoned_subset(only_target, attack, 0.05, seed=0)


def test_retuning_teaches_a_clean_model_the_trigger_and_leaves_the_input_model_alone(clean_model):
    """The mechanism: the poisoned images carry trigger -> target, so enough retuning implants the backdoor."""
    clean = synthetic(n=120, num_classes=4, image_size=16, seed=0, split="reserve")
    test = synthetic(n=200, num_classes=4, image_size=16, seed=0, split="test")
    attack = attacks.create("badnets", target=0, poison_rate=0.1, seed=0)
    before = {k: v.clone() for k, v in clean_model.state_dict().items()}
    asr_before = evaluate(clean_model, test, attack.backdoor_test_set(test))["asr"]
    cfg = RetuneConfig(epochs=10, lr=0.05, poison_fraction=0.25, batch_size=32)
    out = retuned_metrics(clean_model, clean, attack, test, cfg)
    assert out["n_poison"] == 30 and out["n_clean"] == 120 and out["epochs"] == 10
    assert asr_before < 0.3 and out["asr"] > asr_before + 0.5, (asr_before, out["asr"])
    assert all(torch.equal(v, before[k]) for k, v in clean_model.state_dict().items())  # input untouched
    assert not clean_model.training


def test_retune_config_is_checked_before_compute(clean_model):
    clean = synthetic(n=20, num_classes=4, image_size=16, seed=0, split="reserve")
    attack = attacks.create("badnets", target=0, poison_rate=0.1, seed=0)
    for bad, match in (({"epochs": 0}, "epochs"), ({"lr": -1}, "lr"), ({"poison_fraction": 0}, "poison_fraction"),
                       ({"batch_size": 1.5}, "batch_size")):
        with pytest.raises(ConfigError, match=match):
            retuning_attack(clean_model, clean, attack, RetuneConfig(**bad))
    with pytest.raises(ConfigError, match="unknown retune option"):
        RetuneConfig.from_dict({"epoch": 3})


def test_a_retune_spec_records_the_figures_and_keeps_plain_runs_apart(tmp_path):
    """``[retune]`` adds the retuning attack to every purify run (new run keys, same models); the
    report's ``asr_retuned`` / ``acc_retuned`` columns read it."""
    import tomllib

    from fipurify.bench import stages
    from fipurify.bench.report import metric_value
    from fipurify.bench.spec import parse_spec

    from test_bench import TINY

    doc = tomllib.loads(TINY)
    doc["attacks"] = doc["attacks"][:1]
    doc["defenses"] = [{"name": "ft", "options": {"epochs": 1, "batch_size": 16}}]
    plain = parse_spec(doc).runs()[0]
    run = parse_spec({**doc, "retune": {"epochs": 1, "poison_fraction": 0.1}}).runs()[0]
    assert run.key != plain.key and run.model_key == plain.model_key
    assert run.config["retune"] == {"epochs": 1, "lr": 0.01, "poison_fraction": 0.1, "batch_size": 128}
    path, _, _ = stages.train(run.model_config(), run.model_key, tmp_path, log=lambda m: None)
    row = stages.purify(run.config, path)
    rt = row["details"]["retune"]
    assert rt["n_poison"] == 2 and 0 <= rt["asr"] <= 1 and 0 <= rt["acc"] <= 1
    assert metric_value(row, "asr_retuned") == rt["asr"] and metric_value(row, "acc_retuned") == rt["acc"]
    assert "retune" not in stages.purify(plain.config, path)["details"]
    with pytest.raises(ConfigError, match="seed"):
        parse_spec({**doc, "retune": {"seed": 1}})
    with pytest.raises(ConfigError, match="retune.*epochs"):
        parse_spec({**doc, "retune": {"epochs": 0}})
