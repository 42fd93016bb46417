"""CogVLM's visual expert: image positions get their own QKV and FFN in every LM layer."""

from __future__ import annotations

import copy
from functools import partial

import torch
from torch import nn

from mmbridge.models.bridges.base import BRIDGES
from mmbridge.models.bridges.deep import DeepFusionBridge, FusionContext, decoder_layers
from mmbridge.models.bridges.mlp import mlp


@BRIDGES.register("visual_expert")
class VisualExpertBridge(DeepFusionBridge):
    """An MLP adapter fills the image positions (one per encoder token); in every LM layer those
    positions use copies of the layer's q/k/v projections and FFN (initialised from the LM's, trained
    as part of the bridge) while text positions use the originals; attention spans both (CogVLM).

    With LoRA on the LM's q/k/v, the adapters' update applies at image positions too.
    """

    def __init__(
        self,
        vision_dim,
        lm_dim,
        grid,
        depth: int = 2,
        qkv: tuple = ("q_proj", "k_proj", "v_proj"),
        ffn: str = "mlp",
        l2_normalize: bool = False,
        in_tokens=None,
    ):
        super().__init__(vision_dim, lm_dim, grid, l2_normalize, in_tokens)
        self.proj = mlp(vision_dim, lm_dim, depth)
        self.qkv_names, self.ffn_name = list(qkv), ffn
        self.experts = nn.ModuleList()
        self._active: FusionContext | None = None

    @property
    def num_tokens(self) -> int:
        return self.in_tokens

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        return self.proj(feats)

    def _attach(self, lm: nn.Module) -> None:
        for i, layer in enumerate(decoder_layers(lm)):
            attn = getattr(layer, "self_attn", None)
            names = {n: getattr(attn, n, None) for n in self.qkv_names}
            ffn = getattr(layer, self.ffn_name, None)
            if attn is None or ffn is None or any(m is None for m in names.values()):
                raise ValueError(f"visual_expert: layer {i} lacks self_attn.{self.qkv_names} or {self.ffn_name}")
            expert = nn.ModuleDict({n: copy.deepcopy(m) for n, m in names.items()})
            expert["ffn"] = copy.deepcopy(ffn)
            self.experts.append(expert)
            # the attention module receives the layer's keyword arguments, `fusion` among them
            attn.register_forward_pre_hook(self._enter, with_kwargs=True)
            for n, m in names.items():
                m.register_forward_hook(partial(self._route, expert[n]))
            ffn.register_forward_hook(partial(self._route, expert["ffn"]))

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._active = kwargs.get("fusion")

    def _route(self, expert: nn.Module, module: nn.Module, inputs: tuple, output: torch.Tensor):
        """Forward hook: replace the outputs at image positions with the expert's."""
        ctx = self._active
        if ctx is None or not ctx.has_images:
            return None
        x, mask, index = inputs[0], ctx.image_mask, ctx.image_index
        if mask.shape != x.shape[:2]:
            raise ValueError(f"visual_expert: image mask {tuple(mask.shape)} does not fit input {tuple(x.shape)}")
        routed = expert(x.reshape(-1, x.shape[-1]).index_select(0, index)).to(output.dtype)
        return output.reshape(-1, output.shape[-1]).index_copy(0, index, routed).view(output.shape)
