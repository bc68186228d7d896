import pytest
import torch

from cmdcl.model import CMDCL, tiny_config


def small_config(**overrides):
    """A very small model for fast tests (32 px frames, width 32)."""
    from cmdcl.model import TextConfig, VisionConfig

    cfg = dict(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2, output_dim=24),
        text=TextConfig(context_length=8, vocab_size=64, width=16, layers=1, heads=2, output_dim=24),
        num_frames=4,
        token_grid=2,
        width=32,
        heads=4,
        depth=1,
        num_bias=5,
        num_confounders=6,
    )
    cfg.update(overrides)
    return tiny_config(**cfg)


@pytest.fixture
def make_model():
    def make(num_classes=3, seed=0, **overrides):
        torch.manual_seed(seed)
        model = CMDCL(small_config(**overrides), [f"class {i}" for i in range(num_classes)])
        return model.eval()

    return make


def random_frames(b, f, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, f, size, size, 3), dtype=torch.uint8, generator=g)
