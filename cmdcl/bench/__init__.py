"""cmdcl-bench: latency, throughput and memory of the runtime, stage by stage and end to end.

    from cmdcl.bench.runner import Bench, BenchSettings
    report = Bench(BenchSettings(preset="tiny", batches=(1, 8))).run()   # machine, records, comparisons, floors

`runner` runs the stages (`stages`) on the models (`models`: generated, or
--engine files; `variants`: the PyTorch variants and the timing wrapper) and
the videos (`videos`); `floors` counts the FLOP and byte floors of a model
from its config; `measure` holds the timers and memory probes; `report` the
comparisons, the table, JSON and plot. Nothing is imported here:
benchmarks/gpu_check.py uses measure and report on machines that have only
torch, triton and cupy (no PyAV, ONNX Runtime or click for the runner).
"""
