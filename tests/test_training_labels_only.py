"""Training from image or breast labels alone: hospital archives rarely have pixel masks."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from dicomnode.cli import main
from dicomnode.synth import SynthOptions, generate_studies
from gmic.augment import intensity_jitter


def test_intensity_jitter_is_seeded_normalised_and_keeps_the_image() -> None:
    torch.manual_seed(0)
    volume = torch.randn(3, 64, 48).cumsum(dim=2)  # some structure
    volume = (volume - volume.mean()) / volume.std()
    assert intensity_jitter(volume, 0.0) is volume
    outs = [intensity_jitter(volume, 0.5, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    torch.testing.assert_close(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])
    for out in outs:
        assert out.shape == volume.shape
        assert abs(float(out.mean())) < 1e-4 and abs(float(out.std()) - 1) < 1e-3
        assert not torch.allclose(out, volume, atol=1e-2)
        # the same anatomy: strongly correlated with the input
        assert float(torch.corrcoef(torch.stack([out.ravel(), volume.ravel()]))[0, 1]) > 0.8


def _breast_labels(images: Path, path: Path) -> Path:
    """Breast-level labels (study, laterality) from the image rows: no SOP Instance UIDs."""
    with (images / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    breasts = {}
    for r in rows:
        key = (r["study_uid"], r["laterality"])
        old = breasts.get(key, (0, 0))
        breasts[key] = (max(old[0], int(r["benign"])), max(old[1], int(r["malignant"])))
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_uid", "laterality", "benign", "malignant"])
        for (study, lat), (benign, malignant) in sorted(breasts.items()):
            writer.writerow([study, lat, benign, malignant])
    return path


def test_train_dbt_from_builtin_with_breast_labels_and_no_masks(tmp_path: Path, capsys) -> None:
    """No SEG anywhere, breast labels only, from the built-in DBT weights, with geometric and
    intensity augmentation: one optimizer step, a finite loss, changed weights."""
    torch.set_num_threads(1)
    images = tmp_path / "images"
    # seed 183: malignant studies and a normal one; 2 studies give a train and a val patient
    generate_studies(images, SynthOptions(studies=2, modalities=("dbt",), seed=183,
                                          families=("lumpy",), variety=True))
    for seg in images.glob("*/seg"):
        shutil.rmtree(seg)
    assert not list(images.rglob("*seg*.dcm"))
    labels = _breast_labels(images, tmp_path / "breasts.csv")
    out = tmp_path / "run"
    args = ["train", "--labels", str(labels), "--modality", "dbt", "--images", str(images),
            "--init", "builtin", "--out", str(out), "--epochs", "1", "--batch-size", "2",
            "--augment-px", "16", "--augment-intensity", "0.3", "--split", "0.5,0.5,0",
            "--lr", "1e-4", "--no-progress", "--device", "cpu", "--max-minutes", "0.0001",
            "--whole-breast", "--normal-slices", "4"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    captured = capsys.readouterr()
    assert not exc.value.code, captured.err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all(math.isfinite(r["train_loss"]) for r in records)
    assert records[-1]["train_loss"] > 0
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["augment_intensity"] == 0.3 and run["settings"]["mask_weight"] == 0
    assert run["whole_breast"] and run["settings"]["normal_slices"] == 4
    from dicomnode.pipeline.weights import BUILTIN_DIR

    before = torch.load(BUILTIN_DIR / "dbt.pt", map_location="cpu", weights_only=True)
    after = torch.load(out / "epoch_001.pt", map_location="cpu", weights_only=True)
    key = "ds_net.first_conv.weight"
    assert not torch.allclose(before["state_dict"][key].float(), after["state_dict"][key].float())

    # Mask supervision asked for without masks: one clear error, not a silent no-op.
    with pytest.raises(SystemExit) as exc:
        main([*args[:args.index("--out") + 1], str(tmp_path / "run2"),
              *args[args.index("--out") + 2:], "--mask-weight", "1"])
    assert exc.value.code and "SEG" in capsys.readouterr().err
