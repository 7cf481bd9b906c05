""""ft-sam-bb": FT-SAM in BackdoorBench's setting (defense/ft-sam.py + config/defense/ft-sam/cifar10.yaml)."""
import pytest

from fipurify import defenses
from fipurify.defenses.ftsam import FTSAM

# BackdoorBench's CIFAR-10 FT-SAM run: epochs 100, batch 256, lr 0.01, SGD momentum 0.9, wd 5e-4, cosine,
# rho_max = rho_min = 2.0, adaptive (``--adaptive`` is store_false: on by default), label smoothing 0.1
BACKDOORBENCH = {"epochs": 100, "batch_size": 256, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
                 "schedule": "cosine", "rho": 2.0, "adaptive": True, "label_smoothing": 0.1, "augment": True,
                 "flip": True, "milestones": ()}


@pytest.mark.parametrize("dataset", [None, "cifar10", "gtsrb"])
def test_create_gives_backdoorbench_values(dataset):
    d = defenses.create("ft-sam-bb", dataset=dataset)
    assert type(d) is FTSAM
    # GTSRB's labels change under a horizontal flip: the dataset's fact wins over the preset's flip
    expected = {**BACKDOORBENCH, "flip": dataset != "gtsrb"}
    assert {k: getattr(d.config, k) for k in BACKDOORBENCH} == expected


def test_ft_sam_keeps_the_fip_appendix_numbers():
    """"ft-sam" is A.3.3's setting (100 epochs, lr 0.01, momentum 0.9, wd 1e-4, batch 128): it differs
    from BackdoorBench's in batch size and weight decay, and "ft-sam-bb" leaves it alone."""
    a33, bb = defenses.create("ft-sam").config, defenses.create("ft-sam-bb").config
    assert (a33.epochs, a33.lr, a33.momentum, a33.weight_decay, a33.batch_size) == (100, 0.01, 0.9, 1e-4, 128)
    assert (a33.weight_decay, a33.batch_size) != (bb.weight_decay, bb.batch_size)


def test_options_still_override_the_configuration():
    cfg = defenses.create("ft-sam-bb", epochs=3, rho=0.5).config
    assert (cfg.epochs, cfg.rho, cfg.batch_size, cfg.weight_decay) == (3, 0.5, 256, 5e-4)
    assert "ft-sam-bb" in defenses.available()
