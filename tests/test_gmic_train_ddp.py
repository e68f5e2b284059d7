"""Two processes on CPU (gloo, DistributedDataParallel) compute the gradients one process
computes for the same images (one image per process vs. two accumulated)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gmic.train import DistInfo, Trainer, TrainSettings
from tests.support.training import DiscVolumes, tiny_model

SETTINGS = dict(epochs=1, learning_rate=1e-3, batch_size=2, augment_px=0, seed=5,
                progress=False, max_steps=1)


def _grads_of_first_step(out: Path, dist_info: DistInfo | None = None) -> dict[str, torch.Tensor]:
    grads: dict[str, torch.Tensor] = {}

    def hook(model) -> None:
        if not grads:
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters()})

    trainer = Trainer(tiny_model(0), DiscVolumes(4, seed=1), DiscVolumes(2, seed=2),
                      TrainSettings(**SETTINGS), out, dist_info=dist_info, grad_hook=hook)
    trainer.run()
    return grads


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        grads = _grads_of_first_step(Path(out) / "run", DistInfo(rank, world, rank))
        if rank == 0:
            torch.save(grads, Path(out) / "ddp_grads.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    expected = _grads_of_first_step(tmp_path / "single")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "ddp_grads.pt")
    assert set(got) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # the state written under DDP resumes like any other
    assert (tmp_path / "run" / "train_state.pt").is_file()
