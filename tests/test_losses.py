"""Tests of ``cadenza.models.losses`` against OpenCLIP 3.3.0's losses, in one process and across gloo processes."""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import math
import os
import socket
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from cadenza.models.losses import (
    CLIP_LOGIT_SCALE_INIT,
    LOSSES,
    ClipLoss,
    CoCaLoss,
    DistillClipLoss,
    SigLipLoss,
    _NeighbourExchange,
    _NeighbourExchangeBidir,
    build_loss,
    siglip_init,
)


def _import_open_clip_loss() -> ModuleType:
    """Imports ``open_clip/loss.py`` alone (it needs only torch).

    ``import open_clip.loss`` runs the package's ``__init__``, which imports transformers and every model (about 4 s),
    and every spawned worker would pay that again.
    """
    assert importlib.metadata.version("open_clip_torch") == "3.3.0"
    spec = importlib.util.find_spec("open_clip")  # finds the package without importing it
    assert spec is not None and spec.origin is not None
    loss_spec = importlib.util.spec_from_file_location("open_clip_loss", Path(spec.origin).parent / "loss.py")
    assert loss_spec is not None and loss_spec.loader is not None
    module = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(module)
    return module


oc = _import_open_clip_loss()

B, D = 8, 16  # per-rank batch, feature width
REL_TOL = 1e-6  # against OpenCLIP on identical inputs
DIST_TOL = 1e-5  # across process layouts (different summation orders)
SIGLIP_IMPLS = ("bidir", "shift", "reduce", "gather")


def _rel(actual: Tensor, expected: Tensor) -> float:
    """Relative difference ``|actual - expected| / |expected|`` in the 2-norm (absolute when ``expected`` is 0)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    diff = (actual - expected).norm().item()
    scale = expected.norm().item()
    return diff / scale if scale > 0 else diff


def _features(n: int, dim: int, seed: int) -> Tensor:
    """Unit-norm random features, ``(n, dim)``."""
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


def _run(fn: Callable[..., dict[str, Tensor]], inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
    """Calls ``fn`` on fresh leaf copies of ``inputs``; returns its terms and each term's gradient per float input."""
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    terms = fn(**leaves)
    wrt = [k for k, v in leaves.items() if v.requires_grad]
    grads = {}
    for term, value in terms.items():
        if not value.requires_grad:  # CoCa's contrastive term with clip_loss_weight=0
            continue
        got = torch.autograd.grad(value, [leaves[k] for k in wrt], retain_graph=True, allow_unused=True)
        grads[term] = {k: g for k, g in zip(wrt, got, strict=True) if g is not None}
    return terms, grads


def _assert_same(
    ours: Callable[..., dict[str, Tensor]],
    theirs: Callable[..., Any],
    inputs: dict[str, Tensor],
    zero_grads: tuple[str, ...] = (),
) -> None:
    """Asserts equal loss terms and equal gradients of every term w.r.t. every float input.

    Inputs named in ``zero_grads`` must get a gradient of (rounding-level) zero from both instead.
    """
    our_terms, our_grads = _run(ours, inputs)
    their_terms, their_grads = _run(lambda **kw: theirs(**kw, output_dict=True), inputs)
    assert our_terms.keys() == their_terms.keys()
    for term in our_terms:
        assert torch.isfinite(our_terms[term]).all()
        assert _rel(our_terms[term], their_terms[term]) <= REL_TOL, term
    assert our_grads.keys() == their_grads.keys()
    for term in our_grads:
        assert our_grads[term].keys() == their_grads[term].keys(), term
        if term != "caption_loss":
            assert {"image_features", "text_features", "logit_scale"} <= our_grads[term].keys(), term
        for name, grad in our_grads[term].items():
            if name in zero_grads:
                assert grad.abs().max() <= 1e-6 and their_grads[term][name].abs().max() <= 1e-6, (term, name)
                continue
            assert grad.abs().sum() > 0, (term, name)
            assert _rel(grad, their_grads[term][name]) <= REL_TOL, (term, name)


def _clip_inputs(n: int = B, seed: int = 0) -> dict[str, Tensor]:
    return {
        "image_features": _features(n, D, seed),
        "text_features": _features(n, D, seed + 1),
        "logit_scale": torch.tensor(CLIP_LOGIT_SCALE_INIT).exp(),
    }


