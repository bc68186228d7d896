import signal

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


def skew_priors(model, seed=0):
    """Install skewed priors pi_b, pi_z (softmax of 3 x randn) in place of the uniform ones a new model has.

    A uniform prior adds the same log pi to every attention score, which softmax cancels: a bug that drops or
    misplaces a prior only shows with skewed ones. Returns the model.
    """
    g = torch.Generator().manual_seed(seed)
    bias_prior = torch.softmax(3 * torch.randn(model.bias_prior.shape, generator=g), 0)
    conf_prior = torch.softmax(3 * torch.randn(model.conf_prior.shape, generator=g), 0)
    model.set_dictionaries(model.bias_dict, bias_prior, model.conf_dict, conf_prior)
    return model


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a busy machine: intra-op threads only wait for each other (modules that train use it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_model():
    """A small model in eval mode, with skewed priors."""

    def make(num_classes=3, seed=0, **overrides):
        torch.manual_seed(seed)
        model = CMDCL(small_config(**overrides), [f"class {i}" for i in range(num_classes)])
        return skew_priors(model, seed).eval()

    return make


def random_frames(b, f, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, f, size, size, 3), dtype=torch.uint8, generator=g)


def default_sigint():
    """preexec_fn of a subprocess a test interrupts with SIGINT: a test run started in the background (`&`, nohup) passes
    SIGINT ignored on to its children, which the Ctrl-C of a user at a terminal never meets."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
