"""CLP, channel Lipschitzness pruning (defenses.clp)."""
import torch
from torch import nn

from fipurify import defenses
from fipurify.defenses.baseline_common import conv_bn_pairs
from fipurify.defenses.clp import CLP


class _ConvNoBN(nn.Module):
    """conv_a (no BN) -> ReLU -> conv_b -> BN -> ReLU -> BN after a ReLU (not a conv's) -> head."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 16, 3, padding=1)
        self.conv_b = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(16)
        self.conv_c = nn.Conv2d(16, 16, 1, bias=False)
        self.bn_c = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.conv_a(x))
        x = torch.relu(self.bn_b(self.conv_b(x)))
        x = self.bn_c(torch.relu(self.conv_c(x)))
        return self.head(x.mean(dim=(2, 3)))


def test_clp_is_data_free_and_pairs_a_bn_only_with_the_conv_it_follows():
    torch.manual_seed(0)
    net = _ConvNoBN().eval()
    with torch.no_grad():
        net.conv_a.weight[3] *= 40  # an outlier channel without BN
        net.bn_b.weight[5] = 30.0  # an outlier through its BN scale
        net.bn_b.bias.normal_()  # non-zero, so zeroing a channel's bias shows
    pairs = conv_bn_pairs(net, torch.zeros(1, 3, 8, 8))
    assert pairs == {"conv_a": None, "conv_b": "bn_b", "conv_c": None}
    d = CLP(input_size=8)
    out = d.purify(net)  # no data at all
    assert d.report["pruned_channels"] == {"conv_a": [3], "bn_b": [5]}
    sd0, sd1 = net.state_dict(), out.state_dict()
    changed = {k for k in sd0 if not torch.equal(sd0[k], sd1[k])}
    assert changed == {"conv_a.weight", "conv_a.bias", "bn_b.weight", "bn_b.bias"}
    acts = {}
    for name in ("conv_a", "bn_b"):
        getattr(out, name).register_forward_hook(lambda m, i, o, name=name: acts.__setitem__(name, o))
    out(torch.rand(4, 3, 8, 8))
    assert acts["conv_a"][:, 3].abs().max() == 0 and acts["bn_b"][:, 5].abs().max() == 0
    assert acts["conv_a"][:, [0, 1, 2, 4]].abs().max() > 0
    lax = CLP(u=50.0, input_size=8)  # the threshold is relative to the layer's own spread
    lax.purify(net, None)
    assert lax.report["n_pruned"] == 0


def test_clp_on_the_backdoored_preact_resnet_without_data(tiny_backdoor):
    d = defenses.create("clp")
    d.purify(tiny_backdoor["model"], None, progress=False)
    scored = d.report["layers_scored"]
    assert scored["conv1"]["bn"] == "layer1.0.bn1"  # the stem feeds the first block's BN directly
    assert scored["layer1.0.conv1"]["bn"] == "layer1.0.bn2" and scored["layer1.0.conv2"]["bn"] is None
