"""Atomic checkpoint writes, retention, and finding the newest readable checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cadenza.engine import checkpoint as ckpt
from cadenza.engine.errors import CheckpointError
from cadenza.train.trainer import Trainer


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ep0-ba1.pt"
    ckpt.save_atomic({"x": torch.ones(3)}, path)

    def crash(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(CheckpointError, match="No space left.*previous checkpoint is kept"):
        ckpt.save_atomic({"x": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(ckpt.load_checkpoint(path)["x"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ep0-ba1.pt", "ep0-ba1.pt.sha256"]  # no temporary file left


def test_find_latest_skips_unreadable_files(tmp_path):
    ckpt.save_atomic({"step": 2}, tmp_path / "ep0-ba2.pt")
    ckpt.save_atomic({"step": 10}, tmp_path / "ep0-ba10.pt")
    (tmp_path / "ep1-ba12.pt").write_bytes(b"truncated")  # no checksum file: killed while writing
    ckpt.save_atomic({"step": 14}, tmp_path / "ep1-ba14.pt")
    with (tmp_path / "ep1-ba14.pt").open("r+b") as handle:  # bit rot after a complete write
        handle.seek(40)
        handle.write(b"\x00\x01")
    assert ckpt.find_latest(tmp_path) == tmp_path / "ep0-ba10.pt"  # numeric order, not text order
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        ckpt.load_checkpoint(tmp_path / "ep1-ba14.pt")
    assert ckpt.find_latest(tmp_path / "missing") is None
    with pytest.raises(CheckpointError, match="corrupt or incomplete"):
        ckpt.load_checkpoint(tmp_path / "ep1-ba12.pt")


def test_load_refuses_arbitrary_pickles(tmp_path):
    import argparse

    torch.save({"obj": argparse.Namespace(cmd="rm -rf /")}, tmp_path / "evil.pt")  # any non-tensor class
    with pytest.raises(CheckpointError, match="cannot be read"):
        ckpt.load_checkpoint(tmp_path / "evil.pt")


def test_keep_and_latest(tiny):
    trainer = Trainer(tiny("data.val=null", "checkpoint.save_interval=2ba", "checkpoint.keep=2", "run.duration=8ba"))
    trainer.fit()
    folder = trainer.run_dir / "checkpoints"
    assert sorted(p.name for p in folder.glob("*.pt")) == ["ep0-ba6.pt", "ep0-ba8.pt", "epoch_latest.pt"]
    assert sorted(p.name for p in folder.glob("*.sha256")) == ["ep0-ba6.pt.sha256", "ep0-ba8.pt.sha256"]
    latest = ckpt.load_checkpoint(folder / "epoch_latest.pt")
    assert latest["timestamp"]["batch"] == 8


def test_epoch_interval_and_resume_latest_without_checkpoints(tiny):
    trainer = Trainer(
        tiny(
            "data.val=null",
            "checkpoint.save_interval=1ep",
            "run.duration=2ep",
            "data.train.num_samples=64",
            "checkpoint.resume=latest",
        )
    )
    assert trainer.state.timestamp.batch == 0  # nothing to resume: a fresh start
    trainer.fit()
    names = sorted(p.name for p in (trainer.run_dir / "checkpoints").glob("ep*-ba*.pt"))
    assert names == ["ep1-ba4.pt", "ep2-ba8.pt"]
    assert ckpt.load_checkpoint(trainer.run_dir / "checkpoints" / "ep1-ba4.pt")["dataloader"] == {
        "epoch": 1,
        "sample_in_epoch": 0,
    }


def test_wall_clock_interval(tiny, monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(ckpt.time, "monotonic", lambda: clock["now"])

    class Tick:
        def run_event(self, event, state, logger):
            if event.value == "batch_end":
                clock["now"] += 25.0  # each step "takes" 25 s

        def close(self, state, logger):
            pass

        def state_dict(self):
            return {}

    trainer = Trainer(tiny("data.val=null", "checkpoint.save_interval=1m", "run.duration=6ba"), callbacks=[])
    trainer.state.callbacks.insert(0, Tick())
    trainer.fit()
    names = sorted(p.name for p in (trainer.run_dir / "checkpoints").glob("ep*-ba*.pt"))
    assert names == ["ep0-ba3.pt", "ep0-ba6.pt"]  # 75 s > 60 s after step 3; step 6 is the final save


@pytest.fixture
def small_disk(tmp_path):
    """A real 60 MB file system (tmpfs): room for one tiny-model checkpoint (~40 MB with Adam's state), not two."""
    import subprocess

    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_a_full_disk_fails_the_save_clearly_and_keeps_the_previous_checkpoint(tiny, small_disk):
    overrides = ("data.val=null", "checkpoint.save_interval=2ba", "run.duration=6ba", "checkpoint.keep=1")
    trainer = Trainer(tiny(*overrides, f"checkpoint.save_folder={small_disk}"))
    with pytest.raises(CheckpointError, match=r"ep0-ba4\.pt.*No space left on device.*previous checkpoint is kept"):
        trainer.fit()
    # the step-2 checkpoint (and its latest link, which takes no space) survived the failed step-4 save, whole
    assert sorted(p.name for p in small_disk.iterdir()) == ["ep0-ba2.pt", "ep0-ba2.pt.sha256", "epoch_latest.pt"]
    ckpt.verify(small_disk / "ep0-ba2.pt")
    assert ckpt.load_checkpoint(small_disk / "epoch_latest.pt")["timestamp"]["batch"] == 2
    # once there is room again, the run resumes from it
    resumed = Trainer(
        tiny(*overrides, "checkpoint.resume=latest", f"checkpoint.save_folder={small_disk.parent / 'big_disk'}")
    )
    assert resumed.state.timestamp.batch == 0  # 'latest' looks in the new save_folder: nothing there yet
    resumed.release()  # a trainer holds its run folder until it ends
    resumed = Trainer(tiny(*overrides, f"checkpoint.resume={small_disk / 'epoch_latest.pt'}"))
    assert resumed.state.timestamp.batch == 2


#: written by the code before the move to train/ (commit 6a3c730): yamls/tiny.yaml with these overrides, 4 of 8 steps
#: (its image tower started from timm's initialisation, the default then)
PRELAYOUT = Path(__file__).parent / "fixtures" / "prelayout-ep0-ba4.pt"
PRELAYOUT_RUN = (
    "data.val=null",
    "data.train.num_samples=64",
    "data.batch_size=8",
    "optim.scheduler=const",
    "checkpoint.save_interval=4ba",
    "model.overrides={text: {vocab_size: 256, width: 32}, vision: {init: timm, timm_kwargs: {embed_dim: 32}}}",
)


def test_a_checkpoint_of_the_previous_layout_resumes(tiny, tmp_path):
    """Old code's 4 steps, then this code's 4, land where this code's 8 in one go do (the first 4 ran on another
    machine's kernels, so within float tolerance, not bit for bit)."""
    straight = Trainer(tiny(*PRELAYOUT_RUN, "run.name=straight", "run.duration=8ba")).fit()
    resumed = Trainer(tiny(*PRELAYOUT_RUN, "run.name=resumed", "run.duration=8ba", f"checkpoint.resume={PRELAYOUT}"))
    assert resumed.state.timestamp.batch == 4
    state = resumed.fit()
    assert state.timestamp.batch == 8
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(state.model.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_resume_on_another_number_of_processes_warns_where_the_gradient_scale_changes(tiny, tmp_path):
    """Without gather_with_grad a process's gradient is 1 / processes of the global one: moments saved on 2 processes
    are 0.5x the scale of 1 process's gradients, which the resume says; with it (or SigLIP) nothing changes."""
    first = Trainer(tiny("data.val=null", "run.duration=2ba", "checkpoint.save_interval=2ba"))
    first.fit()
    checkpoint = ckpt.load_checkpoint(first.checkpoint_folder / "ep0-ba2.pt")
    checkpoint["rng"] = checkpoint["rng"] * 2  # as 2 processes save it: one RNG state per rank
    two = tmp_path / "two.pt"
    torch.save(checkpoint, two)
    for name, loss, warned in (
        ("default", (), True),
        ("exact", ("loss.local_loss=true", "loss.gather_with_grad=true"), False),
    ):
        again = Trainer(
            tiny("data.val=null", f"run.name={name}", "run.duration=4ba", f"checkpoint.resume={two}", *loss)
        )
        again.release()
        said = [line for line in (again.run_dir / "out.log").read_text().splitlines() if "saved on 2" in line]
        assert bool(said) == warned, said
        if warned:
            assert "saved on 2 processes, resumed on 1" in said[0] and "0.5x" in said[0], said[0]
            assert "loss.gather_with_grad=true" in said[0]


def test_retention_interrupted_between_its_two_deletions_leaves_nothing_behind(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        ckpt.save_atomic({"step": step}, folder / f"ep0-ba{step}.pt")
    saver = ckpt.CheckpointSaver(folder, "1ba", keep=2, save_latest=False, run_name="r", config_yaml="")
    unlink = Path.unlink

    def killed_after_the_first(self, missing_ok=False):
        unlink(self, missing_ok=missing_ok)
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(Path, "unlink", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        saver._apply_retention()
    monkeypatch.undo()
    # the checkpoint went first; its checksum (which says whose it is) is an orphan, removed when the next run starts
    assert not (folder / "ep0-ba1.pt").exists() and (folder / "ep0-ba1.pt.sha256").exists()
    assert ckpt.find_latest(folder) == folder / "ep0-ba3.pt"
    (folder / "ep0-ba0.pt.sha256").write_text("{}")
    ckpt.CheckpointSaver(folder, "1ba", keep=2, save_latest=False, run_name="r", config_yaml="")
    assert sorted(p.name for p in folder.iterdir()) == [
        "ep0-ba2.pt",
        "ep0-ba2.pt.sha256",
        "ep0-ba3.pt",
        "ep0-ba3.pt.sha256",
    ]
