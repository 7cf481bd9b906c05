"""Activation bounds as part of a model (fipurify.models.bounded), activation clipping (act-clip)
and running registered methods in sequence (detect-unlearn-clip)."""
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fipurify.defenses import DEFENSES
from fipurify.errors import ConfigError, ModelFileError
from fipurify.io import load_model, save_model
from fipurify.models.bounded import (BoundedActivation, activations_in_order, bounded_channels, insert_bounds,
                                     remove_bounds)


class Reordered(nn.Module):
    """Registers ``late`` before ``early`` but calls ``early`` first."""

    def __init__(self):
        super().__init__()
        self.late = nn.ReLU()
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
        self.early = nn.ReLU()
        self.conv2 = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        x = self.late(self.conv2(self.early(self.conv1(x))))
        return self.head(x.mean((2, 3)))


def test_a_bound_caps_each_channel_and_inf_leaves_it():
    act = BoundedActivation(nn.ReLU(), 3, torch.tensor([0.5, float("inf"), 0.0]))
    x = torch.tensor([[-1.0, 2.0, 3.0]]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = act(x)
    assert torch.equal(out[:, 0], torch.full((2, 2, 2), 0.0))  # relu(-1) = 0 <= 0.5
    assert torch.equal(out[:, 1], torch.full((2, 2, 2), 2.0))  # no bound
    assert torch.equal(out[:, 2], torch.full((2, 2, 2), 0.0))  # cut to 0
    assert torch.equal(BoundedActivation(nn.ReLU(), 3, torch.tensor([0.5, 9.0, 1.0]))(x)[:, 0], out[:, 0])
    with pytest.raises(RuntimeError, match="expects 3 channels"):
        act(torch.ones(1, 4, 2, 2))
    with pytest.raises(ConfigError, match="one value per channel"):
        BoundedActivation(nn.ReLU(), 3, torch.ones(2))


def test_activations_come_in_forward_order_and_shared_ones_are_refused():
    m = Reordered()
    assert activations_in_order(m, torch.rand(1, 1, 5, 5)) == [("early", 2), ("late", 3)]
    shared = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1))
    shared.append(shared[1])
    with pytest.raises(ConfigError, match="called more than once"):
        activations_in_order(shared, torch.rand(1, 1, 3, 3))
    assert activations_in_order(shared, torch.rand(1, 1, 3, 3), skip_shared=True) == []
    insert_bounds(m, {"early": 2})  # a bounded module is listed under its wrapper's name, once
    assert activations_in_order(m, torch.rand(1, 1, 5, 5)) == [("early", 2), ("late", 3)]


def test_bounds_go_on_and_off_and_survive_save_and_load(tmp_path):
    torch.manual_seed(0)
    m = Reordered().eval()
    x = torch.rand(4, 1, 5, 5)
    plain = m(x)
    insert_bounds(m, {"early": torch.tensor([0.01, 0.02]), "late": 3})
    assert bounded_channels(m) == {"early": 2, "late": 3}
    assert torch.isinf(m.late.bound).all()
    clipped = m(x)
    assert not torch.allclose(clipped, plain)
    path = save_model(m, tmp_path / "m.safetensors", {"arch": "tests.test_act_clip:Reordered"})
    back, _ = load_model(path)
    assert bounded_channels(back) == {"early": 2, "late": 3}
    assert torch.equal(back.early.bound, torch.tensor([0.01, 0.02])) and torch.allclose(back(x), clipped)
    again = save_model(back, tmp_path / "again.safetensors")  # spec inferred from the class, bounds apart
    assert torch.allclose(load_model(again)[0](x), clipped)
    remove_bounds(m)
    assert bounded_channels(m) == {} and torch.allclose(m(x), plain)
    with pytest.raises(ConfigError, match="not an activation"):
        insert_bounds(m, {"conv1": 2})
    with pytest.raises(ConfigError, match="no module"):
        insert_bounds(m, {"nowhere": 2})


