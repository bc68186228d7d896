"""Training CMDCL: k-means dictionaries, label-text init, the training loop, metrics.

Entry points: `cmdcl-train` (cmdcl.cli.train) and `cmdcl-eval` (cmdcl.cli.eval);
from Python, `cmdcl.train.loop.train(TrainOptions(...))` and `evaluate(model, dataset)`.
"""
