"""Multi-process training: torchrun, 2 CPU processes, gloo backend (DistributedDataParallel)."""

import os
import subprocess
import sys

import pytest
import torch

from cmdcl.data.synth import SynthConfig, generate
from cmdcl.model import load_checkpoint


@pytest.mark.slow
@pytest.mark.timeout(900)  # two training runs of up to 300 s each
def test_torchrun_two_processes_match_one_process(tmp_path):
    manifest = generate(tmp_path / "train", 16, seed=0, split="train", cfg=SynthConfig(size=32))
    args = ["--data", str(manifest), "--epochs", "2", "--batch-size", "4", "--frames", "4", "--image-size", "32",
            "--text-init", "random", "--seed", "5", "--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    single = subprocess.run([sys.executable, "-m", "cmdcl.cli.train", *args, "--out", str(tmp_path / "one.pt")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "cmdcl.cli.train", *args, "--out", str(tmp_path / "two.pt")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    one, two = load_checkpoint(tmp_path / "one.pt"), load_checkpoint(tmp_path / "two.pt")
    # Each process takes half of every global batch; DDP averages the gradients,
    # so the two runs follow the same optimisation up to float rounding.
    # Parameters are not compared one by one: some get an exactly-zero gradient
    # (softmax ignores logit_bias and attention key biases), and Adam turns the
    # rounding noise there into lr-sized steps. What the model computes must agree.
    frames = torch.randint(0, 256, (2, 4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p1, p2 = one.probabilities(one(frames)[0]), two.probabilities(two(frames)[0])
    assert ((p1 - p2).norm() / p1.norm()).item() < 1e-4
    h1, h2 = one.checkpoint_extra["history"], two.checkpoint_extra["history"]
    assert [h["accuracy"] for h in h1] == [h["accuracy"] for h in h2]
    assert all(abs(x["loss"] - y["loss"]) < 1e-4 for x, y in zip(h1, h2))
    assert torch.equal(one.bias_dict, two.bias_dict)  # built once (rank 0), broadcast by DDP


def test_batch_must_split_evenly(monkeypatch, tmp_path):
    from cmdcl.train.loop import TrainOptions, train

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("cmdcl.train.loop._distributed", lambda: (0, 2))
    with pytest.raises(ValueError, match="--batch-size 5 must be divisible by the 2 processes"):
        train(TrainOptions(data=str(tmp_path), out=str(tmp_path / "x.pt"), batch_size=5), progress=False)