def test_a_file_whose_bounds_do_not_fit_its_architecture_is_refused(tmp_path, monkeypatch):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    m = insert_bounds(Reordered(), {"early": 2})
    path = save_model(m, tmp_path / "m.safetensors", {"arch": "tests.test_act_clip:Reordered"})
    with safe_open(str(path), framework="pt") as f:
        doc = json.loads(f.metadata()["fipurify"])
    doc["activation_bounds"] = {"conv1": 2}
    save_file(load_file(str(path)), str(tmp_path / "bad.safetensors"), metadata={"fipurify": json.dumps(doc)})
    with pytest.raises(ModelFileError, match="activation bounds"):
        load_model(tmp_path / "bad.safetensors")


class Toy(nn.Module):
    """Channels 0 and 1 carry the clean task (the brightness of the left and of the right half,
    compared by the head); channel 2 is a 'trigger' channel, large only when pixel (0, 0) is
    bright, that sends the input to class 0. On clean images (pixels <= 0.5) it stays under 0.5."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 4, bias=True)
        self.relu = nn.ReLU()
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            w = torch.zeros(3, 1, 4, 4)
            w[0, 0, :, :2], w[1, 0, :, 2:] = 1.0, 1.0
            w[0, 0, 0, 0] = 0.0  # the trigger pixel is no part of the clean task
            w[2, 0, 0, 0] = 20.0
            self.conv.weight.copy_(w)
            self.conv.bias.copy_(torch.tensor([0.0, 0.0, -9.5]))
            self.head.weight.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.relu(self.conv(x)).flatten(1))


def _toy_data(n, seed, trigger=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, generator=g) * 0.5
    y = (x[:, 0, :, :2].sum((1, 2)) - x[:, 0, 0, 0] < x[:, 0, :, 2:].sum((1, 2))).long()
    if trigger:
        x[:, 0, 0, 0] = 1.0
    return x, y


class Functional(nn.Module):
    """Calls torch.relu instead of an nn.ReLU module: nothing for the clipping to bound."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 4)

    def forward(self, x):
        return torch.relu(self.conv(x)).flatten(1)


def test_act_clip_cuts_what_clean_data_does_not_need():
    """The learned bound on the trigger channel falls below its clean maximum (the clean outputs
    barely need it), the clipped model agrees with the original on >= 98 % of the clean images, and
    the trigger no longer flips class-1 images to class 0; no weight changes."""
    torch.manual_seed(0)
    model = Toy().eval()
    x, y = _toy_data(400, 0)
    xt, yt = _toy_data(400, 1, trigger=True)
    victims = yt == 1
    assert (model(xt[victims]).argmax(1) == 0).float().mean() == 1.0  # the 'backdoor' works
    d = DEFENSES.create("act-clip", epochs=30, holdout=0.1)
    out = d.purify(model, TensorDataset(x, y), progress=False)
    rep = d.report
    assert rep["bounded"] == {"relu": 3} and rep["n_trainable"] == 3
    assert rep["agreement"] >= 0.98 and rep["holdout_agreement"] >= 0.9
    bound = out.relu.bound
    clean_max = model.relu(model.conv(x)).amax((0, 2, 3))
    assert (bound <= clean_max + 1e-6).all() and bound[2] < 0.5 * clean_max[2]
    flips = float((out(xt[victims]).argmax(1) == 0).float().mean())
    assert flips < 0.1, flips
    with torch.no_grad():
        assert (out(x).argmax(1) == model(x).argmax(1)).float().mean() >= 0.97
    assert all(torch.equal(a, b) for a, b in zip(out.parameters(), model.parameters()))
    assert bounded_channels(model) == {}  # the input model is left as it was
    assert len(rep["history"]) == 30 and all("seconds" in h for h in rep["history"])
    again = DEFENSES.create("act-clip", epochs=3).purify(out, TensorDataset(x, y), progress=False)
    assert bounded_channels(again) == {"relu": 3}  # clipping a clipped model tightens, never nests
    assert (again.relu.bound <= out.relu.bound + 1e-6).all()


