"""A model that outputs NaN or infinite logits (issue 21, item 5): README "Runtime" says a NaN or infinite score makes
that input an error record, and records are always valid JSON. Neither a threshold nor a sigmoid may hide it: a
multi-label model's NaN class used to be dropped by the 0.5 threshold (the other labels reported, exit 0), an infinite
logit came out as a confident 1.0, and a single-label model's NaN scores under --threshold became "no label"."""

import json

import numpy as np
import pytest

from cmdcl.data.video import write_video
from cmdcl.runtime import Recognizer
from cmdcl.runtime.backends import ModelInfo
from cmdcl.runtime.output import NON_FINITE_ERROR, RecordWriter
from test_runtime import moving_square
from test_stream_reliability import CLASSES, EchoBackend, finishes_within


class Broken(EchoBackend):
    """EchoBackend whose logits of class "a" are `value` (NaN or +-inf) in the calls listed in `broken_calls` (all when None)."""

    def __init__(self, value, multi_label, broken_calls=None):
        self.value, self.multi_label, self.broken_calls, self.calls = value, multi_label, broken_calls, 0
        super().__init__()

    def load(self):
        sampling = {"window_seconds": 2.0, "stride_frames": 2}
        self.info = ModelInfo(CLASSES, self.num_frames, self.image_size, 1, 3, self.multi_label, sampling)

    def _break(self, logits):
        logits = np.array(logits, dtype=np.float32)  # [B, 3]: the mean colour
        if self.broken_calls is None or self.calls in self.broken_calls:
            logits[:, 0] = self.value
        self.calls += 1
        return logits

    def classify_clips(self, frames):
        return self._break(super().classify_clips(frames))

    def classify_tokens(self, tokens):
        return self._break(super().classify_tokens(tokens))


def reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def written(records, tmp_path):
    """The records as RecordWriter writes them (JSON Lines), read back strictly: NaN and Infinity are not JSON."""
    out = tmp_path / "out.jsonl"
    with RecordWriter(out) as writer:
        for record in records:
            writer.write(record)
    return [json.loads(line, parse_constant=reject_constant) for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("nonfinite") / "v.mp4", moving_square(30, 1), rate=10)  # 3 s


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("multi_label", [False, True])
@pytest.mark.parametrize("threshold", [None, 0.1])
@pytest.mark.parametrize("mode", ["video", "stream"])
def test_non_finite_logits_give_error_records_never_labels(clip, tmp_path, value, multi_label, threshold, mode):
    recognizer = Recognizer(Broken(value, multi_label), threshold=threshold, window=2.0, stride=0.5, workers=1)
    produced = recognizer.predict_many([clip]) if mode == "video" else recognizer.stream_many([clip])
    records = written(finishes_within(60, list, produced), tmp_path)
    assert len(records) == (1 if mode == "video" else 4)  # stream: 3 windows (grid 0-2.5 s, F = 4, one every grid frame), a summary
    assert all(r["error"] == NON_FINITE_ERROR and r["top"] == [] for r in records)


def test_one_broken_window_is_an_error_record_and_so_is_the_summary(clip, tmp_path):
    """The second window's logits are NaN: its record is an error, the windows around it keep their labels, and the
    summary (the mean of the windows' scores) is an error too, so the input counts as failed."""
    recognizer = Recognizer(Broken(np.nan, True, broken_calls={1}), window=2.0, stride=0.5)
    records = written(finishes_within(60, list, recognizer.stream_many([clip])), tmp_path)
    assert ["error" in r for r in records] == [False, True, False, True]
    assert records[0]["top"] and records[2]["top"] and records[1]["top"] == [] == records[3]["top"]


@pytest.mark.parametrize("multi_label", [False, True])
def test_probabilities_of_a_row_with_a_non_finite_logit_are_nan_and_other_rows_are_untouched(multi_label):
    backend = Broken(np.nan, multi_label)
    logits = np.array([[1.0, 2.0, 3.0], [np.inf, 0.0, 0.0], [-np.inf, 0.0, 1.0], [np.nan, 0.0, 0.0]])
    probabilities = backend.probabilities(logits)
    assert np.isnan(probabilities[1:]).all()
    expected = 1 / (1 + np.exp(-logits[0])) if multi_label else np.exp(logits[0]) / np.exp(logits[0]).sum()
    assert probabilities[0] == pytest.approx(expected)


@pytest.mark.parametrize("score", [float("nan"), float("inf"), float("-inf")])
def test_a_record_with_a_score_that_is_not_finite_is_written_as_an_error_without_labels(score):
    """valid_record, which every writer goes through, whatever produced the record (a backend, a plugin, a caller)."""
    from cmdcl.runtime.output import valid_record

    record = valid_record({"video": "v.mp4", "summary": True, "top": [{"label": "a", "score": score}, {"label": "b", "score": 0.1}]})
    assert record["top"] == [] and record["error"] == NON_FINITE_ERROR
    json.dumps(record, allow_nan=False)
