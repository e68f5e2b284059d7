"""The built-in weights: small, described as synthetic, loaded by the node, and better than
chance on a synthetic study they never saw."""

from __future__ import annotations

import numpy as np
import torch

from dicomnode.config import ModelConfig
from dicomnode.pipeline.images import load_image
from dicomnode.pipeline.weights import BUILTIN_DIR, ModelRegistry
from gmic.model import predict
from gmic.preprocess import preprocess


def test_builtin_weights_are_small_and_say_what_they_are() -> None:
    registry = ModelRegistry(ModelConfig(device="cpu"))
    for modality in ("dbt", "ffdm", "s2d"):
        path = BUILTIN_DIR / f"{modality}.pt"
        assert path.stat().st_size < 15 * 2 ** 20
        loaded = registry.get(modality)
        assert loaded is not None and loaded.model.cfg.modality == modality
        assert "synthetic phantoms" in loaded.identity.description
        assert "not for clinical use" in loaded.identity.description
        assert loaded.identity.checkpoint_name == f"builtin:{modality}"
        raw = torch.load(path, map_location="cpu", weights_only=True)
        assert raw["meta"]["recipe"] == "dicomnode/weights/make_weights.sh"
        assert all(v.dtype == torch.float16 for v in raw["state_dict"].values()
                   if v.is_floating_point())


def test_builtin_dbt_scores_the_malignant_breast_higher(synth_study) -> None:
    """Seed 1 (the demo's study): a malignant and a benign mass in the right breast, the
    left one normal; not a seed the weights were trained or validated on."""
    torch.set_num_threads(1)
    study = synth_study(studies=1, size="small", seed=1, modalities=("dbt",))
    model = ModelRegistry(ModelConfig(device="cpu")).get("dbt").model
    scores = {}
    for side in ("L", "R"):
        per_view = []
        for view in ("CC", "MLO"):
            image = load_image(next(study.glob(f"*/dbt/{side}_{view}.dcm")))
            volume, _ = preprocess(image.pixels, "dbt", image.laterality,
                                   input_size=model.cfg.input_size)
            per_view.append(float(predict(model, torch.from_numpy(volume)).y[1]))
        scores[side] = np.mean(per_view)
    assert scores["R"] > scores["L"] + 0.05, scores
