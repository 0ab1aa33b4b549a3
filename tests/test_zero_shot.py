"""Zero-shot classification (``eval.zero_shot``): the classifier math, the evaluator's wiring, the trainer hook."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cadenza.engine.errors import ConfigError
from cadenza.engine.logger import Logger
from cadenza.engine.state import State
from cadenza.train.trainer import Trainer
from cadenza.train.zero_shot import (
    ZeroShotEvaluator,
    build_classifier_weights,
    imagenet_classnames,
    load_templates,
    topk_correct,
)

COLORS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}  # sorted folder order: blue, green, red


def image_folder(root: Path, per_class: int = 3) -> Path:
    for name, color in COLORS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((12, 12, 3), color, np.uint8)).save(root / name / f"{i}.png")
    return root


def test_class_embedding_is_the_normalized_mean_of_normalized_prompts():
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [0.6, 0.8]]])  # (C=2, T=2, D=2), rows normalized
    expected = torch.tensor([[2**-0.5, 2**-0.5], [0.6, 0.8]])
    torch.testing.assert_close(build_classifier_weights(text), expected)


def test_topk_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.0, 0.1, 0.9]])
    assert topk_correct(logits, torch.tensor([1, 2, 0]), ks=(1, 2)) == [1, 2]
    assert topk_correct(logits, torch.tensor([1, 2, 0]), ks=(1, 5)) == [1, 3]  # k capped at the class count


class ColorModel(torch.nn.Module):
    """Embeds an image as its mean RGB and a prompt as the RGB of the color word in it: a perfect zero-shot model."""

    def __init__(self, tokenizer, colors=COLORS):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.words = {int(tokenizer([name])[0, 1]): color for name, color in colors.items()}  # first token of a name

    def encode_image(self, images, normalize=False):
        return torch.nn.functional.normalize(images.mean(dim=(2, 3)), dim=-1)

    def encode_text(self, tokens, normalize=False):  # a prompt without a color word: gray
        rows = [next((self.words[int(t)] for t in row if int(t) in self.words), (1, 1, 1)) for row in tokens]
        return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float) + 1e-3, dim=-1)


def evaluator(root: Path, classnames=None, templates=("a photo of {}.", "{} things")) -> ZeroShotEvaluator:
    from torchvision import transforms as T

    from cadenza.models.tokenizer import get_tokenizer

    return ZeroShotEvaluator(str(root), classnames, templates, "colors", T.ToTensor(), get_tokenizer(None, 16), 4)


def test_evaluator_scores_a_perfect_model_and_follows_the_classnames(tmp_path):
    root = image_folder(tmp_path / "colors")
    zero_shot = evaluator(root)
    state = State(model=ColorModel(zero_shot.tokenizer))
    assert zero_shot.evaluate(state) == {"val/colors-zeroshot-val-top1": 1.0, "val/colors-zeroshot-val-top5": 1.0}
    names = tmp_path / "names.txt"
    names.write_text("green\nblue\nred\n")  # folders blue, green named the other way round
    swapped = evaluator(root, classnames=str(names)).evaluate(state)
    assert swapped["val/colors-zeroshot-val-top1"] == pytest.approx(1 / 3)
    with pytest.raises(ConfigError, match="eval.zero_shot.classnames.*2 class names for 3 class folders"):
        evaluator(root, classnames=["a", "b"])
    with pytest.raises(ConfigError, match="eval.zero_shot.path.*no class folders"):
        evaluator(tmp_path / "missing")


def test_imagenet_names_and_templates_ship_as_data_equal_to_openais():
    import open_clip.zero_shot_metadata as reference

    names = imagenet_classnames()
    assert list(names.values()) == list(reference.IMAGENET_CLASSNAMES)
    assert list(names)[:2] == ["n01440764", "n01443537"] and len(set(names)) == 1000  # sorted WordNet ids
    assert load_templates(None) == [t("{}") for t in reference.OPENAI_IMAGENET_TEMPLATES]  # the default: all 80
    assert load_templates("simple") == [t("{}") for t in reference.SIMPLE_IMAGENET_TEMPLATES]


def test_template_and_classname_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="eval.zero_shot.templates.*neither a template set"):
        load_templates("openia")
    with pytest.raises(ConfigError, match="eval.zero_shot.templates.*has no"):
        load_templates(["a photo"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {}.\n\n{}, drawn\n")
    assert load_templates(str(prompts)) == ["a photo of {}.", "{}, drawn"]
    root = image_folder(tmp_path / "colors")
    with pytest.raises(ConfigError, match="eval.zero_shot.classnames.*'imagenet' names ImageNet-1k's 1000 classes"):
        evaluator(root, classnames="imagenet")  # 3 folders that are not WordNet ids


def test_imagenet_subset_is_named_by_wordnet_id_and_scored_against_all_1000_classes(tmp_path):
    """Three of ImageNet's folders (WordNet ids, not the first three classes), each a plain color: every image is
    scored against the 1000 classes, labelled by its folder's class index, as published numbers (and OpenCLIP) are."""
    from cadenza.models.tokenizer import get_tokenizer

    names = imagenet_classnames()
    tokens = get_tokenizer(None, 16)(list(names.values()))[:, 1].tolist()  # each name's first token
    first_token = dict(zip(names, tokens, strict=True))
    unique = [w for w in list(names)[5:] if list(first_token.values()).count(first_token[w]) == 1][:3]
    classes = dict(zip(unique, ((255, 0, 0), (0, 255, 0), (0, 0, 255)), strict=True))
    for wnid, color in classes.items():
        (tmp_path / "val" / wnid).mkdir(parents=True)
        Image.fromarray(np.full((12, 12, 3), color, np.uint8)).save(tmp_path / "val" / wnid / f"{wnid}_1.JPEG")
    assert len(evaluator(tmp_path / "val", templates=None).templates) == 80  # OpenAI's, the default
    for classnames in (None, "imagenet"):
        zero_shot = evaluator(tmp_path / "val", classnames, templates=("a photo of a {}.",))
        assert zero_shot.classnames == list(names.values())  # all 1000, in class-index order
        assert [label for _, label in zero_shot.dataset.files] == [list(names).index(w) for w in classes]
        model = ColorModel(zero_shot.tokenizer, colors={names[w]: color for w, color in classes.items()})
        assert zero_shot.evaluate(State(model=model))["val/colors-zeroshot-val-top1"] == 1.0
    (tmp_path / "val" / "n99999999").mkdir()  # not an ImageNet-1k class: the folder names are used as they are
    (tmp_path / "val" / "n99999999" / "x.png").write_bytes(
        (tmp_path / "val" / unique[0] / f"{unique[0]}_1.JPEG").read_bytes()
    )
    assert evaluator(tmp_path / "val").classnames == [*sorted(classes), "n99999999"]


