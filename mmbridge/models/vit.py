"""Our own ViT with attentive pooling, trained from scratch by LCL (latent compression learning).

The attentive pool has one learned query: its output is the global image latent. Its value and
output projections, applied to each patch on its own, give that patch's token for the LM (LCL,
Yang et al. 2024). `save_pretrained` / `from_pretrained` use a Hugging Face-style folder
(`config.json` + `model.safetensors`); the registry name `lcl_vit` loads one as a vision encoder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mmbridge.data.images import SIGLIP_MEAN, SIGLIP_STD
from mmbridge.models.encoder import VisionEncoder, register_vision_encoder

MODEL_TYPE = "lcl_vit"


@dataclass
class ViTConfig:
    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    out_dim: int = 128  # width of the latent and of the patch tokens (the LCL language model's width)
    image_mean: tuple = SIGLIP_MEAN
    image_std: tuple = SIGLIP_STD

    @property
    def grid(self) -> int:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        return self.image_size // self.patch_size


class Block(nn.Module):
    """Pre-norm transformer block (bidirectional self-attention + GELU MLP)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


class AttentivePool(nn.Module):
    """One learned query attends over the patches → the global latent; value+output projections
    of each patch alone → that patch's LM token."""

    def __init__(self, width: int, heads: int, out_dim: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N, width] → (latent [B, out_dim], patch tokens [B, N, out_dim])."""
        b, n, d = x.shape
        h = self.heads
        q = self.q(self.query).view(1, h, 1, d // h).expand(b, -1, -1, -1)
        k = self.k(x).view(b, n, h, d // h).transpose(1, 2)
        v = self.v(x)
        pooled = F.scaled_dot_product_attention(q, k, v.view(b, n, h, d // h).transpose(1, 2))
        latent = self.out(pooled.reshape(b, d))
        return latent, self.out(v)


class LCLVisionTower(nn.Module):
    """Patch embedding + learned positions + transformer blocks + final norm + attentive pool."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = nn.Conv2d(3, c.width, c.patch_size, stride=c.patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, c.grid**2, c.width) * 0.02)
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width)
        self.pool = AttentivePool(c.width, c.heads, c.out_dim)

    def patch_features(self, pixel_values: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 3, S, S] → final-normed patch features [B, grid², width], row-major (`positions`: a table for
        another grid, [1, rows·cols, width])."""
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        x = x + (self.pos_embed if positions is None else positions)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, S, S] → (latent [B, out_dim], patch tokens for the LM [B, grid², out_dim])."""
        return self.pool(self.patch_features(pixel_values))

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {"model_type": MODEL_TYPE, "architectures": [type(self).__name__], **asdict(self.config)}
        (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_file(
            {k: v.detach().contiguous() for k, v in self.state_dict().items()},
            str(folder / "model.safetensors"),
            metadata={"format": "pt"},
        )

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> LCLVisionTower:
        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder}: no config.json (export an encoder with `mmbridge train lcl` first)")
        cfg = json.loads((folder / "config.json").read_text())
        if cfg.pop("model_type", None) != MODEL_TYPE:
            raise ValueError(f"{folder}: config.json is not an {MODEL_TYPE} encoder")
        cfg.pop("architectures", None)
        cfg["image_mean"], cfg["image_std"] = tuple(cfg["image_mean"]), tuple(cfg["image_std"])
        tower = cls(ViTConfig(**cfg))
        tower.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
        return tower


@register_vision_encoder(MODEL_TYPE)
class LCLViTEncoder(VisionEncoder):
    """An exported LCL ViT as an LMM vision encoder.

    ``features="patches"``: final-normed ViT patch features (width); ``"tokens"``: the attentive
    pool's per-patch value+output projections (out_dim), the tokens LCL's LM was trained to read.
    """

    def __init__(self, path: str, features: str = "patches") -> None:
        super().__init__()
        if features not in ("patches", "tokens"):
            raise ValueError(f"features must be 'patches' or 'tokens', got {features!r}")
        self.tower = LCLVisionTower.from_pretrained(path)
        c = self.tower.config
        self.features = features
        self.image_size, self.grid = c.image_size, (c.grid, c.grid)
        self.hidden_size = c.width if features == "patches" else c.out_dim
        self.image_mean, self.image_std = tuple(c.image_mean), tuple(c.image_std)
        self.cfg = {"name": MODEL_TYPE, "path": path, "features": features}

    def resize(self, image_size: int) -> None:
        """Interpolate the learned positions to `image_size` (2D bicubic) and take that size from now on."""
        if image_size == self.image_size:
            return
        from mmbridge.models.resolution import interpolate_positions

        c = self.tower.config
        if image_size % c.patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {c.patch_size}")
        side = image_size // c.patch_size
        old = self.tower.pos_embed
        with torch.no_grad():
            table = interpolate_positions(old[0], 0, (side, side))
        self.tower.pos_embed = nn.Parameter(table.unsqueeze(0), requires_grad=old.requires_grad)
        c.image_size = image_size
        self.image_size, self.grid = image_size, (side, side)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self._check_pixels(pixel_values)
        feats = self.tower.patch_features(pixel_values)
        return feats if self.features == "patches" else self.tower.pool(feats)[1]

    def forward_any(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W], sides multiples of the patch → [B, (H/p)·(W/p), hidden_size], the learned positions
        resampled in 2D (bicubic) to this grid on the fly, as HF towers' `interpolate_pos_encoding` (LLaVA-UHD)."""
        from mmbridge.models.resolution import interpolate_positions

        patch, (h, w) = self.tower.config.patch_size, pixel_values.shape[-2:]
        if h % patch or w % patch:
            raise ValueError(f"a {h}x{w} view: both sides must be multiples of the patch size {patch}")
        grid = (h // patch, w // patch)
        table = (
            self.tower.pos_embed
            if grid == self.grid
            else interpolate_positions(self.tower.pos_embed[0], 0, grid).unsqueeze(0)
        )
        feats = self.tower.patch_features(pixel_values, table)
        return feats if self.features == "patches" else self.tower.pool(feats)[1]
