"""The CLIP towers load real CLIP weight layouts with no missing or unexpected keys."""

import pytest
import torch
from torch import nn

from cmdcl.model import CLIP, CMDCL, TextConfig, VisionConfig, load_clip, preset, read_clip_state_dict
from cmdcl.model.clip import SelfAttention, clip_configs_from_state_dict


def openai_clip_keys(vision_width, vision_layers, patch, grid, embed_dim, text_width, text_layers, context, vocab):
    """The key -> shape list of OpenAI CLIP's model.py, written out independently."""
    keys = {
        "visual.class_embedding": (vision_width,),
        "visual.positional_embedding": (grid * grid + 1, vision_width),
        "visual.proj": (vision_width, embed_dim),
        "visual.conv1.weight": (vision_width, 3, patch, patch),
        "visual.ln_pre.weight": (vision_width,),
        "visual.ln_pre.bias": (vision_width,),
        "visual.ln_post.weight": (vision_width,),
        "visual.ln_post.bias": (vision_width,),
        "positional_embedding": (context, text_width),
        "text_projection": (text_width, embed_dim),
        "logit_scale": (),
        "token_embedding.weight": (vocab, text_width),
        "ln_final.weight": (text_width,),
        "ln_final.bias": (text_width,),
    }
    for prefix, width, layers in (("visual.transformer", vision_width, vision_layers), ("transformer", text_width, text_layers)):
        for i in range(layers):
            p = f"{prefix}.resblocks.{i}"
            keys.update(
                {
                    f"{p}.attn.in_proj_weight": (3 * width, width),
                    f"{p}.attn.in_proj_bias": (3 * width,),
                    f"{p}.attn.out_proj.weight": (width, width),
                    f"{p}.attn.out_proj.bias": (width,),
                    f"{p}.ln_1.weight": (width,),
                    f"{p}.ln_1.bias": (width,),
                    f"{p}.mlp.c_fc.weight": (4 * width, width),
                    f"{p}.mlp.c_fc.bias": (4 * width,),
                    f"{p}.mlp.c_proj.weight": (width, 4 * width),
                    f"{p}.mlp.c_proj.bias": (width,),
                    f"{p}.ln_2.weight": (width,),
                    f"{p}.ln_2.bias": (width,),
                }
            )
    return keys


def test_vit_b16_has_exactly_openais_keys_and_shapes():
    cfg = preset("base")
    expected = openai_clip_keys(768, 12, 16, 14, 512, 512, 12, 77, 49408)
    with torch.device("meta"):
        clip = CLIP(cfg.vision, cfg.text)
    ours = {k: tuple(v.shape) for k, v in clip.state_dict_openai().items()}
    assert ours == expected


def small_openai_state(seed=0, **extra):
    g = torch.Generator().manual_seed(seed)
    keys = openai_clip_keys(64, 2, 8, 4, 48, 64, 2, 16, 100)
    state = {k: torch.randn(shape, generator=g) * 0.05 for k, shape in keys.items()}
    state["logit_scale"] = torch.tensor(4.6)
    state.update(extra)
    return state


def test_openai_layout_file_loads_strictly(tmp_path):
    state = small_openai_state()
    path = tmp_path / "clip.pt"
    torch.save(state, path)
    clip = load_clip(path)
    assert clip.visual.cfg == VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=1, output_dim=48)
    assert clip.text.cfg.context_length == 16 and clip.text.cfg.vocab_size == 100
    for k, v in clip.state_dict_openai().items():
        torch.testing.assert_close(v, state[k])
    assert not any(p.requires_grad for p in clip.parameters())  # frozen VLM


def test_open_clip_training_checkpoint_and_openai_extras_load(tmp_path):
    """open_clip training checkpoints nest the weights under "state_dict" with DDP's
    "module." prefix; OpenAI archives carry three non-tensor entries."""
    state = small_openai_state()
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    wrapped["state_dict"]["module.attn_mask"] = torch.zeros(16, 16)
    torch.save(wrapped, tmp_path / "open_clip.pt")
    torch.save({**state, "input_resolution": 32, "context_length": 16, "vocab_size": 100}, tmp_path / "openai.pt")
    for name in ("open_clip.pt", "openai.pt"):
        assert set(read_clip_state_dict(tmp_path / name)) == set(state)
        load_clip(tmp_path / name)


