"""Initialising a model from pretrained weights (finetune.init_from) in this process: files in the formats people
have, prefix remapping, strict and non-strict matching, and a file on the S3 endpoint."""

from __future__ import annotations

import pytest
import torch

from launcher import finetune as ft
from launcher.zoo.models import MLP


def model(out_features: int = 4) -> MLP:
    torch.manual_seed(0)
    return MLP(in_features=8, hidden=16, out_features=out_features)


def pretrained() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return MLP(in_features=8, hidden=16, out_features=4).state_dict()


def test_a_ddp_state_dict_wrapped_as_lightning_writes_it_loads_after_stripping_the_prefix(tmp_path):
    src = pretrained()
    path = tmp_path / "lightning.ckpt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in src.items()}}, path)
    m = model()
    report = ft.load_initial(m, str(path), {"module.": ""})
    assert report.complete and report.source == f"{path} (its 'state_dict' entry)"
    for k, v in m.state_dict().items():
        assert torch.equal(v, src[k]), k


def test_adding_a_prefix_maps_a_bare_backbone_into_a_bigger_model(tmp_path):
    body = {k[len("body."):]: v for k, v in pretrained().items() if k.startswith("body.")}
    torch.save(body, tmp_path / "body.pt")
    m = model()
    head = m.head.weight.clone()
    report = ft.load_initial(m, str(tmp_path / "body.pt"), {"": "body."}, strict=False)
    assert sorted(report.loaded) == ["body.0.bias", "body.0.weight", "body.3.bias", "body.3.weight"]
    assert report.missing == ["head.weight", "head.bias"] and not report.unexpected
    assert torch.equal(m.body[0].weight, body["0.weight"]) and torch.equal(m.head.weight, head)


def test_strict_refuses_a_reshaped_head_and_loads_nothing(tmp_path):
    torch.save(pretrained(), tmp_path / "w.pt")
    m = model(out_features=2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ft.InitError) as e:
        ft.load_initial(m, str(tmp_path / "w.pt"))
    assert "finetune.init_strict is true" in str(e.value)
    assert "head.weight [2, 16] in the model, [4, 16] in the source" in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items()), "strict failure changed the model"
    report = ft.load_initial(m, str(tmp_path / "w.pt"), strict=False)
    assert len(report.loaded) == 4 and len(report.mismatched) == 2
    assert "different shape (kept their initialisation): head.weight [2, 16]" in report.text()


def test_sources_that_cannot_be_used_say_why(tmp_path):
    torch.save(pretrained(), tmp_path / "w.pt")
    with pytest.raises(ft.InitError, match=r"no tensor of .*w.pt matches the model by name: .*finetune.init_key_map"):
        ft.load_initial(model(), str(tmp_path / "w.pt"), {"": "encoder."})
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ft.InitError, match=r"list.pt holds a list, not a state dict"):
        ft.load_initial(model(), str(tmp_path / "list.pt"))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ft.InitError, match=r"notes.txt cannot be loaded with torch.load\(weights_only=True\)"):
        ft.load_initial(model(), str(tmp_path / "notes.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ft.InitError, match=r"empty is a directory without a committed checkpoint"):
        ft.load_initial(model(), str(tmp_path / "empty"))


def test_a_state_dict_on_the_s3_endpoint(s3_server, monkeypatch):
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    s3_server.make_bucket("pretrained")
    import fsspec
    import io
    buf = io.BytesIO()
    src = pretrained()
    torch.save({"model": src}, buf)
    fsspec.filesystem("s3", **s3_server.fs_kwargs()).pipe_file("pretrained/mlp/weights.pt", buf.getvalue())
    m = model()
    report = ft.load_initial(m, "s3://pretrained/mlp/weights.pt", endpoint_url=s3_server.endpoint)
    assert report.complete and report.source == "s3://pretrained/mlp/weights.pt (its 'model' entry)"
    assert all(torch.equal(v, src[k]) for k, v in m.state_dict().items())
