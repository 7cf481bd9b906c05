"""Tests of the model zoo: shapes, sizes, rebuild specs, normalisation, ViT parametrisability, errors."""
import json

import pytest
import torch
from torch import nn

from fipurify import models
from fipurify.errors import ConfigError, DataError
from fipurify.models import Normalize, create, dataset_stats

# Small versions of every model so that forward/backward passes stay fast on CPU.
SMALL = {
    "preactresnet18": {"width": 8},
    "resnet18": {"width": 8},
    "wideresnet16_1": {},
    "vgg11": {"width": 8},
    "vit_small": {"dim": 32, "depth": 2, "heads": 2},
}
RESNETS = ["preactresnet18", "resnet18", "wideresnet16_1"]


#: models of the other tasks, each tested in its task's file (test_pointcloud, test_translation, test_video)
OTHER_TASKS = {"pointnet", "pointnet2", "transformer-mt", "cnn-lstm"}


def test_available_lists_every_model():
    assert models.available() == sorted(set(SMALL) | OTHER_TASKS)


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("num_classes", [10, 43])
def test_forward_shape_32(name, num_classes):
    model = create(name, num_classes=num_classes, **SMALL[name]).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", RESNETS + ["vit_small"])
def test_forward_shape_64(name):
    model = create(name, num_classes=43, input_size=64, **SMALL[name]).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 43)


def test_vgg_accepts_tiny_images_and_one_channel():
    model = create("vgg", num_classes=5, in_channels=1, input_size=8, width=4).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 8, 8)).shape == (2, 5)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_classifier_and_features(name):
    model = create(name, num_classes=7, **SMALL[name]).eval()
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.out_features == 7
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.features(x)
        assert feats.shape == (2, model.classifier.in_features)
        torch.testing.assert_close(model.classifier(feats), model(x))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = create(name, num_classes=3, **SMALL[name]).train()
    model(torch.rand(2, 3, 32, 32)).logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_preactresnet18_parameter_counts():
    def count(width):
        return sum(p.numel() for p in create("preactresnet18", width=width).parameters())

    assert abs(count(64) - 11.17e6) / 11.17e6 < 0.01
    assert abs(count(16) - 0.70e6) / 0.70e6 < 0.01


@pytest.mark.parametrize("name", sorted(SMALL))
def test_spec_round_trip(name):
    mean, std = dataset_stats("gtsrb")
    model = create(name, num_classes=43, mean=mean, std=std, **SMALL[name]).eval()
    spec = json.loads(json.dumps(model.fipurify_spec))  # must survive JSON, as in a model file
    assert spec["arch"] == name
    assert spec["kwargs"]["mean"] == list(mean) and spec["kwargs"]["std"] == list(std)
    rebuilt = create(spec["arch"], **spec["kwargs"]).eval()
    a, b = model.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    rebuilt.load_state_dict(a)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    assert rebuilt.fipurify_spec == spec


def test_spec_fills_in_defaults_and_uses_canonical_names():
    spec = create("VIT", dim=32, depth=1, heads=2).fipurify_spec
    assert spec["arch"] == "vit_small"
    assert spec["kwargs"]["patch_size"] == 4 and spec["kwargs"]["mean"] == [0.5, 0.5, 0.5]
    assert create("vgg", width=4).fipurify_spec["arch"] == "vgg11"
    assert create("wideresnet16_1", depth=10, widen_factor=2).fipurify_spec["kwargs"]["depth"] == 10


def test_vit_has_only_conv_linear_layernorm_and_embedding_parameters():
    model = create("vit", dim=32, depth=2, heads=2)
    owners = {}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            owners[f"{mod_name}.{p_name}".lstrip(".")] = (type(module), p_name)
    for full, (kind, p_name) in owners.items():
        if kind in (nn.Conv2d, nn.Linear, nn.LayerNorm):
            assert p_name in ("weight", "bias"), full
        else:
            assert full in ("pos_embed", "cls_token"), full
    # All matrices live in Conv/Linear layers, so parametrize can reach every one of them.
    matrices = [n for n, p in model.named_parameters() if p.dim() >= 2 and n not in ("pos_embed", "cls_token")]
    assert matrices and all(owners[n][0] in (nn.Conv2d, nn.Linear) for n in matrices)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


def test_normalize_maps_mean_image_to_zero():
    mean, std = dataset_stats("CIFAR-10")
    assert mean == (0.4914, 0.4822, 0.4465) and std == (0.2470, 0.2435, 0.2616)
    layer = Normalize(mean, std)
    x = torch.tensor(mean).view(1, 3, 1, 1).expand(2, 3, 5, 5)
    torch.testing.assert_close(layer(x), torch.zeros(2, 3, 5, 5))
    one_std_up = x + torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(layer(one_std_up), torch.ones(2, 3, 5, 5))


def test_dataset_stats_fallbacks():
    assert dataset_stats("gtsrb")[0] == (0.3403, 0.3121, 0.3214)
    assert dataset_stats("unknown", 3) == ((0.5,) * 3, (0.5,) * 3)
    assert dataset_stats("cifar10", 1) == ((0.5,), (0.5,))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_normalisation_is_inside_the_model(name):
    mean, std = dataset_stats("cifar10")
    model = create(name, mean=mean, std=std, **SMALL[name])
    assert isinstance(next(iter(model.children())), Normalize)
    state = model.state_dict()
    torch.testing.assert_close(state["normalize.mean"].flatten(), torch.tensor(mean))
    torch.testing.assert_close(state["normalize.std"].flatten(), torch.tensor(std))


def test_wrong_input_shapes_raise_data_error():
    with pytest.raises(DataError, match="1, H, W"):
        create("resnet18", in_channels=1, width=4)(torch.rand(2, 3, 32, 32))
    with pytest.raises(DataError, match="32x32"):
        create("vit", dim=32, depth=1, heads=2)(torch.rand(2, 3, 64, 64))


def test_unknown_name_lists_known_models():
    with pytest.raises(ConfigError, match="preactresnet18.*vit_small"):
        create("alexnet")
    with pytest.raises(ConfigError):
        create(None)


def test_unknown_option_is_named():
    with pytest.raises(ConfigError, match="'depthh'.*options are: .*depth"):
        create("vit", depthh=3)
    with pytest.raises(ConfigError, match="'width'"):
        create("wideresnet16_1", width=8)


@pytest.mark.parametrize("name, kwargs", [
    ("preactresnet18", {"width": 0}),
    ("resnet18", {"width": "8"}),
    ("vgg11", {"width": 2.5}),
    ("resnet18", {"num_classes": 0}),
    ("resnet18", {"in_channels": True}),
    ("wideresnet16_1", {"depth": 15}),
    ("wideresnet16_1", {"dropout": 1.0}),
    ("vit_small", {"input_size": 30}),
    ("vit_small", {"dim": 30, "heads": 4}),
    ("vit_small", {"mlp_ratio": "big"}),
    ("resnet18", {"mean": [0.5, 0.5]}),
    ("resnet18", {"std": [0.5, 0.0, 0.5]}),
    ("resnet18", {"mean": "cifar10"}),
])
def test_bad_values_raise_config_error(name, kwargs):
    with pytest.raises(ConfigError):
        create(name, **kwargs)