def test_mixtures_lie_between_two_classes():
    from fipurify.defenses.act_clip import mixed_images

    x = torch.cat([torch.zeros(5, 1, 2, 2), torch.ones(5, 1, 2, 2)])
    classes = torch.tensor([0] * 5 + [1] * 5)
    m = mixed_images(x, classes, seed=0)
    lam0 = 1 - m[:5].flatten(1)  # a class-0 image (zeros) mixed with a class-1 one (ones): 1 - lam everywhere
    assert torch.allclose(lam0, lam0[:, :1].expand_as(lam0)) and ((lam0 > 0) & (lam0 < 1)).all()
    assert ((m[5:] > 0) & (m[5:] < 1)).all()
    assert torch.equal(m, mixed_images(x, classes, seed=0)) and not torch.equal(m, mixed_images(x, classes, seed=1))


def test_images_learned_by_heart_hide_what_mixtures_show():
    """Clean images far from the boundary (one half bright, the other dark) agree under bounds that move
    the boundary a long way; their mixtures do not. ``agreement_on="clean+mixed"`` keeps the bounds at
    which both agree; its records show both agreements, and every kept epoch meets both."""
    torch.manual_seed(0)
    model = Toy().eval()
    g = torch.Generator().manual_seed(0)
    y = torch.randint(2, (400,), generator=g)
    x = torch.rand(400, 1, 4, 4, generator=g) * 0.5
    x[y == 0, :, :, 2:] *= 0.1
    x[y == 1, :, :, :2] *= 0.1
    x[:, 0, 0, 0] = 0.0
    from fipurify.defenses.act_clip import mixed_images

    mixed = mixed_images(x, model(x).argmax(1), 0)
    agree = {}
    for on in ("clean", "clean+mixed"):
        d = DEFENSES.create("act-clip", epochs=30, agreement_on=on)
        out = d.purify(model, TensorDataset(x, y), progress=False)
        with torch.no_grad():
            agree[on] = float((out(mixed).argmax(1) == model(mixed).argmax(1)).float().mean())
        assert d.report["agreement"] >= 0.98
    assert agree["clean"] < 0.9 and agree["clean+mixed"] >= 0.98
    rep = d.report
    assert rep["mixed_agreement"] == pytest.approx(agree["clean+mixed"])
    assert all(h["kept"] == (min(h["agreement"], h["mixed_agreement"]) >= 0.98) for h in rep["history"])
    with pytest.raises(ConfigError, match="agreement_on"):
        DEFENSES.create("act-clip", agreement_on="mixed")


def test_act_clip_refuses_bad_options_and_models_without_activation_modules():
    with pytest.raises(ConfigError, match="agreement"):
        DEFENSES.create("act-clip", agreement=0)
    with pytest.raises(ConfigError, match="layers"):
        DEFENSES.create("act-clip", layers=1.5)
    x, y = _toy_data(40, 0)
    with pytest.raises(ConfigError, match="has none"):
        DEFENSES.create("act-clip").purify(Functional(), TensorDataset(x, y), progress=False)


def test_a_sequence_runs_its_steps_in_order_and_reports_each():
    torch.manual_seed(0)
    model = Toy()
    x, y = _toy_data(200, 0)
    seen = []
    d = DEFENSES.create("sequence", steps=("ft", "act-clip"),
                        options={"ft": {"epochs": 2, "batch_size": 50, "augment": False}, "act-clip": {"epochs": 3}})
    out = d.purify(model, TensorDataset(x, y), progress=False, callback=lambda r: seen.append(r["step"]))
    rep = d.report
    assert [s["method"] for s in rep["steps"]] == ["ft", "act-clip"]
    assert seen == ["ft", "ft", "act-clip", "act-clip", "act-clip"]
    assert [h["step"] for h in rep["history"]] == seen
    assert rep["bounded"] == {"relu": 3}  # act-clip's own field, lifted
    assert rep["n_trainable"] == sum(s["n_trainable"] for s in rep["steps"])
    assert rep["seconds"]["total"] >= rep["seconds"]["ft"] + rep["seconds"]["act-clip"] - 1e-6
    assert not torch.equal(out.conv.weight, model.conv.weight)  # ft changed it, act-clip bounded it
    assert bounded_channels(out) == {"relu": 3}


