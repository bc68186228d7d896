"""Dictionaries V_P and Z: shapes, priors, determinism, features from the frozen tower."""

import pytest
import torch

from cmdcl.train.dictionaries import build_dictionaries, extract_features, kmeans_dictionary


def test_kmeans_finds_clusters_and_their_frequencies():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    sizes = [300, 150, 50]
    x = torch.cat([c + 0.1 * torch.randn(n, 2, generator=generator) for c, n in zip(centres, sizes)])
    found, prior = kmeans_dictionary(x, 3, seed=0, batch_size=64)
    assert found.shape == (3, 2) and prior.shape == (3,)
    assert prior.sum().item() == pytest.approx(1.0, abs=1e-6) and (prior >= 0).all()
    # each true centre is matched by a found one, with its share of the points
    for centre, n in zip(centres, sizes):
        nearest = (found - centre).norm(dim=1).argmin()
        assert (found[nearest] - centre).norm() < 0.5
        assert prior[nearest].item() == pytest.approx(n / 500, abs=1e-6)


def test_kmeans_is_deterministic_and_checks_size():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(1))
    a, pa = kmeans_dictionary(x, 5, seed=3)
    b, pb = kmeans_dictionary(x, 5, seed=3)
    assert torch.equal(a, b) and torch.equal(pa, pb)
    with pytest.raises(ValueError, match="V_P: 300 clusters need at least 300 feature vectors, got 200"):
        kmeans_dictionary(x, 300, name="V_P")


def test_dictionaries_from_frozen_tower_fit_the_model(make_model):
    model = make_model(num_bias=5, num_confounders=6)
    cfg = model.cfg
    frames = torch.randint(0, 256, (20, 32, 32, 3), dtype=torch.uint8)
    features = extract_features(model, frames, batch_size=7)
    g = cfg.token_grid
    assert features["frame"].shape == (20, cfg.embed_dim)
    assert features["patch"].shape == (20 * g * g, cfg.embed_dim)
    # the frame feature is the tower's class token, exactly what vlm_tokens gives
    assert torch.allclose(features["frame"][:3], model.vlm_tokens(frames[:3])[:, 0].detach(), atol=1e-6)
    dicts = build_dictionaries(features, cfg.num_bias, cfg.num_confounders, seed=0)
    assert dicts["bias_dict"].shape == (5, cfg.embed_dim) and dicts["conf_dict"].shape == (6, cfg.embed_dim)
    for prior in (dicts["bias_prior"], dicts["conf_prior"]):
        assert prior.sum().item() == pytest.approx(1.0, abs=1e-6) and (prior >= 0).all()
    model.set_dictionaries(dicts["bias_dict"], dicts["bias_prior"], dicts["conf_dict"], dicts["conf_prior"])
    assert torch.equal(model.conf_prior, dicts["conf_prior"])
