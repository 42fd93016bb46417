"""The composite multimodal LM: vision encoder → bridge → causal LM.

"Early fusion" (every bridge): image-token positions of the LM input hold the bridge's outputs.
"Deep fusion" (bridges with `fusion = "deep"`, see `bridges/deep.py`): the bridge also works inside
the LM's layers, reading a per-forward context passed to the decoder as the keyword `fusion`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from mmbridge.data.layouts import window_ids
from mmbridge.data.processor import IGNORE
from mmbridge.models import mma, moe, packed_attention, window_lora
from mmbridge.models.feature_cache import FeatureCache
from mmbridge.models.masks import mixed_attention_mask
from mmbridge.models.precision import autocast
from mmbridge.models.sampling import next_tokens, per_row


@dataclass
class LMOutput:
    loss: torch.Tensor | None  # sum of token losses / `num_targets` (or the given normaliser)
    num_targets: torch.Tensor | float  # the target count (or their weight sum), a 0-d tensor
    hidden_states: torch.Tensor | None = None


class MultimodalLM(nn.Module):
    """Image-token positions in the LM input are filled, in order, with the bridge's outputs.

    `vision`, `bridge` and `lm` are the three trainable parts a recipe stage names.
    `instruction_ids` ([n_images, L], the bridge's own tokens) reach a bridge that reads the
    instruction (InstructBLIP's Q-Former) and no other. `frame_counts` ([n_inputs], see data/video.py)
    group the encoded frames into the videos of a bridge that reads a whole video (`reads_video`);
    every other bridge takes each frame as an image.
    """

    def __init__(
        self,
        vision: nn.Module,
        bridge: nn.Module,
        lm: nn.Module,
        image_token_id: int,
        precision: str = "auto",
        tiling=None,
        feature_cache: FeatureCache | None = None,
    ):
        super().__init__()
        self.vision, self.bridge, self.lm = vision, bridge, lm
        self.image_token_id = image_token_id
        self.precision = precision  # see models/precision.py
        self.packed_attention = "auto"  # packed rows: a flex_attention BlockMask on a GPU, a dense mask on a CPU
        self.feature_cache = feature_cache  # a frozen encoder's outputs per image (model.feature_cache)
        self.tiling = tiling  # how the processor lays out images (data/layouts.py)
        if self.deep_fusion:
            bridge.attach(lm)

    @property
    def deep_fusion(self) -> bool:
        return getattr(self.bridge, "fusion", "early") == "deep"

    @property
    def num_image_tokens(self) -> int:
        """The bridge's tokens per encoder view (an image's own count may differ: `visual_index`)."""
        return self.bridge.num_tokens

    @property
    def max_image_tokens(self) -> int:
        """The most tokens one image can take: the bridge's count, or under a tiling its largest layout."""
        if self.tiling is None or not self.tiling.varies:
            return self.num_image_tokens
        return self.tiling.max_count(self.vision.image_size, self.num_image_tokens)

    def place_visual(self, visual: torch.Tensor, visual_index: torch.Tensor | None) -> torch.Tensor:
        """[n_views, k, D] bridge outputs → [image tokens, D] in the order of the image-token positions: as they
        are, or, with a `visual_index` (data/layouts.py), gathered from them and the bridge's `image_newline`
        (index -1)."""
        flat = visual.reshape(-1, visual.shape[-1])
        if visual_index is None:
            return flat
        newline = getattr(self.bridge, "image_newline", None)
        if newline is not None:
            flat = torch.cat([flat, newline.to(flat.dtype)[None]], dim=0)
        elif visual_index.numel() and bool((visual_index < 0).any()):
            raise ValueError("visual_index asks for the image newline, but the bridge has no image_newline")
        if visual_index.dim() == 2:  # anyres_max: each token a weighted sum of four rows (data/layouts.py)
            rows, weights = visual_index[:, :4].long(), visual_index[:, 4:].to(flat.dtype)
            return (flat[rows] * weights[..., None]).sum(1)
        return flat[visual_index]

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (the device its inputs must be on)."""
        return next(self.parameters()).device

    def autocast(self):
        """The forward pass's precision context: bf16 autocast on a GPU, nothing on a CPU (by default)."""
        return autocast(self.precision, self.device)

    def set_image_size(self, image_size: int) -> None:
        """Encode `image_size` images from now on: the encoder interpolates its positions, the bridge follows its
        new grid (the tokens per image may change: give the processor `num_image_tokens` again)."""
        self.vision.resize(image_size)
        if self.feature_cache is not None:
            self.feature_cache.clear()
        self.bridge.regrid(self.vision.grid, self.vision.num_tokens)

    def parts(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "bridge": self.bridge, "lm": self.lm}

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_images, 3, H, W] → encoder tokens [n_images, T_in, D_vision] (no graph if it is frozen)."""
        cache = self.feature_cache
        if cache is not None and (self.vision.training or any(p.requires_grad for p in self.vision.parameters())):
            cache.clear()  # the encoder trains, or its outputs vary (dropout): what it gave before is stale
            cache = None
        if self.tiling is not None and self.tiling.mode == "monkey":  # each view its own window's adapter
            window_lora.mark(self.vision, window_ids(pixel_values.shape[0], self.tiling.windows, pixel_values.device))
        if any(p.requires_grad for p in self.vision.parameters()):
            return self.vision(pixel_values)
        with torch.no_grad():
            return self.vision(pixel_values) if cache is None else cache.lookup(pixel_values, self.vision)

    def _bridge(
        self,
        feats: torch.Tensor,
        instruction_ids: torch.Tensor | None,
        frame_counts: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        kwargs = {} if instruction_ids is None else {"instruction_ids": instruction_ids}
        if grid is not None and getattr(self.bridge, "reads_grid", False):  # positions for a view's own grid
            kwargs["grid"] = grid
        if getattr(self.bridge, "reads_words", False):  # concept tokens: the LM's own word embeddings
            kwargs["words"] = self.lm.get_input_embeddings().weight
        if frame_counts is not None and getattr(self.bridge, "reads_video", False):
            kwargs["frame_counts"] = frame_counts
        return self.bridge(feats, **kwargs)

    def encode_images(
        self,
        pixel_values: torch.Tensor,
        instruction_ids: torch.Tensor | None = None,
        frame_counts: torch.Tensor | None = None,
        view_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[n_frames, 3, H, W] → [n_inputs, num_image_tokens, lm_width] (an input: an image, or a whole video
        for a bridge that reads videos, its frames counted by `frame_counts`; or a view of its own size)."""
        if view_sizes is not None:
            return self.encode_views(pixel_values, view_sizes)
        return self._bridge(self.vision_features(pixel_values), instruction_ids, frame_counts)

    def encode_views(self, pixel_values: torch.Tensor, view_sizes: torch.Tensor) -> torch.Tensor:
        """Views of their own sizes (LLaVA-UHD's slices; zero-padded `pixel_values`, `view_sizes` [n, 2] of
        (height, width)) → [n, num_image_tokens, lm_width]: each size encoded as one batch with the position
        table interpolated to it, then compressed by the bridge to the same count. A frozen encoder's outputs come
        from `feature_cache` where it has them (keyed by each view's own pixels)."""
        trains = any(p.requires_grad for p in self.vision.parameters())
        cache = None if trains or self.vision.training else self.feature_cache
        groups: dict[tuple[int, int], list[int]] = {}
        for k, (h, w) in enumerate(view_sizes.tolist()):
            groups.setdefault((h, w), []).append(k)
        out = None
        for (h, w), rows in groups.items():  # one encoder pass per distinct size
            index = torch.tensor(rows, device=pixel_values.device)
            views = pixel_values[index, :, :h, :w]
            with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
                feats = (
                    self.vision.forward_any(views) if cache is None else cache.lookup(views, self.vision.forward_any)
                )
            patch = self.tiling.patch if self.tiling is not None else self.vision.image_size // self.vision.grid[1]
            tokens = self._bridge(feats, None, grid=(h // patch, w // patch))
            out = tokens.new_zeros(len(view_sizes), *tokens.shape[1:]) if out is None else out
            out = out.index_copy(0, index, tokens)
        return out

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        visual: torch.Tensor | None = None,
        instruction_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image positions replaced by visual tokens: `visual`
        ([n_images, num_image_tokens, width], e.g. Croc's partly replaced tokens) or, if not given,
        the encoded `pixel_values`."""
        return self.prepare(input_ids, pixel_values, visual, instruction_ids)[0]

    def prepare(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        visual: torch.Tensor | None = None,
        instruction_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        frame_counts: torch.Tensor | None = None,
        visual_index: torch.Tensor | None = None,
        view_sizes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """`embed`, plus the extra decoder keywords (`fusion`) a deep-fusion bridge needs for the same forward.
        LaVIN's adapters (models/mma.py), if the LM has them, learn here which samples hold an image; MoE layers
        (models/moe.py) which positions are padding (`attention_mask` [B, T] or `segment_ids` 0), for their
        balancing loss."""
        is_image = input_ids == self.image_token_id
        mma.mark(self.lm, is_image, segment_ids)
        if segment_ids is not None:
            moe.mark(self.lm, segment_ids != 0)
        else:
            moe.mark(self.lm, attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None)
        table = self.lm.get_input_embeddings()
        embeds = table(input_ids.masked_fill(is_image, 0))
        n_slots = int(is_image.sum())
        feats = None
        if visual is None:
            if pixel_values is None or pixel_values.numel() == 0:
                if n_slots:
                    raise ValueError(f"{n_slots} image tokens in the batch but no images")
                return embeds, {}
            if view_sizes is not None:
                visual = self.encode_views(pixel_values, view_sizes)
            else:
                feats = self.vision_features(pixel_values)
                visual = self._bridge(feats, instruction_ids, frame_counts)
        placed = self.place_visual(visual.to(embeds.dtype), visual_index)
        if placed.shape[0] != n_slots:
            got = (
                f"{visual.shape[0]} images x {visual.shape[1]} tokens"
                if visual_index is None
                else f"{placed.shape[0]} visual tokens (visual_index)"
            )
            raise ValueError(f"{got} do not match {n_slots} image-token positions in the batch")
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), placed)
        if not self.deep_fusion:
            return embeds, {}
        if feats is None:
            raise ValueError(f"{type(self.bridge).__name__} works inside the LM: give pixel_values, not visual tokens")
        return embeds, {"fusion": self.bridge.context(feats, is_image)}

    def packed_mask(self, segment_ids: torch.Tensor, attention_mask: torch.Tensor | None, dtype: torch.dtype):
        """Block-diagonal causal attention for packed rows: a flex_attention BlockMask where the LM can take one
        (`packed_attention`: `auto` = on a GPU; `block` forces it, `dense` never), else a dense additive mask."""
        use_block = self.packed_attention == "block" or (self.packed_attention == "auto" and segment_ids.is_cuda)
        if use_block and packed_attention.install(self.lm):
            return packed_attention.packed_block_mask(segment_ids, attention_mask)
        if attention_mask is None:
            attention_mask = (segment_ids != 0).long()
        return mixed_attention_mask(attention_mask, "causal", segment_ids=segment_ids, dtype=dtype)

    def target_loss(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        normalizer: float | None = None,
        weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy over labelled positions / `normalizer` (default: their count).

        `weights` ([B, T-1], see `mmbridge.loss_norm`) weigh each target; the count returned (a tensor,
        not read back to the host) is then their sum."""
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][keep])
        token_loss = F.cross_entropy(logits.float(), targets[keep], reduction="none")
        if weights is None:
            n = keep.sum()
        else:
            token_loss = token_loss * weights[keep]
            n = weights[keep].sum()
        loss = token_loss.sum()
        return loss / (normalizer if normalizer is not None else n.clamp(min=1)), n

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        normalizer: float | None = None,
        position_ids: torch.Tensor | None = None,
        instruction_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        target_weights: torch.Tensor | None = None,
        frame_counts: torch.Tensor | None = None,
        visual_index: torch.Tensor | None = None,
        view_sizes: torch.Tensor | None = None,
    ) -> LMOutput:
        """Next-token loss over labelled positions only; logits are computed only where needed.

        `segment_ids` ([B, T], packed rows: samples 1, 2, … and 0 for padding) make attention
        block-diagonal; give each sample's own `position_ids` with them. `visual_index` places a tiled batch's
        bridge outputs (data/layouts.py); `view_sizes` gives views of their own sizes (UHD)."""
        embeds, extra = self.prepare(
            input_ids,
            pixel_values,
            instruction_ids=instruction_ids,
            segment_ids=segment_ids,
            attention_mask=attention_mask,
            frame_counts=frame_counts,
            visual_index=visual_index,
            view_sizes=view_sizes,
        )
        if segment_ids is not None:
            attention_mask = self.packed_mask(segment_ids, attention_mask, embeds.dtype)
        decoder = self.lm.get_decoder()
        hidden = decoder(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **extra
        ).last_hidden_state
        if labels is None:
            return LMOutput(None, 0, hidden)
        loss, n = self.target_loss(hidden, labels, normalizer, target_weights)
        return LMOutput(loss, n, hidden)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        max_new_tokens: int = 32,
        eos_token_ids: list[int] | tuple = (),
        instruction_ids: torch.Tensor | None = None,
        temperature: float | Sequence[float] = 0.0,
        top_p: float | Sequence[float] = 1.0,
        generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
        on_token: Callable[[list[int | None]], Sequence[bool] | None] | None = None,
        frame_counts: torch.Tensor | None = None,
        visual_index: torch.Tensor | None = None,
        view_sizes: torch.Tensor | None = None,
        suffix_ids: torch.Tensor | None = None,
        suffix_mask: torch.Tensor | None = None,
        group: torch.Tensor | None = None,
    ) -> list[list[int]]:
        """Decoding with a KV cache; `input_ids` are left-padded prompts, on the model's device.

        Shared prefixes (several questions on one image): with `group` [B], `input_ids` are the prefixes (their
        images and the text before each question), row b's prompt being prefix `group[b]` followed by its
        `suffix_ids[b]` (left-padded, `suffix_mask`). Each prefix is read once and its cache copied to its rows.

        Greedy by default; a row with `temperature` > 0 samples from its top-p nucleus with its `generator`
        (one per row, or one for all; on the model's device), see `sampling.py`. `on_token`, if given, is
        called after every step with each row's new token (None for a row already finished) and may return
        one flag per row that ends that row after this token (a stop string, a client gone). Returns each
        row's tokens up to its first `eos_token_ids` token (excluded) or its end."""
        n = input_ids.shape[0] if group is None else group.numel()
        choose = partial(
            next_tokens,
            temperature=per_row(temperature, n, "temperature"),
            top_p=per_row(top_p, n, "top_p"),
            generators=per_row(generator, n, "generator"),
        )
        with self.autocast():
            return self._generate(
                input_ids,
                attention_mask,
                pixel_values,
                max_new_tokens,
                eos_token_ids,
                instruction_ids,
                choose,
                on_token,
                frame_counts,
                visual_index,
                view_sizes,
                (suffix_ids, suffix_mask, group) if group is not None else None,
            )

    def _generate(
        self,
        input_ids,
        attention_mask,
        pixel_values,
        max_new_tokens,
        eos_token_ids,
        instruction_ids,
        choose,
        on_token,
        frame_counts=None,
        visual_index=None,
        view_sizes=None,
        shared=None,
    ):
        embeds, extra = self.prepare(
            input_ids,
            pixel_values,
            instruction_ids=instruction_ids,
            frame_counts=frame_counts,
            visual_index=visual_index,
            view_sizes=view_sizes,
        )
        mask = attention_mask.clone()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # only the last position's logits are needed (a [B, T, vocab] product is a fifth of a small LM's prefill)
        keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(type(self.lm).forward).parameters else {}
        out = self.lm(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, **keep, **extra
        )
        # deep fusion: every new token is text and sees the prompt's last image
        step_extra = {"fusion": extra["fusion"].next_token()} if extra else {}
        # transformers renamed `past_key_values` to `cache` (5.2x); use whichever this version has
        key = (
            "cache"
            if "cache" in inspect.signature(type(self.lm.get_decoder()).forward).parameters
            else "past_key_values"
        )
        cache, last = out[key], positions[:, -1]
        if shared is not None:  # each row: its prefix's cache, then its own suffix
            suffix_ids, suffix_mask, group = shared
            if extra:
                raise ValueError("generate: shared prefixes need an early-fusion bridge (the image is in the prefix)")
            cache.batch_select_indices(group)
            mask = torch.cat([mask[group], suffix_mask], 1)
            last = (mask.cumsum(-1) - 1).clamp(min=0)[:, -suffix_ids.shape[1] :]
            out = self.lm(
                input_ids=suffix_ids, attention_mask=mask, position_ids=last, use_cache=True, **keep, **{key: cache}
            )
            cache, last = out[key], last[:, -1]
        rows = last.shape[0]
        eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=input_ids.device)
        done = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
        ends: list[int | None] = [None] * rows  # with `on_token`: each finished row's length
        tokens = []
        next_tok = choose(out.logits[:, -1])
        for step in range(max_new_tokens):
            tokens.append(next_tok)
            done |= torch.isin(next_tok, eos)
            if on_token is not None:
                self._report(next_tok, step, ends, set(eos_token_ids), on_token, done)
            if bool(done.all()) or step == max_new_tokens - 1:  # no forward pass for a token never kept
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            last = last + 1
            out = self.lm(
                input_ids=next_tok[:, None],
                attention_mask=mask,
                position_ids=last[:, None],
                use_cache=True,
                **{key: cache},
                **step_extra,
            )
            cache = out[key]
            next_tok = choose(out.logits[:, -1])
        seqs = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(rows)]
        result = []
        for seq, end in zip(seqs, ends):
            cut = next((i for i, t in enumerate(seq) if t in set(eos_token_ids)), len(seq))
            result.append(seq[: cut if end is None else min(cut, end)])
        return result

    @staticmethod
    def _report(next_tok, step, ends, eos, on_token, done) -> None:
        """Give `on_token` this step's tokens (None for rows finished before it); end the rows it flags.
        `ends` holds each finished row's length: before its stop token, or after a flagged token."""
        new = next_tok.tolist()
        flags = on_token([None if end is not None else t for t, end in zip(new, ends)]) or ()
        flags = list(flags) + [False] * (len(new) - len(flags))
        for row, (t, flag) in enumerate(zip(new, flags)):
            if ends[row] is None and t in eos:
                ends[row] = step
            elif ends[row] is None and flag:
                ends[row] = step + 1
        if any(flags):
            done |= torch.tensor([bool(f) for f in flags], device=done.device)
