"""CoCa: a CLIP whose text decoder also captions the image (Yu et al., "CoCa: Contrastive Captioners are
Image-Text Foundation Models", 2022), as OpenCLIP 3.3.0's ``CoCa`` builds it.

- the image tower (``AttentionalPoolImageTower``) gives the image embedding and image tokens ``(B, Q - 1, E)``;
- the text tower (``TextTransformer(embed_cls=True)``) gives the text embedding, pooled at a class token appended
  after the caption, and the caption's token features ``(B, L, D)``;
- the multimodal decoder (``MultimodalDecoder``) runs causal self-attention over the caption's token features and
  cross-attention to the image tokens, then maps each position to vocabulary logits: the next token's prediction.

``forward(images, tokens)`` returns what ``CoCaLoss`` takes: normalized features, the logit scale, the decoder's
logits for positions ``0 .. L-2`` and the tokens they predict (``labels``, positions ``1 .. L-1``).
Parameter names are OpenCLIP's (``text_decoder.resblocks.N``, ``text_decoder.cross_attn.N.ln_1_kv``, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cadenza.models.clip import CLIP, LOGIT_SCALE_INIT, OPENAI_MEAN, OPENAI_STD
from cadenza.models.text import QuickGELU, ResidualAttentionBlock, SelfAttention, TextTransformer
from cadenza.models.vision import AttentionalPoolImageTower

#: OpenCLIP's tokenizer's start-of-text, end-of-text and padding ids (``CoCa.generate``'s defaults)
SOT_TOKEN_ID, EOT_TOKEN_ID, PAD_TOKEN_ID = 49406, 49407, 0


class CrossAttention(SelfAttention):
    """Queries from ``x``, keys and values from ``context``: ``nn.MultiheadAttention``'s parameters, fused SDPA."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        batch, length, width = x.shape  # (B, L, D)
        head_dim = width // self.heads
        w_q, w_kv = self.in_proj_weight.split([width, 2 * width])
        b_q, b_kv = self.in_proj_bias.split([width, 2 * width])
        q = F.linear(x, w_q, b_q).view(batch, length, self.heads, head_dim).transpose(1, 2)  # (B, H, L, d)
        kv = F.linear(context, w_kv, b_kv).view(batch, context.shape[1], 2, self.heads, head_dim)  # (B, N, 2, H, d)
        k, v = kv.permute(2, 0, 3, 1, 4)  # 2 x (B, H, N, d)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, d)
        return self.out_proj(x.transpose(1, 2).reshape(batch, length, width))


