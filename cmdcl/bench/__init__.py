"""cmdcl-bench: latency, throughput and memory of the runtime, stage by stage and end to end.

    from cmdcl.bench.runner import Bench, BenchSettings
    report = Bench(BenchSettings(preset="tiny", batches=(1, 8))).run()   # machine, records, comparisons, floors

`cmdcl.bench.floors` counts the FLOP and byte floors of a model from its
config; `cmdcl.bench.measure` holds the timers and memory probes;
`cmdcl.bench.report` the table, JSON and plot. Nothing is imported here:
benchmarks/gpu_check.py uses measure and report on machines that have only
torch, triton and cupy (no PyAV, ONNX Runtime or click for the runner).
"""
