"""Behaviour of the PyTorch CMDCL reference model."""

import math

import pytest
import torch

from cmdcl.kernels import causal_intervention
from cmdcl.model import CMDCL, CMDCLConfig, preset
from conftest import random_frames, small_config


def test_forward_equals_frame_tokens_then_head(make_model):
    model = make_model()
    frames = random_frames(2, 4, 32)
    logits, embedding = model(frames)
    tokens = model.frame_tokens(frames.flatten(0, 1)).view(2, 4, model.cfg.tokens_per_frame, model.cfg.width)
    logits2, embedding2 = model.head(tokens)
    torch.testing.assert_close(logits, logits2)
    torch.testing.assert_close(embedding, embedding2)
    assert logits.shape == (2, 3) and embedding.shape == (2, 32)
    torch.testing.assert_close(embedding.norm(dim=-1), torch.ones(2))


def test_frames_are_encoded_independently(make_model):
    model = make_model()
    frames = random_frames(1, 4, 32)[0]
    together = model.frame_tokens(frames)
    alone = torch.cat([model.frame_tokens(frames[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid", [0, 1, 2, 4])
def test_tokens_per_frame_follow_the_grid(make_model, grid):
    model = make_model(token_grid=grid)
    tokens = model.frame_tokens(random_frames(1, 2, 32)[0])
    assert tokens.shape == (2, 1 + grid * grid, 32)


def test_pooled_patch_tokens_average_the_patches(make_model):
    """With g = 1 the single patch slot is the mean of all projected patch tokens."""
    model = make_model(token_grid=1)
    frames = random_frames(1, 2, 32)[0]
    x = (frames.permute(0, 3, 1, 2).float() - model.pixel_mean) / model.pixel_std
    vit = model.video_encoder(x)
    expected = model.token_proj(torch.stack([vit[:, 0], vit[:, 1:].mean(1)], dim=1))
    torch.testing.assert_close(model.frame_tokens(frames), expected, rtol=1e-5, atol=1e-5)


def test_normalisation_is_inside_forward(make_model):
    """The model takes uint8 RGB and applies the configured mean/std itself."""
    model = make_model()
    frames = random_frames(1, 2, 32)[0]
    x = frames.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(model.cfg.mean).view(3, 1, 1)
    std = torch.tensor(model.cfg.std).view(3, 1, 1)
    expected = model.token_proj(model.video_encoder((x - mean) / std)[:, :1])
    torch.testing.assert_close(model.frame_tokens(frames)[:, :1], expected, rtol=1e-4, atol=1e-5)
    other = make_model(mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    assert not torch.allclose(other.frame_tokens(frames), model.frame_tokens(frames))


def test_debiased_text_does_not_depend_on_the_video(make_model):
    model = make_model()
    before = model.text_features().detach().clone()
    logits_a, _ = model(random_frames(1, 4, 32, seed=1))
    logits_b, _ = model(random_frames(1, 4, 32, seed=2))
    assert not torch.allclose(logits_a, logits_b)
    torch.testing.assert_close(model.text_features(), before)


def test_textual_branch_is_differentiable(make_model):
    model = make_model().train()
    logits, _ = model(random_frames(2, 4, 32))
    model.loss(logits, torch.tensor([0, 2])).backward()
    for name in ("text", "text_proj.weight", "textual.q.weight", "textual.k.weight", "textual.t.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_bias_prior_steers_the_textual_attention(make_model):
    model = make_model()
    base = model.text_features().detach()
    prior = torch.full((5,), 1e-9)
    prior[3] = 1.0
    model.bias_prior.copy_(prior / prior.sum())
    assert not torch.allclose(model.text_features(), base)
    off = make_model(use_bias_prior=False)
    base_off = off.text_features().detach()
    off.bias_prior.copy_(prior / prior.sum())
    torch.testing.assert_close(off.text_features(), base_off)


def test_single_dictionary_entry_with_zero_log_prior_returns_its_value_row():
    torch.manual_seed(0)
    b, n, h, d, c = 2, 7, 4, 8, 5
    q = torch.randn(b, n, h * d)
    kt, vt = torch.randn(h, c, d), torch.randn(h, c, d)
    kz, vz = torch.randn(h, 1, d), torch.randn(h, 1, d)
    out = causal_intervention(q, kt, vt, kz, vz, torch.zeros(1), num_heads=h)
    assert out.shape == (b, n, 2 * h * d)
    expected = vz[:, 0].reshape(h * d).expand(b, n, h * d)
    torch.testing.assert_close(out[..., h * d :], expected)


def test_causal_intervention_matches_explicit_attention():
    torch.manual_seed(1)
    b, n, h, d, c, kzn = 2, 5, 2, 4, 3, 6
    q = torch.randn(b, n, h * d)
    kt, vt, kz, vz = torch.randn(h, c, d), torch.randn(h, c, d), torch.randn(h, kzn, d), torch.randn(h, kzn, d)
    log_prior = torch.log(torch.softmax(torch.randn(kzn), 0))
    out = causal_intervention(q, kt, vt, kz, vz, log_prior, num_heads=h, scale=0.3)
    for head in range(h):
        qh = q[..., head * d : (head + 1) * d]
        m = torch.softmax(qh @ kt[head].T * 0.3, -1) @ vt[head]
        z = torch.softmax(qh @ kz[head].T * 0.3 + log_prior, -1) @ vz[head]
        torch.testing.assert_close(out[..., head * d : (head + 1) * d], m)
        torch.testing.assert_close(out[..., h * d + head * d : h * d + (head + 1) * d], z)
    with pytest.raises(ValueError, match="impl"):
        causal_intervention(q, kt, vt, kz, vz, log_prior, num_heads=h, impl="nope")


def test_confounder_prior_and_dictionary_reach_the_logits(make_model):
    frames = random_frames(1, 4, 32)
    for change in ("conf_prior", "conf_dict"):
        model = make_model()  # skewed priors
        base = model(frames)[0]
        with torch.no_grad():
            if change == "conf_prior":
                model.conf_prior.copy_(model.conf_prior.flip(0))
            else:
                model.conf_dict.add_(1.0)
            assert not torch.allclose(model(frames)[0], base), change
    # Without the visual intervention neither has an effect.
    ablated = make_model(visual_intervention=False)
    base = ablated(frames)[0]
    ablated.conf_dict.add_(1.0)
    ablated.conf_prior.copy_(ablated.conf_prior.flip(0))
    torch.testing.assert_close(ablated(frames)[0], base)


def test_no_textual_intervention_uses_the_projected_texts(make_model):
    model = make_model(textual_intervention=False)
    torch.testing.assert_close(model.text_features(), model.text_proj(model.text))
    model.bias_dict.add_(1.0)  # the bias dictionary is then unused
    torch.testing.assert_close(model.text_features(), model.text_proj(model.text))


def test_cosine_classifier(make_model):
    model = make_model()
    frames = random_frames(2, 4, 32)
    logits, embedding = model(frames)
    text = torch.nn.functional.normalize(model.text_features(), dim=-1)
    expected = model.logit_scale.exp() * embedding @ text.T + model.logit_bias
    torch.testing.assert_close(logits, expected)
    assert logits.abs().max() <= model.logit_scale.exp() + 1e-4


def test_attention_pooling_and_multi_label(make_model):
    model = make_model(pooling="attention", multi_label=True)
    logits, _ = model(random_frames(2, 4, 32))
    probs = model.probabilities(logits)
    assert ((probs > 0) & (probs < 1)).all() and not torch.allclose(probs.sum(-1), torch.ones(2))
    loss = model.loss(logits, torch.tensor([[1, 0, 1], [0, 0, 1]]))
    assert loss.item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([[1.0, 0, 1], [0, 0, 1]])).item()
    )
    single = make_model()
    torch.testing.assert_close(single.probabilities(logits).sum(-1), torch.ones(2))


def test_fewer_frames_than_configured_and_too_many(make_model):
    model = make_model()
    assert model(random_frames(1, 2, 32))[0].shape == (1, 3)
    with pytest.raises(ValueError, match="at most 4"):
        model(random_frames(1, 5, 32))


def test_config_round_trip_validation_and_hash():
    cfg = small_config(pooling="attention", multi_label=True)
    again = CMDCLConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.config_hash() == cfg.config_hash()
    assert small_config(depth=2).config_hash() != cfg.config_hash()
    with pytest.raises(ValueError, match="divide the patch grid"):
        small_config(token_grid=3)
    with pytest.raises(ValueError, match="unknown CMDCL config fields: bogus"):
        CMDCLConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


def test_base_preset_is_the_papers_setting():
    cfg = preset("base")
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.width, cfg.vision.layers) == (224, 16, 768, 12)
    assert (cfg.num_frames, cfg.width, cfg.depth, cfg.heads, cfg.tokens_per_frame) == (64, 512, 6, 8, 5)
    assert (cfg.num_bias, cfg.num_confounders) == (512, 512)
    torch.manual_seed(0)
    model = CMDCL(cfg, ["a", "b"]).eval()
    with torch.no_grad():
        tokens = model.frame_tokens(torch.zeros(1, 224, 224, 3, dtype=torch.uint8))
    assert tokens.shape == (1, 5, 512)
    assert math.isfinite(tokens.abs().sum().item())


def test_set_dictionaries_checks_shapes(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="bias_dict must be"):
        model.set_dictionaries(torch.zeros(4, 24), torch.ones(4) / 4, torch.zeros(6, 24), torch.ones(6) / 6)
    model.set_dictionaries(torch.ones(5, 24), torch.ones(5) / 5, torch.ones(6, 24), torch.ones(6) / 6)
    assert model.bias_dict.sum() == 5 * 24
