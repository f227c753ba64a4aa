"""DDP receives every gradient in its buckets' layout, also the ones compiled bf16 gives.

``torch.compile`` with bf16 autocast hands a 1x1 convolution's weight (C, K, 1, 1), strides
(K, 1, 1, 1), a gradient of strides (K, 1, K, K): the same memory, other strides in the size-1
dimensions. Autograd keeps it; DDP's reducer compares strides with its bucket's and warned
"Grad strides do not match bucket view strides" on every process. Compiling takes minutes on
a 2-core CPU, so these tests give the gradients that layout with a hook instead of inductor (the
torchrun command in docs/distributed.md shows the compiled case).
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import pytest
import torch
from test_distributed import PLAIN, free_port, global_batch
from test_resume import tiny_model, tiny_trainer

from fcnseg.engine.runtime import match_grad_strides
from fcnseg.utils.distributed import cleanup

WARNING = "Grad strides do not match bucket view strides"


def compiled_layout(model: torch.nn.Module) -> list[str]:
    """Gives the gradient of every 1x1 convolution weight the strides compiled bf16 gives it
    (channels_last strides, which differ from the weight's in the size-1 dimensions only)."""
    names = []
    for name, param in model.named_parameters():
        if param.dim() == 4 and param.shape[2:] == (1, 1):
            param.register_hook(
                lambda g: torch.empty_like(g, memory_format=torch.channels_last).copy_(g)
            )
            names.append(name)
    return names


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
    )  # fmt: skip
    torch.set_num_threads(1)
    result: dict = {}
    try:
        sgd = functools.partial(torch.optim.SGD, lr=0.1)
        trainer = tiny_trainer(Path(tmp) / "run", backbone_options=PLAIN, optimizer=sgd)
        result["convs_1x1"] = compiled_layout(trainer.model)
        images, targets = global_batch()
        own = slice(4 * rank, 4 * rank + 4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):  # DDP rebuilds its buckets after the first step
                trainer.run_step(images[own], targets[own])
        result["trainer"] = [str(w.message) for w in caught]
        result["params"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        # The same layout handed to DDP without the fix warns (the check can fail).
        model = tiny_model(**PLAIN)
        compiled_layout(model)
        plain = torch.nn.parallel.DistributedDataParallel(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plain(images[own]).sum().backward()
        result["plain"] = [str(w.message) for w in caught]
    finally:
        torch.save(result, Path(tmp) / f"result{rank}.pt")
        cleanup()


@pytest.mark.slow
def test_ddp_gets_gradients_in_its_buckets_layout(tmp_path):
    torch.multiprocessing.start_processes(
        _worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    results = [torch.load(tmp_path / f"result{r}.pt", weights_only=False) for r in range(2)]
    for result in results:
        assert result["convs_1x1"], "the model has no 1x1 convolution"
        assert not [m for m in result["trainer"] if WARNING in m], result["trainer"]
        assert [m for m in result["plain"] if WARNING in m]
    # Both processes trained to the same weights, away from the initial ones.
    initial = dict(tiny_trainer(tmp_path / "ref", backbone_options=PLAIN).model.named_parameters())
    for name, param in results[0]["params"].items():
        torch.testing.assert_close(results[1]["params"][name], param, rtol=0, atol=0)
    assert any(not torch.equal(p, initial[n]) for n, p in results[0]["params"].items())


def test_a_gradient_is_restrided_only_where_its_layout_is_the_same():
    conv = torch.nn.Conv2d(8, 4, 1)
    match_grad_strides(conv)
    compiled_layout(conv)
    x = torch.randn(2, 8, 3, 3)
    conv(x).square().sum().backward()
    assert conv.weight.grad.stride() == conv.weight.stride() == (8, 1, 1, 1)
    # The values are those of an unhooked convolution's gradient.
    reference = torch.nn.Conv2d(8, 4, 1)
    reference.load_state_dict(conv.state_dict())
    reference(x).square().sum().backward()
    torch.testing.assert_close(conv.weight.grad, reference.weight.grad, rtol=0, atol=0)
    # Accumulating into it (micro-batches) keeps the layout and adds up.
    conv(x).square().sum().backward()
    assert conv.weight.grad.stride() == (8, 1, 1, 1)
    torch.testing.assert_close(conv.weight.grad, 2 * reference.weight.grad)
