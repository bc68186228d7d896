"""cmdcl-bench: latency, throughput and memory of the runtime, stage by stage and end to end.

    from cmdcl.bench import Bench, BenchSettings
    report = Bench(BenchSettings(preset="tiny", batches=(1, 8))).run()   # machine, records, comparisons, floors

`cmdcl.bench.floors` counts the FLOP and byte floors of a model from its
config; `cmdcl.bench.measure` holds the timers and memory probes;
`cmdcl.bench.report` the table, JSON and plot.
"""

from .floors import model_flops, model_floors
from .runner import Bench, BenchSettings

__all__ = ["Bench", "BenchSettings", "model_flops", "model_floors"]
