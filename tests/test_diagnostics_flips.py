"""The intervention diagnostics' top-1 flips (issue 21, item 5): tests/test_diagnostics.py's random model never flips a
prediction when a dictionary is replaced, so a wrong count or share could not fail there. Here the head is replaced by
one whose answer flips for a known set of clips as soon as a given dictionary differs from the model's own: the flips,
their share and the logit changes are then known exactly."""

import math

import pytest
import torch

from cmdcl.train.diagnostics import format_diagnostics, intervention_diagnostics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLIPS = 8
FLIPPED = {"bias_dict": {1, 4, 6}, "conf_dict": {0, 2, 3, 5, 7}}  # the clips whose top-1 changes with each dictionary replaced


@pytest.fixture
def flipping_model(make_model, monkeypatch):
    """A small model whose frame tokens are the clip's number (clip i's frames are flat at level i) and whose head answers
    class 0 for every clip, except class 1 for the clips FLIPPED lists under a dictionary that differs from the model's."""
    model = make_model(num_classes=2)
    own = {name: getattr(model, name).clone() for name in FLIPPED}
    tokens_per_frame, width = model.cfg.tokens_per_frame, model.cfg.width

    def frame_tokens(frames):
        return frames.float().mean(dim=(1, 2, 3)).view(-1, 1, 1).expand(-1, tokens_per_frame, width).contiguous()

    def head(tokens):
        logits = torch.tensor([[1.0, 0.0]]).repeat(len(tokens), 1)
        replaced = [name for name in FLIPPED if not torch.equal(getattr(model, name), own[name])]
        for row, clip in enumerate(tokens[:, 0, 0, 0].round().long().tolist()):
            if any(clip in FLIPPED[name] for name in replaced):
                logits[row] = torch.tensor([0.0, 1.0])
        return logits, torch.zeros(len(tokens), width)

    monkeypatch.setattr(model, "frame_tokens", frame_tokens)
    monkeypatch.setattr(model, "head", head)
    return model


def test_flips_and_their_share_are_counted_per_dictionary_and_stand_in(flipping_model):
    clips = torch.arange(CLIPS, dtype=torch.uint8).view(-1, 1, 1, 1, 1).expand(-1, 4, 32, 32, 3)
    report = intervention_diagnostics(flipping_model, clips, batch_size=3)  # batches of 3, 3, 2
    for part, name in (("textual", "bias_dict"), ("visual", "conf_dict")):
        flips = len(FLIPPED[name])
        for kind in ("shuffled", "replaced"):
            measured = report[part][kind]
            assert (measured["flips"], measured["flip_share"]) == (flips, flips / CLIPS), (part, kind)
            # a flipped clip's logits go from [1, 0] to [0, 1]: a relative change of sqrt(2); the others do not move
            assert measured["relative_change"] == pytest.approx(flips * math.sqrt(2) / CLIPS)
            assert measured["max_relative_change"] == pytest.approx(math.sqrt(2))
    table = format_diagnostics(report)
    assert table.count("3 of 8 (37.5%)") == 2 and table.count("5 of 8 (62.5%)") == 2
