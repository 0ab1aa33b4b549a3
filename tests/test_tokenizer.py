"""Parity of ``cadenza.models.tokenizer`` with OpenCLIP 3.3.0's CLIP tokenizer, and its own contract."""

from __future__ import annotations

import doctest
import gzip
import hashlib
import importlib.resources
import pickle
import random
from pathlib import Path

import pytest
import torch

from cadenza.models import tokenizer as tokenizer_module
from cadenza.models.tokenizer import VOCAB_FILENAME, ClipTokenizer, get_tokenizer

CLIP_VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
SOT, EOT = 49406, 49407

TRICKY_CAPTIONS = {
    "accents": "Café crème brûlée, naïve résumé à São Paulo",
    "cjk": "東京タワーの夜景 北京烤鸭",
    "korean": "안녕하세요 세계, 서울의 밤",
    "mixed_scripts": "Ünïcödé ǅ straße ﬁsh İstanbul Ωμέγα Привет мир",
    "html_entities": "Tom &amp; Jerry say &quot;hi&quot; &lt;b&gt;bold&lt;/b&gt; &#39;quoted&#39; &eacute;",
    "double_escaped_html": "salt &amp;amp; pepper &amp;quot;fresh&amp;quot;",
    "mojibake": "cafÃ© dÃ©jÃ  vu",
    "emoji": "I ❤️ my 🐱 and 🐶! 👍🏽 🇫🇷 👨‍👩‍👧",
    "punctuation": "Wait... what?!? (yes) [no] {maybe} -- a/b_c @home #tag $5 100% ~tilde~ `code`",
    "numbers": "3.14159 and 1,000,000 in 2024; 42nd street, 7th ave, 0x1F",
    "contractions": "it's the cat's toy, don't we're they've I'm we'll he'd IT'S DON'T",
    "whitespace": "  a\n\nphoto \t\t of\r\n a   cat\u00a0on\u2003a mat  ",
    "uppercase": "A PHOTO OF A DOG IN NEW YORK",
    "special_token_strings": "<start_of_text>hello<end_of_text> <START_OF_TEXT> <ſtart_of_text>",
    "control_characters": "tab\u0009bell\u0007null\u0000zero\u200bwidth",
    "only_whitespace": " \n\t ",
    "only_punctuation": "!!!???...",
    "single_character": "x",
}
LONG_CAPTION = " ".join(["a very long caption about a photo of a cat sitting on a mat near the window"] * 20)


@pytest.fixture(scope="module")
def reference():
    """OpenCLIP's tokenizer for ViT-B-32, the ground truth."""
    open_clip = pytest.importorskip("open_clip")
    assert open_clip.__version__ == "3.3.0", "these parity tests pin open_clip_torch==3.3.0 (the dev dependency)"
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return get_tokenizer("ViT-B-32")


@pytest.mark.parametrize("text", TRICKY_CAPTIONS.values(), ids=TRICKY_CAPTIONS.keys())
def test_matches_open_clip_on_tricky_captions(tokenizer, reference, text):
    assert tokenizer.encode(text) == reference.encode(text)
    assert torch.equal(tokenizer(text), reference(text))


def test_matches_open_clip_on_a_batch(tokenizer, reference):
    import open_clip

    texts = [*TRICKY_CAPTIONS.values(), LONG_CAPTION, ""]
    tokens = tokenizer(texts)
    assert tokens.shape == (len(texts), 77)
    assert tokens.dtype == torch.long
    assert torch.equal(tokens, reference(texts))
    assert torch.equal(tokens, open_clip.tokenize(texts))


@pytest.mark.parametrize("context_length", [2, 5, 16, 32, 77, 100])
def test_matches_open_clip_at_other_context_lengths(reference, context_length):
    texts = [*TRICKY_CAPTIONS.values(), LONG_CAPTION, ""]
    expected = reference(texts, context_length=context_length)
    assert torch.equal(get_tokenizer(context_length=context_length)(texts), expected)
    assert torch.equal(get_tokenizer()(texts, context_length=context_length), expected)
    assert torch.equal(ClipTokenizer(context_length=context_length)(texts), expected)


@pytest.mark.parametrize("context_length", [77, 32])
def test_long_caption_is_truncated_keeping_eot_last(tokenizer, reference, context_length):
    ids = tokenizer.encode(LONG_CAPTION)
    assert len(ids) > context_length

    tokens = tokenizer(LONG_CAPTION, context_length=context_length)

    assert tokens.shape == (1, context_length)
    assert tokens[0].tolist() == [SOT, *ids[: context_length - 2], EOT]
    assert torch.equal(tokens, reference(LONG_CAPTION, context_length=context_length))


def test_a_repeated_caption_is_cut_for_each_call(reference):
    """Captions are cached whole: the second call, at another length, is still OpenCLIP's row."""
    tokenizer = ClipTokenizer()
    for context_length in (77, 8, 77, 8):
        expected = reference([LONG_CAPTION, "a cat"], context_length=context_length)
        assert torch.equal(tokenizer([LONG_CAPTION, "a cat"], context_length=context_length), expected)
    assert LONG_CAPTION in tokenizer._caption_cache


