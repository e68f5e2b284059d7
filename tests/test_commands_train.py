"""`dicomnode train` / `evaluate` on small synthetic studies: archive and folder sources, and
the errors a user can cause (one `error: ...` line naming the file and row)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pydicom
import pytest
import torch

from tests.support.cli import run_cli
from tests.support.training import TINY_ARGS


# seed 183: the first studies are malignant, malignant, malignant, normal
@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def synth(synth_study) -> Path:
    return synth_study(studies=4, modalities=("s2d",), seed=183)


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def import_folder(folder: Path, config: Path) -> None:
    """Index synthetic files into the node's archive as if they had been received."""
    from dicomnode.config import load_config
    from dicomnode.wiring import open_store

    with open_store(load_config(config)) as store:
        for path in sorted(folder.rglob("*.dcm")):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            store.store_instance(
                encoded=path.read_bytes(), sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID, study_uid=ds.StudyInstanceUID,
                series_uid=ds.SeriesInstanceUID,
                transfer_syntax=ds.file_meta.TransferSyntaxUID, patient_key=ds.PatientID,
                modality=str(ds.get("Modality", "")), laterality=ds.get("ImageLaterality"))


def node_config(tmp_path: Path) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n[storage]\nmin_free_mb = 0\n')
    return path


@pytest.mark.slow
def test_train_from_the_archive_then_evaluate(synth: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    config = node_config(tmp_path)
    import_folder(synth, config)
    out = tmp_path / "run"
    code, stdout, err = run_cli(["--config", str(config), "train", "--labels",
                                 str(synth / "labels.csv"), "--modality", "s2d", "--out",
                                 str(out), "--epochs", "1", *TINY_ARGS], capsys)
    assert code == 0, err
    assert "best epoch 1" in stdout
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_loss", "val_auc_malignant", "images_per_second"} <= set(record)
    run = json.loads((out / "run.json").read_text())
    assert run["source"].startswith("the archive")
    assert run["splits"]["train"]["images"] == 8 and run["splits"]["val"]["images"] == 8

    report = tmp_path / "report"
    code, stdout, err = run_cli(["--config", str(config), "evaluate", "--labels",
                                 str(synth / "labels.csv"), "--checkpoint", str(out / "best.pt"),
                                 "--checkpoint", str(out / "epoch_001.pt"), "--out",
                                 str(report), "--bootstrap", "50", "--montages", "1"], capsys)
    assert code == 0, err
    data = json.loads((report / "report.json").read_text())
    assert data["breast"][0]["name"] == "Synthetic 2D" and data["breast"][0]["malignant"]
    loc = data["localisation"][0]["pxap_malignant"]
    assert loc["images"] == 6 and loc["checkpoints"] == 2 and 0 <= loc["ensemble"] <= 1
    assert (report / "roc_breast.png").stat().st_size > 0
    assert len(list((report / "montages").glob("*.png"))) == 2
    assert "Breast-wise AUC" in (report / "report.md").read_text()

    # the training run's validation patients only
    code, _, err = run_cli(["--config", str(config), "evaluate", "--labels",
                            str(synth / "labels.csv"), "--checkpoint", str(out / "best.pt"),
                            "--out", str(tmp_path / "val"), "--subset", "val", "--split-file",
                            str(out / "split.json"), "--bootstrap", "20", "--montages", "0"],
                           capsys)
    assert code == 0, err
    images = json.loads((tmp_path / "val" / "report.json").read_text())["images"]
    split = json.loads((out / "split.json").read_text())
    assert sorted(i["sop_instance_uid"] for i in images) == sorted(split["val"])


def test_labels_with_bad_columns(synth: Path, tmp_path: Path, capsys) -> None:
    labels = write_csv(tmp_path / "bad.csv", ["uid", "cancer"], [["1.2.3", "1"]])
    code, _, err = run_cli(["train", "--labels", str(labels), "--modality", "s2d", "--out",
                            str(tmp_path / "o"), "--images", str(synth)], capsys)
    line = one_error_line(err)
    assert code == 1 and str(labels) in line and "benign, malignant" in line


def test_labels_with_a_bad_value(synth: Path, tmp_path: Path, capsys) -> None:
    labels = write_csv(tmp_path / "bad.csv", ["sop_instance_uid", "benign", "malignant"],
                       [["1.2.3", "0", "yes"]])
    code, _, err = run_cli(["train", "--labels", str(labels), "--modality", "s2d", "--out",
                            str(tmp_path / "o"), "--images", str(synth)], capsys)
    line = one_error_line(err)
    assert code == 1 and f"{labels} line 2: malignant must be 0 or 1" in line


def test_labels_for_uids_not_in_the_images(synth: Path, tmp_path: Path, capsys) -> None:
    labels = write_csv(tmp_path / "l.csv", ["sop_instance_uid", "benign", "malignant"],
                       [["1.2.3.4", "0", "1"]])
    code, _, err = run_cli(["train", "--labels", str(labels), "--modality", "s2d", "--out",
                            str(tmp_path / "o"), "--images", str(synth)], capsys)
    line = one_error_line(err)
    assert code == 1 and f"{labels} line 2" in line and "1.2.3.4" in line


def test_labels_for_uids_not_in_the_archive(tmp_path: Path, capsys) -> None:
    labels = write_csv(tmp_path / "l.csv", ["sop_instance_uid", "benign", "malignant"],
                       [["1.2.3.4", "0", "1"]])
    config = node_config(tmp_path)
    code, _, err = run_cli(["--config", str(config), "train", "--labels", str(labels),
                            "--modality", "s2d", "--out", str(tmp_path / "o")], capsys)
    line = one_error_line(err)
    assert code == 1 and "not in the archive" in line and f"{labels} line 2" in line


def test_no_positive_cases_in_a_split(synth: Path, tmp_path: Path, capsys) -> None:
    rows = list(csv.DictReader((synth / "labels.csv").open()))
    labels = write_csv(tmp_path / "l.csv", ["sop_instance_uid", "benign", "malignant"],
                       [[r["sop_instance_uid"], r["benign"], "0"] for r in rows])
    code, _, err = run_cli(["train", "--labels", str(labels), "--modality", "s2d", "--out",
                            str(tmp_path / "o"), "--images", str(synth), *TINY_ARGS], capsys)
    line = one_error_line(err)
    assert code == 1 and str(labels) in line and "no malignant positive cases" in line


def test_init_from_another_model(synth: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(2, 3)}, other)
    code, _, err = run_cli(["train", "--labels", str(synth / "labels.csv"), "--modality", "s2d",
                            "--out", str(tmp_path / "o"), "--images", str(synth),
                            "--init", str(other), *TINY_ARGS], capsys)
    line = one_error_line(err)
    assert code == 1 and str(other) in line and "do not fit" in line


