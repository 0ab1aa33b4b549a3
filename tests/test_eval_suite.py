"""The evaluation suite (``eval.tasks``, ``composer eval --tasks``): every format against hand-computed numbers, the
retrieval metric, bad definitions stopped before the model, logging during training, and LAION's CLIP_benchmark on
the same model and data. Two processes against one: ``test_distributed.py`` (the distributed evaluation test runs a
suite beside ``data.val``)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import transforms as T

from cadenza.engine.errors import ConfigError
from cadenza.engine.logger import Logger
from cadenza.engine.retrieval import retrieval_recall
from cadenza.engine.state import State
from cadenza.models.tokenizer import get_tokenizer
from cadenza.train import evaluate
from cadenza.train.eval_suite import SuiteEvaluator
from cadenza.train.eval_tasks import load_tasks, parse_tasks
from cadenza.train.trainer import Trainer

from . import eval_data as data
from .conftest import ROOT

CLASSIFY = {"type": "classification", "templates": ["a photo of a {}."]}


def run_suite(tasks, root: Path, chunk_size: int = 1024, batch_size: int = 3) -> tuple[dict, State]:
    tokenizer = get_tokenizer(None, 16)
    evaluator = SuiteEvaluator(
        load_tasks(tasks, str(root)), T.ToTensor(), tokenizer, batch_size=batch_size, chunk_size=chunk_size
    )
    state = State(model=data.ColorModel(tokenizer))
    evaluator.eval_start(state, Logger([]))
    evaluator.eval_end(state, Logger([]))
    return evaluator.results, state


# -- the metrics ---------------------------------------------------------------------------------------------------
def reference_recall(images, texts, text_image, k):
    """CLIP_benchmark's definition, directly: a hit when a correct row is among the k best (no ties here)."""
    scores = texts @ images.T  # (T, I)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(texts)), text_image] = True
    top_images = scores.topk(k, dim=1).indices
    top_texts = scores.T.topk(k, dim=1).indices
    t2i = positive.gather(1, top_images).any(dim=1).float().mean().item()
    i2t = positive.T.gather(1, top_texts).any(dim=1).float().mean().item()
    return i2t, t2i


def test_retrieval_recall_counts_every_caption_of_an_image_and_does_not_depend_on_the_chunks():
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(13, 8, generator=generator), dim=-1)
    owner = torch.randint(0, 13, (40,), generator=generator)
    owner[:13] = torch.arange(13)  # every image has a caption
    texts = torch.nn.functional.normalize(images[owner] + 0.9 * torch.randn(40, 8, generator=generator), dim=-1)
    whole = retrieval_recall(images, texts, owner, ks=(1, 5, 10))
    assert retrieval_recall(images, texts, owner, ks=(1, 5, 10), chunk_size=3) == whole
    for k in (1, 5, 10):
        i2t, t2i = reference_recall(images, texts, owner, k)
        assert whole[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert whole[f"text_to_image_R@{k}"] == pytest.approx(t2i)
    assert 0 < whole["image_to_text_R@1"] < whole["image_to_text_R@10"] <= 1  # not a trivial case


def test_a_querys_own_rows_are_never_counted_above_it():
    from cadenza.engine.retrieval import _count_above

    # every score (0 or 1) is above a target of -1: each query counts every key but its own
    above = torch.zeros(3, dtype=torch.long)  # captions 0, 1, 2 of images 0, 1, 2 against the 3 images
    _count_above(torch.eye(3), torch.full((3,), -1.0), torch.arange(3), torch.eye(3), torch.arange(3), above, 2, True)
    assert above.tolist() == [2, 2, 2]
    above = torch.zeros(3, dtype=torch.long)  # images 10, 11, 12 against captions of images 10, 10, 12
    queries, owners = torch.eye(3), torch.tensor([10, 10, 12])
    _count_above(queries, torch.full((3,), -1.0), torch.arange(10, 13), torch.eye(3), owners, above, 2, False)
    assert above.tolist() == [1, 3, 2]


# -- every format ----------------------------------------------------------------------------------------------------
def test_every_format_gives_the_hand_computed_numbers(tmp_path):
    data.image_folder(tmp_path / "folder")
    data.wds_classification(tmp_path / "wds")
    data.csv_labels(tmp_path / "csv")
    data.csv_labels(tmp_path / "csv-names", by_name=True)
    data.mds_labels(tmp_path / "mds")
    data.karpathy(tmp_path / "karpathy")
    data.csv_captions(tmp_path / "csv-captions")
    data.wds_retrieval(tmp_path / "wds-captions")
    tasks = {
        "folder": {**CLASSIFY, "path": "folder"},
        "wds": {"type": "classification", "path": "wds"},  # class names and {c} templates from beside the shards
        "csv": {**CLASSIFY, "path": "csv/labels.csv", "classnames": data.CLASSES},
        "csv-names": {**CLASSIFY, "path": "csv-names/labels.csv", "classnames": data.CLASSES, "main_metric": "top5"},
        "mds": {**CLASSIFY, "format": "mds", "path": "mds", "classnames": data.CLASSES},
        "karpathy": {"type": "retrieval", "path": "karpathy/dataset.json", "metrics": ["R@1", "R@5"]},
        "csv-captions": {"type": "retrieval", "path": "csv-captions/captions.tsv", "main_metric": "text_to_image_R@1"},
        "wds-captions": {"type": "retrieval", "path": "wds-captions"},
    }
    results, state = run_suite(tasks, tmp_path, chunk_size=2)  # chunks smaller than the sets
    for name in ("folder", "wds", "csv", "csv-names", "mds"):
        task = results["tasks"][name]
        assert (task["images"], task["classes"], task["skipped"]) == (8, 6, 0), name
        assert task["metrics"] == pytest.approx(
            {"top1": data.TOP1, "top5": data.TOP5, "mean_per_class_recall": data.MEAN_PER_CLASS_RECALL}
        ), name
        assert state.eval_metrics[f"val/{name}-zeroshot-val-top1"] == pytest.approx(data.TOP1)
    for name in ("karpathy", "csv-captions", "wds-captions"):
        task = results["tasks"][name]
        assert (task["images"], task["captions"]) == (4, 6), name  # karpathy: the train-split image is left out
        assert task["metrics"]["image_to_text_R@1"] == pytest.approx(data.I2T_R1), name
        assert task["metrics"]["text_to_image_R@1"] == pytest.approx(data.T2I_R1), name
        assert task["metrics"]["image_to_text_R@5"] == task["metrics"]["text_to_image_R@5"] == 1.0
    assert "image_to_text_R@10" not in results["tasks"]["karpathy"]["metrics"]
    mean_r1 = (data.I2T_R1 + data.T2I_R1) / 2
    mains = [data.TOP1, data.TOP1, data.TOP1, data.TOP5, data.TOP1, mean_r1, data.T2I_R1, mean_r1]  # in task order
    assert results["average"] == pytest.approx(sum(mains) / len(mains))
    assert state.eval_metrics["val/suite-average"] == pytest.approx(results["average"])


def test_imagenet_layouts_take_the_class_from_the_folder_name(tmp_path):
    from cadenza.train.zero_shot import imagenet_classnames

    names = imagenet_classnames()
    wnids = list(names)
    r_wnids = (Path(__file__).parents[1] / "train" / "suite_data" / "imagenet_r_wnids.txt").read_text().split()
    assert len(r_wnids) == len(set(r_wnids)) == 200 and set(r_wnids) <= set(names) and r_wnids == sorted(r_wnids)
    for folder in ("v2/3", "v2/999", f"r/{r_wnids[0]}", f"r/{r_wnids[199]}", f"sketch/{wnids[5]}"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "x.png").write_bytes(data.png((9, 9, 9)))
    tasks = load_tasks(
        {
            "v2": {"type": "classification", "path": "v2", "classnames": "imagenet"},  # folders are class indices
            "r": {"type": "classification", "path": "r", "classnames": "imagenet_r"},  # 200 classes, by WordNet id
            "sketch": {"type": "classification", "path": "sketch"},  # WordNet ids of ImageNet-1k
        },
        str(tmp_path),
    )
    v2, r, sketch = tasks
    assert len(v2.classnames) == 1000 and v2.labels.tolist() == [3, 999] and len(v2.templates) == 80
    assert len(r.classnames) == 200 and r.labels.tolist() == [0, 199] and r.classnames[0] == names[r_wnids[0]]
    assert sketch.classnames == [names[wnids[5]]] and sketch.labels.tolist() == [0]
    with pytest.raises(ConfigError, match=r"eval.tasks.v2.classnames.*numbers"):
        load_tasks({"v2": {"type": "classification", "path": "v2"}}, str(tmp_path))
    with pytest.raises(ConfigError, match=r"eval.tasks.s.classnames.*n\d+.* is not a WordNet id of imagenet_a"):
        load_tasks({"s": {"type": "classification", "path": "sketch", "classnames": "imagenet_a"}}, str(tmp_path))


# -- bad definitions -------------------------------------------------------------------------------------------------
def error_of(tasks, root: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_tasks(tasks, str(root))
    return str(caught.value)


def test_bad_task_definitions_name_the_task_and_the_field(tmp_path):
    data.wds_classification(tmp_path / "no-names", classnames=False)
    data.csv_labels(tmp_path / "csv")
    (tmp_path / "csv" / "bad.csv").write_text("filepath,label\nimages/0.png,0\nimages/1.png,9\n")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "nothing").mkdir()
    names = {"classnames.txt": "\n".join(data.CLASSES)}
    data.wds_set(tmp_path / "big-label", [(data.png((1, 2, 3)), 6)], "cls", meta=names)
    data.wds_retrieval(tmp_path / "captions")
    data.image_folder(tmp_path / "folder")
    for name in ("a", "b", "c"):
        (tmp_path / "three" / name).mkdir(parents=True)
        (tmp_path / "three" / name / "0.png").write_bytes(data.png((1, 1, 1)))
    folder = {**CLASSIFY, "path": "folder"}
    cases = [
        ("w.classnames': missing.*classnames.txt beside the shards", {"type": "classification", "path": "no-names"}),
        ("w.classnames': missing", {"type": "classification", "path": "csv/labels.csv"}),
        ("w.path': .*has 1 class folders but no images", {"type": "classification", "path": "empty"}),
        ("w.path': .*no class folders", {"type": "classification", "path": "nothing"}),
        (
            "w.classnames': .*label 6 is outside the 6 classes of classnames.txt",
            {"type": "classification", "path": "big-label"},
        ),
        (
            "w.label_key': line 3 of .*bad.csv: label 9 is outside the 6 classes",
            {**CLASSIFY, "path": "csv/bad.csv", "classnames": data.CLASSES},
        ),
        ("w.type': .*says 'retrieval'", {"type": "classification", "path": "captions"}),
        ("w.path': .*does not exist", {"type": "retrieval", "path": "missing.json"}),
        ("w.templat': unknown key.*Did you mean 'templates'", {**folder, "templat": "x"}),
        ("w.metrics': 'top2' is not a classification metric", {**folder, "metrics": ["top2"]}),
        ("w.main_metric': 'top5'", {**folder, "metrics": ["top1"], "main_metric": "top5"}),
        ("w.type': missing", {"path": "folder"}),
        ("w.format': 'karpathy' is not a classification format", {**folder, "format": "karpathy"}),
        ("w.classnames': 4 class names for 6 class folders", {**folder, "classnames": ["a"] * 4}),
        ("w.classnames': 'imagenett' is neither .*Did you mean 'imagenet'", {**folder, "classnames": "imagenett"}),
        ("w.templates': 'a photo' has no", {**folder, "templates": ["a photo"]}),
        (
            "w.metrics': top5 needs at least 5 classes; this task has 3",
            {**CLASSIFY, "path": "three", "metrics": ["top5"]},
        ),
        (
            "w.image_key': .*no column 'image'",
            {**CLASSIFY, "path": "csv/labels.csv", "image_key": "image", "classnames": data.CLASSES},
        ),
    ]
    for expected, task in cases:
        assert re.search(f"config key 'eval.tasks.{expected}", error_of({"w": task}, tmp_path)), expected
    three = load_tasks({"w": {**CLASSIFY, "path": "three"}}, str(tmp_path))[0]
    assert three.metrics == ("top1", "mean_per_class_recall")  # top-5 of 3 classes would always be 1


def test_a_bad_suite_stops_composer_eval_before_the_model_is_built(tmp_path, monkeypatch, capsys):
    from cadenza.engine import registry

    data.wds_classification(tmp_path / "wds", classnames=False)
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"root: {tmp_path}\ntasks:\n  cifar:\n    type: classification\n    path: wds\n")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(registry.MODELS, "build", no_model)
    status = evaluate.main(["--tasks", str(suite), "tiny-vit", f"run.logs={tmp_path / 'logs'}"])
    assert status == 2
    assert "config key 'eval.tasks.cifar.classnames': missing" in capsys.readouterr().err
    assert evaluate.main(["--tasks", str(suite), "tiny-vitt"]) == 2
    assert "Did you mean 'tiny-vit'" in capsys.readouterr().err
    weights = tmp_path / "openclip.pt"
    torch.save({"visual.proj": torch.zeros(2)}, weights)  # OpenCLIP weights: no architecture, no stored config
    assert evaluate.main(["--tasks", str(suite), str(weights)]) == 2
    assert "is not a Cadenza checkpoint (it stores no config). For OpenCLIP weights" in capsys.readouterr().err
    assert evaluate.main([str(ROOT / "yamls" / "tiny.yaml"), "eval.data_root=/data"]) == 2
    assert "'eval.data_root': only applies to eval.tasks" in capsys.readouterr().err