def test_caption_that_exactly_fits_is_not_cut(tokenizer):
    ids = tokenizer.encode(LONG_CAPTION)[:30]
    text = tokenizer.decode(ids)
    assert tokenizer(text, context_length=32)[0].tolist() == [SOT, *ids, EOT]


def test_empty_string_is_sot_eot_then_padding(tokenizer, reference):
    assert tokenizer.encode("") == []
    expected = torch.tensor([[SOT, EOT] + [0] * 75])
    assert torch.equal(tokenizer(""), expected)
    assert torch.equal(tokenizer([""]), expected)
    assert torch.equal(reference(""), expected)


def test_empty_batch(tokenizer):
    assert tokenizer([]).shape == (0, 77)


def test_html_is_unescaped_twice_and_text_lowercased(tokenizer):
    assert tokenizer.encode("salt &amp;amp; PEPPER") == tokenizer.encode("salt & pepper")
    assert tokenizer.encode("a\n\n\tcat  ") == tokenizer.encode("a cat")


def test_special_token_strings_in_text_become_special_ids(tokenizer):
    assert tokenizer.encode("<start_of_text>a<end_of_text>") == [SOT, 320, EOT]


def test_matches_open_clip_on_random_unicode(tokenizer, reference):
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x4FF), (0x600, 0x6FF), (0x3040, 0x30FF), (0x4E00, 0x4FFF)]
    blocks += [(0xAC00, 0xAD00), (0x1F300, 0x1F6FF), (0x0, 0x1F), (0x2000, 0x206F)]
    rng = random.Random(0)
    texts = []
    for _ in range(300):
        chars = [chr(rng.randint(*rng.choice(blocks))) for _ in range(rng.randint(0, 30))]
        texts.append("".join(chars))
    assert torch.equal(tokenizer(texts), reference(texts))
    for text in texts:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == reference.decode(ids)


@pytest.mark.parametrize("text", ["a photo of a cat", "two dogs playing in the snow", "x", "a cat sitting on the mat"])
def test_encode_decode_round_trip(tokenizer, text):
    # Each end of word decodes to a space, so the text comes back with one trailing space.
    assert tokenizer.decode(tokenizer.encode(text)) == text + " "


def test_digits_are_single_tokens(tokenizer):
    assert tokenizer.decode(tokenizer.encode("year 2024")) == "year 2 0 2 4 "


def test_decode_accepts_a_tensor_row(tokenizer, reference):
    row = tokenizer("a photo of a cat")[0]
    ids = row[1 : int((row == EOT).nonzero()[0])]
    assert tokenizer.decode(ids) == "a photo of a cat "
    assert tokenizer.decode(row[:7]) == reference.decode(row[:7].tolist())


def test_attributes_match_open_clip(tokenizer, reference):
    assert tokenizer.vocab_size == reference.vocab_size == 49408
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id) == (reference.sot_token_id, reference.eot_token_id)
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id) == (SOT, EOT)
    assert tokenizer.context_length == 77
    assert get_tokenizer(context_length=32).context_length == 32


def test_vocab_file_is_package_data(tokenizer):
    packaged = importlib.resources.files("cadenza.models").joinpath(VOCAB_FILENAME)
    assert packaged.is_file()
    assert importlib.resources.files("cadenza.models").joinpath("LICENSE-CLIP-VOCAB").is_file()
    assert Path(str(packaged)).resolve() == tokenizer.vocab_path.resolve()
    assert hashlib.sha256(packaged.read_bytes()).hexdigest() == CLIP_VOCAB_SHA256


def test_explicit_vocab_path_gives_same_ids(tokenizer):
    path = importlib.resources.files("cadenza.models").joinpath(VOCAB_FILENAME)
    other = ClipTokenizer(vocab_path=str(path))
    assert other.encode(TRICKY_CAPTIONS["accents"]) == tokenizer.encode(TRICKY_CAPTIONS["accents"])


def test_pickles_for_data_loader_workers(tokenizer):
    texts = list(TRICKY_CAPTIONS.values())
    tokenizer(texts)  # fill the cache
    assert torch.equal(pickle.loads(pickle.dumps(tokenizer))(texts), tokenizer(texts))


def test_missing_vocab_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab_path=None"):
        ClipTokenizer(vocab_path=str(tmp_path / "missing.txt.gz"))


def test_malformed_vocab_file_raises(tmp_path):
    path = tmp_path / "tiny.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as file:
        file.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(ValueError, match="not a CLIP merges file"):
        ClipTokenizer(vocab_path=str(path))


@pytest.mark.parametrize("context_length", [0, 1, -5])
def test_too_short_context_length_raises(tokenizer, context_length):
    with pytest.raises(ValueError, match="context_length"):
        tokenizer("a cat", context_length=context_length)
    with pytest.raises(ValueError, match="context_length"):
        get_tokenizer(context_length=context_length)


def test_decode_rejects_unknown_ids(tokenizer):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([320, 49408])


def test_module_docstring_example_runs():
    result = doctest.testmod(tokenizer_module)
    assert result.attempted > 0
    assert result.failed == 0
