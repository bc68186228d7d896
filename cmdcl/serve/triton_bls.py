"""Triton Python-backend model (BLS) for CMDCL; `write_triton_repo` copies this file
to `cmdcl/1/model.py` and `cmdcl_stream/1/model.py`. It is never imported by the
cmdcl package: it runs inside Triton's Python backend and needs only numpy there.

- `cmdcl` (dynamic batching): frames uint8 [B, F, H, W, 3] per request. All frames
  of all batched requests go through `frame_encoder` (in chunks of its max batch),
  then the clips through `head`.
- `cmdcl_stream` (sequence batching, one sequence id per camera): one grid frame
  uint8 [1, H, W, 3] per request, sent at F / W_1 frames per second (W_1 the
  shortest window; the config's `grid_fps`). Like `cmdcl-run --mode stream`
  (docs/design.md section 5), each frame is encoded once and its tokens kept in
  the sequence's ring buffer of the last N_n frames (`window_frames`: N_k grid
  frames per scale k, N_1 = F); scale k's window takes F tokens of its last N_k
  frames at `window_positions`. Windows are due at each stride step: when F
  frames have arrived, then every `stride_frames` frames; at a step every scale
  whose N_k frames have arrived is scored, and a sequence that ends before F
  frames is scored once at the shortest scale with its frames repeated. All due
  windows of a batch go to `head` together.
  Outputs with one scale: `logits` [1, C] (NaN when no window is due), `window`
  [1, 1] (the window index, -1 when this frame finished none) and `scale` [1, 1]
  (its length in seconds). With K scales: `logits` [1, K, C], `window` [1, K]
  (each scale's own window index, -1 for a scale not due) and `scale` [1, K].
"""

import json
import time
from collections import deque

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        self.num_frames = int(params["num_frames"])
        self.encoder_batch, self.head_batch = int(params["frame_encoder_max_batch"]), int(params["head_max_batch"])
        self.streaming = "sequence_batching" in config
        if self.streaming:
            self.stride = int(params["stride_frames"])
            self.idle_seconds = int(params["sequence_idle_us"]) / 1e6
            self.window_frames = [int(n) for n in params["window_frames"].split(",")]  # N_k, ascending
            self.scales = np.array([float(w) for w in params["window_seconds"].split(",")], dtype=np.float32)
        self.num_classes = next(int(t["dims"][-1]) for t in config["output"] if t["name"] == "logits")
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
        scales = len(self.window_frames)
        windows = np.full((len(requests), scales), -1, dtype=np.int32)
        due = []  # (request, scale, window tokens [F, S, D])
        for i, ((corrid, start, end), token) in enumerate(zip(controls, tokens)):
            if start or corrid not in self.sequences:
                self.sequences[corrid] = _Sequence(self.window_frames[-1])
            sequence = self.sequences[corrid]
            sequence.add(token, now)
            for k in sequence.due(self.window_frames, self.num_frames, self.stride, end):
                windows[i, k], window = sequence.window(k, self.window_frames[k], self.num_frames)
                due.append((i, k, window))
            if end:
                del self.sequences[corrid]
        logits = np.full((len(requests), scales, self.num_classes), np.nan, dtype=np.float32)
        if due:
            scored = self._call("head", "tokens", np.stack([t for _, _, t in due]), ["logits"], self.head_batch)[0]
            for (i, k, _), row in zip(due, scored):
                logits[i, k] = row
        if scales == 1:  # one scale: today's logits [1, C]
            logits = logits[:, 0]
        scale = np.broadcast_to(self.scales, windows.shape)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("logits", logits[i : i + 1]),
                                            pb_utils.Tensor("window", windows[i : i + 1]),
                                            pb_utils.Tensor("scale", np.ascontiguousarray(scale[i : i + 1]))])
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


def window_positions(num_frames, span):
    """The F ring positions (0 = oldest of the last `span` frames) a window takes: the centre of each of F
    equal segments. Mirrors cmdcl.artifacts.window_positions (this file cannot import cmdcl;
    tests/test_serve_bls.py pins the two together)."""
    return [(2 * j + 1) * span // (2 * num_frames) for j in range(num_frames)]


class _Sequence:
    """One camera's ring buffer of the last N_n frames' tokens, and its window count per scale."""

    def __init__(self, ring_frames):
        self.tokens = deque(maxlen=ring_frames)
        self.new = 0  # frames since the last stride step
        self.windows = {}  # scale -> index of its last window
        self.seen = 0.0

    def add(self, token, now):
        self.tokens.append(token)
        self.new, self.seen = self.new + 1, now

    def due(self, window_frames, num_frames, stride, end):
        """The scales due now: at a stride step (F frames, then every `stride`) those whose N_k frames have
        arrived; a sequence ending before its first step gets one window at the shortest scale."""
        if len(self.tokens) >= num_frames and (not self.windows or self.new >= stride):
            self.new = 0
            return [k for k, n in enumerate(window_frames) if len(self.tokens) >= n]
        return [0] if end and not self.windows else []

    def window(self, scale, span, num_frames):
        """(window index, tokens [F, S, D]) of scale `scale`'s window over its last `span` frames; a sequence
        shorter than that (only at the shortest scale, span F) has its frames repeated by the same rule."""
        tokens = list(self.tokens)[-span:]
        index = self.windows[scale] = self.windows.get(scale, -1) + 1
        return index, np.stack([tokens[p] for p in window_positions(num_frames, len(tokens))])
