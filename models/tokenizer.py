"""CLIP's byte-level BPE tokenizer, giving the same token ids as OpenCLIP 3.3.0.

The tokenizer is the one OpenAI trained for CLIP (https://github.com/openai/CLIP) and OpenCLIP uses for every
``ViT-*`` and ``RN*`` model (``open_clip.get_tokenizer("ViT-B-32")``, ``open_clip.tokenize``). A caption goes
through four steps:

1. Cleaning, as OpenCLIP's default ``clean="lower"``: ``ftfy.fix_text``, HTML entities unescaped twice (so
   ``&amp;amp;`` becomes ``&``), runs of whitespace collapsed to one space, the ends stripped, lowercased.
2. Splitting into pieces with a regular expression: the contractions ``'s 't 're 've 'm 'll 'd``, runs of
   letters, single digits, and runs of other non-space characters.
3. Byte-level BPE: each piece's UTF-8 bytes are mapped to printable characters, ``</w>`` is appended to the last
   one, and the 48,894 merges of ``bpe_simple_vocab_16e6.txt.gz`` are applied, lowest rank first.
4. Framing: ``<start_of_text>`` + ids + ``<end_of_text>``, zero padding to the context length; a caption that is
   too long is cut and its last kept token replaced by ``<end_of_text>``.

As in OpenCLIP, the literal strings ``<start_of_text>`` and ``<end_of_text>`` inside a caption are read as the
special tokens, not as text.

Example:
    >>> tokenizer = get_tokenizer("ViT-B-32")
    >>> tokenizer.encode("a photo of a cat")
    [320, 1125, 539, 320, 2368]
    >>> tokenizer.decode([320, 1125, 539, 320, 2368])
    'a photo of a cat '
    >>> tokenizer(["a cat", ""], context_length=6).tolist()
    [[49406, 320, 2368, 49407, 0, 0], [49406, 49407, 0, 0, 0, 0]]
"""

from __future__ import annotations

import functools
import gzip
import html
import itertools
import os
from collections.abc import Iterable
from pathlib import Path

import ftfy
import regex
import torch

DEFAULT_CONTEXT_LENGTH = 77  # what every OpenAI CLIP model was trained with
VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"

# CLIP uses the first 48,894 merges of the file: 256 byte symbols + 256 byte symbols ending a word + 48,894 merged
# symbols + 2 special tokens = 49,408 ids.
_NUM_MERGES = 49152 - 256 - 2
_END_OF_WORD = "</w>"
# A word's BPE result is kept once computed; the cache is emptied when it grows past this many words.
_MAX_CACHED_WORDS = 1_000_000
# Whole captions likewise (datasets of class names or templates repeat them; unique captions only cost the lookup).
_MAX_CACHED_CAPTIONS = 10_000


class ClipTokenizer:
    """CLIP's byte-level BPE tokenizer (the same ids as OpenCLIP 3.3.0's ``SimpleTokenizer``).

    The object holds only plain Python data, so it pickles into data loader workers.

    Attributes:
        vocab_path: The gzipped merges file the vocabulary was built from.
        context_length: The number of tokens per caption that ``__call__`` returns by default.
        vocab_size: The number of token ids (49,408 for CLIP's vocabulary).
        sot_token_id: The id of ``<start_of_text>`` (49,406).
        eot_token_id: The id of ``<end_of_text>`` (49,407).
    """

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH, vocab_path: str | os.PathLike[str] | None = None):
        """Builds the vocabulary from the merges file.

        Args:
            context_length: The number of tokens per caption, start and end tokens included; at least 2.
            vocab_path: A gzipped BPE merges file in the format of CLIP's ``bpe_simple_vocab_16e6.txt.gz``. ``None``
                uses the copy shipped in this package.

        Raises:
            ValueError: If ``context_length`` is below 2 or the merges file is malformed.
            FileNotFoundError: If ``vocab_path`` does not exist.
        """
        _check_context_length(context_length, "context_length")
        self.context_length = context_length
        self.vocab_path = Path(vocab_path) if vocab_path is not None else Path(__file__).with_name(VOCAB_FILENAME)
        merges = _read_merges(str(self.vocab_path))

        self._byte_encoder = _byte_to_unicode()
        self._byte_decoder = {char: byte for byte, char in self._byte_encoder.items()}
        byte_symbols = list(self._byte_encoder.values())  # their order fixes ids 0-511
        vocab = [
            *byte_symbols,
            *(symbol + _END_OF_WORD for symbol in byte_symbols),
            *(first + second for first, second in merges),
            SOT_TOKEN,
            EOT_TOKEN,
        ]
        self._encoder = {symbol: token_id for token_id, symbol in enumerate(vocab)}
        self._decoder = {token_id: symbol for symbol, token_id in self._encoder.items()}
        self._merge_ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.vocab_size = len(self._encoder)
        self.sot_token_id = self._encoder[SOT_TOKEN]
        self.eot_token_id = self._encoder[EOT_TOKEN]

        self._special_ids = {SOT_TOKEN: (self.sot_token_id,), EOT_TOKEN: (self.eot_token_id,)}
        specials = "|".join(regex.escape(token) for token in self._special_ids)
        self._pattern = regex.compile(
            specials + r"|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+", regex.IGNORECASE
        )
        self._cache: dict[str, tuple[int, ...]] = {}
        self._caption_cache: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str) -> list[int]:
        """Cleans ``text`` and returns its BPE token ids, without start or end token.

        Args:
            text: A caption.

        Returns:
            The token ids; empty for a caption that cleans to the empty string.
        """
        ids: list[int] = []
        for piece in self._pattern.findall(clean_text(text)):
            ids.extend(self._encode_piece(piece))
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Turns token ids back into text, as OpenCLIP does.

        Every end of word becomes a space, so ``decode(encode("a cat"))`` is ``"a cat "``. Special and padding ids
        are decoded like any other (``0`` is ``"!"``): strip them first.

        Args:
            ids: Token ids, e.g. a list or a 1-D tensor.

        Returns:
            The text; invalid UTF-8 (from a cut multi-byte character) is replaced by U+FFFD.

        Raises:
            ValueError: If an id is outside ``[0, vocab_size)``.
        """
        symbols = []
        for token_id in ids:
            symbol = self._decoder.get(int(token_id))
            if symbol is None:
                raise ValueError(f"Token id {int(token_id)} is outside the vocabulary [0, {self.vocab_size}).")
            symbols.append(symbol)
        raw = bytes(self._byte_decoder[char] for char in "".join(symbols))
        return raw.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ")

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.LongTensor:
        """Tokenizes captions into a padded batch.

        Each row is ``<start_of_text>``, the caption's ids, ``<end_of_text>``, then zeros. A caption that does not
        fit is cut to ``context_length`` tokens and its last one replaced by ``<end_of_text>``.

        Args:
            texts: One caption or a list of captions.
            context_length: Tokens per row; ``None`` uses ``self.context_length``.

        Returns:
            A ``(len(texts), context_length)`` tensor of ``torch.long`` ids (``(1, context_length)`` for a string).

        Raises:
            ValueError: If ``context_length`` is below 2.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length if context_length is None else context_length
        _check_context_length(length, "context_length")

        if not texts:
            return torch.zeros(0, length, dtype=torch.long)
        rows = []
        for text in texts:
            ids = self._caption_cache.get(text)
            if ids is None:
                ids = (self.sot_token_id, *self.encode(text), self.eot_token_id)
                if len(self._caption_cache) >= _MAX_CACHED_CAPTIONS:
                    self._caption_cache.clear()
                self._caption_cache[text] = ids
            if len(ids) > length:
                ids = (*ids[: length - 1], self.eot_token_id)
            rows.append((*ids, *(0,) * (length - len(ids))))
        return torch.tensor(rows, dtype=torch.long)  # (N, L)

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        """Returns the ids of one piece of the split caption, from the cache when it has been seen."""
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        ids = self._special_ids.get(piece)
        if ids is None:
            symbols = _apply_merges(
                "".join(self._byte_encoder[byte] for byte in piece.encode("utf-8")), self._merge_ranks
            )
            ids = tuple(self._encoder[symbol] for symbol in symbols)
        if len(self._cache) >= _MAX_CACHED_WORDS:
            self._cache.clear()
        self._cache[piece] = ids
        return ids