class CrossAttentionBlock(ResidualAttentionBlock):
    """Pre-norm cross-attention (the context gets its own norm, ``ln_1_kv``) and an MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__(width, heads, mlp_ratio, act_layer)
        self.attn = CrossAttention(width, heads)
        self.ln_1_kv = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x + self.attn(self.ln_1(x), self.ln_1_kv(context))
        return x + self.mlp(self.ln_2(x))


class MultimodalDecoder(nn.Module):
    """Caption token features ``(B, L, D)`` and image tokens ``(B, N, D)`` → next-token logits ``(B, L, V)``.

    Each layer is a causal self-attention block followed by a cross-attention block (OpenCLIP's
    ``MultimodalTransformer``). OpenCLIP never runs that class's ``init_parameters`` (its projection starts as
    uninitialised memory); this one is initialised as the text tower is.

    Args:
        width, heads, layers: transformer size; ``width`` must equal the text width and the image tokens' size.
        vocab_size: logits per position (the tokenizer's vocabulary).
        context_length: the longest caption it decodes (OpenCLIP's ``multimodal_cfg.context_length``).
        mlp_ratio: MLP hidden size over width.
        quick_gelu: OpenAI's activation.
    """

    def __init__(
        self,
        width: int = 512,
        heads: int = 8,
        layers: int = 12,
        vocab_size: int = 49408,
        context_length: int = 76,
        mlp_ratio: float = 4.0,
        quick_gelu: bool = False,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"decoder width {width} is not divisible by heads {heads}")
        act_layer = QuickGELU if quick_gelu else nn.GELU
        self.width = width
        self.context_length = context_length
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, act_layer) for _ in range(layers)]
        )
        self.cross_attn = nn.ModuleList(
            [CrossAttentionBlock(width, heads, mlp_ratio, act_layer) for _ in range(layers)]
        )
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, vocab_size))
        self.init_parameters()

    def init_parameters(self) -> None:
        layers = len(self.resblocks)
        proj_std = (self.width**-0.5) * ((2 * layers) ** -0.5)
        for block in [*self.resblocks, *self.cross_attn]:
            nn.init.normal_(block.attn.in_proj_weight, std=self.width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * self.width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.width**-0.5)

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        x = text_tokens  # (B, L, D)
        for block, cross in zip(self.resblocks, self.cross_attn, strict=True):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, True, use_reentrant=False)
                x = checkpoint(cross, x, image_tokens, use_reentrant=False)
            else:
                x = cross(block(x, causal=True), image_tokens)
        return self.ln_final(x) @ self.text_projection  # (B, L, V)


class CoCa(CLIP):
    """A CLIP (image and text embeddings, learnable temperature) with a captioning text decoder.

    Args:
        visual: CoCa's image tower (``images -> (embedding, image tokens)``).
        text: a text tower with ``embed_cls=True``.
        text_decoder: the multimodal decoder.
        init_logit_scale, init_logit_bias, image_mean, image_std: as :class:`CLIP`'s.
    """

    def __init__(
        self,
        visual: AttentionalPoolImageTower,
        text: TextTransformer,
        text_decoder: MultimodalDecoder,
        init_logit_scale: float = LOGIT_SCALE_INIT,
        init_logit_bias: float | None = None,
        image_mean: tuple[float, ...] = OPENAI_MEAN,
        image_std: tuple[float, ...] = OPENAI_STD,
    ) -> None:
        super().__init__(visual, text, init_logit_scale, init_logit_bias, image_mean, image_std)
        self.text_decoder = text_decoder

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(images)[0]
        return F.normalize(features, dim=-1) if normalize else features

    def forward(
        self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Normalized features, the logit scale and, given both inputs, ``logits`` ``(B, L-1, V)`` with their
        ``labels`` ``(B, L-1)`` (the next token at every position): OpenCLIP's ``CoCa.forward`` keys."""
        out: dict[str, torch.Tensor] = {"logit_scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        image_tokens = None
        if images is not None:
            image_features, image_tokens = self.visual(images)
            out["image_features"] = F.normalize(image_features, dim=-1)
        if tokens is not None:
            text_features, token_features = self.text.forward_tokens(tokens)
            out["text_features"] = F.normalize(text_features, dim=-1)
            if image_tokens is not None:
                out["logits"] = self.text_decoder(image_tokens, token_features[:, :-1])  # teacher forcing
                out["labels"] = tokens[:, 1:]
        return out

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        seq_len: int = 30,
        min_seq_len: int = 5,
        sot_token_id: int = SOT_TOKEN_ID,
        eot_token_id: int = EOT_TOKEN_ID,
        pad_token_id: int = PAD_TOKEN_ID,
    ) -> torch.Tensor:
        """Caption ``images`` greedily: the most likely next token at each step.

        The defaults are OpenCLIP's ``CoCa.generate``'s (at most 30 tokens, at least 5 before EOT is allowed,
        SOT 49406, EOT 49407, padding 0). OpenCLIP defaults to beam search; this equals its
        ``generation_type="top_k", top_k=1``. Decode with ``cadenza.models.get_tokenizer(name).decode``.

        Args:
            images: ``(B, 3, H, W)``, normalized as the model's eval transform does.
            seq_len: the longest output, SOT and EOT included (at most ``context_length``).
            min_seq_len: EOT is not chosen while the output is shorter than this.
            sot_token_id, eot_token_id, pad_token_id: the tokenizer's ids.

        Returns:
            ``(B, T)`` token ids, ``T <= seq_len``: SOT, the caption, EOT, then padding for captions that ended early.
        """
        if not 0 < min_seq_len < seq_len <= self.context_length:
            raise ValueError(
                f"need 0 < min_seq_len ({min_seq_len}) < seq_len ({seq_len}) <= context_length ({self.context_length})"
            )
        was_training = self.training
        self.eval()
        image_tokens = self.visual(images)[1]  # (B, N, E), once for every step
        out = torch.full((images.shape[0], 1), sot_token_id, dtype=torch.long, device=images.device)  # (B, 1)
        while True:
            done = (out[:, -1] == eot_token_id) | (out[:, -1] == pad_token_id)
            if done.all():
                break
            token_features = self.text.forward_tokens(out)[1]  # (B, T, D)
            logits = self.text_decoder(image_tokens, token_features)[:, -1]  # (B, V): the next token
            if out.shape[1] < min_seq_len:
                logits[:, eot_token_id] = -torch.inf
            following = logits.argmax(dim=-1)
            if out.shape[1] + 1 == seq_len:
                following.fill_(eot_token_id)  # the last place is EOT's
            following[done] = pad_token_id
            out = torch.cat([out, following[:, None]], dim=1)
            if out.shape[1] >= seq_len:
                break
        self.train(was_training)
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.text_decoder.grad_checkpointing = enable
