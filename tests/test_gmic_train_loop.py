"""gmic.train.Trainer: exact resume, checkpoints, metrics log, early stopping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gmic.checkpoint import load_checkpoint
from gmic.train import Trainer, TrainError, TrainSettings
from tests.support.training import TINY, DiscVolumes, tiny_model

SETTINGS = dict(epochs=2, learning_rate=1e-3, batch_size=2, augment_px=6, seed=3,
                progress=False)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _cfg3d():
    return TINY.replace(modality="dbt", zeta=1)  # slice sampling within +/-1 exercised


def test_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    cfg = _cfg3d()
    train, val = DiscVolumes(6, seed=1, depth=3), DiscVolumes(4, seed=2, depth=3)
    full = Trainer(tiny_model(0, cfg), train, val, TrainSettings(**SETTINGS), tmp_path / "a")
    expected = full.run()

    # interrupted mid-epoch 1, then resumed by a new process with different initial weights
    first = Trainer(tiny_model(0, cfg), train, val, TrainSettings(**SETTINGS, max_steps=2),
                    tmp_path / "b")
    assert first.run().interrupted
    resumed = Trainer(tiny_model(99, cfg), train, val, TrainSettings(**SETTINGS),
                      tmp_path / "b")
    got = resumed.run()

    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert [h["train_loss"] for h in got.history] == [h["train_loss"] for h in expected.history]
    assert got.best_epoch == expected.best_epoch
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    model, meta = load_checkpoint(tmp_path / "b" / "epoch_002.pt")
    assert meta["epoch"] == 2 and model.cfg == cfg
    assert (tmp_path / "b" / "best.pt").is_file()


def test_time_budget_checkpoints_mid_epoch_and_resumes_exactly(tmp_path: Path) -> None:
    train, val = DiscVolumes(6, seed=1), DiscVolumes(4, seed=2)
    full = Trainer(tiny_model(0), train, val, TrainSettings(**SETTINGS), tmp_path / "a")
    full.run()

    boxed = Trainer(tiny_model(0), train, val, TrainSettings(**SETTINGS, max_seconds=1e-6),
                    tmp_path / "b")
    result = boxed.run()
    # out of time after the first optimizer step: the weights so far are validated and kept
    assert result.interrupted and result.epochs_run == 0
    records = [json.loads(line) for line in
               (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["partial"]) for r in records] == [(1, round(1 / 3, 4))]
    assert (tmp_path / "b" / "best.pt").is_file()
    _, meta = load_checkpoint(tmp_path / "b" / "best.pt")
    assert meta["val_auc_malignant"] == records[0]["val_auc_malignant"]

    resumed = Trainer(tiny_model(7), train, val, TrainSettings(**SETTINGS), tmp_path / "b")
    assert not resumed.run().interrupted
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_rerun_after_the_end_does_nothing_more(tmp_path: Path) -> None:
    train, val = DiscVolumes(4, seed=1), DiscVolumes(4, seed=2)
    settings = TrainSettings(**{**SETTINGS, "epochs": 1})
    Trainer(tiny_model(), train, val, settings, tmp_path).run()
    again = Trainer(tiny_model(), train, val, settings, tmp_path).run()
    assert again.epochs_run == 1 and len(again.history) == 1


def test_resume_refuses_another_configuration(tmp_path: Path) -> None:
    train, val = DiscVolumes(4, seed=1), DiscVolumes(4, seed=2)
    settings = TrainSettings(**{**SETTINGS, "max_steps": 1})
    Trainer(tiny_model(), train, val, settings, tmp_path).run()
    other = tiny_model(cfg=TINY.replace(num_crops=3))
    with pytest.raises(TrainError, match="another model configuration"):
        Trainer(other, train, val, settings, tmp_path).run()


def test_early_stopping(tmp_path: Path) -> None:
    train, val = DiscVolumes(2, seed=1), DiscVolumes(4, seed=2)
    settings = TrainSettings(**{**SETTINGS, "epochs": 10, "patience": 1,
                                "learning_rate": 1e-9})
    result = Trainer(tiny_model(), train, val, settings, tmp_path).run()
    assert result.stopped_early and result.epochs_run < 10


def test_bad_settings() -> None:
    with pytest.raises(TrainError, match="batch_size"):
        TrainSettings(batch_size=0)


@pytest.mark.slow
def test_short_training_learns_held_out_lesions(tmp_path: Path) -> None:
    """A tiny model learns bright discs: held-out validation AUC far above chance in a few
    epochs (half a minute of CPU)."""
    settings = TrainSettings(epochs=4, learning_rate=3e-4, batch_size=2, augment_px=8,
                             progress=False)
    result = Trainer(tiny_model(0), DiscVolumes(16, seed=1), DiscVolumes(12, seed=2), settings,
                     tmp_path).run()
    assert result.best_auc >= 0.9, result.history


def test_mixed_precision_step_runs(tmp_path: Path) -> None:
    """bf16 autocast (the CPU stand-in for the GPU's mixed precision) trains and saves."""
    settings = TrainSettings(**{**SETTINGS, "precision": "bf16", "max_steps": 1})
    trainer = Trainer(tiny_model(), DiscVolumes(4, seed=1), DiscVolumes(2, seed=2), settings,
                      tmp_path)
    assert trainer.amp_dtype == torch.bfloat16
    assert trainer.run().interrupted
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    with pytest.raises(TrainError, match="fp16 mixed precision needs a CUDA"):
        Trainer(tiny_model(), DiscVolumes(2, seed=1), DiscVolumes(2, seed=2),
                TrainSettings(precision="fp16"), tmp_path / "x")


def test_normal_items_train_on_a_slab_of_consecutive_slices(tmp_path: Path) -> None:
    """normal_slices: an image with no finding trains on a random run of that many slices of
    its own; an image with a finding, and validation, see every slice."""
    train, val = DiscVolumes(10, seed=1, depth=5), DiscVolumes(4, seed=2, depth=5)
    model = tiny_model(0, _cfg3d())
    seen: list[tuple[bool, torch.Tensor]] = []
    forward = model.forward

    def recording(x, *args, **kwargs):
        seen.append((torch.is_grad_enabled(), x.detach().clone()))
        return forward(x, *args, **kwargs)

    model.forward = recording  # type: ignore[method-assign]
    settings = TrainSettings(**{**SETTINGS, "epochs": 1, "augment_px": 0, "normal_slices": 2})
    Trainer(model, train, val, settings, tmp_path).run()
    trained = [x for grad, x in seen if grad]
    assert len(trained) == len(train)
    starts = set()
    for x in trained:
        matches = [(vol, label) for vol, label in train.items
                   if any(torch.equal(x, torch.from_numpy(vol[s:s + x.shape[0]]))
                          for s in range(vol.shape[0] - x.shape[0] + 1))]
        assert len(matches) == 1
        vol, label = matches[0]
        assert x.shape[0] == (5 if label.any() else 2)
        if not label.any():
            starts.add(next(s for s in range(4) if torch.equal(x, torch.from_numpy(vol[s:s + 2]))))
    assert len(starts) > 1  # a random slab, not always the first
    assert all(x.shape[0] == 5 for grad, x in seen if not grad)  # validation: whole volumes
    with pytest.raises(TrainError, match="normal_slices"):
        TrainSettings(normal_slices=-1)
