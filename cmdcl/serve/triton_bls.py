"""Triton Python-backend model (BLS) for CMDCL; `write_triton_repo` copies this file
to `cmdcl/1/model.py` and `cmdcl_stream/1/model.py`. It is never imported by the
cmdcl package: it runs inside Triton's Python backend and needs only numpy there.

- `cmdcl` (dynamic batching): frames uint8 [B, F, H, W, 3] per request. All frames
  of all batched requests go through `frame_encoder` (in chunks of its max batch),
  then the clips through `head`.
- `cmdcl_stream` (sequence batching, one sequence id per camera): one frame
  uint8 [1, H, W, 3] per request. Each frame is encoded once and its tokens kept
  in the sequence's ring buffer of F frames; like `cmdcl-run --mode stream`, the
  first window is scored when F frames have arrived, then every `stride_frames`
  frames, and a sequence that ends before F frames is scored once with its frames
  repeated. Outputs: `window` (window index, or -1 when this frame finished no
  window) and `logits` (NaN when window is -1).
"""

import json
import time
from collections import deque

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: int(v["string_value"]) for k, v in config["parameters"].items()}
        self.num_frames = params["num_frames"]
        self.encoder_batch, self.head_batch = params["frame_encoder_max_batch"], params["head_max_batch"]
        self.stride = params["stride_frames"]
        self.idle_seconds = params["sequence_idle_us"] / 1e6
        self.streaming = "sequence_batching" in config
        self.num_classes = next(int(t["dims"][0]) for t in config["output"] if t["name"] == "logits")
        self.sequences = {}  # correlation id -> _Sequence

    def execute(self, requests):
        # Triton has already checked dtypes, shapes, batch sizes (1 per sequence request)
        # and sequence ids against the config; a failing BLS call raises TritonModelException,
        # which the Python backend returns to the client as the error.
        return (self._stream if self.streaming else self._clips)(requests)

    # ---- whole clips -------------------------------------------------------------------
    def _clips(self, requests):
        clips = [pb_utils.get_input_tensor_by_name(r, "frames").as_numpy() for r in requests]
        frames = np.concatenate(clips)
        b, f = frames.shape[:2]
        tokens = self._call("frame_encoder", "frames", frames.reshape(b * f, *frames.shape[2:]), ["tokens"], self.encoder_batch)[0]
        logits, embedding = self._call("head", "tokens", tokens.reshape(b, f, *tokens.shape[1:]), ["logits", "embedding"],
                                       self.head_batch)
        responses, start = [], 0
        for clip in clips:
            stop = start + len(clip)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("logits", logits[start:stop]),
                                                         pb_utils.Tensor("embedding", embedding[start:stop])]))
            start = stop
        return responses

    # ---- streams -----------------------------------------------------------------------
    def _stream(self, requests):
        frames, controls = [], []
        for request in requests:
            frames.append(pb_utils.get_input_tensor_by_name(request, "frame").as_numpy())
            controls.append([int(pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)[0])
                             for name in ("CORRID", "START", "END")])
        tokens = self._call("frame_encoder", "frames", np.concatenate(frames), ["tokens"], self.encoder_batch)[0]
        now = time.monotonic()
        self.sequences = {k: s for k, s in self.sequences.items() if now - s.seen < self.idle_seconds}
        windows, due = [-1] * len(requests), []
        for i, ((corrid, start, end), token) in enumerate(zip(controls, tokens)):
            if start or corrid not in self.sequences:
                self.sequences[corrid] = _Sequence(self.num_frames)
            sequence = self.sequences[corrid]
            sequence.add(token, now)
            full = len(sequence.tokens) == self.num_frames
            if (full and (sequence.windows == 0 or sequence.new >= self.stride)) or (end and sequence.windows == 0):
                windows[i] = sequence.windows
                due.append(sequence.window())
            if end:
                del self.sequences[corrid]
        logits = np.full((len(requests), self.num_classes), np.nan, dtype=np.float32)
        if due:
            logits[[i for i, w in enumerate(windows) if w >= 0]] = self._call("head", "tokens", np.stack(due), ["logits"],
                                                                             self.head_batch)[0]
        return [pb_utils.InferenceResponse([pb_utils.Tensor("logits", logits[i : i + 1]),
                                            pb_utils.Tensor("window", np.array([[windows[i]]], dtype=np.int32))])
                for i in range(len(requests))]

    # ---- BLS -----------------------------------------------------------------------------
    def _call(self, model, input_name, array, output_names, max_batch):
        """Run `model` on `array` in chunks of at most `max_batch` along axis 0."""
        chunks = []
        for start in range(0, len(array), max_batch):
            chunk = np.ascontiguousarray(array[start : start + max_batch])
            request = pb_utils.InferenceRequest(model_name=model, requested_output_names=output_names,
                                                inputs=[pb_utils.Tensor(input_name, chunk)])
            response = request.exec()
            if response.has_error():
                raise pb_utils.TritonModelException(f"{model}: {response.error().message()}")
            chunks.append([pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in output_names])
        return [np.concatenate([chunk[i] for chunk in chunks]) for i in range(len(output_names))]


class _Sequence:
    """One camera's ring buffer of the last F frames' tokens."""

    def __init__(self, num_frames):
        self.num_frames = num_frames
        self.tokens = deque(maxlen=num_frames)
        self.new = self.windows = 0
        self.seen = 0.0

    def add(self, token, now):
        self.tokens.append(token)
        self.new, self.seen = self.new + 1, now

    def window(self):
        """Tokens [F, S, D] of the current window; fewer than F frames are repeated uniformly."""
        tokens = list(self.tokens)
        if len(tokens) < self.num_frames:
            tokens = [tokens[int((i + 0.5) * len(tokens) / self.num_frames)] for i in range(self.num_frames)]
        self.windows, self.new = self.windows + 1, 0
        return np.stack(tokens)
