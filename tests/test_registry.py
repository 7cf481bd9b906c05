"""The one registry shape (fipurify.registry) and the kinds built on it."""
import sys
import warnings

import pytest
import torch

from fipurify import attacks, datasets, defenses, detection, models
from fipurify.errors import ConfigError
from fipurify.registry import Registry, discover


class Thing:
    def __init__(self, size=1, colour="red"):
        self.size, self.colour = size, colour


def test_register_get_create_names_and_aliases():
    reg = Registry("thing")
    assert reg.register("small", Thing, size=2) is Thing

    @reg.register("Big", size=9)
    class Big(Thing):
        pass

    reg.alias("tiny", "small", colour="blue")
    assert reg.names() == ["small", "big"] and list(reg) == ["small", "big"] and len(reg) == 2
    assert reg.get(" SMALL ") is Thing and reg.get("tiny") is Thing and reg["big"] is Big
    assert "small" in reg and "tiny" not in reg  # the mapping holds canonical names only
    made = reg.create("small", colour="green")
    assert (made.size, made.colour) == (2, "green")
    assert reg.create("small", size=5).size == 5  # presets are defaults
    assert reg.create("tiny").colour == "blue"
    with pytest.raises(ConfigError, match="thing 'tiny' means colour='blue'"):
        reg.create("tiny", colour="red")
    assert reg.options("tiny") == {"size": 2, "colour": "blue"}
    assert reg.get("nope", None) is None


def test_unknown_name_is_one_line_listing_the_known_ones():
    reg = Registry("thing")
    reg.register("b", Thing)
    reg.register("a", Thing)
    reg.alias("c", "a")
    with pytest.raises(ConfigError) as err:
        reg.get("zzz")
    assert str(err.value) == "unknown thing 'zzz'; known: a, b (aliases: c=a)"


def test_registering_a_name_twice_for_something_else_is_refused():
    reg = Registry("thing")
    reg.register("a", Thing)
    reg.register("a", Thing)  # the same again (a module imported twice) is fine
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", dict)


def test_build_hook_makes_the_instance():
    reg = Registry("thing", build=lambda cls, **o: ("built", cls(**o)))
    reg.register("a", Thing, size=3)
    tag, made = reg.create("a")
    assert tag == "built" and made.size == 3


def test_a_new_module_registers_itself_when_its_package_is_discovered(tmp_path, monkeypatch):
    pkg = tmp_path / "plugins_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from fipurify.registry import Registry\nTHINGS = Registry('thing')\n")
    (pkg / "extra.py").write_text("from . import THINGS\nTHINGS.register('extra', dict, a=1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        discover("plugins_pkg")
        from plugins_pkg import THINGS
        assert THINGS.create("extra") == {"a": 1}
    finally:
        for name in [m for m in sys.modules if m.startswith("plugins_pkg")]:
            del sys.modules[name]


def test_every_kind_uses_the_registry():
    assert isinstance(attacks.ATTACKS, Registry) and isinstance(defenses.DEFENSES, Registry)
    assert isinstance(defenses.TRAINING_DEFENSES, Registry) and isinstance(models.MODELS, Registry)
    assert isinstance(datasets.DATASETS, Registry) and isinstance(detection.DETECTORS, Registry)
    assert defenses.METHODS is defenses.DEFENSES.table and attacks.ALIASES is attacks.ATTACKS.aliases
    assert set(defenses.available()) == set(defenses.DEFENSES.names())
    assert defenses.available_training_defenses() == ["abl", "cbd"]


def test_the_default_method_is_chosen_per_task(monkeypatch):
    """No method named: image classification gets the measured default, other tasks the fallback,
    through fipurify.purify, defenses.purify and defenses.create alike."""
    import fipurify
    from fipurify.defenses import registry

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the measured default says nothing
        assert defenses.default_method() == defenses.default_method("image-classification") == "detect-unlearn-clip-all"
    with pytest.warns(UserWarning, match="no purifier has been shown to remove a backdoor on translation"):
        assert defenses.default_method("translation") == registry.FALLBACK_METHOD == "ffip"
    with pytest.warns(UserWarning, match="measured on two models of one stand-in dataset"):  # provisional: it says so
        assert defenses.default_method("video-classification") == "act-clip-all"
    assert defenses.create("act-clip-all").config.layers == 1.0
    assert defenses.create().method_name() == "detect-unlearn-clip-all"
    seen = []

    class Stop(Exception):
        pass

    def fake_create(method, dataset=None, **options):
        seen.append(method)
        raise Stop

    monkeypatch.setattr(defenses, "create", fake_create)
    images = datasets.synthetic(n=8, num_classes=2, image_size=8)

    class Sentences(torch.utils.data.Dataset):
        task = "translation"
    for data in (images, torch.utils.data.Subset(Sentences(), [])):
        with pytest.raises(Stop), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fipurify.purify(None, data)
    assert seen == ["detect-unlearn-clip-all", "ffip"]


def test_a_dataset_whose_labels_a_flip_changes_turns_flips_off_for_every_defense():
    assert datasets.dataset_info("gtsrb").flip is False and datasets.dataset_info("cifar10").flip is True
    for method in ("ft", "ffip", "fst", "i-bau"):
        assert defenses.create(method, "gtsrb").config.flip is False, method
        assert defenses.create(method, "cifar10").config.flip is True, method
    assert defenses.create("ft", "gtsrb", flip=True).config.flip is True  # the caller's word is last