def _siglip_inputs(n: int = B, seed: int = 0) -> dict[str, Tensor]:
    scale, bias = siglip_init()
    inputs = _clip_inputs(n, seed)
    inputs.update(logit_scale=torch.tensor(scale).exp(), logit_bias=torch.tensor(bias))
    return inputs


# ----------------------------------------------------------------------------------------------------------------------
# One process, against OpenCLIP
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("local_loss", [False, True])
@pytest.mark.parametrize("gather_with_grad", [False, True])
def test_clip_loss_matches_open_clip(local_loss: bool, gather_with_grad: bool) -> None:
    kwargs = {"local_loss": local_loss, "gather_with_grad": gather_with_grad, "cache_labels": True}
    _assert_same(ClipLoss(**kwargs), oc.ClipLoss(**kwargs), _clip_inputs())


def test_clip_loss_with_logit_bias_matches_open_clip() -> None:
    inputs = _clip_inputs() | {"logit_bias": torch.tensor(-2.5)}
    # A constant shift of the logits cannot change a softmax cross-entropy: the bias gets no gradient.
    _assert_same(ClipLoss(), oc.ClipLoss(), inputs, zero_grads=("logit_bias",))


def test_clip_loss_ignores_extra_model_outputs() -> None:
    inputs = _clip_inputs()
    expected = oc.ClipLoss()(**inputs)
    got = ClipLoss()(**inputs, logit_bias=None, extra=torch.zeros(3))["contrastive_loss"]
    assert _rel(got, expected) <= REL_TOL


@pytest.mark.parametrize("cache_labels", [False, True])
def test_clip_loss_label_cache_follows_batch_size(cache_labels: bool) -> None:
    ours = ClipLoss(cache_labels=cache_labels)
    for step, n in enumerate([B, 5, B, 3]):  # a short last batch, then full batches again
        inputs = _clip_inputs(n, seed=step)
        expected = oc.ClipLoss()(**inputs)  # a fresh loss: nothing cached
        assert _rel(ours(**inputs)["contrastive_loss"], expected) <= REL_TOL, n


def test_clip_loss_is_the_textbook_infonce() -> None:
    inputs = _clip_inputs()
    logits = inputs["logit_scale"] * inputs["image_features"] @ inputs["text_features"].T  # (B, B)
    targets = torch.arange(B)
    expected = (
        torch.nn.functional.cross_entropy(logits, targets) + torch.nn.functional.cross_entropy(logits.T, targets)
    ) / 2
    assert _rel(ClipLoss()(**inputs)["contrastive_loss"], expected) <= REL_TOL


@pytest.mark.parametrize("dist_impl", SIGLIP_IMPLS)
@pytest.mark.parametrize("cache_labels", [False, True])
def test_siglip_loss_matches_open_clip(dist_impl: str, cache_labels: bool) -> None:
    ours = SigLipLoss(cache_labels=cache_labels, dist_impl=dist_impl)
    theirs = oc.SigLipLoss(cache_labels=cache_labels, dist_impl=dist_impl)
    for n in (B, 5, B):  # the label cache must follow the batch size
        _assert_same(ours, theirs, _siglip_inputs(n, seed=n))


def test_siglip_loss_rejects_unknown_dist_impl() -> None:
    with pytest.raises(ValueError, match="'ring'.*bidir"):
        SigLipLoss(dist_impl="ring")


def _coca_inputs(pad_id: int, seq_len: int = 7, vocab: int = 11) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, vocab, (B, seq_len), generator=gen)  # (B, L)
    labels[:, -2:] = pad_id  # trailing padding
    labels[0, 3:] = pad_id  # a short caption
    assert (labels == pad_id).any() and (labels != pad_id).any()
    return _clip_inputs() | {"logits": torch.randn(B, seq_len, vocab, generator=gen), "labels": labels}


