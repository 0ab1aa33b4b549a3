"""Text-token reduction: train the text tower on at most ``length`` tokens of each caption, chosen by random,
block or syntax masking (CLIPA: Li, Wang and Xie, "An Inverse Scaling Law for CLIP Training", NeurIPS 2023,
https://arxiv.org/abs/2305.07017; OpenCLIP's tokenizer ``reduction_mask``).

**What.** Every training batch's captions keep their start and end tokens and ``length - 2`` of their content
tokens; the batch is cut to ``length`` positions, so the text tower runs that many. Captions that already fit are
unchanged. Which tokens stay:

- ``random``: a random subset, in caption order (CLIPA's best for its text encoder at short lengths);
- ``block``: a random run of consecutive tokens (OpenCLIP's ``simple``);
- ``syntax``: whole words by part of speech, nouns first, then adjectives, then verbs, then the rest (CLIPA's
  syntax masking; OpenCLIP's ``syntax``), in caption order. Needs ``nltk`` with its English tagger
  (``pip install nltk`` and ``python -m nltk.downloader averaged_perceptron_tagger_eng``): without them the
  algorithm is a config error, before any work.

This goes beyond ``model.trim_text_padding``, which only cuts padding and never changes a caption's embedding:
here the caption itself is shortened, as regularisation and to save compute on long captions.

**Evaluation is honest:** only training batches are reduced; zero-shot prompts and validation captions are whole.
Random choices draw from torch's global generator (saved in every checkpoint), so a resumed run masks exactly as
the uninterrupted one. Runs on ``AFTER_DATALOADER``, on every micro-batch once (gradient accumulation's two passes
see the same tokens).

**When it helps.** Long captions (web alt-text) with a large text tower: CLIPA trains at 8-32 tokens of 77. Where
captions are short already it saves little compute and can hurt when the dropped words are the ones that matter (a
short caption whose class word is masked out teaches nothing that step: syntax masking keeps the nouns); on the
digits (captions of 3-11 tokens) 8 tokens reached 90% after the same epochs as whole captions, 6 tokens an epoch
later in one seed (README: Time to accuracy).

**Measured** (time to accuracy, `python benchmarks/time_to_accuracy.py --algorithms --seeds 0 1 2 --budget 30`;
digits, `tiny-vit`, seeds 0, 1, 2, 2 idle CPU cores (Sapphire Rapids), 2026-12-06 21:39-21:50 UTC): Text-token
reduction (`length: 8, mode: random`) is part of the fastest recipe (`yamls/digits_fast.yaml`: Muon at lr 1.2e-2 with
momentum 0.5 and no warmup, an average of the weights with a half-life of 10 steps, the text embeddings frozen,
captions cut to 8 tokens); switched off there, 90% zero-shot top-1 after 9.5 s (median; per seed 6.6, 10.2, 9.5),
after epochs 1, 1, 1 (with it: 1, 1, 1), against 7.5 s with it (1.27x sooner with it), best top-1 within 30 s 0.9805
without against 0.9749 with it. README's method-card table has every algorithm side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from cadenza.engine.algorithm import Algorithm
from cadenza.engine.event import Event
from cadenza.engine.logger import Logger
from cadenza.engine.registry import ALGORITHMS
from cadenza.engine.state import State

MODES = ("random", "block", "syntax")
#: syntax masking keeps words in this order of their Penn Treebank tag (CLIPA; OpenCLIP's syntax_mask_tokenize)
TAG_PRIORITY = (("NN", 0), ("JJ", 1), ("VB", 2))

#: a tagger: words -> one Penn Treebank tag per word
Tagger = Callable[[list[str]], list[str]]


def word_priority(tag: str) -> int:
    """0 for nouns, 1 adjectives, 2 verbs, 3 anything else."""
    return next((rank for prefix, rank in TAG_PRIORITY if tag.startswith(prefix)), len(TAG_PRIORITY))


def keep_indices(
    count: int, keep: int, mode: str, priorities: Sequence[int] | None = None, generator: torch.Generator | None = None
) -> list[int]:
    """Which of ``count`` content tokens to keep (``keep`` of them, ascending).

    ``priorities`` (one per token, lower kept first; ties in caption order) is needed for ``syntax``.

    >>> keep_indices(5, 3, "syntax", priorities=[3, 0, 3, 1, 0])
    [1, 3, 4]
    """
    if count <= keep:
        return list(range(count))
    if mode == "random":
        return sorted(torch.randperm(count, generator=generator)[:keep].tolist())
    if mode == "block":
        start = int(torch.randint(0, count - keep + 1, (), generator=generator))
        return list(range(start, start + keep))
    if priorities is None or len(priorities) != count:
        raise ValueError("syntax masking needs one priority per token")
    ranked = sorted(range(count), key=lambda i: (priorities[i], i))
    return sorted(ranked[:keep])


def reduce_tokens(
    tokens: torch.Tensor,
    length: int,
    mode: str = "random",
    eot_id: int | None = None,
    priorities: Callable[[list[int]], list[int]] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(B, L)`` captions (start token, content, end token, zero padding) → ``(B, min(L, length))`` with at most
    ``length - 2`` content tokens each, chosen by ``mode``.

    Args:
        tokens: token ids; each row's end token is its largest id (CLIP's vocabulary), or ``eot_id``.
        length: tokens kept per caption, start and end included; at least 3.
        mode: ``random``, ``block`` or ``syntax``.
        eot_id: the end token's id; default each row's largest id.
        priorities: ``syntax`` only: a row's content ids → one priority per id (``word_priority``'s scale).
        generator: for ``random`` and ``block``; default torch's global one.

    >>> reduce_tokens(torch.tensor([[9, 1, 2, 3, 4, 10, 0], [9, 5, 10, 0, 0, 0, 0]]), 4, "block", 10).shape
    torch.Size([2, 4])
    """
    width = min(tokens.shape[1], length)
    out = tokens.new_zeros(tokens.shape[0], width)
    for row, caption in enumerate(tokens.tolist()):
        end = caption.index(eot_id) if eot_id is not None else max(range(len(caption)), key=caption.__getitem__)
        content = caption[1:end]
        ranks = priorities(content) if mode == "syntax" and len(content) > length - 2 else None
        kept = [content[i] for i in keep_indices(len(content), length - 2, mode, ranks, generator)]
        reduced = [caption[0], *kept, caption[end]][:width]
        out[row, : len(reduced)] = torch.tensor(reduced, dtype=tokens.dtype)
    return out


