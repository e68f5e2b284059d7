"""dicomnode.training.evaluation: breast-wise means, modality ensembles, Table III rows."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dicomnode.training.data import Example
from dicomnode.training.evaluation import (
    ImageScore,
    auc_tables,
    breast_predictions,
    localisation_table,
    predict_image,
)
from gmic.metrics import roc_auc


def _score(study: str, lat: str, view: str, modality: str, malignant: int,
           ys: list[float], loc: dict[str, list[float]] | None = None) -> ImageScore:
    header = SimpleNamespace(uid=f"{study}{lat}{view}{modality}", study_uid=study,
                             laterality=lat, modality=modality, view=view)
    example = Example(header, 0, malignant, study, "")  # type: ignore[arg-type]
    return ImageScore(example, [np.array([0.1, y]) for y in ys], dict(loc or {}))


def test_breast_prediction_is_the_mean_of_views_and_checkpoints() -> None:
    scores = [_score("s1", "L", "CC", "dbt", 1, [0.8, 0.6]),  # checkpoint mean 0.7
              _score("s1", "L", "MLO", "dbt", 1, [0.2, 0.4]),  # 0.3
              _score("s1", "R", "CC", "dbt", 0, [0.1, 0.1])]
    breasts = breast_predictions(scores)
    labels, y = breasts[("s1", "L")]
    assert labels[1] == 1 and y[1] == pytest.approx(0.5)
    assert breasts[("s1", "R")][1][1] == pytest.approx(0.1)


def test_modality_ensemble_rows() -> None:
    rng = np.random.default_rng(0)
    results: dict[str, list[ImageScore]] = {"dbt": [], "s2d": []}
    truth = {}
    for i in range(12):
        for lat in "LR":
            malignant = int(rng.random() < 0.4) if lat == "L" else 0
            truth[(f"s{i}", lat)] = malignant
            for m in results:
                for view in ("CC", "MLO"):
                    results[m].append(_score(f"s{i}", lat, view, m, malignant,
                                             [float(rng.random())]))
    tables = auc_tables(results, resamples=50)
    names = [r["name"] for r in tables["breast"]]
    assert names == ["Synthetic 2D", "DBT", "Synthetic 2D + DBT"]
    dbt = breast_predictions(results["dbt"])
    s2d = breast_predictions(results["s2d"])
    keys = sorted(truth)
    expected = roc_auc([truth[k] for k in keys],
                       [(dbt[k][1][1] + s2d[k][1][1]) / 2 for k in keys])
    assert tables["breast"][2]["malignant"]["auc"] == pytest.approx(expected)
    assert tables["breast"][2]["benign"] is None  # no benign cases: n/a, not an error
    assert [r["images"] for r in tables["image"]] == [48, 48]


def test_localisation_table_mean_std_and_ensemble() -> None:
    a = _score("s1", "L", "CC", "dbt", 1, [0.5, 0.5], {"dsc_malignant": [0.2, 0.4]})
    b = _score("s2", "L", "CC", "dbt", 1, [0.5, 0.5], {"dsc_malignant": [0.4, 0.6]})
    a.ensemble_localisation = {"dsc_malignant": 0.35}
    b.ensemble_localisation = {"dsc_malignant": 0.55}
    (row,) = localisation_table({"dbt": [a, b]})
    cell = row["dsc_malignant"]
    # per checkpoint: (0.2 + 0.4) / 2 = 0.3 and (0.4 + 0.6) / 2 = 0.5
    assert cell["mean"] == pytest.approx(0.4) and cell["std"] == pytest.approx(0.1)
    assert cell["ensemble"] == pytest.approx(0.45) and cell["images"] == 2
    assert row["name"] == "DBT max-projected" and row["pxap_benign"] is None


def test_test_time_augmentation_averages_copies() -> None:
    from tests.train_support import tiny_model

    torch.set_num_threads(1)
    model = tiny_model().eval()
    pixels = np.random.default_rng(0).random((1, 140, 100)).astype(np.float32)
    pixels[:, :, :60] += 2  # a "breast" on the left
    y0, out, volume, _ = predict_image(model, pixels, "s2d", "L", tta=0, augment_px=10, seed=1)
    y1, _, _, _ = predict_image(model, pixels, "s2d", "L", tta=3, augment_px=10, seed=1)
    y2, _, _, _ = predict_image(model, pixels, "s2d", "L", tta=3, augment_px=10, seed=1)
    assert volume.shape == (1, *model.cfg.input_size)
    np.testing.assert_allclose(y0, out.y.numpy())
    np.testing.assert_allclose(y1, y2)  # seeded
    assert not np.allclose(y0, y1)


def test_conspicuity_drops_when_tissue_overlaps_the_finding() -> None:
    from dicomnode.training.evaluation import conspicuity

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:80, :80]
    mask = (yy - 40) ** 2 + (xx - 40) ** 2 < 8 ** 2
    clear = rng.normal(100, 5, (80, 80)) + 30 * mask
    # the same finding under a patchy dense structure: brighter, busier surroundings
    cluttered = clear + 40 * (rng.random((80, 80)) > 0.5) * ((yy - 40) ** 2 + (xx - 40) ** 2
                                                             < 20 ** 2)
    high, low = conspicuity(clear, mask), conspicuity(cluttered, mask)
    assert high == pytest.approx(30 / 5, rel=0.2)
    assert low < high / 3
    assert conspicuity(clear, np.zeros_like(mask)) is None