@pytest.mark.parametrize(
    ("caption_loss_weight", "clip_loss_weight", "pad_id"), [(2.0, 1.0, 0), (1.5, 0.5, 3), (2.0, 0.0, 0)]
)
def test_coca_loss_matches_open_clip(caption_loss_weight: float, clip_loss_weight: float, pad_id: int) -> None:
    kwargs = {"caption_loss_weight": caption_loss_weight, "clip_loss_weight": clip_loss_weight, "pad_id": pad_id}
    inputs = _coca_inputs(pad_id)
    if clip_loss_weight:
        _assert_same(CoCaLoss(**kwargs), oc.CoCaLoss(**kwargs), inputs)
        return
    # No contrastive term: OpenCLIP returns an integer zero that carries no gradient, only the caption term has one.
    our_terms, our_grads = _run(CoCaLoss(**kwargs), inputs)
    their_terms, their_grads = _run(lambda **kw: oc.CoCaLoss(**kwargs)(**kw, output_dict=True), inputs)
    assert our_terms["contrastive_loss"].item() == 0.0 and our_terms["contrastive_loss"].is_floating_point()
    assert _rel(our_terms["caption_loss"], their_terms["caption_loss"]) <= REL_TOL
    assert our_grads.keys() == their_grads.keys() == {"caption_loss"}
    assert _rel(our_grads["caption_loss"]["logits"], their_grads["caption_loss"]["logits"]) <= REL_TOL


def test_coca_loss_ignores_padding() -> None:
    inputs = _coca_inputs(pad_id=0)
    changed = dict(inputs, logits=inputs["logits"].clone())
    changed["logits"][inputs["labels"] == 0] += 100.0  # logits at padded positions must not matter
    loss = CoCaLoss(clip_loss_weight=0.0)
    assert _rel(loss(**changed)["caption_loss"], loss(**inputs)["caption_loss"]) <= REL_TOL


def test_distill_loss_matches_open_clip() -> None:
    inputs = _clip_inputs() | {
        "dist_image_features": _features(B, 2 * D, 7),  # the teacher is wider
        "dist_text_features": _features(B, 2 * D, 8),
        "dist_logit_scale": torch.tensor(50.0),
    }
    # The teacher is frozen: OpenCLIP's trainer feeds it without gradients.
    fn_inputs = {k: v for k, v in inputs.items() if not k.startswith("dist_")}

    def ours(**kw: Tensor) -> dict[str, Tensor]:
        return DistillClipLoss()(**kw, **{k: v for k, v in inputs.items() if k.startswith("dist_")})

    def theirs(output_dict: bool, **kw: Tensor) -> Any:
        return oc.DistillClipLoss()(
            **kw, **{k: v for k, v in inputs.items() if k.startswith("dist_")}, output_dict=output_dict
        )

    _assert_same(ours, theirs, fn_inputs)


def test_inits() -> None:
    assert CLIP_LOGIT_SCALE_INIT == pytest.approx(math.log(1 / 0.07))
    assert math.exp(CLIP_LOGIT_SCALE_INIT) == pytest.approx(1 / 0.07)
    scale, bias = siglip_init()
    assert math.exp(scale) == pytest.approx(10.0) and bias == -10.0


def test_build_loss() -> None:
    assert set(LOSSES) == {"clip", "siglip", "coca", "distill"}
    loss = build_loss("clip", local_loss=True, gather_with_grad=True)
    assert isinstance(loss, ClipLoss) and loss.local_loss and loss.gather_with_grad
    assert isinstance(build_loss("siglip", dist_impl="shift"), SigLipLoss)
    assert isinstance(build_loss("coca"), CoCaLoss) and isinstance(build_loss("distill"), DistillClipLoss)
    with pytest.raises(ValueError, match=r"'infonce'.*clip, coca, distill, siglip"):
        build_loss("infonce")


# ----------------------------------------------------------------------------------------------------------------------
# Several gloo processes on CPU, against one process with the concatenated batch
#
# What "the same gradients" means: DDP averages parameter gradients over ranks, so a parameter's gradient is
# (1/W) * sum_r grad_r . dx_r/dtheta, where grad_r is the gradient rank r's backward leaves on its shard x_r of the
# features. That equals the gradient of the single-process loss L on the 2B batch when grad_r == W * dL/dx_r. This holds
# for the exact settings (gather_with_grad, SigLIP): the gradient of x_r sums the gradients of all ranks' losses,
# and L is the mean of the per-rank losses. Without gather_with_grad (and without local_loss) each rank computes all of
# L but only its own shard gets a gradient, so grad_r == dL/dx_r: DDP then trains with 1/W of the gradient. That is
# OpenCLIP's behaviour, kept and asserted here. Replicated scalars (logit scale, bias) get the same gradient either way
# once DDP averages them: mean_r grad_r == dL/dscale.
# ----------------------------------------------------------------------------------------------------------------------

