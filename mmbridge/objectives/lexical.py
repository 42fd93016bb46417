"""The `lexical` objective: align a continuous bridge's tokens with the LM's own words before the LM reads them.

A pretrained LM binds and reasons over its own word embeddings from the first step, but learns a new kind
of input slowly. This stage puts the bridge's tokens where the LM already reads, without any LM pass:

* the stage's data chooses a vocabulary (`words` ids: the answer words found in the most samples, as the
  `concepts` objective chooses them; captions suit best, since they name what is in the image);
* for a bridge whose last step is Linear → activation → Linear (`mlp`, `pool_adapter`, with
  `act: sigmoid`), the first `words` hidden units become word detectors and the output layer starts as
  their words' embeddings (the rest of it at zero): a token is then Σ_w p_w · E[w], a weighted bag of the
  words detected there, in the LM's own embedding space and at its scale. The detectors (everything before
  the output layer) train by multiple-instance learning (Fang et al., 2015): an image holds a word if one
  of its tokens does, so the image's logit for w is the largest of its tokens' pre-activations, with binary
  cross-entropy against the words of the sample's text. The output layer does not train here;
* any other early-fusion bridge (resampler, Q-Former, LLaMA-VID, …) is aligned through its output tokens: a
  token's logit for w is its dot product with E[w], times a learned scale plus a learned offset per word
  (these two live in the objective: set `lr.objective`).

`phrases` (a weight, 0 = off) adds a binding term for texts of several sentences that each describe one thing
(detailed captions, region descriptions): one token should hold all the vocabulary words of a sentence (the
token whose mean log-probability of them is highest), and at that token the words the image's other sentences
name, and this one does not, should be off. Word-level MIL alone lets a token that straddles two objects hold
the words of both; the LM then cannot tell which colour goes with which shape.

`exclusive` (a weight, 0 = off) asks each token to hold one word at most (its detections sum to 1 or less), so
that an object's words spread over its tokens, one word each, as the LM reads text.

Under a tiling (AnyRes, UHD) a bag is the whole image: its views' tokens in the order the LM reads them, so a
tile that does not show a word is not asked to hold it.

After the stage the bridge is an ordinary projector (exportable as LLaVA's where the shapes match): the LM
reads its continuous tokens directly, there is no vocabulary at inference, and later stages train every
weight, the output layer included, away from the words where the data asks for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmbridge.objectives.base import OBJECTIVES, LossOutput, Objective
from mmbridge.objectives.concepts import answer_rows, choose_vocabulary, images_per_row, word_mil

PAD = -1.0e4  # the word logit of a position that is no token (AnyRes's newline, a shorter image's padding)


def hidden_units(bridge) -> nn.Linear | None:
    """The bridge's output layer if its tokens come from hidden units through one (see bridges/mlp.py)."""
    return getattr(bridge, "output_layer", None) if hasattr(bridge, "pre_activation") else None