def test_torchscript_archive_loads(tmp_path):
    """OpenAI distributes TorchScript archives; their state dict is read without unpickling."""
    cfg_v, cfg_t = clip_configs_from_state_dict(small_openai_state())
    clip = CLIP(cfg_v, cfg_t).eval()
    scripted = torch.jit.trace_module(clip, {"encode_image": torch.randn(1, 3, 32, 32)})
    scripted.save(str(tmp_path / "clip_jit.pt"))
    loaded = load_clip(tmp_path / "clip_jit.pt")
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.encode_image(images), clip.encode_image(images))


def test_safetensors_file_loads(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch", reason="safetensors not installed")
    state = small_openai_state()
    safetensors.save_file(state, str(tmp_path / "clip.safetensors"))
    clip = load_clip(tmp_path / "clip.safetensors")
    torch.testing.assert_close(clip.visual.proj, state["visual.proj"])


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_clip(tmp_path / "nope.pt")


def test_attention_matches_torch_multihead_attention():
    """Same parameters, same maths as nn.MultiheadAttention (what OpenAI's CLIP uses)."""
    torch.manual_seed(0)
    ours = SelfAttention(32, 4)
    ref = nn.MultiheadAttention(32, 4, batch_first=True)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(ours(x), ref(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-5)
    mask = torch.triu(torch.full((9, 9), float("-inf")), 1)
    torch.testing.assert_close(ours(x, causal=True), ref(x, x, x, attn_mask=mask, need_weights=False)[0], rtol=1e-5, atol=1e-5)


def test_text_tower_reads_the_end_of_text_token_causally():
    torch.manual_seed(0)
    clip = CLIP(VisionConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2, output_dim=16),
                TextConfig(context_length=8, vocab_size=50, width=32, layers=2, heads=2, output_dim=16)).eval()
    tokens = torch.tensor([[1, 5, 7, 49, 0, 0, 0, 0]])  # 49: end of text (largest id)
    after = tokens.clone()
    after[0, 5:] = torch.tensor([3, 4, 6])  # tokens after end-of-text must not matter
    torch.testing.assert_close(clip.encode_text(tokens), clip.encode_text(after))
    changed = tokens.clone()
    changed[0, 1] = 9
    assert not torch.allclose(clip.encode_text(tokens), clip.encode_text(changed))


def test_cmdcl_video_encoder_starts_from_clip():
    state = small_openai_state()
    cfg_v, cfg_t = clip_configs_from_state_dict(state)
    clip = CLIP(cfg_v, cfg_t)
    clip.load_state_dict_openai(state)
    cfg = preset("tiny", vision=cfg_v, text=cfg_t, width=32, heads=4, num_bias=4, num_confounders=4, num_frames=2)
    text = torch.randn(3, 48)
    model = CMDCL.from_clip(cfg, ["a", "b", "c"], clip, text_embeddings=text)
    torch.testing.assert_close(model.video_encoder.conv1.weight, state["visual.conv1.weight"])
    torch.testing.assert_close(model.text.detach(), text)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.video_encoder(images)[:, 0], clip.encode_image(images))


def test_open_clip_model_state_dict_loads():
    open_clip = pytest.importorskip("open_clip", reason="open_clip is not installed (needs torchvision)")
    ref = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    state = {k: v for k, v in ref.state_dict().items() if k != "attn_mask"}
    cfg = preset("base")
    cfg.vision.activation = cfg.text.activation = "gelu"  # open_clip's ViT-B-16 (not -quickgelu)
    clip = CLIP(cfg.vision, cfg.text).eval()
    clip.load_state_dict_openai(state)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(images), ref.encode_image(images), rtol=1e-4, atol=1e-4)