class SyntaxPriorities:
    """Content token ids → per-token priorities from their word's part of speech (cached per caption).

    Args:
        decode: one token id → its text (the tokenizer's ``decode``; a word ends with a space).
        tagger: words → Penn Treebank tags; default nltk's English perceptron tagger.
    """

    def __init__(self, decode: Callable[[list[int]], str], tagger: Tagger | None = None) -> None:
        self.decode = decode
        self.tagger = tagger or nltk_tagger()
        self._cache: dict[tuple[int, ...], list[int]] = {}

    def __call__(self, ids: list[int]) -> list[int]:
        key = tuple(ids)
        if key not in self._cache:
            words, owner, current = [], [], ""
            for token_id in ids:  # BPE pieces → words: a piece that ends a word decodes with a trailing space
                piece = self.decode([token_id])
                current += piece
                owner.append(len(words))
                if piece.endswith(" "):
                    words.append(current.strip())
                    current = ""
            if current:
                words.append(current.strip())
            ranks = [word_priority(tag) for tag in self.tagger(words)] if words else []
            self._cache[key] = [ranks[w] for w in owner]
        return self._cache[key]


def nltk_tagger() -> Tagger:
    """nltk's English part-of-speech tagger, or a ValueError saying how to install it."""
    try:
        import nltk

        nltk.pos_tag(["a", "test"])
    except (ImportError, LookupError) as error:
        raise ValueError(
            "mode 'syntax' tags words with nltk's English tagger, which is not available here "
            f"({type(error).__name__}). Install it with: pip install nltk && python -m nltk.downloader "
            "averaged_perceptron_tagger_eng; or use mode 'random' or 'block'."
        ) from None
    return lambda words: [tag for _, tag in nltk.pos_tag(words)]


@ALGORITHMS.register("text_token_reduction")
class TextTokenReduction(Algorithm):
    """Train on at most ``length`` tokens per caption.

    Args:
        length: tokens kept per caption, start and end tokens included (CLIPA: 8 to 32); at least 3.
        mode: ``random``, ``block`` or ``syntax`` (needs nltk).
    """

    def __init__(self, length: int = 16, mode: str = "random") -> None:
        if length < 3:
            raise ValueError(f"length must be at least 3 (start, one token, end), got {length}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.length = length
        self.mode = mode
        self._priorities = syntax_priorities() if mode == "syntax" else None

    def match(self, event: Event, state: State) -> bool:
        return event == Event.AFTER_DATALOADER

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        state.batch = [
            (images, reduce_tokens(tokens, self.length, self.mode, priorities=self._priorities))
            for images, tokens in state.batch
        ]


def syntax_priorities() -> SyntaxPriorities:
    from cadenza.models.tokenizer import get_tokenizer

    return SyntaxPriorities(get_tokenizer().decode)