@OBJECTIVES.register("lexical")
class LexicalAlignment(Objective):
    """Word detectors on the bridge's tokens by multiple-instance learning; no LM pass.

    `words`: the vocabulary's size at most; `samples`, `min_count`, `max_share`, `exclude`: how the vocabulary is chosen
    (see `concepts.choose_vocabulary`)."""

    runs_lm = False  # the trainer counts the encoder's and bridge's FLOPs only

    def __init__(
        self,
        model,
        words: int = 64,
        samples: int = 4000,
        min_count: int = 3,
        max_share: float = 0.9,
        exclude: list[str] | tuple[str, ...] = (),
        phrases: float = 0.0,
        exclusive: float = 0.0,
    ):
        super().__init__(model)
        self.phrases, self.exclusive = float(phrases), float(exclusive)
        self.register_buffer("stop_ids", torch.zeros(0, dtype=torch.long), persistent=False)
        bridge = model.bridge
        if bridge.fusion != "early" or bridge.uses_instruction or getattr(bridge, "reads_words", False):
            raise ValueError(
                "objective lexical: the bridge must be an early-fusion bridge whose tokens the LM reads "
                f"as they are, without its own text side; got {type(bridge).__name__}"
            )
        self.samples, self.min_count, self.max_share, self.exclude = samples, min_count, max_share, tuple(exclude)
        self.words = int(words)  # at most; the stage's data may have fewer eligible words
        self.register_buffer("word_ids", torch.full((int(words),), -1, dtype=torch.long))
        head = hidden_units(bridge)
        if head is not None:
            if not isinstance(bridge.proj[-2], nn.Sigmoid):
                raise ValueError(
                    "objective lexical: the bridge's hidden units must read as probabilities; set "
                    f"model.bridge.act: sigmoid (got {type(bridge.proj[-2]).__name__})"
                )
            if words > head.in_features:
                raise ValueError(
                    f"objective lexical: {words} words for {head.in_features} hidden units "
                    "(the bridge's width); choose words ≤ the width"
                )
            self.scale = self.offset = None
        else:  # read the output tokens against the word embeddings
            self.scale = nn.Parameter(torch.zeros(()))  # log of the logits' scale
            self.offset = nn.Parameter(torch.zeros(int(words)))  # the first len(word_ids) are used

    @property
    def detects_in_hidden_units(self) -> bool:
        return self.scale is None

    def read_stage_data(self, model, datasets, tokenizer) -> None:
        """Choose the vocabulary; a hidden-unit bridge's output layer starts as its words' embeddings (the same
        values on every call, so a resumed stage finds them again) and stays fixed during the stage."""
        rows = answer_rows(datasets, self.samples)
        ids = choose_vocabulary(rows, tokenizer, self.words, self.min_count, self.max_share, self.exclude, at_most=True)
        self.word_ids = torch.as_tensor(ids, dtype=torch.long, device=self.word_ids.device)
        if self.phrases > 0:  # the binding term splits the text into sentences at these tokens
            stops = {
                t for text in (".", " .", "!", "?", "\n") for t in tokenizer.encode(text, add_special_tokens=False)[-1:]
            }
            self.stop_ids = torch.as_tensor(sorted(stops), dtype=torch.long, device=self.word_ids.device)
        if not self.detects_in_hidden_units:
            return
        head = hidden_units(model.bridge)
        table = model.lm.get_input_embeddings().weight.detach()
        with torch.no_grad():
            head.weight.zero_()
            head.weight[:, : len(ids)] = table[self.word_ids].to(head.weight).T
            head.bias.zero_()
        head.requires_grad_(False)
        if not any(p.requires_grad for p in model.bridge.parameters()):
            raise ValueError("objective lexical: nothing of the bridge trains; set train.bridge: full")

    def word_logits(self, model, pixel_values: torch.Tensor, view_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """[n_views, tokens, words]: each token's logit for each vocabulary word (a view: an image, or one of a
        tiling's views; `view_sizes` for views of their own sizes, LLaVA-UHD's)."""
        if bool((self.word_ids < 0).any()):
            raise RuntimeError("objective lexical: no vocabulary yet (read_stage_data chooses it)")
        if self.detects_in_hidden_units:
            if view_sizes is not None:
                raise ValueError("objective lexical: views of their own sizes need a token-read bridge (resampler)")
            return model.bridge.pre_activation(model.vision_features(pixel_values))[..., : len(self.word_ids)]
        table = model.lm.get_input_embeddings().weight[self.word_ids].detach()
        tokens = model.encode_images(pixel_values, view_sizes=view_sizes)
        return tokens @ table.to(tokens.dtype).T * self.scale.exp() + self.offset[: len(self.word_ids)]

    def image_logits(self, model, batch: dict) -> torch.Tensor:
        """[n_images, tokens, words]. Under a tiling whose counts vary (AnyRes, UHD) an image's tokens are its
        views' tokens in the order the LM reads them, padded to the batch's longest image with `PAD` (as are
        AnyRes's newlines), so that a bag of multiple-instance learning is a whole image, not one view."""
        per_view = self.word_logits(model, batch["pixel_values"], batch.get("view_sizes"))
        index = batch.get("visual_index")
        if index is None:
            return per_view
        if index.dim() != 1:
            raise ValueError("objective lexical: tokens blended from several views (anyres_max) are not supported")
        flat = per_view.reshape(-1, per_view.shape[-1])
        flat = torch.cat([flat, flat.new_full((1, flat.shape[1]), PAD)])  # index -1 (a newline) reads PAD
        slots = flat[index].split(batch["image_counts"].tolist())
        return nn.utils.rnn.pad_sequence(slots, batch_first=True, padding_value=PAD)

    def forward(self, model, batch: dict, normalizer: float | None = None) -> LossOutput:
        per_token = self.image_logits(model, batch)
        counts = batch.get("image_counts")  # present under a tiling whose counts vary
        loss, share, hit = word_mil(
            per_token,
            batch,
            model.image_token_id,
            model.bridge.num_tokens,
            self.word_ids,
            normalizer,
            "lexical",
            counts,
        )
        parts = {"lexical": (loss * share).detach()}
        if self.phrases > 0:
            bind = phrase_binding(per_token, batch, model.image_token_id, self.word_ids, self.stop_ids, counts)
            loss = loss + self.phrases * bind
            parts["phrases"] = (self.phrases * bind * share).detach()
        if self.exclusive > 0:  # a token holds one word at most: its detections sum to 1 or less
            real = per_token[..., 0] > PAD  # not a newline or padding
            excess = torch.relu(torch.sigmoid(per_token).sum(-1) - 1)[real].mean()
            loss = loss + self.exclusive * excess
            parts["exclusive"] = (self.exclusive * excess * share).detach()
        return LossOutput(loss * share, parts, {"word_accuracy": hit.detach()})


def phrase_binding(
    per_token: torch.Tensor,
    batch: dict,
    image_token_id: int,
    word_ids: torch.Tensor,
    stop_ids: torch.Tensor,
    image_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """The binding term (see the module's docstring) over rows of one image: per sentence of two or more vocabulary
    words, -mean log σ of its words at its best token, plus -mean log(1 - σ) of the image's other words there."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    per_row = images_per_row(input_ids, image_token_id, per_token.shape[1], image_counts)
    first = torch.cumsum(per_row, 0) - per_row  # each row's first image
    rows = torch.nonzero(per_row == 1).squeeze(1)
    if rows.numel() == 0:
        return per_token.sum() * 0.0
    lab = labels[rows]  # [R, L]
    sentence = torch.cumsum(torch.isin(lab, stop_ids).long(), 1)  # sentence index of each label position
    n_sent = int(sentence.max()) + 1
    hit = lab[:, :, None] == word_ids[None, None, :]  # [R, L, V]
    onehot = F.one_hot(sentence, n_sent).to(per_token.dtype)  # [R, L, S]
    words = torch.einsum("rls,rlv->rsv", onehot, hit.to(per_token.dtype)) > 0  # [R, S, V]
    in_image = words.any(1, keepdim=True)
    others = in_image & ~words
    size = words.sum(-1)  # [R, S]
    keep = size >= 2
    if not bool(keep.any()):
        return per_token.sum() * 0.0
    logits = per_token[first[rows]]  # [R, T, V]
    on, off = F.logsigmoid(logits), F.logsigmoid(-logits)
    w = words.to(logits.dtype)
    score = torch.einsum("rtv,rsv->rst", on, w) / size.clamp(min=1)[..., None]  # mean log-prob per token
    best = score.argmax(-1)  # [R, S]
    pos = -score.gather(-1, best[..., None]).squeeze(-1)
    at_best = off.gather(1, best[..., None].expand(-1, -1, off.shape[-1]))  # [R, S, V]
    o = others.to(logits.dtype)
    neg = -(at_best * o).sum(-1) / o.sum(-1).clamp(min=1)
    return (pos + neg)[keep].mean()
