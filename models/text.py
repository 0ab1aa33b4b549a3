"""The CLIP text tower: a causal transformer over BPE tokens, pooled at the EOT token, then projected.

CoCa's variant (``embed_cls``) appends a learned class token after the caption and pools that instead; it also
returns the per-token features its multimodal decoder reads.

Parameter names follow OpenCLIP's (``token_embedding``, ``transformer.resblocks.N.attn.in_proj_weight``,
``ln_final``, ``text_projection``, ``cls_emb``) so that weights move between the two by renaming a prefix only.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

#: on a CPU, attention over at most this many tokens runs as plain matrix multiplies (``matmul_attention``)
MATMUL_ATTENTION_MAX_TOKENS = 256


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + mask) v`` as two batched matrix multiplies: ``F.scaled_dot_product_attention``'s
    function. On a CPU, for the short sequences of CLIP's towers (50-256 tokens), its backward pass is 1.3-1.7x
    faster than the fused (flash) kernel's, at the cost of keeping the ``(B, H, L, L)`` weights; on a GPU the fused
    kernels win. ``mask``: boolean, True where a query may attend to a key."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, L, L)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1).to(v.dtype) @ v  # (B, H, L, d)


def prefers_matmul_attention(device: torch.device, tokens: int) -> bool:
    """Whether attention over ``tokens`` tokens on ``device`` is faster as ``matmul_attention`` (CPUs, short)."""
    return device.type == "cpu" and tokens <= MATMUL_ATTENTION_MAX_TOKENS


class QuickGELU(nn.Module):
    """OpenAI CLIP's sigmoid GELU approximation, used by its original checkpoints."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names, run by fused SDPA."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.matmul_attention = False  # set by the tower for its device (TextTransformer._apply)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attn_mask`` (boolean, True where a query may attend to a key) replaces ``causal`` when given."""
        batch, length, width = x.shape  # (B, L, D)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3D)
        q, k, v = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, d)
        if self.matmul_attention:
            if attn_mask is None and causal:
                attn_mask = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            x = matmul_attention(q, k, v, attn_mask)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None)
        return self.out_proj(x.transpose(1, 2).reshape(batch, length, width))  # (B, H, L, d) -> (B, L, D)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(width, hidden)), ("gelu", act_layer()), ("c_proj", nn.Linear(hidden, width))]
            )
        )

    def forward(self, x: torch.Tensor, causal: bool = True, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal, attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, act_layer=nn.GELU) -> None:
        super().__init__()
        self.width = width
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, act_layer) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor, causal: bool = True, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, attn_mask, use_reentrant=False)
            else:
                x = block(x, causal, attn_mask)
        return x


