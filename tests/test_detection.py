"""Backdoor detection from clean data alone: fipurify.detect, the detector families, the CLI."""
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fipurify
from fipurify import detection
from fipurify.cli import main
from fipurify.errors import ConfigError, DataError

# small budgets: the tiny 4-class model needs far fewer steps than CIFAR-10
FAST_NC = {"max_steps": 50, "batch_size": 16, "stop_patience": 10, "refine_steps": 60}
FAST_UAP = {"growth": 1.5, "batch_size": 16}


@pytest.fixture(scope="module")
def nc_report(tiny_backdoor):
    return fipurify.detect(tiny_backdoor["model"], tiny_backdoor["reserve"], method="neural-cleanse", **FAST_NC)


@pytest.fixture(scope="module")
def saved_model(tiny_backdoor, tmp_path_factory):
    """The tiny backdoored model as a fipurify model file whose metadata names a reproducible
    clean reserve (same synthetic distribution as its training data)."""
    from fipurify.workflow import load_data

    bundle = load_data("synthetic", None, 120, 0, None, n=720, num_classes=4, image_size=16)
    meta = {"dataset": bundle.dataset_info, "clean_reserve": bundle.reserve_info,
            "attack": tiny_backdoor["attack"].to_spec(), "metrics": {"acc": 1.0, "asr": 0.93, "lcr": 0.07}}
    path = tmp_path_factory.mktemp("zoo") / "tiny_badnets.safetensors"
    fipurify.save_model(tiny_backdoor["model"], path, meta)
    return path


# --------------------------------------------------------------------------- the outlier test
def test_mad_anomaly_index_matches_hand_computation():
    sizes = [1.0, 10.0, 11.0, 12.0, 13.0]
    # median 11; |L - 11| = 10, 1, 0, 1, 2 -> median 1; MAD = 1.4826 * 1
    idx = detection.anomaly_indices(sizes)
    assert idx == pytest.approx([10 / 1.4826, 1 / 1.4826, 0.0, -1 / 1.4826, -2 / 1.4826])
    assert detection.most_anomalous(sizes) == (0, pytest.approx(6.7449, abs=1e-4))
    # a large size is never a backdoor target: the index is signed toward small sizes
    assert detection.most_anomalous([10.0, 11.0, 12.0, 13.0, 100.0])[1] < 2
    # all equal: no deviation, no anomaly; equal but one: infinitely anomalous
    assert list(detection.anomaly_indices([5.0, 5.0, 5.0])) == [0.0, 0.0, 0.0]
    assert detection.anomaly_indices([1.0, 5.0, 5.0, 5.0])[0] == math.inf


# --------------------------------------------------------------------------- the detectors
def test_neural_cleanse_flags_the_tiny_backdoor_and_its_target(tiny_backdoor, nc_report):
    r = nc_report
    assert r.backdoored and r.target == 0 and r.candidate == 0
    assert r.score > r.threshold == 2.0
    sizes = {row["class"]: row["size"] for row in r.per_class}
    assert sizes[0] < 0.7 * min(sizes[c] for c in (1, 2, 3))  # the target needs a much smaller mask
    assert r.proxy_asr >= 0.7  # the recovered trigger carries over to held-out clean images
    assert r.trigger.mask.shape == (1, 16, 16) and r.trigger.pattern.shape == (3, 16, 16)
    assert 0 <= float(r.trigger.mask.min()) and float(r.trigger.mask.max()) <= 1
    # the refined trigger sits where BadNets stamps its 3x3 patch (bottom-right corner)
    mask = r.trigger.mask[0]
    assert float(mask[12:, 12:].sum()) > 0.4 * float(mask.sum()) and float(mask.sum()) < 12  # 6 % of the pixels
    assert r.per_class[0]["refined"]["size"] < 0.5 * sizes[0]
    assert r.n_holdout + r.n_optimise == len(tiny_backdoor["reserve"]) and r.n_holdout > 0
    # the proxy ASR is measured on held-out images of the other classes, and the trigger really does it
    model = tiny_backdoor["model"]
    data = detection.create("neural-cleanse", **FAST_NC).split(model, tiny_backdoor["reserve"])
    others = data.x_hold[data.y_hold != 0]
    assert r.proxy_asr == pytest.approx(detection.flip_rate(model, r.trigger, others, 0))
    assert detection.flip_rate(model, r.trigger, others, 0) > \
        detection.flip_rate(model, detection.Trigger("mask-pattern", 0, mask=r.trigger.mask * 0,
                                                      pattern=r.trigger.pattern), others, 0)


