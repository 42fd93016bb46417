"""Object tokens: each object the bridge detects, told to the LM as its own words and its box's digits.

Objects are points (Zhou et al., "Objects as points", 2019): an object is the cell of the encoder's grid
that holds its box centre. A small convolutional head over the grid gives each cell an objectness logit, a box
(its centre within one cell of the cell's own, and a half-size up to half the image) and a detector embedding,
scored against the LM's word embeddings as concept tokens are (bridges/concepts.py). The embedding also reads
where its box is (Fourier features of the box centre, `frequencies` of them per axis), so that words of place
("top", "left") are told by the box, not by the cell alone, which straddles their borders. The `objects` objective
(objectives/objects.py) trains it from boxes and captions.

The LM reads, for each of the `objects` best cells (local maxima of objectness, present ones left to right,
then the rest): the embeddings of its `slots` best words in reading order (the vocabulary's order, which the
objective sets to the order the captions write words in, so an object reads "large red circle top left"; or
best first with `word_order: score`), each weighted by its detection probability, then its
box written as the training data writes boxes (`box_format`, coordinates in [0, 999]: "[503, 71, 726, 941]",
`box_tokens` of the LM's own tokens, the tail left empty where a coordinate has fewer than three digits), all
weighted by the object's probability, plus a learned embedding per position. A box answer is then a copy of
text in view, which a pretrained LM does from its first steps, and a count is of how many objects it sees.

Limits. It is a word bottleneck, not a continuous bridge: the LM reads only vocabulary words and box digits, so
what the vocabulary cannot name (texture, text, relations) does not reach it. The vocabulary is chosen from the
objects stage's data (the demo recipe's `words: 19` and the objective's `exclude` are fitted to the shapes
world's inventory); other data needs its own. It assumes one object per grid cell (two box centres in one cell
are one object), one image per sample, boxes written as integers in [0, 999] (data whose boxes are decimals in
[0, 1] is refused by the objective rather than written back in another form) and a tokenizer that writes numbers
digit by digit (the objective raises DigitTokenizerError otherwise, e.g. for Llama-3's). The grid is fixed
(`regrid` refuses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmbridge.models.bridges.base import BRIDGES, Bridge

BOX_DIGITS = 12  # four coordinates in [0, 999], three digits each


@BRIDGES.register("objects")
class ObjectTokens(Bridge):
    """[B, rows·cols, D_vision] grid → [B, objects · (slots + box_tokens), D_lm] word and box-text tokens."""

    reads_words = True  # the composite passes the LM's input-embedding table to forward
    run_buffers = ("word_ids", "digit_ids", "box_template")  # set by the objects objective, saved with the weights

    def __init__(
        self,
        vision_dim,
        lm_dim,
        grid,
        objects: int = 3,
        words: int = 24,
        slots: int = 4,
        hidden: int = 256,
        box_format: str = "[{}, {}, {}, {}]",
        box_tokens: int = 20,
        frequencies: int = 6,
        word_order: str = "reading",
        pos_std: float = 0.5,
        slot_std: float = 0.02,
        l2_normalize: bool = False,
        in_tokens=None,
    ):
        super().__init__(vision_dim, lm_dim, grid, l2_normalize, in_tokens)
        if self.in_tokens != self.grid[0] * self.grid[1]:
            raise ValueError("objects: the bridge needs the patch grid only; set drop_cls: true on the vision encoder")
        if not 1 <= slots <= words:
            raise ValueError(f"objects: slots must be between 1 and words ({words}), got {slots}")
        if not 1 <= objects <= self.in_tokens:
            raise ValueError(f"objects: objects must be between 1 and the grid's {self.in_tokens} cells, got {objects}")
        if box_format.count("{}") != 4 or box_tokens < BOX_DIGITS:
            raise ValueError(
                f"objects: box_format needs four {{}} fields and box_tokens at least {BOX_DIGITS}, got "
                f"{box_format!r} and {box_tokens}"
            )
        if word_order not in ("reading", "score"):
            raise ValueError(f"objects: word_order is 'reading' or 'score', got {word_order!r}")
        self.objects, self.slots, self.box_format, self.word_order = objects, slots, box_format, word_order
        self.pos = nn.Parameter(torch.randn(vision_dim, *self.grid) * pos_std)  # CNN features carry little position
        self.trunk = nn.Conv2d(vision_dim, hidden, 3, padding=1)
        self.head = nn.Conv2d(hidden, 5, 1)  # objectness, centre offset (2), half-size (2)
        self.frequencies = frequencies
        self.where = (
            nn.Sequential(nn.Linear(4 * frequencies, hidden), nn.GELU(), nn.Linear(hidden, hidden))
            if frequencies
            else None
        )
        self.embed = nn.Linear(hidden, lm_dim)  # the detector embedding, scored against word embeddings
        self.register_buffer("word_ids", torch.full((words,), -1, dtype=torch.long))
        self.register_buffer("digit_ids", torch.full((10,), -1, dtype=torch.long))
        # the box's text as token ids, -1 where a digit goes (e.g. "[", d, d, d, ",", " ", ..., "]")
        self.register_buffer("box_template", torch.full((box_tokens,), -2, dtype=torch.long))
        self.slot_embed = nn.Parameter(torch.randn(objects, slots + box_tokens, lm_dim) * slot_std)

    @property
    def num_tokens(self) -> int:
        return self.objects * (self.slots + len(self.box_template))

    def regrid(self, grid, in_tokens) -> None:
        if tuple(grid) != self.grid:
            raise ValueError("objects: the position table is per cell of the grid; keep the image size")
        super().regrid(grid, in_tokens)

    def set_vocabulary(self, ids: list[int], digits: list[int], template: list[int]) -> None:
        """Word and digit token ids, and the box's text (`box_format` tokenised, -1 for each of its 12 digits)."""
        if len(ids) != len(self.word_ids) or len(digits) != 10:
            raise ValueError(
                f"objects: {len(self.word_ids)} words and 10 digits expected, got {len(ids)}, {len(digits)}"
            )
        if len(template) != len(self.box_template) or sum(t == -1 for t in template) != BOX_DIGITS:
            raise ValueError(
                f"objects: the box's text {self.box_format!r} is {len(template)} tokens with "
                f"{sum(t == -1 for t in template)} digits; set model.bridge.box_tokens: {len(template)}"
            )
        self.word_ids.copy_(torch.as_tensor(ids, dtype=torch.long))
        self.digit_ids.copy_(torch.as_tensor(digits, dtype=torch.long))
        self.box_template.copy_(torch.as_tensor(template, dtype=torch.long))

    def maps(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per cell: `objectness` logits [B, R, C], `boxes` (x0, y0, x1, y1 in image fractions) [B, R, C, 4]
        and detector `embed`dings [B, R, C, D_lm]."""
        b, t, d = feats.shape
        rows, cols = self.grid
        if t != rows * cols:
            raise ValueError(f"objects: expected {rows}x{cols}={rows * cols} tokens per image, got {t}")
        x = F.gelu(self.trunk(feats.transpose(1, 2).reshape(b, d, rows, cols) + self.pos.to(feats.dtype)))
        out = self.head(x).permute(0, 2, 3, 1)
        ys = (torch.arange(rows, device=x.device, dtype=out.dtype) + 0.5) / rows
        xs = (torch.arange(cols, device=x.device, dtype=out.dtype) + 0.5) / cols
        cell = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), -1)  # [R, C, (x, y)]
        step = torch.tensor([1 / cols, 1 / rows], device=x.device, dtype=out.dtype)
        centre = cell + torch.tanh(out[..., 1:3]) * step
        half = 0.5 * torch.sigmoid(out[..., 3:5])
        h = x.permute(0, 2, 3, 1)
        if self.where is not None:  # the words read the box's place; they do not move it
            angle = (
                centre.detach()[..., None]
                * torch.arange(1, self.frequencies + 1, device=h.device, dtype=h.dtype)
                * torch.pi
            )
            h = h + self.where(torch.cat([angle.sin(), angle.cos()], -1).flatten(-2))
        return {
            "objectness": out[..., 0],
            "boxes": torch.cat([centre - half, centre + half], -1),
            "embed": self.embed(h),
        }

    def peaks(self, objectness: torch.Tensor) -> torch.Tensor:
        """Cell indices [B, objects] (row-major) of the best local maxima of objectness: present ones (p > 0.5)
        first, left to right by column, then the rest by objectness."""
        b, rows, cols = objectness.shape
        local = objectness == F.max_pool2d(objectness[:, None], 3, 1, 1)[:, 0]
        score = torch.where(local, objectness, objectness - 1e4).flatten(1)
        top = score.topk(self.objects, dim=1).indices
        present = objectness.flatten(1).gather(1, top) > 0
        reading = top % cols * rows + top // cols  # column-major: left to right, then top to bottom
        rest = rows * cols + torch.arange(self.objects, device=top.device)
        order = torch.where(present, reading, rest).argsort(dim=1, stable=True)
        return top.gather(1, order)

    @staticmethod
    def at(cells: torch.Tensor, grid_values: torch.Tensor) -> torch.Tensor:
        """`grid_values` [B, R, C, ...] at the cells [B, K] (row-major indices) → [B, K, ...]."""
        flat = grid_values.flatten(1, 2)
        index = cells.reshape(*cells.shape, *[1] * (flat.dim() - 2)).expand(*cells.shape, *flat.shape[2:])
        return flat.gather(1, index)

    def scores(self, embed: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """Detector logits [..., V]: each cell's embedding against each vocabulary word's."""
        if bool((self.word_ids < 0).any()):
            raise RuntimeError("objects: no vocabulary yet; a stage with the `objects` objective chooses it")
        return embed @ words[self.word_ids].to(embed.dtype).T

    def box_text(self, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes [..., 4] in image fractions → their text as token ids [..., box_tokens] and which are written:
        `box_format` with the coordinates in [0, 999] and no leading zeros ("[15, 0, 500, 999]"), the text
        moved up over the dropped zeros and the tail left empty."""
        coords = (boxes * 1000).floor().clamp(0, 999).long()
        digits = torch.stack([coords // 100, coords // 10 % 10, coords % 10], -1).flatten(-2)
        shown = torch.stack([coords >= 100, coords >= 10, torch.ones_like(coords, dtype=torch.bool)], -1).flatten(-2)
        slot = self.box_template == -1
        ids = self.box_template.expand(*coords.shape[:-1], -1).clone()
        ids[..., slot] = self.digit_ids[digits]
        written = torch.ones_like(ids, dtype=torch.bool)
        written[..., slot] = shown
        order = (~written).to(torch.uint8).argsort(dim=-1, stable=True)  # written tokens first, in order
        return ids.gather(-1, order), written.gather(-1, order)

    def project(self, feats: torch.Tensor, words: torch.Tensor | None = None) -> torch.Tensor:
        if words is None:
            raise ValueError("objects: the LM's input-embedding table is needed (pass words=)")
        with torch.no_grad():  # the detector trains only under the objects objective
            m = self.maps(feats)
            cells = self.peaks(m["objectness"])
            top = self.scores(self.at(cells, m["embed"]), words).topk(self.slots, dim=-1)
            index, value = top.indices, top.values
            if self.word_order == "reading":
                index, order = index.sort(dim=-1)
                value = value.gather(-1, order)
            p = torch.sigmoid(self.at(cells, m["objectness"]))
            boxes = self.at(cells, m["boxes"])
        table = words.to(self.slot_embed.dtype)
        word_tok = table[self.word_ids][index] * torch.sigmoid(value)[..., None].to(table.dtype)
        box_ids, written = self.box_text(boxes)
        box_tok = table[box_ids] * written[..., None].to(table.dtype)  # the empty tail is the position alone
        tokens = torch.cat([word_tok, box_tok], 2) * p[..., None, None].to(table.dtype)
        return (tokens + self.slot_embed).flatten(1, 2)