def test_checkpoint_of_another_format_version(synth: Path, tmp_path: Path, capsys) -> None:
    from gmic.checkpoint import save_checkpoint
    from tests.support.training import tiny_model

    path = tmp_path / "future.pt"
    save_checkpoint(path, tiny_model())
    data = torch.load(path, weights_only=True)
    data["format_version"] = 99
    torch.save(data, path)
    code, _, err = run_cli(["evaluate", "--labels", str(synth / "labels.csv"), "--checkpoint",
                            str(path), "--out", str(tmp_path / "r"), "--images", str(synth)],
                           capsys)
    line = one_error_line(err)
    assert code == 1 and str(path) in line and "format_version 99" in line


def test_lesion_crop_stage_trains_the_local_network_of_init(synth: Path, tmp_path: Path,
                                                            capsys) -> None:
    from gmic.checkpoint import load_checkpoint, save_checkpoint
    from gmic.model_config import GMICConfig
    from tests.support.training import tiny_model

    init = tmp_path / "init.pt"
    save_checkpoint(init, tiny_model(0, GMICConfig.s2d(input_size=(448, 320), crop_size=(64, 64),
                                                       num_crops=1)))
    common = ["train", "--labels", str(synth / "labels.csv"), "--modality", "s2d",
              "--images", str(synth), "--init", str(init), "--lesion-crops", "--epochs", "1",
              *TINY_ARGS]
    code, _, err = run_cli([*common, "--out", str(tmp_path / "o"), "--mask-weight", "1"],
                           capsys)
    line = one_error_line(err)
    assert code == 1 and "lesion_crops" in line and "mask_weight" in line

    code, stdout, err = run_cli([*common, "--out", str(tmp_path / "run")], capsys)
    assert code == 0, err
    assert "best epoch 1" in stdout
    before, _ = load_checkpoint(init)
    after, _ = load_checkpoint(tmp_path / "run" / "epoch_001.pt")
    for key, value in before.state_dict().items():
        if key.startswith(("ds_net.", "left_postprocess_net.")):  # the global network
            assert torch.equal(value, after.state_dict()[key]), key
    assert not torch.equal(before.dn_resnet.conv1.weight, after.dn_resnet.conv1.weight)


