"""``optim.name: muon`` (``cadenza.engine.muon``): the update by hand (momentum, Newton-Schulz per matrix, the
learning-rate scale, AdamW for the rest), the batching by shape, the orthogonalised step, the config's errors.
(Exact resume is in tests/test_finetune.py's optimizer table.)"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cadenza.engine import ConfigError
from cadenza.engine.muon import Muon, is_matrix


class Net(nn.Module):
    """A tall and a wide matrix of one shape class (batched together), a third shape, a bias, an embedding table."""

    def __init__(self) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(40, 8)
        self.up = nn.Linear(8, 24)  # weight (24, 8): tall
        self.down = nn.Linear(24, 8, bias=False)  # weight (8, 24): wide, the same class as up's
        self.head = nn.Linear(8, 8, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(torch.relu(self.up(self.token_embedding(tokens))))).pow(2).mean()


def grads_of(net: Net, seed: int) -> None:
    net.zero_grad(set_to_none=True)
    net(torch.randint(0, 40, (6, 5), generator=torch.Generator().manual_seed(seed))).backward()


def test_which_parameters_are_matrices():
    assert is_matrix(torch.empty(64, 192)) and is_matrix(torch.empty(64, 3, 8, 8))  # a patch projection, flattened
    assert not is_matrix(torch.empty(64))  # a bias or a norm
    assert not is_matrix(torch.empty(1, 17, 64))  # a position embedding (leading unit dimension)
    assert not is_matrix(torch.empty(64, 2))  # too narrow
    assert not is_matrix(torch.empty(49408, 64))  # a vocabulary: aspect ratio 772
    assert not is_matrix(torch.empty(77, 64), "text.positional_embedding")  # looked up, not multiplied


def test_the_update_by_hand():
    """Two steps: the matrices by momentum, Nesterov, timm's Newton-Schulz one matrix at a time and the shape's
    learning-rate scale; the bias and embedding by torch's AdamW with the same settings."""
    from timm.optim.muon import _COEFFICIENTS, get_lr_scale, zeropower_via_newtonschulz

    torch.manual_seed(0)
    net = Net()
    reference = Net()
    reference.load_state_dict(net.state_dict())
    lr, decay, momentum = 0.02, 0.1, 0.95
    muon = Muon(list(net.named_parameters()), lr=lr, weight_decay=decay, betas=(0.9, 0.98), eps=1e-6)
    matrices = {"up.weight", "down.weight", "head.weight"}
    assert {n for n, p in net.named_parameters() if muon._is_matrix(p)} == matrices
    others = [p for n, p in reference.named_parameters() if n not in matrices]
    adamw = torch.optim.AdamW(others, lr=lr, weight_decay=decay, betas=(0.9, 0.98), eps=1e-6, foreach=False)
    buffers = {n: torch.zeros_like(p) for n, p in reference.named_parameters() if n in matrices}
    for step in range(2):
        grads_of(net, step)
        muon.step()
        grads_of(reference, step)
        with torch.no_grad():
            for name, p in reference.named_parameters():
                if name not in matrices:
                    continue
                buffers[name] = momentum * buffers[name] + (1 - momentum) * p.grad
                nesterov = (1 - momentum) * p.grad + momentum * buffers[name]
                ortho = zeropower_via_newtonschulz(nesterov, 5, _COEFFICIENTS["quintic"], dtype=torch.float32)
                p.mul_(1 - lr * decay).sub_(lr * get_lr_scale(p.shape, "match_rms_adamw") * ortho)
        adamw.step()
    for (name, got), expected in zip(net.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)
    assert set(muon.state[net.up.weight]) == {"momentum_buffer"}
    assert set(muon.state[net.token_embedding.weight]) == {"step", "exp_avg", "exp_avg_sq"}


def test_the_step_of_a_matrix_is_orthogonalised():
    """A matrix's step, over its learning-rate scale, has every singular value near 1 (the quintic iteration
    leaves them between about 0.7 and 1.2) where the gradient's spread a hundredfold."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.zeros(16, 48))
    u, _, v = torch.linalg.svd(torch.randn(16, 48), full_matrices=False)
    weight.grad = u @ torch.diag(torch.logspace(-1, 1, 16)) @ v  # singular values from 0.1 to 10
    Muon([("w", weight)], lr=1.0, momentum=0.0, nesterov=False).step()
    singular = torch.linalg.svdvals(-weight.detach() / (0.2 * math.sqrt(48)))
    assert singular.min() > 0.6 and singular.max() < 1.3, singular


def test_bf16_iterations_follow_fp32():
    torch.manual_seed(0)
    nets = [Net(), Net()]
    nets[1].load_state_dict(nets[0].state_dict())
    initial = nets[0].up.weight.detach().clone()
    for net, dtype in zip(nets, ("float32", "bfloat16"), strict=True):
        grads_of(net, 0)
        Muon(list(net.named_parameters()), lr=0.02, ns_dtype=dtype).step()
    moved = (nets[0].up.weight - initial).abs().max()  # the step itself
    assert (nets[0].up.weight - nets[1].up.weight).abs().max() < 0.05 * moved


@pytest.mark.parametrize(
    "overrides, key, message",
    [
        (["optim.name=muon", "dist.fsdp=true"], "optim.name", "whole weight matrices"),
        (["optim.name=muon", "optim.args={ns_dtpye: float32}"], "optim.args.ns_dtpye", "Did you mean 'ns_dtype'"),
        (["optim.name=muon", "optim.fused=true"], "optim.fused", "only applies to optim.name=adamw"),
    ],
)
def test_config_errors_name_the_key(tiny, overrides, key, message):
    with pytest.raises(ConfigError, match=message) as caught:
        tiny(*overrides)
    assert caught.value.key == key


def test_bad_arguments_are_refused():
    weight = nn.Parameter(torch.zeros(8, 8))
    for kwargs in ({"ns_dtype": "float16"}, {"adjust_lr_fn": "spectral"}, {"momentum": 1.0}, {"ns_steps": 0}):
        with pytest.raises(ValueError):
            Muon([weight], **kwargs)
