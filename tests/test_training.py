import pytest
import torch

from fipurify.errors import ConfigError, DataError
from fipurify.metrics import evaluate
from fipurify.training import TrainConfig, train_model


def test_end_to_end_backdoor_reaches_high_asr(tiny_backdoor):
    r = evaluate(tiny_backdoor["model"], tiny_backdoor["test"], tiny_backdoor["backdoor_test"])
    assert r["acc"] >= 0.9
    assert r["asr"] >= 0.9
    hist = tiny_backdoor["history"]
    assert len(hist) == 6 and hist[-1]["asr"] == pytest.approx(r["asr"])


def test_training_is_seeded(tiny_backdoor):
    from fipurify import models
    from fipurify.datasets.synthetic import synthetic

    data = synthetic(n=64, num_classes=4, image_size=16)
    outs = []
    for _ in range(2):
        torch.manual_seed(1)
        m = models.create("preactresnet18", num_classes=4, width=4, input_size=16)
        train_model(m, data, TrainConfig(epochs=1, batch_size=16, seed=5), progress=False, log=None)
        outs.append(m(torch.ones(1, 3, 16, 16)))
    assert torch.equal(outs[0], outs[1])


def test_bad_config_and_class_mismatch():
    from fipurify import models
    from fipurify.datasets.synthetic import synthetic

    with pytest.raises(ConfigError, match="schedule"):
        TrainConfig(schedule="bogus").validate()
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(epochs=0).validate()
    m = models.create("preactresnet18", num_classes=3, width=4, input_size=16)
    with pytest.raises(DataError, match="class count mismatch"):
        train_model(m, synthetic(n=16, num_classes=4, image_size=16), TrainConfig(epochs=1), progress=False, log=None)
