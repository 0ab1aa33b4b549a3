"""Multi-process training on CPU with gloo: 2 processes under torch.distributed.run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cadenza.engine.dist import first_host, setup_slurm_env

from .conftest import ROOT, TINY
from .eval_data import suite_over_processes

WORKER = ROOT / "tests" / "dist_worker.py"
COMMON = ("data.val=null", "optim.grad_clip_norm=null", "optim.warmup=0ba", "data.train.num_samples=128")


def torchrun(nproc: int, mode: str, out: Path, *overrides: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(WORKER),
        mode,
        str(out),
        f"run.logs={out / 'logs'}",
        *overrides,
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for threads in out.glob("threads-rank*.txt"):  # the process group's threads stopped before Python's teardown
        assert "gloo" not in threads.read_text(), f"{threads.name}: {threads.read_text().split()}"


@pytest.mark.parametrize(
    "loss", [("loss.name=clip", "loss.local_loss=true", "loss.gather_with_grad=true"), ("loss.name=siglip",)]
)
def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, loss):
    torchrun(2, "grads", tmp_path / "two", *COMMON, *loss, "data.batch_size=8")
    torchrun(1, "grads", tmp_path / "one", *COMMON, *loss, "data.batch_size=16")
    two, one = (torch.load(tmp_path / n / "grads.pt", weights_only=True) for n in ("two", "one"))
    # rank 0's loss is its local rows' loss; averaged over ranks it is the global one, checked through the gradients
    assert two["grads"].keys() == one["grads"].keys()
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_composer_n_2_trains_the_tiny_config(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cadenza.train.cli",
            "-n",
            "2",
            str(TINY),
            f"run.logs={tmp_path}",
            "run.duration=4ba",
            "run.log_interval=2ba",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [2, 4]
    assert train[0]["train/samples_per_second"] == pytest.approx(2 * train[0]["train/samples_per_second_per_gpu"])
    assert (tmp_path / "tiny" / "checkpoints" / "ep0-ba4.pt").is_file()
    assert any("val/image_to_text_R@1" in r for r in rows)


def test_killing_one_rank_ends_the_job(tmp_path):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cadenza.train.cli",
            "-n",
            "2",
            str(TINY),
            f"run.logs={tmp_path}",
            "run.duration=100000ba",
            "data.val=null",
            "run.log_interval=1ba",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    metrics = tmp_path / "tiny" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline and process.poll() is None, "training did not start"
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-f", "cadenza.train.cli " + str(TINY)], capture_output=True, text=True)
    pids = [int(p) for p in workers.stdout.split() if int(p) != process.pid]
    assert len(pids) >= 2, workers.stdout
    os.kill(max(pids), signal.SIGKILL)  # one worker dies
    killed_at = time.monotonic()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("the job did not end within 60 s of a rank dying")
    assert process.returncode != 0
    assert time.monotonic() - killed_at < 60
    assert "training failed" in process.stdout.read()


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_ranks_stop_when_their_launcher_is_killed(tmp_path):
    """SIGKILL of ``composer -n 2`` itself (no signal reaches the ranks, each in a session of its own)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "cadenza.train.cli", "-n", "2", str(TINY), f"run.logs={tmp_path}"]
        + ["run.duration=100000ba", "data.val=null", "run.log_interval=1ba"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    metrics = tmp_path / "tiny" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # both ranks are training
        assert time.monotonic() < deadline and process.poll() is None, "training did not start"
        time.sleep(0.2)
    ranks = _children(process.pid)
    assert len(ranks) == 2, ranks
    process.kill()
    process.wait()
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in ranks):
        if time.monotonic() > deadline:
            for pid in ranks:
                os.kill(pid, signal.SIGKILL)
            pytest.fail("the ranks kept running for 60 s after their launcher was killed")
        time.sleep(0.2)
    # the first rank to notice says why; the other may instead fail on the collective its peer left
    logs = "".join(path.read_text() for path in (tmp_path / "tiny").glob("out*.log"))
    assert f"the launcher (process {process.pid}) is gone" in logs


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


#: the uninterrupted 6-step job both resumes below are compared with (global batch 16)
RESUME_JOB = (*COMMON, "run.name=job", "optim.scheduler=cosine", "optim.warmup=2ba", "checkpoint.save_interval=3ba")
RESUME_JOB += ("run.duration=6ba", "loss.local_loss=true", "loss.gather_with_grad=true")


