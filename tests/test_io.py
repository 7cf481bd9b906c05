import json
import os
import pickle

import pytest
import torch

import fipurify
from fipurify import models
from fipurify.errors import ModelFileError


def _tiny():
    torch.manual_seed(0)
    return models.create("preactresnet18", num_classes=4, width=4, input_size=16)


def test_round_trip_gives_identical_outputs(tmp_path):
    m = _tiny().eval()
    path = fipurify.save_model(m, tmp_path / "m.safetensors", {"attack": {"name": "badnets"}, "seed": 3})
    m2, meta = fipurify.load_model(path)
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
    assert meta["attack"] == {"name": "badnets"} and meta["seed"] == 3
    assert meta["arch"] == "preactresnet18"
    assert type(m2) is type(m)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_hostile_pickle_is_refused_without_executing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "evil.safetensors"
    bad.write_bytes(pickle.dumps({"state": _Boom()}))
    torch.save({"x": _Boom()}, tmp_path / "evil.pt")
    for f in (bad, tmp_path / "evil.pt"):
        with pytest.raises(ModelFileError, match="not a safetensors file"):
            fipurify.load_model(f)
    assert not (tmp_path / "PWNED").exists()


def test_tampered_file_is_refused(tmp_path):
    path = fipurify.save_model(_tiny(), tmp_path / "m.safetensors", {})
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # flip bits in the last tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        fipurify.load_model(path)


def test_foreign_safetensors_and_missing_file(tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ModelFileError, match="not a fipurify model"):
        fipurify.load_model(tmp_path / "foreign.safetensors")
    with pytest.raises(ModelFileError, match="not found"):
        fipurify.load_model(tmp_path / "nope.safetensors")


def test_save_is_atomic_and_needs_json_metadata(tmp_path):
    m = _tiny()
    with pytest.raises(ModelFileError, match="JSON"):
        fipurify.save_model(m, tmp_path / "m.safetensors", {"bad": object()})
    assert list(tmp_path.iterdir()) == []  # no partial or temporary file left behind
    fipurify.save_model(m, tmp_path / "m.safetensors", {"ok": [1, 2]})
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    assert json.loads(json.dumps(fipurify.load_model(tmp_path / "m.safetensors")[1]["ok"])) == [1, 2]


def test_atomic_output_gives_the_usual_file_mode(tmp_path):
    import os
    import stat

    from fipurify.io import atomic_write_text
    umask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "report.html", "<p>hi</p>")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_directory_truncated_and_pytorch_files_get_clear_messages(tmp_path):
    with pytest.raises(ModelFileError, match="is a directory"):
        fipurify.load_model(tmp_path)
    path = fipurify.save_model(_tiny(), tmp_path / "m.safetensors", {})
    raw = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ModelFileError, match="truncated or corrupt") as info:
        fipurify.load_model(tmp_path / "cut.safetensors")
    assert "unpickles" not in str(info.value)
    torch.save(_tiny().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ModelFileError, match="--weights sd.pt") as info:
        fipurify.load_model(tmp_path / "sd.pt")
    assert "fipurify import" in str(info.value)


def test_weights_loader_reads_state_dicts_and_refuses_modules(tmp_path):
    from fipurify.models.external import load_weights
    net = _tiny()
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")  # common checkpoint layout
    state = load_weights(tmp_path / "ckpt.pt")
    assert state.keys() == net.state_dict().keys()
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(ModelFileError, match=r"model\.state_dict\(\)"):
        load_weights(tmp_path / "whole.pt")


def test_sniff_reads_a_safetensors_file_whose_header_length_starts_with_0x80(tmp_path):
    from fipurify.models.external import sniff
    path = tmp_path / "x.safetensors"
    path.write_bytes((0x180).to_bytes(8, "little") + b"{" + b" " * 0x17F)  # low byte 0x80, like a pickle's first
    assert sniff(path) == "safetensors"
    (tmp_path / "p.pt").write_bytes(b"\x80\x02}q\x00.")  # a real pickle still is one
    assert sniff(tmp_path / "p.pt") == "pickle"

