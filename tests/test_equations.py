"""The model's equations against formulas written out here (docs/design.md sections 2.3, 2.6, 2.7 and 3).

Every parity test elsewhere compares a backend with the PyTorch model, so a bug in what that model computes moves
both sides. These tests compute the two interventions, the pooling and the classifier again from the weights with
explicit per-head loops, an explicit softmax and LayerNorm, and none of cmdcl's attention helpers. Weights are
random (not their init values), priors skewed, so that every term (prior, gate, concatenation order, scale, heads)
moves the result.
"""

import math

import pytest
import torch

from cmdcl.model import CMDCL
from conftest import random_frames, skew_priors, small_config


def linear(x, layer):
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


def softmax(scores):
    e = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def layer_norm(x, norm):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def attention(q, k, v, heads, log_prior=None):
    """softmax(q_h k_h^T / sqrt(d) + log_prior) v_h for each head h (columns h*d..(h+1)*d), heads side by side."""
    d = q.shape[-1] // heads
    out = []
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        scores = torch.einsum("...id,jd->...ij", q[..., cols], k[:, cols]) / math.sqrt(d)
        if log_prior is not None:
            scores = scores + log_prior
        out.append(torch.einsum("...ij,jd->...id", softmax(scores), v[:, cols]))
    return torch.cat(out, dim=-1)


def keys(rows, layer):
    """Wk applied to a dictionary's rows as the config asks (centred, or centred and ZCA-whitened, here through the SVD
    rows = U S V^T: whitened rows = sqrt(K) U V^T over the directions the rows span), times exp(log_temperature)."""
    if layer.key_norm != "none":
        rows = rows - rows.mean(dim=0)
    if layer.key_norm == "whiten":
        u, s, vh = torch.linalg.svd(rows.double(), full_matrices=False)
        spanned = s > 1e-6 * s.max()
        rows = (math.sqrt(rows.shape[0]) * u[:, spanned] @ vh[spanned]).float()
    out = linear(rows, layer)
    return out if layer.log_temperature is None else out * layer.log_temperature.exp()


def textual(module, text, bias_dict, prior, use_prior):
    """T' = LN(T + Wt [T ; T * Bh]), Bh = softmax((T Wq)(V_P Wk)^T / sqrt(d) + log pi_b) (V_P Wv)."""
    log_prior = torch.log(prior) if use_prior else None
    bias = attention(linear(text, module.q), keys(bias_dict, module.k), linear(bias_dict, module.v), module.heads, log_prior)
    return layer_norm(text + linear(torch.cat([text, text * bias], dim=-1), module.t), module.norm)


def visual(module, x, text_debiased, conf_dict, prior, use_prior):
    """V' = LN(X + Wo [X * sigmoid(M Wg) ; Zh]) (CATT's form: LN(Wo [M ; Zh])), M over the texts T', Zh over Z with
    log pi_z."""
    q = linear(x, module.q)
    mediator = attention(q, linear(text_debiased, module.k_text), linear(text_debiased, module.v_text), module.heads)
    log_prior = torch.log(prior) if use_prior else None
    cross = attention(q, keys(conf_dict, module.k_conf), linear(conf_dict, module.v_conf), module.heads, log_prior)
    if module.approximator == "catt":
        return layer_norm(linear(torch.cat([mediator, cross], dim=-1), module.out), module.norm)
    gated = x * torch.sigmoid(linear(mediator, module.gate))
    return layer_norm(x + linear(torch.cat([gated, cross], dim=-1), module.out), module.norm)


def randomised(model, seed=1):
    """`model` with skewed priors and the parameters of the texts, both interventions, the pooling query and the
    projection drawn at random (no LayerNorm left at ones/zeros, no pool query at zero, a non-zero logit bias),
    large enough that the attentions are far from uniform."""
    skew_priors(model, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("textual.", "visual.", "pool_query", "video_proj", "text")):
                param.copy_(0.5 * torch.randn(param.shape, generator=g))
        model.logit_bias.fill_(0.3)
    return model.eval()


