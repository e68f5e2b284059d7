"""3D-GMIC forward pass, chunking, gradients and loss."""

from __future__ import annotations

import math

import pytest
import torch

from gmic.loss import gmic_loss, gmic_loss_terms
from gmic.model import GMIC, GMICOutput, predict
from gmic.model_config import GMICConfig, GMICConfigError

# Small inputs, real architecture: 256x192 gives a 4x3 saliency map; 64-pixel crops.
TINY = GMICConfig.dbt(input_size=(256, 192), crop_size=(64, 64), num_crops=3, percent_t=0.5,
                      zeta=1, slice_chunk=2)


@pytest.fixture(scope="module")
def model() -> GMIC:
    torch.manual_seed(0)
    return GMIC(TINY).eval()


@pytest.mark.parametrize("slices", [1, 2, 5])
def test_output_shapes(model: GMIC, slices: int) -> None:
    out = model(torch.randn(slices, 256, 192))
    assert out.y.shape == out.y_global.shape == out.y_local.shape == (2,)
    assert out.saliency.shape == (slices, 2, 4, 3)
    assert out.crop_positions.shape == (3, 3) and out.crop_positions.dtype == torch.long
    assert out.crop_source_slices.shape == (3,)
    assert out.attention.shape == (3,)
    assert torch.allclose(out.attention.sum(), torch.tensor(1.0))
    assert torch.allclose(out.y, (out.y_global + out.y_local) / 2)
    assert bool(((out.saliency >= 0) & (out.saliency <= 1)).all())
    assert int(out.crop_positions[:, 0].max()) < slices
    assert int(out.crop_positions[:, 1].max()) <= 256 - 64
    assert int(out.crop_positions[:, 2].max()) <= 192 - 64


def test_batched_call_stacks_outputs(model: GMIC) -> None:
    out = model(torch.randn(2, 3, 256, 192))
    assert out.y.shape == (2, 2)
    assert out.saliency.shape == (2, 3, 2, 4, 3)
    assert out.crop_positions.shape == (2, 3, 3)


def test_2d_image_is_one_slice() -> None:
    cfg = GMICConfig.ffdm(input_size=(256, 192), crop_size=(64, 64), num_crops=2)
    out = GMIC(cfg).eval()(torch.randn(256, 192))
    assert out.saliency.shape == (1, 2, 4, 3)
    assert out.crop_positions[:, 0].tolist() == [0, 0]


def test_chunked_equals_unchunked(model: GMIC) -> None:
    x = torch.randn(5, 256, 192)
    with torch.no_grad():
        a = model(x, slice_chunk=2)
        b = model(x, slice_chunk=0)
    assert torch.allclose(a.saliency, b.saliency, atol=1e-6)
    assert torch.allclose(a.y, b.y, atol=1e-6)
    assert torch.equal(a.crop_positions, b.crop_positions)


def test_predict_bf16_runs_and_restores_mode(model: GMIC) -> None:
    model.train()
    out = predict(model, torch.randn(3, 256, 192), dtype="bf16")
    assert model.training
    model.eval()
    assert out.y.dtype == torch.float32 and out.saliency.shape == (3, 2, 4, 3)


def test_saliency_head_starts_at_positive_constant(model: GMIC) -> None:
    w = GMIC(TINY).left_postprocess_net.gn_conv_last.weight.detach()
    assert torch.allclose(w, torch.full_like(w, 10 ** -2.5))


def test_gradients_reach_both_networks_and_attention() -> None:
    torch.manual_seed(0)
    model = GMIC(TINY).train()
    out = model(torch.randn(4, 256, 192), generator=torch.Generator().manual_seed(0))
    gmic_loss(out, torch.tensor([0.0, 1.0]), beta=1e-3).backward()
    for name in ["ds_net.first_conv.weight", "ds_net.layer_list.4.1.conv2.weight",
                 "left_postprocess_net.gn_conv_last.weight", "dn_resnet.conv1.weight",
                 "dn_resnet.layer4.1.conv2.weight", "mil_attn_V.weight", "mil_attn_U.weight",
                 "mil_attn_w.weight", "classifier_linear.weight"]:
        grad = model.get_parameter(name).grad
        assert grad is not None and float(grad.abs().sum()) > 0, name


def test_training_crops_come_from_within_zeta_of_their_source() -> None:
    model = GMIC(TINY.replace(num_crops=4)).train()
    gen = torch.Generator().manual_seed(0)
    seen = set()
    with torch.no_grad():
        for _ in range(2):
            out = model(torch.randn(5, 256, 192), generator=gen)
            offset = out.crop_positions[:, 0] - out.crop_source_slices
            assert int(offset.abs().max()) <= TINY.zeta
            seen.update(offset.tolist())
    assert len(seen) > 1  # it does sample


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    x = torch.randn(5, 256, 192)
    grads = []
    for ckpt in (True, False):
        torch.manual_seed(0)
        model = GMIC(TINY.replace(activation_checkpointing=ckpt)).train()
        out = model(x, generator=torch.Generator().manual_seed(3))
        gmic_loss(out, torch.tensor([1.0, 0.0]), beta=1e-3).backward()
        grads.append(model.ds_net.first_conv.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_loss_matches_hand_computation() -> None:
    sal = torch.zeros(2, 2, 2, 2)
    sal[0, 0, 0, 0], sal[1, 1, 1, 1] = 0.5, -0.25  # |.| counts the sign away
    out = GMICOutput(y=torch.zeros(2), y_global=torch.tensor([0.2, 0.7]),
                     y_local=torch.tensor([0.4, 0.9]), saliency=sal,
                     crop_positions=torch.zeros(1, 3, dtype=torch.long),
                     crop_source_slices=torch.zeros(1, dtype=torch.long),
                     attention=torch.ones(1), crop_logits=torch.zeros(1, 2))
    target = torch.tensor([0.0, 1.0])
    beta = 0.1
    expected = (-math.log(1 - 0.2) - math.log(0.7)  # global BCE, benign 0 and malignant 1
                - math.log(1 - 0.4) - math.log(0.9)  # local BCE
                + beta * (0.5 + 0.25))
    terms = gmic_loss_terms(out, target, beta)
    assert float(terms.total) == pytest.approx(expected, rel=1e-6)
    assert float(terms.l1) == pytest.approx(0.75)
    assert float(gmic_loss(out, target, beta)) == pytest.approx(expected, rel=1e-6)


def test_config_is_validated_and_frozen() -> None:
    with pytest.raises(GMICConfigError, match="zeta"):
        GMICConfig(zeta=-1)
    with pytest.raises(GMICConfigError, match="modality"):
        GMICConfig.for_modality("ct")
    cfg = GMICConfig.dbt()
    with pytest.raises(AttributeError):
        cfg.zeta = 5  # type: ignore[misc]
    assert cfg.map_size == (33, 21)
    assert GMICConfig.from_dict(cfg.to_dict()) == cfg
    assert GMICConfig.ffdm().input_size == (2866, 1814)
