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
from cadenza.engine.trainer import Trainer
from cadenza.engine.zero_shot import ZeroShotEvaluator, build_classifier_weights, topk_correct

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

    def __init__(self, tokenizer):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.words = {tuple(tokenizer([name])[0, 1:2].tolist())[0]: COLORS[name] for name in COLORS}

    def encode_image(self, images, normalize=False):
        return torch.nn.functional.normalize(images.mean(dim=(2, 3)), dim=-1)

    def encode_text(self, tokens, normalize=False):
        rows = [next(self.words[int(t)] for t in row if int(t) in self.words) for row in tokens]
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


def test_evaluator_logs_into_eval_metrics(tmp_path):
    zero_shot = evaluator(image_folder(tmp_path / "colors"))
    state = State(model=ColorModel(zero_shot.tokenizer))
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