def build(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomised(CMDCL(small_config(**overrides), [f"class {i}" for i in range(5)]))


def expected_head(model, tokens):
    """logits, embedding of `tokens` [B, F, S, D] by the formulas (the spatio-temporal blocks are the model's own)."""
    cfg = model.cfg
    text = linear(model.text, model.text_proj)
    if cfg.textual_intervention:
        text = textual(model.textual, text, model.bias_dict, model.bias_prior, cfg.use_bias_prior)
    b, f, s, d = tokens.shape
    x = (tokens + model.temporal_embedding[:f, None] + model.slot_embedding[None, :s]).reshape(b, f * s, d)
    for block in model.blocks:
        x = block(x)
    x = layer_norm(x, model.ln_sta)
    if cfg.visual_intervention:
        x = visual(model.visual, x, text, model.conf_dict, model.conf_prior, cfg.use_confounder_prior)
    if cfg.pooling == "attention":
        pooled = (softmax(x @ model.pool_query / math.sqrt(d)).unsqueeze(-1) * x).sum(dim=1)
    else:
        pooled = x.mean(dim=1)
    v = linear(pooled, model.video_proj)
    embedding = v / v.norm(dim=-1, keepdim=True)
    cosine = embedding @ (text / text.norm(dim=-1, keepdim=True)).T
    return min(model.logit_scale.exp().item(), 100.0) * cosine + model.logit_bias, embedding


@pytest.mark.parametrize("use_prior", [True, False])
def test_textual_intervention_is_the_back_door_formula(use_prior):
    model = build(use_bias_prior=use_prior)
    text = torch.randn(5, 32)
    with torch.no_grad():
        got = model.textual(text, model.bias_dict, torch.log(model.bias_prior))
        want = textual(model.textual, text, model.bias_dict, model.bias_prior, use_prior)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # the formula is sensitive to what it is meant to check: the prior (when used) and the T * Bh term
        other = textual(model.textual, text, model.bias_dict, model.bias_prior, not use_prior)
        assert (other - want).abs().max() > 1e-2


@pytest.mark.parametrize("use_prior", [True, False])
def test_visual_intervention_is_the_front_door_formula(use_prior):
    model = build(use_confounder_prior=use_prior)
    x, text_debiased = torch.randn(2, 7, 32), torch.randn(5, 32)
    with torch.no_grad():
        got = model.visual(x, model.visual.memories(text_debiased, model.conf_dict, torch.log(model.conf_prior)))
        want = visual(model.visual, x, text_debiased, model.conf_dict, model.conf_prior, use_prior)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        other = visual(model.visual, x, text_debiased, model.conf_dict, model.conf_prior, not use_prior)
        assert (other - want).abs().max() > 1e-2


def test_visual_terms_each_move_the_output():
    """The checks above are only as good as the formula's sensitivity: a swapped concatenation, an ungated X or
    a scale of 1/d would each change V' by far more than the tolerance on these weights."""
    model = build()
    module, x, text = model.visual, torch.randn(2, 7, 32), torch.randn(5, 32)
    with torch.no_grad():
        want = visual(module, x, text, model.conf_dict, model.conf_prior, True)
        got = module(x, module.memories(text, model.conf_dict, torch.log(model.conf_prior)))
        q = linear(x, module.q)
        mediator = attention(q, linear(text, module.k_text), linear(text, module.v_text), module.heads)
        cross = attention(q, linear(model.conf_dict, module.k_conf), linear(model.conf_dict, module.v_conf), module.heads,
                          torch.log(model.conf_prior))
        gated = x * torch.sigmoid(linear(mediator, module.gate))
        variants = {
            "swapped concatenation": torch.cat([cross, gated], dim=-1),
            "X instead of gated X": torch.cat([x, cross], dim=-1),
            "no sigmoid": torch.cat([x * linear(mediator, module.gate), cross], dim=-1),
            "mediator for cross-sample": torch.cat([gated, mediator], dim=-1),
        }
        for name, concat in variants.items():
            wrong = layer_norm(x + linear(concat, module.out), module.norm)
            assert (wrong - got).abs().max() > 1e-2, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attention_uses_one_over_sqrt_d_and_heads_of_d_columns():
    """4 heads of d = 8: the per-head formula differs from one head over all 32 columns and from a 1/d scale."""
    model = build()
    module, x, text = model.visual, torch.randn(2, 7, 32), torch.randn(5, 32)
    with torch.no_grad():
        got = module(x, module.memories(text, model.conf_dict, torch.log(model.conf_prior)))
        q, k, v = linear(x, module.q), linear(text, module.k_text), linear(text, module.v_text)
        right = attention(q, k, v, module.heads)
        one_head = softmax(q @ k.T / math.sqrt(8)) @ v  # the right scale, heads not split
        by_d = attention(q * (8**-0.5), k, v, module.heads)  # scores / d instead of / sqrt(d)
        assert (one_head - right).abs().max() > 1e-2 and (by_d - right).abs().max() > 1e-2
        torch.testing.assert_close(got, visual(module, x, text, model.conf_dict, model.conf_prior, True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [
    {},
    {"pooling": "attention"},
    {"use_bias_prior": False, "use_confounder_prior": False},
    {"textual_intervention": False},
    {"visual_intervention": False},
    {"approximator": "catt"},
    {"key_norm": "centre", "learn_temperature": True},
    {"key_norm": "whiten", "fixed_key_proj": True},
    {"approximator": "catt", "key_norm": "whiten", "learn_temperature": True, "fixed_key_proj": True},
], ids=["default", "attention-pool", "no-priors", "no-textual", "no-visual", "catt", "centred-keys-temperature",
        "whitened-fixed-keys", "all-variants"])
def test_head_and_forward_are_the_formulas(overrides):
    """The whole head: interventions, pooling, cosine classifier with its clamped scale and bias."""
    model = build(**overrides)
    frames = random_frames(2, 4, 32, seed=3)
    with torch.no_grad():
        tokens = model.frame_tokens(frames.flatten(0, 1))
        tokens = tokens.view(2, 4, *tokens.shape[1:])
        want_logits, want_embedding = expected_head(model, tokens)
        for logits, embedding in (model.head(tokens), model(frames)):
            torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(embedding, want_embedding, rtol=1e-4, atol=1e-5)


def test_logit_scale_is_clamped_at_100():
    model = build()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
        tokens = torch.randn(2, 4, 5, 32)
        logits, _ = model.head(tokens)
        want, _ = expected_head(model, tokens)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    assert (logits - model.logit_bias).abs().max() <= 100.0 + 1e-3


def test_changing_either_prior_changes_the_logits():
    """The priors are live: swapping pi_b or pi_z for another skewed prior moves the logits of the same frames,
    and does not when the model is configured not to use that prior."""
    frames = random_frames(1, 4, 32, seed=4)
    for use in (True, False):
        model = build(use_bias_prior=use, use_confounder_prior=use)
        with torch.no_grad():
            base = model(frames)[0]
            for name in ("bias_prior", "conf_prior"):
                prior = getattr(model, name)
                saved = prior.clone()
                prior.copy_(prior.flip(0))  # another skewed prior, same entries
                moved = (model(frames)[0] - base).abs().max().item()
                assert (moved > 1e-3) if use else (moved < 1e-6), (name, use, moved)
                prior.copy_(saved)