def trim_padding(tokens: torch.Tensor, pad_id: int = 0, multiple: int = 16) -> torch.Tensor:
    """``tokens[:, :n]`` for the smallest ``n`` that keeps every non-padding token of the batch, rounded up to a
    multiple of ``multiple`` (at most 5 shapes for a 77-token context: few kernels and compilations) and at most the
    width.

    The columns cut are padding in every row, so padding the result back restores ``tokens`` exactly. For a tower
    whose :attr:`TextTransformer.trims_padding` is true the embeddings are the same: a batch of 12-token captions
    costs the text tower 16 positions instead of 77. Reads ``tokens`` (a device sync if they are on an accelerator:
    trim on the CPU, before the transfer).
    """
    used = (tokens != pad_id).any(dim=0).nonzero()  # (K, 1): columns with a non-padding token in some row
    width = tokens.shape[1]
    length = int(used[-1]) + 1 if len(used) else 1
    length = min(width, -(-length // multiple) * multiple)
    return tokens if length == width else tokens[:, :length]


class TextTransformer(nn.Module):
    """Token ids ``(B, L)`` → text embeddings ``(B, embed_dim)``.

    Args:
        context_length: tokens per caption (77 for OpenCLIP's models).
        vocab_size: BPE vocabulary size (49,408).
        width, heads, layers: transformer size.
        embed_dim: size of the joint image–text space.
        quick_gelu: OpenAI's activation (for OpenAI-trained checkpoints).
        embed_cls: CoCa's class token, appended after the caption and pooled (its position embedding is one more
            than ``context_length``); the EOT token is pooled otherwise.
        pad_id: the padding token id (0, OpenCLIP's tokenizer's); CoCa's attention mask skips padding.
    """

    def __init__(
        self,
        context_length: int = 77,
        vocab_size: int = 49408,
        width: int = 512,
        heads: int = 8,
        layers: int = 12,
        embed_dim: int = 512,
        mlp_ratio: float = 4.0,
        quick_gelu: bool = False,
        embed_cls: bool = False,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.cls_emb = nn.Parameter(torch.empty(width)) if embed_cls else None
        self.positional_embedding = nn.Parameter(torch.empty(context_length + int(embed_cls), width))
        self.transformer = Transformer(width, layers, heads, mlp_ratio, QuickGELU if quick_gelu else nn.GELU)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.init_parameters()
        self._choose_attention()

    def _apply(self, fn, recurse: bool = True):  # .to(device) and friends: attention follows the device
        module = super()._apply(fn, recurse)
        self._choose_attention()
        return module

    def _choose_attention(self) -> None:
        matmul = prefers_matmul_attention(self.positional_embedding.device, self.positional_embedding.shape[0])
        for block in self.transformer.resblocks:
            block.attn.matmul_attention = matmul

    def init_parameters(self) -> None:
        """OpenCLIP's initialisation (scaled by depth for the residual projections)."""
        width, layers = self.transformer.width, len(self.transformer.resblocks)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.cls_emb is not None:
            nn.init.normal_(self.cls_emb, std=0.01)
        proj_std = (width**-0.5) * ((2 * layers) ** -0.5)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    @property
    def trims_padding(self) -> bool:
        """Whether captions may come cut after their last non-padding token (:func:`trim_padding`) with the same
        embeddings: attention is causal and the EOT token is pooled, so no position before it sees what follows.
        CoCa's tower pools a class token placed after the whole context, so it needs every position."""
        return self.cls_emb is None

    def no_weight_decay(self) -> set[str]:
        return set() if self.cls_emb is None else {"cls_emb"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's ``group_matcher`` format: the embeddings, each block (``ln_final`` joins the last, as a ViT's final
        norm does), then the projection (unmatched: last). ``coarse`` changes nothing."""
        return {
            "stem": r"^token_embedding|^positional_embedding|^cls_emb",
            "blocks": [(r"^transformer\.resblocks\.(\d+)", None), (r"^ln_final", (99999,))],
        }

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cls_emb is not None:
            return self.forward_tokens(tokens)[0]
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:length]  # (B, L, D)
        x = self.ln_final(self.transformer(x, causal=True))
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # EOT has the largest id: (B, D)
        return pooled @ self.text_projection  # (B, E)

    def forward_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CoCa's text encoding: the embedding ``(B, E)`` pooled at the class token, and every caption token's
        features ``(B, L, D)`` (before ``ln_final``, as OpenCLIP's) for the multimodal decoder."""
        if self.cls_emb is None:
            raise ValueError("forward_tokens needs the class token (embed_cls=True)")
        batch, length = tokens.shape
        x = self.token_embedding(tokens)  # (B, L, D)
        x = torch.cat([x, self.cls_emb.to(x.dtype).expand(batch, 1, -1)], dim=1)  # (B, L + 1, D)
        x = x + self.positional_embedding[: length + 1]
        x = self.transformer(x, attn_mask=self._cls_attention_mask(tokens))
        pooled = self.ln_final(x[:, -1])  # (B, D): the class token, normed after pooling
        return pooled @ self.text_projection, x[:, :-1]

    def _cls_attention_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, 1, L + 1, L + 1)``, True where a query may attend to a key: causal, and no padding keys.

        The padding mask is OpenCLIP's legacy one (``correct_cls_mask=False``), which the published CoCa weights were
        trained with: it is shifted one position right, so key ``j`` is masked when token ``j - 1`` is padding (key 0
        is always kept, hence every row attends somewhere).
        """
        batch, length = tokens.shape
        causal = torch.ones(length + 1, length + 1, dtype=torch.bool, device=tokens.device).tril()
        keys = torch.cat([tokens.new_ones(batch, 1, dtype=torch.bool), tokens != self.pad_id], dim=1)  # (B, L + 1)
        return causal[None, None] & keys[:, None, None, :]