@pytest.fixture(scope="module")
def uninterrupted_job(tmp_path_factory) -> dict:
    """RESUME_JOB in 1 process of batch 16, run once for both directions of the resume."""
    out = tmp_path_factory.mktemp("uninterrupted")
    torchrun(1, "fit", out, *RESUME_JOB, "data.batch_size=16")
    return torch.load(out / "fit.pt", weights_only=True)


@pytest.mark.parametrize(("first", "second"), [(1, 2), (2, 1)])
def test_resume_on_another_number_of_processes(tmp_path, first, second, uninterrupted_job):
    """Same global batch (16): 1 x 16 or 2 x 8. A 6-step job stopped after step 3 (preempted) resumes on the other
    number of processes; step count, learning rate and weights continue where one uninterrupted job goes. The loss
    is the exact one (gather_with_grad): without it each process's gradient is 1 / processes of the global one
    (OpenCLIP's rule), Adam's moments carried over are on the other scale, and the trainer warns instead
    (test_checkpoint.py)."""
    batch = {1: "data.batch_size=16", 2: "data.batch_size=8"}
    logs = f"run.logs={tmp_path / 'shared'}"
    torchrun(first, "fit@3", tmp_path / "a", *RESUME_JOB, batch[first], logs)
    torchrun(second, "fit", tmp_path / "b", *RESUME_JOB, batch[second], "checkpoint.resume=latest", logs)
    stopped, resumed = (torch.load(tmp_path / n / "fit.pt", weights_only=True) for n in ("a", "b"))
    reference = uninterrupted_job
    assert stopped["batch"] == 3 and resumed["batch"] == reference["batch"] == 6
    assert resumed["lr"] == pytest.approx(reference["lr"])
    # The same samples in the same steps: the weights agree up to float reduction order, which Adam amplifies for
    # near-zero gradients element by element (one of 3 million once moved 2.5e-3), so the whole update is compared:
    # here they differ by 0.01% of how far training moved the weights; a resume whose moments were on the other scale
    # (no gather_with_grad) by 7%, one that lost its schedule (the first part as a 3-step job) by 20%.
    moved = distance(reference["weights"], reference["initial"])
    assert distance(resumed["weights"], reference["weights"]) < 1e-3 * moved
    for name, value in reference["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], value, rtol=1e-2, atol=5e-3)


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The Euclidean distance between two sets of weights (all tensors as one vector)."""
    return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in b) ** 0.5)


def test_distributed_evaluation_equals_single_process(tmp_path):
    suite = suite_over_processes(tmp_path / "suite")  # eval.tasks too: its images split unevenly over the ranks
    overrides = ("data.train=null", "data.val.num_samples=50", "data.batch_size=8", f"eval.tasks={suite}")  # 50: uneven
    for nproc in (1, 2):
        torchrun(nproc, "fit", tmp_path / str(nproc), *overrides, f"run.logs={tmp_path / str(nproc)}")
    logs = [(tmp_path / str(n) / "tiny" / "metrics.jsonl").read_text().splitlines() for n in (1, 2)]
    rows = [{k: v for line in lines for k, v in json.loads(line).items()} for lines in logs]  # one row per evaluator
    assert rows[0]["val/num_samples"] == rows[1]["val/num_samples"] == 50
    assert "val/suite-average" in rows[0] and "val/captions-text_to_image_R@10" in rows[0]
    tables = [json.loads((tmp_path / str(n) / "tiny" / "results" / "ep0-ba0.json").read_text()) for n in (1, 2)]
    assert [t["tasks"]["colors"]["images"] for t in tables] == [7, 7]
    for key, value in rows[0].items():
        assert rows[1][key] == pytest.approx(value, rel=1e-5), key


def test_slurm_environment():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu-[03-04]",
    }
    setup_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("5", "8", "1", "4")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu-03", "29500")
    assert first_host("node17,node18") == "node17" and first_host("a[1,3-5]") == "a1"
    launched = {"WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}
    setup_slurm_env(launched)
    assert "RANK" not in launched  # torch.distributed.run already set the world: SLURM is not consulted