def test_a_sequence_refuses_before_any_step_computes():
    x, y = _toy_data(40, 0)
    seen = []
    with pytest.raises(ConfigError, match="has none"):  # act-clip's refusal, before ft trains
        DEFENSES.create("sequence", steps=("ft", "act-clip")).purify(
            Functional(), TensorDataset(x, y), progress=False, callback=seen.append)
    assert seen == []
    d = DEFENSES.create("sequence", steps=("ft", "act-clip"), optional=("act-clip",),
                        options={"ft": {"epochs": 1, "augment": False}})
    d.purify(Functional(), TensorDataset(x, y), progress=False, callback=seen.append)  # act-clip left out
    assert [s["method"] for s in d.report["steps"]] == ["ft"] and len(seen) == 1
    assert "has none" in d.report["skipped_steps"]["act-clip"]
    with pytest.raises(ConfigError, match="no step"):
        DEFENSES.create("sequence", steps=("act-clip",), optional=("act-clip",)).purify(
            Functional(), TensorDataset(x, y), progress=False)
    with pytest.raises(ConfigError, match="optional for ft"):
        DEFENSES.create("sequence", steps=("act-clip",), optional=("ft",))
    assert DEFENSES.create("detect-unlearn-clip").config.optional == ("act-clip",)
    with pytest.raises(ConfigError, match="unknown method"):
        DEFENSES.create("sequence", steps=("ft", "no-such-method"))
    with pytest.raises(ConfigError, match="not a step"):
        DEFENSES.create("detect-unlearn-clip", options={"ft": {"epochs": 1}})
    with pytest.raises(ConfigError, match="at least one step"):
        DEFENSES.create("sequence")
    with pytest.raises(ConfigError, match="itself a sequence"):
        DEFENSES.create("detect-unlearn-clip", steps=("detect-unlearn-clip",))
    assert DEFENSES.create("detect-unlearn-clip").config.steps == ("detect-unlearn", "act-clip")


def test_act_clip_refuses_a_model_without_feature_maps_and_the_default_leaves_it_out():
    """An MLP's activations are (N, D) vectors, not (N, C, H, W) maps: act-clip refuses it in one line,
    and a sequence with the clipping optional goes on without it (the model as the step before left it)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    x, y = _toy_data(60, 0)
    with pytest.raises(ConfigError, match="feature maps"):
        DEFENSES.create("act-clip", epochs=1).purify(mlp, TensorDataset(x, y), progress=False)
    d = DEFENSES.create("sequence", steps=("ft", "act-clip"), optional=("act-clip",),
                        options={"ft": {"epochs": 1, "augment": False}})
    out = d.purify(mlp, TensorDataset(x, y), progress=False)
    assert "feature maps" in d.report["skipped_steps"]["act-clip"] and bounded_channels(out) == {}
    assert [s["method"] for s in d.report["steps"]] == ["ft"]
    with pytest.raises(ConfigError, match="no step"):
        DEFENSES.create("sequence", steps=("act-clip",), optional=("act-clip",), epochs=1).purify(
            mlp, TensorDataset(x, y), progress=False)
    assert activations_in_order(Reordered(), torch.rand(1, 1, 5, 5), ndim=2) == []


def test_options_not_of_the_sequence_go_to_every_step_that_takes_them():
    d = DEFENSES.create("sequence", steps=("ft", "act-clip"), epochs=3, agreement=0.9,
                        options={"act-clip": {"epochs": 7}})
    ft, clip = d.make_steps()
    assert ft.config.epochs == 3 and clip.config.epochs == 7 and clip.config.agreement == 0.9
    assert not hasattr(ft.config, "agreement")
    with pytest.raises(ConfigError, match="unknown option.*bogus"):
        DEFENSES.create("sequence", steps=("ft", "act-clip"), bogus=1)
    default = DEFENSES.create("detect-unlearn-clip-all", epochs=2)
    assert [s.config.epochs for s in default.make_steps()] == [2, 2]
    assert default.make_steps()[1].config.layers == 1.0