def get_tokenizer(name: str | None = None, context_length: int | None = None) -> ClipTokenizer:
    """Returns the tokenizer for an architecture.

    Args:
        name: The architecture (e.g. ``"ViT-B-32"``). Every architecture uses CLIP's tokenizer for now.
        context_length: Tokens per caption; ``None`` means 77.

    Returns:
        A new ``ClipTokenizer``.
    """
    del name  # every architecture shares CLIP's tokenizer
    return ClipTokenizer(DEFAULT_CONTEXT_LENGTH if context_length is None else context_length)


def clean_text(text: str) -> str:
    """Cleans a caption as OpenCLIP's default ``"lower"`` cleaning does.

    Args:
        text: A raw caption.

    Returns:
        The caption with mojibake fixed (``ftfy``), HTML entities unescaped twice, whitespace runs collapsed to one
        space, the ends stripped, and lowercased.
    """
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))  # twice: web captions are often escaped twice (&amp;amp;)
    return " ".join(text.split()).lower()


def _check_context_length(value: int, key: str) -> None:
    """Raises if a context length cannot hold the start and end tokens."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"{key} must be an integer of at least 2 (start and end tokens), got {value!r}.")


@functools.cache
def _byte_to_unicode() -> dict[int, str]:
    """Maps each byte value to a printable character, so BPE never sees whitespace or control characters.

    The 188 printable Latin-1 bytes (``!``-``~``, ``¡``-``¬``, ``®``-``ÿ``) map to themselves, in that order; the
    other 68 map to U+0100 onwards, in byte order. The dict's order is the order of the first 256 ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + len(table) - len(printable))
    return table


@functools.lru_cache(maxsize=4)
def _read_merges(path: str) -> tuple[tuple[str, str], ...]:
    """Reads the first ``_NUM_MERGES`` merges of a gzipped merges file (its first line is a version header)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"BPE vocabulary {path!r} not found; pass vocab_path=None to use the packaged one.")
    with gzip.open(path, "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")[1 : 1 + _NUM_MERGES]
    merges = tuple(tuple(line.split()) for line in lines)
    malformed = sum(len(merge) != 2 for merge in merges)
    if len(merges) != _NUM_MERGES or malformed:
        raise ValueError(
            f"BPE vocabulary {path!r} is not a CLIP merges file: expected {_NUM_MERGES} lines of two symbols after "
            f"the header, got {len(merges)} lines ({malformed} malformed)."
        )
    return merges  # type: ignore[return-value]  # each merge has two symbols, checked above


def _apply_merges(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Splits a byte-encoded word into BPE symbols, the last one ending in ``</w>``.

    Starting from single characters, repeatedly merges every occurrence (left to right) of the adjacent pair with
    the lowest merge rank, until no adjacent pair is a known merge.
    """
    symbols = [*word[:-1], word[-1] + _END_OF_WORD]
    while len(symbols) > 1:
        best = min(itertools.pairwise(symbols), key=lambda pair: ranks.get(pair, len(ranks)))
        if best not in ranks:
            break
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(best[0] + best[1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols
