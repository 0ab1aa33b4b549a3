"""Reinforced data and distillation from stored teacher embeddings (``composer convert --teacher``, ``algorithms.
distillation: {source: stored}``): what convert stores reads back with plain ``streaming.StreamingDataset`` and is the
teachers' embedding of the very views training replays; the stored loss and gradients equal online distillation's
on the same views within fp16 rounding; training resumes exactly; convert resumes and runs on two processes;
mismatches are config errors before any work.

The teachers: a tiny-vit with another width (a Cadenza checkpoint, whose ``model.overrides`` convert reads back; the
README test converts with one a run wrote) and a tiny-vit's bare weights; the data: ``test_captions``' 12 images with
two caption fields.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cadenza.algorithms.distillation import Distillation, build_teacher, stored_teacher_outputs, teacher_outputs
from cadenza.datasets import convert as convert_module
from cadenza.datasets.context import TEACHER_EMBEDDINGS, LoaderContext
from cadenza.datasets.convert import main as convert_main
from cadenza.datasets.reinforced import load_teacher, view_seed
from cadenza.datasets.samples import decode_image, sample_seed, transform_sample
from cadenza.datasets.transforms import AUGMENT_DEFAULTS, image_transform
from cadenza.engine.errors import ConfigError
from cadenza.engine.event import Event
from cadenza.engine.registry import DATASETS
from cadenza.engine.state import State
from cadenza.models import create_model
from cadenza.models.losses import ClipLoss, DistillClipLoss
from cadenza.models.tokenizer import get_tokenizer
from cadenza.train.config import to_yaml
from cadenza.train.trainer import Trainer

from .conftest import ROOT, tiny_config
from .data_helpers import check_exact_resume, image_bytes
from .test_captions import SAMPLES, every_caption, synthetic_captions, write_csv

VIEWS = 3
WIDE = "{embed_dim: 48, vision: {timm_kwargs: {embed_dim: 96}}}"


@pytest.fixture(scope="module")
def reinforced(tmp_path_factory) -> dict:
    """The CSV, the two teachers' specs, and their reinforced conversion (3 parts of at most 5 images)."""
    root = tmp_path_factory.mktemp("reinforced")
    csv = write_csv(root / "csv")["path"]
    torch.manual_seed(7)
    wide = tiny_config(root, f"model.overrides={WIDE}")  # a Cadenza checkpoint: weights and the config they need
    model = create_model("tiny-vit", **OmegaConf.to_container(wide.model.overrides))
    torch.save({"state_dict": model.state_dict(), "config": to_yaml(wide)}, root / "wide.pt")
    torch.save(create_model("tiny-vit").state_dict(), root / "random.pt")  # bare weights
    teachers = [f"tiny-vit:{root}/wide.pt", f"tiny-vit:{root}/random.pt"]
    out = root / "dr"
    command = ["--from", "csv", csv, "--captions", "first", "syn", "--views", str(VIEWS), "--part-size", "5"]
    command += [flag for spec in teachers for flag in ("--teacher", spec)] + ["--seed", "11", "--no-progress"]
    assert convert_main([*command, "--to", str(out)]) == 0
    return {"root": root, "csv": csv, "teachers": teachers, "out": out, "command": command}


def samples_of(folder: Path) -> list[dict]:
    from streaming import StreamingDataset

    dataset = StreamingDataset(local=str(folder), batch_size=1)
    return [dataset[i] for i in range(len(dataset))]


def same_samples(a: list[dict], b: list[dict]) -> bool:
    def plain(sample: dict) -> dict:
        return {k: v.tobytes() if isinstance(v, np.ndarray) else v for k, v in sample.items() if k != "jpg"}

    return len(a) == len(b) and all(plain(x) == plain(y) for x, y in zip(a, b, strict=True))


def loader(reinforced: dict, tmp_path: Path, **args):
    context = LoaderContext(
        train=True,
        batch_size=4,
        seed=3,
        image_size=32,
        context_length=32,
        transform=image_transform(32, True),
        tokenizer=get_tokenizer("tiny-vit", context_length=32),
        cache_dir=str(tmp_path / "cache"),
        augment=AUGMENT_DEFAULTS,
        extras=frozenset({TEACHER_EMBEDDINGS}),
    )
    args = {"remote": str(reinforced["out"]), "captions": {"first": 0.5, "syn": 0.5}, **args}
    return DATASETS.build("streaming", args, "data.train", context=context)


def test_convert_stores_each_teachers_views_and_captions(reinforced):
    marker = json.loads((reinforced["out"] / "cadenza-convert.json").read_text())
    meta = marker["reinforced"]
    assert marker["samples"] == SAMPLES and marker["parts"] == 3
    assert meta["views"] == VIEWS and meta["captions"] == ["first", "syn"] and meta["augment"] == AUGMENT_DEFAULTS
    assert [(t["dim"], t["normalized"], t["pretrained"]) for t in meta["teachers"]] == [
        (48, True, reinforced["teachers"][0].split(":", 1)[1]),
        (32, True, reinforced["teachers"][1].split(":", 1)[1]),
    ]
    samples = samples_of(reinforced["out"])  # plain streaming.StreamingDataset
    assert [s["first"] for s in samples] == [[f"sample {i}"] for i in range(SAMPLES)]
    teacher = load_teacher(reinforced["teachers"][0], AUGMENT_DEFAULTS, torch.device("cpu"))
    assert abs(teacher.model.logit_scale.exp().item() - meta["teachers"][0]["logit_scale"]) < 1e-6
    for index in (1, 5):  # an image with two fields' captions, and one with no synthetic caption
        sample = samples[index]
        assert sample["teacher0_image"].shape == (VIEWS, 48) and sample["teacher0_image"].dtype == np.float16
        assert sample["teacher1_image"].shape == (VIEWS, 32)
        assert sample["seed"] == sample_seed(11, 0, index)
        assert sample["teacher0_text"].shape == (len(every_caption(index)), 48)
        image = decode_image(image_bytes(index))
        view = transform_sample(teacher.transform, image, view_seed(int(sample["seed"]), 2))[None]
        with torch.no_grad():
            expected = teacher.model.encode_image(view, normalize=True)[0]
            texts = teacher.model.encode_text(teacher.tokenizer([f"sample {index}", *synthetic_captions(index)]), True)
        assert torch.allclose(torch.from_numpy(sample["teacher0_image"][2]).float(), expected, atol=2e-3)
        assert torch.allclose(torch.from_numpy(sample["teacher0_text"]).float(), texts, atol=2e-3)


def test_stored_distillation_equals_online_on_the_same_views(reinforced, tmp_path):
    images, tokens, extras = next(iter(loader(reinforced, tmp_path)))
    teachers = [
        build_teacher(*spec.split(":", 1), torch.device("cpu"), torch.float32) for spec in reinforced["teachers"]
    ]
    online = [teacher_outputs(teacher, images, tokens) for teacher in teachers]
    stored = stored_teacher_outputs(extras)
    for index, outputs in enumerate(online):  # the loader's images are the views the teachers embedded
        assert torch.allclose(outputs["dist_image_features"], stored["dist_image_features"][index], atol=2e-3)
        assert torch.allclose(outputs["dist_text_features"], stored["dist_text_features"][index], atol=2e-3)
        assert torch.allclose(outputs["dist_logit_scale"], stored["dist_logit_scale"][index])
    online = {key: [outputs[key] for outputs in online] for key in online[0]}
    rounded = {**online, **{k: [f.half().float() for f in online[k]] for k in ("dist_image_features", "dist_text_features")}}  # fmt: skip

    torch.manual_seed(0)
    student = create_model("tiny-vit")
    results = {}
    for name, teacher in (("online", online), ("online in fp16", rounded), ("stored", stored)):
        student.zero_grad()
        losses = DistillClipLoss()(**student(images, tokens), **teacher)
        sum(losses.values()).backward()
        results[name] = losses, [p.grad.clone() for p in student.parameters() if p.grad is not None]
    stored_losses, stored_grads = results["stored"]
    for name, tolerance in (("online in fp16", 1e-4), ("online", 1e-3)):  # the same up to the fp16 rounding
        losses, grads = results[name]
        assert torch.equal(losses["contrastive_loss"], stored_losses["contrastive_loss"])
        assert torch.allclose(losses["distill_loss"], stored_losses["distill_loss"], rtol=tolerance), name
        assert len(grads) == len(stored_grads) > 0
        difference = max(((a - b).norm() / a.norm()).item() for a, b in zip(grads, stored_grads, strict=True))
        assert difference < 50 * tolerance, (name, difference)

    # the algorithm on a minimal State: stored targets at temperature 0.05, losses weighted [0.5, 2]
    state = State(model=student)
    state.loss_fn = ClipLoss()
    algorithm = Distillation(source="stored", temperature=0.05, loss_weights=[0.5, 2.0])
    assert algorithm.batch_extras == (TEACHER_EMBEDDINGS,)
    algorithm.apply(Event.INIT, state, None)
    state.micro_batch, state.extras, state.outputs = (images, tokens), extras, student(images, tokens)
    algorithm.apply(Event.AFTER_FORWARD, state, None)
    state.loss_dict = state.loss_fn(**state.outputs)
    algorithm.apply(Event.AFTER_LOSS, state, None)
    expected = DistillClipLoss()(**student(images, tokens), **{**online, "dist_logit_scale": [20.0, 20.0]})
    assert torch.allclose(state.loss_dict["contrastive_loss"], 0.5 * expected["contrastive_loss"])
    assert torch.allclose(state.loss_dict["distill_loss"], 2.0 * expected["distill_loss"], rtol=1e-3)
    assert torch.equal(state.loss, state.loss_dict["contrastive_loss"] + state.loss_dict["distill_loss"])


def test_ensemble_loss_averages_the_teachers_after_the_softmax():
    torch.manual_seed(1)
    image, text = (torch.nn.functional.normalize(torch.randn(5, 8), dim=1) for _ in range(2))
    teachers = [[torch.nn.functional.normalize(torch.randn(5, d), dim=1) for _ in range(2)] for d in (4, 6)]
    out = DistillClipLoss()(image, text, 10.0, [t[0] for t in teachers], [t[1] for t in teachers], [30.0, 50.0])
    student = 10.0 * image @ text.T
    expected = 0
    for logits in (student, student.T):
        target = sum(
            (s * (a @ b.T if logits is student else b @ a.T)).softmax(1)
            for (a, b), s in zip(teachers, (30.0, 50.0), strict=True)
        )
        expected += -(target / 2 * logits.log_softmax(1)).sum(1).mean() / 2
    assert torch.allclose(out["distill_loss"], expected)
    # one teacher: OpenCLIP's loss, given as tensors or as one-element lists
    single = DistillClipLoss()(image, text, 10.0, *teachers[0], 30.0)
    assert torch.equal(single["distill_loss"], DistillClipLoss()(image, text, 10.0, [teachers[0][0]], [teachers[0][1]], [30.0])["distill_loss"])  # fmt: skip


def test_stored_distillation_trains_and_resumes_exactly(reinforced, tiny):
    data = f"data.train={{type: streaming, remote: '{reinforced['out']}', captions: {{first: 1, syn: 3}}, num_samples: null}}"
    algorithm = "+algorithms.distillation={source: stored, temperature: 0.02}"
    record = check_exact_resume(tiny, (data, algorithm, "data.batch_size=4", "run.peak_tflops=1"), 4, 2, (0, 1))
    seen = [caption for ids in record.ids for caption in ids]
    assert all(caption % 100 < SAMPLES for caption in seen) and any(caption >= 100 for caption in seen)


def test_convert_resumes_where_it_stopped(reinforced, tmp_path, monkeypatch, capsys):
    out = tmp_path / "dr"
    written = []
    original = convert_module._write_part

    def write_part(part, *args, **kwargs):
        if part == 1 and not written.count(1):
            written.append(1)
            raise convert_module.DataError("stopped mid-way")
        written.append(part)
        return original(part, *args, **kwargs)

    monkeypatch.setattr(convert_module, "_write_part", write_part)
    command = [*reinforced["command"], "--to", str(out)]
    assert convert_main(command) == 1
    assert not (out / "index.json").exists() and (out / "part-00000" / "cadenza-part.json").exists()
    assert convert_main(command) == 1  # not empty: resume or overwrite
    assert "--resume to continue" in capsys.readouterr().err
    assert convert_main([*command, "--resume", "--views", "2"]) == 1  # another plan
    assert "views" in capsys.readouterr().err
    assert convert_main([*command, "--resume"]) == 0
    assert written == [0, 1, 1, 2]  # part 0 was kept
    assert same_samples(samples_of(out), samples_of(reinforced["out"]))


def test_convert_on_two_processes(reinforced, tmp_path):
    out = tmp_path / "dr"
    command = [
        sys.executable,
        "-m",
        "cadenza.train.cli",
        "-n",
        "2",
        "convert",
        *reinforced["command"],
        "--to",
        str(out),
    ]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, timeout=600)
    marker = json.loads((out / "cadenza-convert.json").read_text())
    assert marker["reinforced"] == json.loads((reinforced["out"] / "cadenza-convert.json").read_text())["reinforced"]
    assert same_samples(samples_of(out), samples_of(reinforced["out"]))


def test_mismatches_are_config_errors_before_any_work(reinforced, tiny, tmp_path):
    def fails(key: str, match: str, *overrides: str, remote: Path = reinforced["out"], captions: str = "[first, syn]"):
        data = f"data.train={{type: streaming, remote: '{remote}', captions: {captions}, num_samples: null}}"
        with pytest.raises(ConfigError, match=match) as error:
            Trainer(tiny(data, "run.name=mismatch", "+algorithms.distillation={source: stored}", *overrides))
        assert error.value.key == key, error.value
        assert not (Path(tiny().run.logs) / "mismatch" / "config.yaml").exists()

    fails("data.augment", "scale", "data.augment.scale=[0.5,1.0]")
    fails("data.train.captions", "not of \\['other'\\]", captions="[first, other]")
    plain = tmp_path / "plain"
    assert convert_main(["--from", "csv", reinforced["csv"], "--to", str(plain), "--captions", "first", "syn"]) == 0
    fails("algorithms.distillation", "stores no teacher embeddings", remote=plain)
    edited = tmp_path / "edited"
    shutil.copytree(reinforced["out"], edited)
    marker = json.loads((edited / "cadenza-convert.json").read_text())
    marker["reinforced"]["teachers"][1]["dim"] = 64
    (edited / "cadenza-convert.json").write_text(json.dumps(marker))
    fails("data.train", "promises 'ndarray:float16:3,64'", remote=edited)
    with pytest.raises(ConfigError, match="cannot carry teacher_embeddings") as error:
        Trainer(tiny(f"data.train={{type: csv, path: '{reinforced['csv']}', num_samples: null}}",
                     "+algorithms.distillation={source: stored}", "data.train.captions=[first]"))  # fmt: skip
    assert error.value.key == "data.train"
    with pytest.raises(ConfigError, match="loads no teacher"):
        Trainer(tiny("+algorithms.distillation={source: stored, teacher: tiny-vit}"))


def write_digits_stand_in(folder: Path, images: int = 12) -> None:
    """``python -m cadenza.datasets.digits``'s layout (mds/, train.csv, train/, test/) for a few digits."""
    from sklearn.datasets import load_digits

    from cadenza.datasets.convert import Item, convert
    from cadenza.datasets.digits import TEMPLATES, caption, to_png

    digits = load_digits()
    rows, items = ["filepath\tcaptions"], []
    for index in range(images):
        label, png = int(digits.target[index]), to_png(digits.images[index], 32)
        texts = [caption(label, template) for template in TEMPLATES[index % 3 : index % 3 + 2]]
        path = folder / "train" / str(label) / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        rows.append(f"{path.relative_to(folder)}\t{json.dumps(texts)}")
        items += [Item(str(index), png, text, label) for text in texts]
    (folder / "train.csv").write_text("\n".join(rows) + "\n")
    convert(items, str(folder / "mds"), {"jpg": "pil", "txt": "str", "cls": "int"}, progress=False)
    for label in range(10):
        index = int(np.flatnonzero(digits.target == label)[-1])
        (folder / "test" / str(label)).mkdir(parents=True)
        (folder / "test" / str(label) / f"{index}.png").write_bytes(to_png(digits.images[index], 32))


def test_readme_worked_example_runs(tmp_path, monkeypatch, capsys):
    """README's reinforced-data commands, run as written on a stand-in for the digits, each training 2 steps."""
    import re
    import shlex

    from cadenza.train import cli

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("The worked example, on the quickstart's digits") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    assert lines[0] == "python -m cadenza.datasets.digits --out data/digits"
    assert [line.split()[1] for line in lines[1:]] == [
        "yamls/quickstart_teacher.yaml", "convert", "yamls/quickstart_reinforced.yaml", "eval"
    ]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "yamls").symlink_to(ROOT / "yamls")
    write_digits_stand_in(tmp_path / "data" / "digits")
    short = ["run.duration=2ba", "data.batch_size=4", "data.workers=0", "eval.interval=2ba", "run.peak_tflops=1"]
    for line in lines[1:]:
        argv = shlex.split(line)[1:]
        if argv[0] == "convert":
            argv.append("--no-progress")
        elif argv[0] == "eval":
            argv += ["data.batch_size=4", "data.workers=0"]
        else:
            argv += [*short, "checkpoint.save_interval=2ba"]
        assert cli.main(argv) == 0, line
    assert json.loads(Path("data/digits/reinforced/cadenza-convert.json").read_text())["reinforced"]["views"] == 10
    rows = [json.loads(row) for row in Path("logs/quickstart-reinforced/metrics.jsonl").read_text().splitlines()]
    assert any("train/distill_loss" in row for row in rows)
    assert "val/digits-zeroshot-val-top1:" in capsys.readouterr().out