@pytest.mark.filterwarnings("ignore:no class reached")  # a short budget: only the plumbing counts
def test_detection_leaves_the_model_unchanged(tiny_backdoor):
    model = tiny_backdoor["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    fipurify.detect(model, tiny_backdoor["reserve"], method="uap", max_steps=3)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()


def test_uap_points_at_the_target(tiny_backdoor):
    r = fipurify.detect(tiny_backdoor["model"], tiny_backdoor["reserve"], method="uap", **FAST_UAP)
    sizes = {row["class"]: row["size"] for row in r.per_class}
    assert r.candidate == 0 and sizes[0] < 0.6 * np.median([sizes[c] for c in (1, 2, 3)])
    assert r.trigger.kind == "perturbation" and r.trigger.delta.shape == (3, 16, 16)
    assert float(r.trigger.delta.norm()) == pytest.approx(sizes[0], rel=1e-4)
    assert r.size_name == "delta L2"


def test_a_clean_model_is_not_flagged():
    from fipurify import models
    from fipurify.datasets.synthetic import synthetic
    from fipurify.training import TrainConfig, train_model

    torch.manual_seed(0)
    model = models.create("preactresnet18", num_classes=4, width=4, input_size=16)
    train_model(model, synthetic(n=600, num_classes=4, image_size=16, seed=0, split="train"),
                TrainConfig(epochs=6, lr=0.05, batch_size=32, seed=0, augment=False), progress=False, log=None)
    reserve = synthetic(n=120, num_classes=4, image_size=16, seed=0, split="reserve")
    r = fipurify.detect(model, reserve, method="neural-cleanse", **FAST_NC)
    assert not r.backdoored and r.target is None and r.score < r.threshold
    assert r.candidate is not None and r.proxy_asr is not None  # still says which class is most suspicious


@pytest.mark.filterwarnings("ignore:no class reached")  # a short budget: only the plumbing counts
def test_any_dataset_or_dataloader_of_image_label_pairs(tiny_backdoor):
    from torch.utils.data import DataLoader, TensorDataset

    res = tiny_backdoor["reserve"]
    xs = torch.stack([res[i][0] for i in range(len(res))])
    loader = DataLoader(TensorDataset(xs, torch.as_tensor(res.labels)), batch_size=7)
    r = fipurify.detect(tiny_backdoor["model"], loader, method="uap", max_steps=3)
    assert r.n_clean == len(res) and r.class_names == ["0", "1", "2", "3"] and r.class_label(0) == "0"


def test_a_class_whose_trigger_was_not_found_is_never_the_verdict(tiny_backdoor):
    with pytest.warns(UserWarning, match="no class reached the flip rate"):
        r = fipurify.detect(tiny_backdoor["model"], tiny_backdoor["reserve"], method="uap", max_steps=1)
    assert not r.backdoored and r.target is None and not any(row["reached"] for row in r.per_class)


# --------------------------------------------------------------------------- bad input
def _drop(data, keep):
    return data.subset(np.flatnonzero(keep(np.asarray(data.labels))))


@pytest.mark.filterwarnings("ignore:no class reached")  # a short budget: only the plumbing counts
def test_missing_classes_are_named_and_the_rest_analysed(tiny_backdoor):
    data = _drop(tiny_backdoor["reserve"], lambda y: y != 2)
    with pytest.warns(UserWarning, match=r"no images of class\(es\) 2 \(class2\)"):
        r = fipurify.detect(tiny_backdoor["model"], data, method="uap", max_steps=5)
    assert r.missing_classes == [2]
    rows = {row["class"]: row for row in r.per_class}
    assert rows[2]["status"] == "no clean images" and "size" not in rows[2]
    assert all(rows[c]["status"] == "ok" for c in (0, 1, 3))
    assert "no clean images" in r.table() and r.warnings


def test_too_few_clean_images_per_class_says_the_minimum(tiny_backdoor):
    y = np.asarray(tiny_backdoor["reserve"].labels)
    keep = np.ones(len(y), bool)
    keep[np.flatnonzero(y == 1)[3:]] = False  # class 1 keeps 3 images
    data = tiny_backdoor["reserve"].subset(np.flatnonzero(keep))
    with pytest.raises(DataError, match="class 1 has only 3 clean image.*at least 5 per class"):
        fipurify.detect(tiny_backdoor["model"], data)


class _Features(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)  # N x 4 x H x W: not class scores


def test_a_model_whose_output_is_not_class_scores_is_refused(tiny_backdoor):
    with pytest.raises(DataError, match=r"class scores of shape \[batch, classes\]"):
        fipurify.detect(_Features(), tiny_backdoor["reserve"])


def test_bad_options_and_names():
    assert set(detection.available()) >= {"neural-cleanse", "uap"}
    with pytest.raises(ConfigError, match="unknown detector"):
        detection.create("nope")
    with pytest.raises(ConfigError, match="unknown option"):
        detection.create("uap", nope=1)
    with pytest.raises(ConfigError, match="flip_rate"):
        detection.create("neural-cleanse", flip_rate=1.5)
    with pytest.raises(ConfigError, match="norm"):
        detection.create("uap", norm="l1")


# --------------------------------------------------------------------------- the report
def test_report_is_json_ready_and_saves_its_triggers(nc_report, tmp_path):
    d = nc_report.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert len(text) < 20000  # summarised, not inlined tensors
    assert d["backdoored"] is True and d["target"] == 0 and d["trigger"]["kind"] == "mask-pattern"
    assert {"score", "threshold", "proxy_asr", "per_class", "seconds"} <= set(d)
    nc_report.save_triggers(tmp_path / "t.safetensors")
    from safetensors.torch import load_file
    t = load_file(tmp_path / "t.safetensors")
    assert torch.equal(t["class0.mask"], nc_report.trigger.mask) and "class3.pattern" in t
    line = nc_report.verdict()
    assert line.startswith("backdoored: yes, suspected target 0 (class0), score ") and "proxy ASR" in line


def test_compare_before_and_after(nc_report):
    from fipurify.detection.verify import compare, format_comparison

    after = detection.DetectionReport(**{**nc_report.__dict__, "backdoored": False, "target": None, "score": 0.5,
                                         "replay": {"target": 0, "proxy_asr": 0.05, "n_images": 18}})
    c = compare(nc_report, after)
    assert c["suspected_class"] == 0 and c["proxy_asr_before"] == nc_report.proxy_asr
    assert c["proxy_asr_after"] == 0.05 and c["proxy_asr_after_kind"] == "replayed"
    assert c["flagged_before"] and not c["flagged_after"]
    line = format_comparison(c)
    assert "suspected target 0 (class0), proxy ASR" in line and "-> 5.0 %" in line and "after: not flagged" in line
    json.dumps(c, allow_nan=False)


# --------------------------------------------------------------------------- the CLI
def test_cli_detect_end_to_end(saved_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FIPURIFY_CACHE", str(tmp_path / "cache"))
    out, fig = tmp_path / "d.json", tmp_path / "d.png"
    argv = ["detect", str(saved_model), "--clean-size", "120", "--quiet", "--json", str(out), "--figure", str(fig)]
    argv += [f"--set={k}={v}" for k, v in FAST_NC.items()]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("backdoored: yes, suspected target 0 (class0), score")
    assert "mask L1" in printed and "anomaly" in printed
    doc = json.loads(out.read_text())
    assert doc["backdoored"] and doc["target"] == 0 and doc["recorded_attack"]["target"] == 0
    assert (tmp_path / doc["triggers_file"]).exists()
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --fail-if-backdoored: exit status 1 when flagged
    assert main(argv[:5] + [f"--set={k}={v}" for k, v in FAST_NC.items()] + ["--fail-if-backdoored"]) == 1
    # bad input: one line, exit status 2
    capsys.readouterr()
    assert main(["detect", str(saved_model), "--figure", str(tmp_path / "x.jpg")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fipurify: error:") and ".png" in err[0]
    assert main(["detect", str(saved_model), "--method", "nope"]) == 2
    assert main(["detect", str(saved_model), "--json", str(tmp_path / "missing" / "d.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:no class reached")
def test_cli_detect_on_a_clean_folder_missing_a_class(saved_model, tiny_backdoor, tmp_path, capsys):
    from PIL import Image

    res = tiny_backdoor["reserve"]
    for i, y in enumerate(res.labels):
        if y != 2:
            (tmp_path / "clean" / f"class{y}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(res.images[i]).save(tmp_path / "clean" / f"class{y}" / f"{i}.png")
    assert main(["detect", str(saved_model), "--clean-dir", str(tmp_path / "clean"), "--method", "uap",
                 "--set", "max_steps=5", "--quiet"]) == 0
    captured = capsys.readouterr()
    warns = [line for line in captured.err.splitlines() if "no images of class" in line]
    assert len(warns) == 1 and warns[0].startswith("fipurify: warning:") and "2 (class2)" in warns[0]
    assert "no clean images" in captured.out


def test_cli_purify_verify_reports_the_detector(saved_model, tmp_path, capsys, monkeypatch):
    from fipurify.detection import verify

    monkeypatch.setenv("FIPURIFY_CACHE", str(tmp_path / "cache"))
    real_create = verify.create
    monkeypatch.setattr(verify, "create", lambda method, **o: real_create(method, **{**FAST_NC, **o}))
    out = tmp_path / "p.safetensors"
    assert main(["purify", str(saved_model), "--method", "ft", "--epochs", "1", "--clean-size", "120", "--no-eval",
                 "--set", "batch_size=16", "--quiet", "--verify", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "detector (neural-cleanse): suspected target 0 (class0), proxy ASR" in printed
    det = json.loads(out.with_suffix(".json").read_text())["detector"]
    assert det["before"]["target"] == 0 and det["after"]["replay"]["target"] == 0
    assert det["proxy_asr_after_kind"] == "replayed" and 0 <= det["proxy_asr_after"] <= 1


def test_detect_zoo_benchmark_runs_on_one_model(saved_model, tmp_path, monkeypatch):
    monkeypatch.setenv("FIPURIFY_CACHE", str(tmp_path / "cache"))
    zoo = _zoo_module()
    out = tmp_path / "zoo"
    assert zoo.main([str(saved_model.parent), "--methods", "uap", "--clean-size", "120",
                     "--set", "growth=1.5", "--set", "max_steps=30", "--out", str(out)]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    row, = doc["rows"]
    assert row["model"] == saved_model.name and row["true_target"] == 0 and row["true_asr"] == 0.93
    assert row["method"] == "uap" and row["candidate"] == 0 and isinstance(row["seconds"], float)
    assert doc["summary"]["uap"]["n_models"] == 1
    assert row["label"] == "badnets" and "| badnets | badnets | 0 |" in out.with_suffix(".md").read_text()
    # --resume keeps the row and runs only what is missing: here nothing but the FT timing of a new method
    first = row["seconds"]
    assert zoo.main([str(saved_model.parent), "--methods", "uap", "neural-cleanse", "--clean-size", "120",
                     "--set", "max_steps=30", "--set", "refine_steps=10", "--out", str(out), "--resume",
                     "--ft-baseline", "--figure", str(tmp_path / "zoo.png")]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    uap, nc = doc["rows"]
    assert uap["seconds"] == first and uap["ft_seconds"] is None
    assert nc["method"] == "neural-cleanse" and nc["ft_seconds"] > 0 and nc["strong"] is True
    assert (tmp_path / "zoo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # bad input is refused before any compute
    assert zoo.main([str(saved_model.parent), "--figure", str(tmp_path / "zoo.jpg")]) == 2
    assert zoo.main([str(saved_model.parent), "--clean-size-for", "tiny=0"]) == 2
    # too few clean images per class: the model is skipped (no row), the zoo goes on; a per-dataset size fixes it
    small = ["--methods", "uap", "--set", "growth=1.5", "--set", "max_steps=30"]
    assert zoo.main([str(saved_model.parent), *small, "--clean-size", "8", "--out", str(tmp_path / "few")]) == 0
    assert json.loads((tmp_path / "few.json").read_text())["rows"] == []
    assert zoo.main([str(saved_model.parent), *small, "--clean-size", "8", "--clean-size-for", "tiny=120",
                     "--out", str(tmp_path / "per")]) == 0
    assert json.loads((tmp_path / "per.json").read_text())["rows"][0]["n_clean"] == 120


def _bench_module(name):
    """A script of benchmarks/ imported as a module."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _zoo_module():
    return _bench_module("detect_zoo")


def test_zoo_auroc_and_spearman_match_hand_computation():
    zoo = _zoo_module()
    # 3 positives x 2 negatives = 6 pairs: (5>1, 5>2), (2>1, 2=2 half), (inf>1, inf>2) -> 5.5 / 6
    assert zoo.auroc([5.0, 2.0, math.inf], [1.0, 2.0]) == pytest.approx(5.5 / 6)
    assert zoo.auroc([1.0], [2.0]) == 0.0 and zoo.auroc([], [1.0]) is None
    assert zoo.ranks([10.0, 30.0, 20.0, 20.0]) == [1.0, 4.0, 2.5, 2.5]
    assert zoo.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert zoo.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x: 1 2 3 4, y: 1 3 2 4 -> d^2 = 0+1+1+0 = 2 -> 1 - 6*2/(4*15) = 0.8
    assert zoo.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert zoo.spearman([1, 1, 1], [1, 2, 3]) is None and zoo.spearman([1, 2], [1, 2]) is None
    # labels: the bench cache's file names, else the attack
    assert zoo.label("cifar10_troj-all_preactresnet18-w16_e10_s0_58c1d079df44.safetensors") == "cifar10:troj-all"
    assert zoo.label("gtsrb_clean_wideresnet16_1-wd_e10_s2_ebad257d21cf.safetensors") == "gtsrb:clean s2"
    assert zoo.label("mine.safetensors", "trojan", "all2all") == "trojan-all"


def test_replayed_flip_rate_counts_only_other_classes_and_restores_the_mode():
    """The replayed proxy ASR: images of the target class are left out, the model runs in eval mode
    without parameter gradients, and both are restored afterwards."""
    from fipurify.detection.report import Trigger

    class BrightIsTwo(nn.Module):  # class 2 when the top-left pixel is bright, else class 0
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            assert not self.training and not self.w.requires_grad
            hit = (x[:, 0, 0, 0] > 0.5).long()
            return nn.functional.one_hot(2 * hit, 3).float() * self.w

    mask = torch.zeros(1, 4, 4)
    mask[0, 0, 0] = 1
    trig = Trigger("mask-pattern", 2, mask=mask, pattern=torch.ones(3, 4, 4))
    x = torch.zeros(10, 3, 4, 4)
    y = torch.tensor([0, 1, 0, 1, 0, 1, 2, 2, 0, 1])  # images 6 and 7 are of the target class
    model = BrightIsTwo().train()
    rate, n = detection.replayed_flip_rate(model, trig, x, y, 2)
    assert n == 8 and rate == 1.0
    dark = Trigger("mask-pattern", 2, mask=mask, pattern=torch.zeros(3, 4, 4))
    assert detection.replayed_flip_rate(model, dark, x, y, 2) == (0.0, 8)
    assert model.training and model.w.requires_grad


def test_zoo_reads_purified_runs_and_ft_times_from_the_store(tmp_path):
    """--purified-specs keeps [verify] runs with a replayed proxy ASR and pairs it with the true ASR;
    --ft-specs takes FT's own time per model file (the mean over runs); other rows are ignored."""
    from fipurify.bench.store import ResultStore

    zoo = _zoo_module()
    db = tmp_path / "r.sqlite"

    def verify(proxy, kind="replayed"):
        return {"flagged_before": True, "flagged_after": False, "proxy_asr_before": 0.95,
                "proxy_asr_after": proxy, "proxy_asr_after_kind": kind}

    with ResultStore(db) as store:
        for key, spec, defense, asr, seconds, details in [
                ("a", "s1", "ft", 0.99, 100.0, {"model_file": "/x/m1.safetensors", "verify": verify(0.9)}),
                ("b", "s1", "fst", 0.00, 40.0, {"model_file": "/x/m1.safetensors", "verify": verify(0.0)}),
                ("c", "s1", "i-bau", 0.30, 300.0, {"model_file": "/x/m1.safetensors", "verify": verify(0.2)}),
                ("d", "s1", "ft", 0.98, 120.0, {"model_file": "/y/m1.safetensors"}),  # no [verify]
                ("e", "s2", "nft", 0.50, 9.0, {"model_file": "/x/m2.safetensors", "verify": verify(0.4, "re-optimised")}),
                ("f", "s3", "ft", 0.97, 77.0, {"model_file": "/x/m3.safetensors"})]:  # spec not asked for
            store.record({"run_key": key, "spec": spec, "config": {}, "status": "ok", "defense": defense,
                          "attack": "badnets", "asr": asr, "asr_before": 1.0, "purify_seconds": seconds,
                          "details": details})
    rows = zoo.purified_rows(str(db), ["s1", "s2"])
    assert [(r["defense"], r["proxy_asr_after"]) for r in rows] == [("ft", 0.9), ("fst", 0.0), ("i-bau", 0.2),
                                                                     ("nft", 0.4)]
    summ = zoo.summary([], rows)["purified"]
    assert summ["n"] == 3 and summ["spearman_replayed_proxy_vs_asr"] == pytest.approx(1.0)  # re-optimised left out
    assert zoo.stored_ft_seconds(str(db), ["s1", "s2"]) == {"m1.safetensors": pytest.approx(110.0)}


def test_feature_probe_cuts_the_model_after_a_layer_and_keeps_the_pattern_in_range():
    from fipurify.models import create as create_model

    probe = _bench_module("feature_probe")
    torch.manual_seed(0)
    model = create_model("preactresnet18", num_classes=4, width=4).eval()
    x = torch.rand(6, 3, 16, 16)
    with torch.no_grad():
        full = model(x)
        for name in ("layer3", "layer4"):
            layer = dict(model.named_modules())[name]
            feats = probe.layer_outputs(model, layer, x)
            assert torch.allclose(probe.suffix(model, name)(feats), full, atol=1e-5), name
    layer = model.layer4
    shape, lo, hi = probe.layer_range(model, layer, x, per_channel=True)
    assert lo.shape == hi.shape == (shape[0], 1, 1) and bool((lo <= hi).all())
    head = probe.suffix(model, "layer4")
    feats = probe.layer_outputs(model, layer, x)
    g = torch.Generator().manual_seed(0)
    easy = int(full.argmax(1).mode().values)  # an untrained toy reaches its usual class at once
    size, m, p, ok, steps = probe.reverse(head, feats, easy, shape, lo, hi, g, max_steps=30, batch=6,
                                          pattern="channel", flip_rate=0.5)
    assert ok
    assert m.shape == (shape[0], 1, 1) and bool(((p >= lo - 1e-6) & (p <= hi + 1e-6)).all())
    assert abs(float(m.sum()) - size) < 1e-4
    assert 1 <= steps <= 30


def test_feature_probe_combines_sizes_by_their_medians():
    probe = _bench_module("feature_probe")
    # detector A in pixels, B in channels: class 0 is half A's median and a quarter of B's -> sqrt(1/8)
    out = probe.combined_sizes([[50, 100, 100, 200], [0.5, 2, 2, 2]])
    assert out == pytest.approx([(0.5 * 0.25) ** 0.5, 1.0, 1.0, 2 ** 0.5])


# --------------------------------------------------------------------------- the threshold and the class count
def test_class_count_threshold_keeps_the_ten_class_false_alarm_chance():
    from statistics import NormalDist

    t = detection.class_count_threshold
    assert t(2.0, 10) == 2.0 and t(2.0, 4) == 2.0  # never lowered for fewer classes
    phi = NormalDist().cdf
    # by the definition: the largest of K standard-normal indices crosses t_K as often as the largest of 10 crosses 2
    assert phi(t(2.0, 43)) ** 43 == pytest.approx(phi(2.0) ** 10, rel=1e-9)
    assert t(2.0, 43) == pytest.approx(2.553, abs=1e-3) and t(2.0, 100) > t(2.0, 43) > 2.0
    # and by simulation: the chance that a clean model's largest index crosses it (iid normal sizes, MAD index)
    rng = np.random.default_rng(0)
    def alarm_rate(k, thr):
        return float(np.mean([detection.most_anomalous(rng.normal(size=k))[1] > thr for _ in range(2000)]))
    assert abs(alarm_rate(43, t(2.0, 43)) - alarm_rate(10, 2.0)) < 0.06
    assert alarm_rate(43, 2.0) > alarm_rate(10, 2.0) + 0.2  # why: a fixed 2 alarms far more often on 43 classes


class _PresetSizes(detection.Detector):
    """A detector whose per-class trigger sizes are given: only the shared verdict runs."""
    name = "preset"

    def __init__(self, sizes, **options):
        super().__init__(**options)
        self.sizes = sizes

    def reverse(self, model, images, target, generator):
        trig = detection.Trigger("perturbation", target, delta=torch.zeros(images.shape[1:]))
        return detection.base.ClassResult(self.sizes[target], trig, 1.0, True, 1)


def test_the_verdict_uses_the_class_count_threshold():
    from fipurify.datasets.synthetic import synthetic

    k = 20
    data = synthetic(n=10 * k, num_classes=k, image_size=8, seed=0, split="reserve")
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, k))
    # class 0 the smallest: the median and MAD depend only on the order, so place it at index 2.2
    others = np.arange(20.0, 20.0 + k - 1)
    v = np.concatenate([[-1e3], others])
    med = float(np.median(v))
    sizes = [med - 2.2 * 1.4826 * float(np.median(np.abs(v - med)))] + others.tolist()
    assert detection.most_anomalous(sizes) == (0, pytest.approx(2.2))
    assert 2.0 < 2.2 < detection.class_count_threshold(2.0, k)
    auto = _PresetSizes(sizes).detect(model, data)
    fixed = _PresetSizes(sizes, threshold_classes=None).detect(model, data)
    assert auto.threshold == pytest.approx(detection.class_count_threshold(2.0, k))
    assert not auto.backdoored and auto.candidate == 0 and auto.score == pytest.approx(2.2)
    assert fixed.threshold == 2.0 and fixed.backdoored and fixed.target == 0
    assert f"2.20 <= threshold {auto.threshold:.2f}" in auto.verdict()
    with pytest.raises(ConfigError, match="threshold_classes"):
        _PresetSizes(sizes, threshold_classes=1)


def test_noise_probe_counts_received_shares_and_raises_the_loss_within_eps(tiny_backdoor):
    import torch.nn.functional as F

    probe = _bench_module("noise_probe")

    class Fixed(nn.Module):  # predicts the class stored in the first pixel
        def forward(self, x):
            return F.one_hot(x[:, 0, 0, 0].long(), 3).float()

    x = torch.zeros(6, 1, 2, 2)
    x[:, 0, 0, 0] = torch.tensor([0.0, 0.0, 2.0, 2.0, 2.0, 1.0])
    y = torch.tensor([0, 1, 1, 2, 0, 2])
    shares, acc = probe.received_shares(Fixed(), x, y, 3)
    # class 0 gets image 1 (label 1) of the 4 not labelled 0; class 1 gets image 5 of 4; class 2 gets images 2, 4 of 4
    assert shares.tolist() == pytest.approx([1 / 4, 1 / 4, 2 / 4]) and acc == pytest.approx(2 / 6)

    model = tiny_backdoor["model"].eval()
    res = tiny_backdoor["reserve"]
    xs = torch.stack([res[i][0] for i in range(len(res))])
    ys = torch.tensor([int(res[i][1]) for i in range(len(res))])
    with torch.no_grad():
        before, loss0 = model(xs), F.cross_entropy(model(xs), ys)
    pert = probe.adversarial_noise(model, xs, ys, 0.3, 10, 64, torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = F.cross_entropy(model(xs), ys)
    assert all(float(q.detach().abs().max()) <= 0.3 + 1e-6 for q in pert.noise_w + pert.noise_b)
    assert float(loss) > float(loss0) + 0.1  # the ascent raised the clean loss
    pert.remove()
    with torch.no_grad():
        assert torch.allclose(model(xs), before)  # the hooks are gone: the model is as it was


def test_noise_probe_calibrated_eps_finds_the_smallest_level_at_the_target_accuracy():
    probe = _bench_module("noise_probe")
    calls = []

    def accuracy(eps):  # falls linearly from 0.9 at eps 0 to 0.1 at eps 0.4
        calls.append(eps)
        return 0.9 - 2.0 * eps

    eps = probe.calibrated_eps(accuracy, 0.5)
    assert eps == pytest.approx(0.2, abs=0.4 / 2 ** 8) and accuracy(eps) <= 0.5 and len(calls) == 9
    assert probe.calibrated_eps(lambda e: 0.95, 0.5) == pytest.approx(0.4)  # never reached: the upper end
    assert probe.calibrated_eps(lambda e: 0.0, 0.5) == pytest.approx(0.4 / 2 ** 8)  # reached at once