@pytest.mark.slow
def test_tune_keeps_the_best_trials(synth: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "tune"
    args = ["tune", "--labels", str(synth / "labels.csv"), "--modality", "s2d", "--out",
            str(out), "--images", str(synth), "--trials", "2", "--keep", "1", "--epochs", "1",
            *[a for a in TINY_ARGS if a not in ("--num-crops", "1")]]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    summary = json.loads((out / "tune.json").read_text())
    assert len(summary["trials"]) == 2 and len(summary["kept"]) == 1
    assert (out / "best_1.pt").is_file()
    dropped = summary["trials"][1]["folder"]
    assert not list((out / dropped).glob("*.pt"))
    # rerunning skips finished trials
    code, stdout, err = run_cli(args, capsys)
    assert code == 0 and "trial 1/2" not in stdout


def test_breast_level_labels_cover_both_views(synth: Path, tmp_path: Path) -> None:
    from dicomnode.training.data import index_folder, match_labels
    from dicomnode.training.labels import read_labels

    rows = list(csv.DictReader((synth / "labels.csv").open()))
    breasts = sorted({(r["study_uid"], r["laterality"], r["benign"], r["malignant"])
                      for r in rows})
    labels = write_csv(tmp_path / "breasts.csv",
                       ["study_uid", "laterality", "benign", "malignant"],
                       [list(b) for b in breasts])
    examples = match_labels(read_labels(labels), index_folder(synth), "s2d", labels)
    assert len(examples) == 2 * len(breasts) == len(rows)
    by_uid = {r["sop_instance_uid"]: r for r in rows}
    for e in examples:
        assert e.malignant == int(by_uid[e.uid]["malignant"])
        assert e.patient == by_uid[e.uid]["patient_id"] and e.study_date  # from the headers


# --init brings the checkpoint's model: no architecture flags, one step (--max-minutes tiny)
ONE_STEP = ["--epochs", "1", "--batch-size", "2", "--augment-px", "8", "--split", "0.5,0.5,0",
            "--no-progress", "--device", "cpu", "--max-minutes", "0.0001"]


def _trained_config(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())["config"]


def test_init_builtin_trains_the_shipped_model_without_architecture_flags(
        synth: Path, tmp_path: Path, capsys) -> None:
    from dicomnode.pipeline.weights import BUILTIN_DIR
    from gmic.checkpoint import checkpoint_config

    out = tmp_path / "run"
    code, stdout, err = run_cli(["train", "--labels", str(synth / "labels.csv"), "--modality",
                                 "s2d", "--images", str(synth), "--init", "builtin", "--out",
                                 str(out), *ONE_STEP], capsys)
    assert code == 0, err
    assert "time budget reached" in stdout
    shipped = checkpoint_config(BUILTIN_DIR / "s2d.pt")
    assert _trained_config(out) == shipped.to_dict() | {"input_size": list(shipped.input_size),
                                                        "crop_size": list(shipped.crop_size)}
    assert (out / "train_state.pt").is_file()


def test_init_file_takes_the_checkpoints_model_and_flags_that_do_not_change_it(
        synth: Path, tmp_path: Path, capsys) -> None:
    from gmic.checkpoint import save_checkpoint
    from gmic.model_config import GMICConfig
    from tests.support.training import tiny_model

    cfg = GMICConfig.s2d(input_size=(256, 192), crop_size=(48, 48), num_crops=2, percent_t=0.1,
                         local_width=8, slice_chunk=0, activation_checkpointing=False)
    init = tmp_path / "init.pt"
    save_checkpoint(init, tiny_model(0, cfg))
    out = tmp_path / "run"
    # a value equal to the checkpoint's is accepted, and run-time settings may change
    code, stdout, err = run_cli(["train", "--labels", str(synth / "labels.csv"), "--modality",
                                 "s2d", "--images", str(synth), "--init", str(init),
                                 "--crop-size", "48x48", "--beta", "0.001", "--out", str(out),
                                 *ONE_STEP], capsys)
    assert code == 0, err
    trained = _trained_config(out)
    assert trained["input_size"] == [256, 192] and trained["crop_size"] == [48, 48]
    assert trained["num_crops"] == 2 and trained["local_width"] == 8
    assert trained["percent_t"] == 0.1 and trained["beta"] == 0.001


@pytest.mark.parametrize(("flags", "named"), [
    (["--input-size", "448x320"], "--input-size 448x320 contradicts the checkpoint's 256x192"),
    (["--local-width", "16"], "--local-width 16 contradicts the checkpoint's 8"),
    (["--num-crops", "3", "--zeta", "2"], "--num-crops 3 contradicts the checkpoint's 6; "
                                          "--zeta 2 contradicts the checkpoint's 0"),
])
def test_init_refuses_flags_that_contradict_the_checkpoint(
        synth: Path, tmp_path: Path, capsys, flags: list[str], named: str) -> None:
    from gmic.checkpoint import save_checkpoint
    from gmic.model_config import GMICConfig
    from tests.support.training import tiny_model

    init = tmp_path / "init.pt"
    save_checkpoint(init, tiny_model(0, GMICConfig.s2d(input_size=(256, 192), local_width=8)))
    out = tmp_path / "o"
    code, _, err = run_cli(["train", "--labels", str(synth / "labels.csv"), "--modality", "s2d",
                            "--images", str(synth), "--init", str(init), "--out", str(out),
                            *flags, *ONE_STEP], capsys)
    line = one_error_line(err)
    assert code == 1 and named in line and str(init) in line
    assert "leave" in line and "to use the checkpoint's" in line
    assert not out.exists()  # refused before anything was written


def test_init_of_another_modality_keeps_its_network_and_reads_images_the_new_way(
        synth: Path, tmp_path: Path, capsys) -> None:
    from gmic.checkpoint import save_checkpoint
    from gmic.model_config import GMICConfig
    from tests.support.training import tiny_model

    init = tmp_path / "dbt.pt"
    save_checkpoint(init, tiny_model(0, GMICConfig.dbt(input_size=(256, 192), local_width=8,
                                                       crop_size=(48, 48), zeta=3)))
    code, _, err = run_cli(["train", "--labels", str(synth / "labels.csv"), "--modality", "s2d",
                            "--images", str(synth), "--init", str(init), "--out",
                            str(tmp_path / "o"), "--local-width", "16", *ONE_STEP], capsys)
    assert code == 1 and "--local-width 16 contradicts the checkpoint's 8" in one_error_line(err)

    from dicomnode.training.runner import model_config

    cfg = model_config("s2d", {"input_size": (256, 192)}, GMICConfig.dbt(
        input_size=(256, 192), local_width=8, crop_size=(48, 48), zeta=3))
    s2d = GMICConfig.s2d()
    assert cfg.modality == "s2d" and cfg.local_width == 8 and cfg.crop_size == (48, 48)
    assert (cfg.zeta, cfg.percent_t, cfg.num_crops) == (s2d.zeta, s2d.percent_t, s2d.num_crops)