# -- during training ----------------------------------------------------------------------------------------------
def test_tasks_are_scored_at_the_eval_interval_and_logged_everywhere(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data.image_folder(tmp_path / "data" / "folder")
    data.karpathy(tmp_path / "data" / "karpathy")
    tasks = (
        f"eval.data_root={tmp_path / 'data'}",
        "+eval.tasks={colors: {type: classification, path: folder, templates: ['a {} photo.']},"
        " captions: {type: retrieval, path: karpathy/dataset.json}}",
    )
    trainer = Trainer(tiny("data.val=null", "run.duration=2ba", "eval.interval=1ba", "loggers.tensorboard={}", *tasks))
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "val/suite-average" in r]
    assert [r["step"] for r in scored] == [1, 2]
    for row in scored:
        table = json.loads((trainer.run_dir / "results" / f"ep0-ba{row['step']}.json").read_text())
        assert table["step"] == row["step"] and table["average"] == pytest.approx(row["val/suite-average"])
        assert table["tasks"]["colors"]["metrics"]["top1"] == pytest.approx(row["val/colors-zeroshot-val-top1"])
        assert table["tasks"]["captions"]["metrics"]["text_to_image_R@5"] == pytest.approx(
            row["val/captions-text_to_image_R@5"]
        )
        markdown = (trainer.run_dir / "results" / f"ep0-ba{row['step']}.md").read_text()
        assert f"| colors | 8 | 6 | {100 * row['val/colors-zeroshot-val-top1']:.2f} |" in markdown
    events = EventAccumulator(str(trainer.run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/suite-average")] == [1, 2]


# -- against LAION's CLIP_benchmark --------------------------------------------------------------------------------
def test_numbers_equal_clip_benchmark_on_the_same_model_exported_to_openclip(tmp_path):
    pytest.importorskip("clip_benchmark")
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
    from clip_benchmark.models import load_clip

    from cadenza.models.export import export_openclip
    from cadenza.train.config import to_yaml

    # the data: noise images in 6 classes; the scores are the model's, whatever they are
    rng = np.random.default_rng(0)
    noise = [data.image_bytes(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(28)]
    names = ["cat", "dog", "ship", "car", "tree", "house"]
    templates = "a photo of a {c}.\na drawing of the {c}.\n"
    data.wds_set(
        tmp_path / "wds_classes",
        [(image, min(i // 2, 5)) for i, image in enumerate(noise[:18])],  # unbalanced: class 5 has 8 images
        "cls",
        per_shard=7,
        meta={"classnames.txt": "\n".join(names) + "\n", "zeroshot_classification_templates.txt": templates},
    )
    words = ["red", "blue", "round", "tall", "old", "new", "small", "wet"]
    captions = [f"a {words[i % 8]} {names[i % 6]}\nthe {words[(i + 3) % 8]} one" for i in range(10)]  # R@10: 10 images
    data.wds_set(tmp_path / "wds_captions", list(zip(noise[18:], captions, strict=True)), "txt", per_shard=5,
                 meta={"dataset_type.txt": "retrieval\n"})  # fmt: skip

    suite = tmp_path / "suite.yaml"
    suite.write_text(
        f"root: {tmp_path}\ntasks:\n  classes: {{type: classification, path: wds_classes}}\n"
        "  captions: {type: retrieval, path: wds_captions}\n"
    )
    # ours: tiny-vit as `composer eval --tasks suite.yaml tiny-vit` builds it (seeded), scored on the suite
    cfg = evaluate.suite_config(str(suite), "tiny-vit", [f"run.logs={tmp_path / 'eval'}", "run.name=ours"])
    trainer = Trainer(cfg)
    trainer.fit()
    trainer_suite = next(c for c in trainer.state.callbacks if isinstance(c, SuiteEvaluator))
    ours = trainer_suite.results["tasks"]
    assert ours == json.loads((trainer.run_dir / "results" / "ep0-ba0.json").read_text())["tasks"]
    # theirs: the same weights exported to OpenCLIP (composer export reads a checkpoint holding weights and config)
    checkpoint = tmp_path / "weights.pt"
    torch.save({"state_dict": trainer.state.model.state_dict(), "config": to_yaml(cfg)}, checkpoint)
    exported = export_openclip(checkpoint, tmp_path / "openclip")

    model, transform, tokenizer = load_clip("open_clip", f"local-dir:{exported}", None, None, "cpu")
    model.eval()
    theirs = {}
    for name, task in (("classes", "zeroshot_classification"), ("captions", "zeroshot_retrieval")):
        dataset = build_dataset(f"wds/{name}", root=str(tmp_path / f"wds_{name}"), transform=transform, task=task)
        loader = torch.utils.data.DataLoader(dataset.batched(4), batch_size=None, num_workers=0)
        if name == "classes":
            theirs[name] = zeroshot_classification.evaluate(
                model, loader, tokenizer, dataset.classes, dataset.templates, "cpu", amp=False
            )
        else:
            theirs[name] = zeroshot_retrieval.evaluate(
                model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10]
            )
    assert ours["classes"]["metrics"] == pytest.approx(
        {
            "top1": theirs["classes"]["acc1"],
            "top5": theirs["classes"]["acc5"],
            "mean_per_class_recall": theirs["classes"]["mean_per_class_recall"],
        }
    )
    expected = {}
    for k in (1, 5, 10):
        expected[f"image_to_text_R@{k}"] = theirs["captions"][f"text_retrieval_recall@{k}"]
        expected[f"text_to_image_R@{k}"] = theirs["captions"][f"image_retrieval_recall@{k}"]
    assert ours["captions"]["metrics"] == pytest.approx(expected)
    classes = ours["classes"]["metrics"]  # not a trivial case: 0.11, 0.56, 0.17
    assert 0 < classes["top1"] < classes["top5"] < 1 and classes["mean_per_class_recall"] != classes["top1"]
    assert 0 < ours["captions"]["metrics"]["text_to_image_R@1"] < 1


# -- the suites that ship, and the README's worked example ---------------------------------------------------------
def test_every_shipped_suite_parses_and_starts_with_its_command():
    suites = sorted((ROOT / "yamls" / "eval").glob("*.yaml"))
    assert [p.name for p in suites] == ["cifar.yaml", "digits.yaml", "imagenet.yaml", "retrieval.yaml"]
    for path in suites:
        first = path.read_text().splitlines()[0]
        assert first.startswith(f"# composer eval --tasks yamls/eval/{path.name} "), path.name
        specs = parse_tasks(str(path))
        assert specs and all(s.root == ("data/digits" if path.name == "digits.yaml" else "data") for s in specs)
    names = [s.name for s in parse_tasks(str(ROOT / "yamls" / "eval" / "imagenet.yaml"))]
    assert names == ["imagenet", "imagenetv2", "imagenet-r", "imagenet-a", "imagenet-sketch"]


def readme_example() -> tuple[str, str]:
    readme = (ROOT / "README.md").read_text()
    suite = re.search(r"```yaml\n(# pets\.yaml.*?)```", readme, flags=re.S).group(1)
    command = re.search(r"```bash\n(composer eval --tasks pets\.yaml[^\n]*)", readme).group(1)
    return suite, command.split("#")[0].strip()


def test_the_readme_worked_example_runs(tmp_path, monkeypatch, capsys):
    from cadenza.train.cli import main as composer

    suite, command = readme_example()
    monkeypatch.chdir(tmp_path)
    Path("pets.yaml").write_text(suite)
    root = Path("data/pets-eval")
    for breed, color in (("beagle", (200, 150, 90)), ("persian cat", (240, 240, 240)), ("pug", (60, 50, 40))):
        (root / "val" / breed).mkdir(parents=True)
        for i in range(2):
            (root / "val" / breed / f"{i}.jpg").write_bytes(data.png(color))
    (root / "captions.csv").write_text(
        "filepath,title\nval/pug/0.jpg,a pug on a sofa\nval/pug/0.jpg,a small dog\nval/beagle/1.jpg,a beagle outside\n"
    )
    assert composer(shlex.split(command)[1:]) == 0
    out = capsys.readouterr().out
    assert "| pets | 6 | 3 |" in out and "| pets-captions | 2 | 3 |" in out and "**Suite average:" in out
    assert list(Path("logs").glob("eval-pets-tiny-vit-*/results/ep0-ba0.json"))