def test_evaluator_logs_into_eval_metrics(tmp_path):
    zero_shot = evaluator(image_folder(tmp_path / "colors"))
    state = State(model=ColorModel(zero_shot.tokenizer))
    zero_shot.eval_start(state, Logger([]))
    zero_shot.eval_end(state, Logger([]))
    assert state.eval_metrics["val/colors-zeroshot-val-top1"] == 1.0


def test_trainer_runs_zero_shot_without_data_val_at_the_interval_and_the_end(tiny, tmp_path):
    root = image_folder(tmp_path / "colors")
    overrides = ("data.val=null", f"eval.zero_shot.path={root}", "eval.zero_shot.name=colors", "eval.interval=6ba")
    trainer = Trainer(tiny(*overrides, "run.duration=8ba"))
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "val/colors-zeroshot-val-top1" in r]
    assert [r["step"] for r in scored] == [6, 8]
    assert all(0 <= r["val/colors-zeroshot-val-top1"] <= r["val/colors-zeroshot-val-top5"] <= 1 for r in scored)

    evaluation_only = Trainer(tiny(*overrides, "data.train=null", "run.name=eval"))
    assert set(evaluation_only.fit().eval_metrics) == {"val/colors-zeroshot-val-top1", "val/colors-zeroshot-val-top5"}


def test_zero_shot_scores_the_ema_weights_when_evaluate_with_ema(tiny, tmp_path, monkeypatch):
    seen = []

    def record(self, state):
        seen.append({k: v.clone() for k, v in state.model.state_dict().items()})
        return {"val/colors-zeroshot-val-top1": 0.0}

    monkeypatch.setattr(ZeroShotEvaluator, "evaluate", record)
    root = image_folder(tmp_path / "colors")
    trainer = Trainer(
        tiny(
            "data.val=null",
            f"eval.zero_shot.path={root}",
            "run.duration=3ba",
            "+algorithms.ema={decay: 0.5, evaluate_with_ema: true}",
        )
    )
    trainer.fit()
    ema = next(a for a in trainer.state.algorithms if type(a).__name__ == "EMA").ema
    final = seen[-1]  # the end-of-training evaluation
    assert all(torch.equal(final[k], ema[k].to(final[k].dtype)) for k in ema)
    assert not all(torch.equal(final[k], v) for k, v in trainer.state.model.state_dict().items())