# name -> (loss name, constructor kwargs, exact): exact is True where grad_r == W * dL/dx_r (DDP trains on the one-process
# gradient), False where grad_r == dL/dx_r (DDP trains on 1/W of it), None where grad_r is neither.
DIST_CASES: dict[str, tuple[str, dict[str, Any], bool | None]] = {
    "clip_local_gather_with_grad": ("clip", {"local_loss": True, "gather_with_grad": True}, True),
    "clip_global_gather_with_grad": ("clip", {"local_loss": False, "gather_with_grad": True}, True),
    "clip_global_gather_no_grad": ("clip", {"local_loss": False, "gather_with_grad": False}, False),
    # Only this rank's rows reach its features: not a multiple of the full gradient, checked against OpenCLIP only.
    "clip_local_gather_no_grad": ("clip", {"local_loss": True, "gather_with_grad": False}, None),
    **{f"siglip_{impl}": ("siglip", {"dist_impl": impl}, True) for impl in SIGLIP_IMPLS},
}
OPEN_CLIP_LOSSES = {"clip": oc.ClipLoss, "siglip": oc.SigLipLoss}
# 2 ranks as required; 3 because SigLIP's default "bidir" exchange only sends both ways round the ring from 3 ranks up.
WORLD_SIZES = (2, 3)


def _global_inputs(loss_name: str, world_size: int) -> dict[str, Tensor]:
    return (_siglip_inputs if loss_name == "siglip" else _clip_inputs)(world_size * B, seed=11)


def _shard(inputs: dict[str, Tensor], rank: int) -> dict[str, Tensor]:
    return {k: v[rank * B : (rank + 1) * B] if v.dim() else v for k, v in inputs.items()}


def _dist_worker(rank: int, ports: dict[int, int], out_dir: str) -> None:
    """Runs every case at each world size of ``ports`` that includes ``rank``, saving the results per world size.

    One set of processes serves every world size (a process group per size, one after the other), because starting a
    process costs seconds of imports.
    """
    torch.set_num_threads(1)
    # OpenCLIP calls torch.distributed.nn's collectives, deprecated since torch 2.10, on every step.
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional", category=FutureWarning)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    for world_size, port in ports.items():
        if rank >= world_size:
            continue
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
        results = {}
        try:
            for case, (loss_name, kwargs, _) in DIST_CASES.items():
                inputs = _shard(_global_inputs(loss_name, world_size), rank)
                ours = _run(build_loss(loss_name, **kwargs), inputs)
                theirs_loss = OPEN_CLIP_LOSSES[loss_name](**kwargs, rank=rank, world_size=world_size)
                theirs = _run(lambda loss=theirs_loss, **kw: {"contrastive_loss": loss(**kw)}, inputs)
                results[case] = {"ours": ours, "open_clip": theirs}
            results["exchange"] = _exchange(rank, world_size)
        finally:
            dist.destroy_process_group()
        torch.save(results, Path(out_dir) / f"world{world_size}_rank{rank}.pt")


def _exchange(rank: int, world_size: int) -> dict[str, Tensor]:
    """Runs SigLIP's ring exchanges on marked tensors (as in the losses, rank-dependent weights on what arrives).

    Needed because in the losses both directions carry the same tensor in the first round, which hides a backward
    that returns the two gradients the wrong way round until 5 ranks.
    """
    left, right = (rank - 1) % world_size, (rank + 1) % world_size
    x = torch.full((2,), float(rank), requires_grad=True)
    received = _NeighbourExchange.apply(left, right, 2 * x)  # rank r's 2x goes right
    ((rank + 1) * received.sum()).backward()
    out = {"shift_received": received.detach(), "shift_grad": x.grad.clone()}
    if world_size >= 3:  # with 2 ranks left == right and OpenCLIP never uses this exchange
        x.grad = None
        from_right, from_left = _NeighbourExchangeBidir.apply(left, right, x, 2 * x)
        ((rank + 1) * (3 * from_right.sum() + 5 * from_left.sum())).backward()
        out |= {"from_right": from_right.detach(), "from_left": from_left.detach(), "bidir_grad": x.grad.clone()}
    return out


