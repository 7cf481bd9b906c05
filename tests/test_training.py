import pytest
import torch

from fipurify import attacks
from fipurify.datasets.synthetic import synthetic
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


@pytest.fixture(scope="module")
def train():
    return synthetic(n=400, num_classes=4, image_size=16, seed=0, split="train")


# the adaptive attack (TrainConfig.smoothness_penalty)
def test_smoothness_penalty_lowers_the_fisher_trace(train):
    """Training with eta_F * Tr(F) ends in a flatter minimum (lower Tr(F)) than without.

    A small BatchNorm-free CNN: with BatchNorm the trace measured after a 4-epoch run on
    this data swings by 5x between seeds (it mostly reflects how confident the fit ended),
    which hides the penalty's effect; without it the penalty lowers the trace on every
    seed tried (0-9: ratio 0.3 to 0.7).
    """
    from torch import nn

    from fipurify.curvature.fisher import fisher_trace

    data = attacks.create("badnets", poison_rate=0.2).poison(train)
    x = data.as_arrays()[0][:200]
    traces = []
    for eta in (0.0, 0.1):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(16, 4))
        train_model(model, data, TrainConfig(epochs=4, lr=0.05, batch_size=32, augment=False,
                                             smoothness_penalty=eta), progress=False, log=None)
        model.eval()
        traces.append(fisher_trace(model, x, list(model.parameters()), "exact-expected",
                                   create_graph=False, sub_batch=200).item())
    assert traces[1] < 0.8 * traces[0]
    with pytest.raises(ConfigError):
        TrainConfig(smoothness_penalty=-1).validate()
    with pytest.raises(ConfigError):
        TrainConfig(smoothness_interval=0).validate()


# resumable training (checkpoint=..., fipurify.train_state)
class _Interrupt(Exception):
    pass


def _resume_model():
    from fipurify import models

    torch.manual_seed(3)
    return models.create("preactresnet18", num_classes=4, width=4, input_size=16)


@pytest.mark.parametrize("schedule", ["onecycle", "step"])
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, schedule):
    """Killed after epoch 2 of 3 and resumed from its checkpoint, the run ends with the same weights,
    bit for bit, as the run that was never stopped (same batches, augmentation and learning rates)."""
    data = synthetic(n=96, num_classes=4, image_size=16, seed=2)
    cfg = TrainConfig(epochs=3, lr=0.05, batch_size=32, seed=7, schedule=schedule, step_epochs=1)
    straight = _resume_model()
    full = train_model(straight, data, cfg, progress=False, log=None)

    ckpt = tmp_path / "run.pt"
    stopped = _resume_model()

    def stop_after_two(rec):
        if rec["epoch"] == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train_model(stopped, data, cfg, progress=False, log=None, checkpoint=ckpt, callback=stop_after_two)
    resumed, lines = _resume_model(), []  # a fresh process: new weights, the file is all it has
    hist = train_model(resumed, data, cfg, progress=False, log=lines.append, checkpoint=ckpt)
    assert "resuming after epoch 2" in lines[0]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert [h["loss"] for h in hist] == [h["loss"] for h in full]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # a finished run's file returns at once with its history, the model as trained
    again = _resume_model()
    assert train_model(again, data, cfg, progress=False, log=None, checkpoint=ckpt) == hist
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), resumed.state_dict().values()))


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    from fipurify.errors import ModelFileError

    data = synthetic(n=64, num_classes=4, image_size=16)
    ckpt = tmp_path / "run.pt"
    train_model(_resume_model(), data, TrainConfig(epochs=1, batch_size=32), progress=False, log=None,
                checkpoint=ckpt)
    with pytest.raises(ConfigError, match="another run.*lr"):
        train_model(_resume_model(), data, TrainConfig(epochs=1, batch_size=32, lr=0.01), progress=False,
                    log=None, checkpoint=ckpt)
    with pytest.raises(ConfigError, match="batches per epoch"):
        train_model(_resume_model(), synthetic(n=160, num_classes=4, image_size=16),
                    TrainConfig(epochs=1, batch_size=32), progress=False, log=None, checkpoint=ckpt)
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFileError, match="not a readable"):
        train_model(_resume_model(), data, TrainConfig(epochs=1, batch_size=32), progress=False, log=None,
                    checkpoint=bogus)


def test_a_history_with_numpy_scalars_still_resumes(tmp_path):
    """Metrics of other tasks may come back as numpy scalars; the state file must still load with
    weights_only=True (plain Python values are stored)."""
    import numpy as np

    from fipurify import train_state

    model = _resume_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    path = train_state.save(tmp_path / "s.pt", config={"epochs": 2}, batches_per_epoch=3, epoch=1, step=3,
                            model=model, optimizer=opt, scheduler=sched, generators={"data": torch.Generator()},
                            history=[{"epoch": 1, "mAP": np.float64(0.5), "n": np.int64(3), "acc": torch.tensor(0.25)}])
    state = train_state.load(path, config={"epochs": 2}, batches_per_epoch=3)
    assert state["history"] == [{"epoch": 1, "mAP": 0.5, "n": 3, "acc": 0.25}]
    assert train_state.epochs_done(path) == 1
