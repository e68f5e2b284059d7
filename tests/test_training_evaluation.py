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
    malignant_saliency_peaks,
    marks_markdown,
    marks_table,
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


def test_marks_table_counts_what_a_reader_sees_marked() -> None:
    """A mark on a benign mass is counted against the malignant map, a mark on a normal
    image anywhere, a malignant finding only where the mark lies on it."""
    malignant_map = np.zeros((20, 20), np.float32)
    malignant_map[2:6, 2:6] = 0.6  # a hot spot
    on_spot = np.zeros((20, 20), bool)
    on_spot[3:5, 3:5] = True
    beside = np.zeros((20, 20), bool)
    beside[12:16, 12:16] = True
    assert malignant_saliency_peaks(malignant_map, {"benign": on_spot, "malignant": None}) == {
        "peak": pytest.approx(0.6), "benign": pytest.approx(0.6)}

    def image(study: str, benign: int, malignant: int, masks: dict) -> ImageScore:
        score = _score(study, "L", "CC", "dbt", malignant, [0.5])
        score.example.benign = benign
        score.malignant_saliency = malignant_saliency_peaks(malignant_map, masks)
        return score

    scores = [image("n1", 0, 0, {}),  # normal, the spot marks it
              image("b1", 1, 0, {"benign": on_spot}),  # benign mass under the mark
              image("b2", 1, 0, {"benign": beside}),  # benign mass, the mark elsewhere
              image("m1", 0, 1, {"malignant": beside}),  # cancer missed, mark elsewhere
              image("m2", 1, 1, {"malignant": on_spot, "benign": beside})]
    (row,) = marks_table({"dbt": scores}, [0.5, 0.7, 0.5])
    assert [p["threshold"] for p in row["points"]] == [0.7, 0.5]
    at = row["points"][1]
    assert at["normal"] == (1, 1)
    assert at["benign"] == (1, 2)  # m2's benign mass does not count: it has a cancer
    assert at["malignant"] == (1, 2)
    assert row["points"][0]["normal"] == (0, 1)
    # malignant peaks 0 and 0.6 against benign 0.6 and 0: one pair won, one lost, two ties
    assert row["malignant_over_benign"] == pytest.approx(0.5)
    text = marks_markdown([row])
    assert "| DBT | 0.5 | 100.0% (1 of 1) | 50.0% (1 of 2) | 50.0% (1 of 2) |" in text


def test_test_time_augmentation_averages_copies() -> None:
    from tests.support.training import tiny_model

    torch.set_num_threads(1)
    from dicomnode.pipeline.inference import run_model

    model = tiny_model().eval()
    pixels = np.random.default_rng(0).random((1, 140, 100)).astype(np.float32)
    pixels[:, :, :60] += 2  # a "breast" on the left
    image = SimpleNamespace(pixels=pixels, modality="s2d", laterality="L")
    plain = run_model(model, image)  # type: ignore[arg-type]
    once = run_model(model, image, test_time_augmentations=3, augment_px=10,  # type: ignore[arg-type]
                     seed=1)
    again = run_model(model, image, test_time_augmentations=3, augment_px=10,  # type: ignore[arg-type]
                      seed=1)
    # The 140-row breast is taller than the 128x96 input: the whole breast is read, the
    # window grown to multiples of the network's stride (64).
    assert model.cfg.input_size == (128, 96)
    assert plain.model_input.shape == (1, 192, 128)
    np.testing.assert_allclose(plain.final, plain.output.y.numpy())
    np.testing.assert_allclose(once.final, again.final)  # seeded
    assert not np.allclose(plain.final, once.final)
    np.testing.assert_array_equal(once.output.saliency, plain.output.saliency)  # drawn: plain


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


@pytest.mark.parametrize("copies", [0, 2])
def test_evaluate_scores_each_image_as_the_worker_does(tmp_path, capsys, copies: int,
                                                      synth_study) -> None:
    """The AUC `evaluate` reports is measured on the node's own path: per image, its score
    is the probability the worker puts in its results (same checkpoint, same image, same
    [model] test-time augmentation, which evaluate follows by default)."""
    import json

    from dicomnode.cli import main
    from dicomnode.config import ModelConfig
    from dicomnode.pipeline.images import load_image
    from dicomnode.pipeline.weights import ModelRegistry
    from dicomnode.pipeline.worker import analyse_image
    from gmic.checkpoint import save_checkpoint
    from gmic.model_config import GMICConfig
    from tests.support.training import tiny_model

    torch.set_num_threads(1)
    images = synth_study(studies=2, modalities=("s2d",), seed=183)
    checkpoint = tmp_path / "s2d.pt"
    save_checkpoint(checkpoint, tiny_model(3, GMICConfig.s2d(
        input_size=(160, 112), crop_size=(32, 32), num_crops=2, percent_t=0.1, local_width=8,
        saliency_init_log10_w=-0.5)))
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n[model]\ndevice = "cpu"\n'
                      f'test_time_augmentations = {copies}\naugment_px = 12\n')
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(config), "evaluate", "--labels", str(images / "labels.csv"),
              "--images", str(images), "--checkpoint", str(checkpoint), "--out",
              str(tmp_path / "report"), "--bootstrap", "10", "--montages", "0",
              "--group-by", "family", "--group-by", "size"])
    assert not exc.value.code, capsys.readouterr().err
    groups = json.loads((tmp_path / "report" / "groups.json").read_text())
    assert [g["grouping"] for g in groups] == ["family", "size"]
    assert groups[0]["groups"] == ["powerlaw"]  # the default family, recorded per image
    assert groups[0]["rows"][0]["malignant_breasts"] == 4
    assert "Breast-wise AUC by family" in (tmp_path / "report" / "report.md").read_text()
    # the marks at the node's operating points (0.5, 0.35, 0.25 by default), every image
    (marks,) = json.loads((tmp_path / "report" / "marks.json").read_text())
    assert [p["threshold"] for p in marks["points"]] == [0.5, 0.35, 0.25]
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["images"]
    assert marks["points"][0]["normal"][1] == sum(
        1 for row in rows if not row["benign"] and not row["malignant"]) > 0
    scored = {row["sop_instance_uid"]: row for row in rows}

    model_config = ModelConfig(device="cpu", s2d=str(checkpoint),
                               test_time_augmentations=copies, augment_px=12)
    loaded = ModelRegistry(model_config).get("s2d")
    one_pass = ModelRegistry(ModelConfig(device="cpu", s2d=str(checkpoint))).get("s2d")
    paths = sorted(images.glob("*/s2d/*.dcm"))
    assert len(paths) == len(scored) == 8
    moved = 0
    for path in paths:
        image = load_image(path)
        worker = analyse_image(image, loaded)
        row = scored[image.sop_instance_uids[0]]
        assert row["y_malignant"] == pytest.approx(worker.final.malignant, rel=1e-6, abs=1e-7)
        assert row["y_benign"] == pytest.approx(worker.final.benign, rel=1e-6, abs=1e-7)
        plain = analyse_image(image, one_pass).final.malignant
        moved += abs(row["y_malignant"] - plain) > 1e-6
    assert moved == (len(paths) if copies else 0)  # the copies count, and were followed