def test_ring_exchanges(dist_results: tuple[int, list[dict]]) -> None:
    world_size, per_rank = dist_results
    for rank in range(world_size):
        left, right = (rank - 1) % world_size, (rank + 1) % world_size
        got = per_rank[rank]["exchange"]
        assert got["shift_received"].tolist() == [2.0 * left] * 2
        # x reached the right neighbour as 2x, which weighs its sum by right + 1.
        assert got["shift_grad"].tolist() == [2.0 * (right + 1)] * 2
        if world_size >= 3:
            assert got["from_right"].tolist() == [float(right)] * 2
            assert got["from_left"].tolist() == [2.0 * left] * 2
            # x went left (weighted 3 there) and 2x went right (weighted 5 there).
            assert got["bidir_grad"].tolist() == [3.0 * (left + 1) + 2 * 5.0 * (right + 1)] * 2


def _free_ports(count: int) -> list[int]:
    """Ports the OS says are free on 127.0.0.1 (distinct: the sockets are all open when asked)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture(scope="module")
def dist_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict]]:
    """Runs ``_dist_worker`` in ``max(WORLD_SIZES)`` spawned processes; returns each world size's per-rank results."""
    out_dir = tmp_path_factory.mktemp("dist")
    ports = dict(zip(WORLD_SIZES, _free_ports(len(WORLD_SIZES)), strict=True))
    mp.spawn(_dist_worker, args=(ports, str(out_dir)), nprocs=max(WORLD_SIZES), join=True)
    return {w: [torch.load(out_dir / f"world{w}_rank{r}.pt") for r in range(w)] for w in WORLD_SIZES}


@pytest.fixture(params=WORLD_SIZES, ids=lambda w: f"world{w}")
def dist_results(request: pytest.FixtureRequest, dist_runs: dict[int, list[dict]]) -> tuple[int, list[dict]]:
    """``(world_size, per-rank results)`` for one world size."""
    return request.param, dist_runs[request.param]


@pytest.mark.parametrize("case", list(DIST_CASES))
def test_distributed_loss_matches_open_clip(dist_results: tuple[int, list[dict]], case: str) -> None:
    world_size, per_rank = dist_results
    for rank in range(world_size):
        (our_terms, our_grads), (their_terms, their_grads) = per_rank[rank][case].values()
        assert _rel(our_terms["contrastive_loss"], their_terms["contrastive_loss"]) <= REL_TOL, rank
        for name, grad in their_grads["contrastive_loss"].items():
            assert _rel(our_grads["contrastive_loss"][name], grad) <= REL_TOL, (rank, name)


@pytest.mark.parametrize("case", list(DIST_CASES))
def test_distributed_loss_matches_one_process(dist_results: tuple[int, list[dict]], case: str) -> None:
    world_size, per_rank = dist_results
    loss_name, kwargs, exact = DIST_CASES[case]
    full_inputs = _global_inputs(loss_name, world_size)
    full_terms, full_grads = _run(build_loss(loss_name, **kwargs), full_inputs)
    full = full_grads["contrastive_loss"]

    losses = torch.stack([per_rank[r][case]["ours"][0]["contrastive_loss"] for r in range(world_size)])
    # The global loss is the mean of the ranks' losses.
    assert _rel(losses.mean(), full_terms["contrastive_loss"]) <= DIST_TOL
    grads = [per_rank[r][case]["ours"][1]["contrastive_loss"] for r in range(world_size)]

    # Replicated scalars: the DDP average of the ranks' gradients is the one-process gradient, in every setting.
    for name in ("logit_scale", "logit_bias"):
        if name in full:
            assert _rel(torch.stack([g[name] for g in grads]).mean(), full[name]) <= DIST_TOL, name

    if exact is None:
        return
    factor = world_size if exact else 1
    for name in ("image_features", "text_features"):
        for rank in range(world_size):
            expected = factor * full[name][rank * B : (rank + 1) * B]  # (B, D)
            assert _rel(grads[rank][name], expected) <= DIST_TOL, (name, rank)
