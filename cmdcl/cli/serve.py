"""`cmdcl-serve`: serve a CMDCL model on Triton Inference Server through PyTriton."""

from __future__ import annotations

import ipaddress
import socket
import sys

import click
import numpy as np

from ..errors import CmdclError, ExitCode, first_line
from ..runtime.backends import BACKENDS
from .errors import cli_errors
from .options import BATCH, RETRIES, TOP_K, FiniteFloat


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engine", type=click.Path(dir_okay=False), help="Model file: .onnx (ONNX Runtime, with its split graphs "
              "next to it), .plan (TensorRT) or .pt (PyTorch). Default: the bundled demo model.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="As in cmdcl-run: auto picks by the engine's suffix.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the HTTP and gRPC endpoints bind to. Anything but loopback exposes the model to the network.")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--no-http", is_flag=True, help="Serve gRPC only.")
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Serve Triton's Prometheus metrics (/metrics) on this port [default: metrics off].")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address the metrics port binds to.")
@click.option("--max-batch", type=BATCH, default=8, show_default=True,
              help="Largest batch Triton's dynamic batcher forms across requests (clips for cmdcl/head, frames for frame_encoder).")
@click.option("--queue-delay-us", type=click.IntRange(0, 60_000_000), default=2000, show_default=True,
              help="How long a request may wait for others to join its batch.")
@click.option("--top-k", type=TOP_K, default=5, show_default=True,
              help="Labels per clip in the cmdcl model's top_labels/top_scores outputs.")
@click.option("--restart", type=RETRIES, default=5, show_default=True,
              help="When tritonserver stops on its own, start it again after 0.5 s, 1 s, 2 s ... (at most 8 s); "
              "one stop more than this many within 60 s exits 1. 0: exit 1 at the first stop.")
@click.option("--debug", is_flag=True, help="Tracebacks for errors (also in the errors sent to clients).")
def main(engine, backend, device, host, http_port, no_http, grpc_port, metrics_port, metrics_host, max_batch, queue_delay_us, top_k,
         restart, debug):
    """Serve the runtime through PyTriton (the real Triton Inference Server; no GPU
    needed) with dynamic batching across requests. Models: `cmdcl` (uint8 clips
    [B, F, H, W, 3] -> logits, embedding, top_labels, top_scores), `frame_encoder`
    and `head` (the streaming split). Stop with Ctrl-C or SIGTERM (exit 0); a tritonserver
    that stops on its own is started again (--restart), each time with one line.

    Clients: `cmdcl-client classify VIDEO`, any tritonclient (HTTP or gRPC).
    """
    from ..runtime.backends import load_backend

    http_port = None if no_http else http_port
    ports = [port for port in (http_port, grpc_port, metrics_port) if port is not None]
    if len(set(ports)) != len(ports):
        raise click.UsageError("--http-port, --grpc-port and --metrics-port must differ")

    def ready(names):
        metrics = f", metrics http://{metrics_host}:{metrics_port}/metrics" if metrics_port else ""
        http = f"http://{host}:{http_port} and " if http_port else ""
        click.echo(f"cmdcl-serve: serving {model.path} ({model.name}) as {', '.join(names)} on "
                   f"{http}grpc {host}:{grpc_port}{metrics}", err=True)
        if not _is_loopback(host):
            click.echo(f"cmdcl-serve: warning: {host} is not a loopback address: anyone who can reach it can use "
                       "the model (Triton has no authentication here)", err=True)
        if metrics_port and not _is_loopback(metrics_host):
            click.echo(f"cmdcl-serve: warning: --metrics-host {metrics_host} is not a loopback address: anyone who can "
                       "reach it can read the metrics", err=True)

    def restarting(reason, n, delay_s):
        click.echo(f"cmdcl-serve: warning: {reason}; restart {n} in {delay_s:g} s", err=True)

    with cli_errors("cmdcl-serve", debug):
        try:
            import pytriton  # noqa: F401  (fail here, with the fix, rather than inside serve)

            from ..serve.server import ServeConfig, ServerDied, check_ports, serve
        except ImportError as exc:
            raise CmdclError(f"PyTriton is not installed ({exc}); it pins numpy<2, so it lives in its own venv: "
                             "make serve-venv, then .venv-serve/bin/cmdcl-serve") from exc
        config = ServeConfig(host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                             metrics_host=metrics_host, max_batch=max_batch, queue_delay_us=queue_delay_us, top_k=top_k)
        check_ports(config)
        model = load_backend(engine, backend, device)
        if not debug:  # PyTriton sends a failing request's traceback to the client: no frames, so no paths
            sys.tracebacklimit = 0
        try:
            serve(model, config, on_ready=ready, restarts=restart, on_restart=restarting)
        except ServerDied:
            raise
        except Exception as exc:  # PyTriton's start-up errors (a model that fails to load)
            raise ServerDied(f"the server stopped: {first_line(exc)}") from exc


def _is_loopback(host: str) -> bool:
    address = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
    return ipaddress.ip_address(address.split("%")[0]).is_loopback


if __name__ == "__main__":
    main()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def client():
    """Talk to a cmdcl-serve (or any Triton serving the cmdcl model) with tritonclient."""


_url = click.option("--url", default=None, help="host:port of the server [default: 127.0.0.1:8000 for http, :8001 for grpc].")
_protocol = click.option("--protocol", type=click.Choice(["http", "grpc"]), default="http", show_default=True)


@client.command()
@click.argument("videos", nargs=-1, required=True, type=click.Path(dir_okay=False))
@_url
@_protocol
@click.option("--debug", is_flag=True, help="Tracebacks for errors.")
def classify(videos, url, protocol, debug):
    """Send each VIDEO's frames (sampled as cmdcl-run --mode video does) and print its labels as a JSON line."""
    import json

    from ..data.video import VideoError
    from ..serve.client import clip_frames, connect, infer

    failed = False
    # expected=Exception: connection refused, server errors
    with cli_errors("cmdcl-client", debug, prefix=f"{url or _default_url(protocol)}: ", expected=Exception):
        connection = connect(url or _default_url(protocol), protocol)
        for video in videos:
            try:
                outputs = infer(connection, protocol, clip_frames(connection, protocol, video)[None])
            except VideoError as exc:
                click.echo(f"cmdcl-client: {exc}", err=True)
                failed = True
                continue
            top = [{"label": label, "score": round(float(score), 6)}
                   for label, score in zip(outputs["top_labels"][0], outputs["top_scores"][0])]
            click.echo(json.dumps({"video": video, "top": top}))
    sys.exit(ExitCode.INPUTS_FAILED if failed else ExitCode.OK)


@client.command("load-test")
@click.argument("videos", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--engine", required=True, type=click.Path(dir_okay=False),
              help="The model file the server serves; its offline answers are what every response must equal.")
@_url
@_protocol
@click.option("--clients", type=click.IntRange(1, 256), default=4, show_default=True, help="Concurrent clients.")
@click.option("--seconds", type=FiniteFloat(0, 600, min_open=True), default=10.0, show_default=True,
              help="Stop sending after this long.")
@click.option("--max-requests", type=click.IntRange(1, 1_000_000), default=2000, show_default=True, help="Stop after this many requests.")
@click.option("--debug", is_flag=True, help="Tracebacks for errors.")
def load_test_command(videos, engine, url, protocol, clients, seconds, max_requests, debug):
    """N concurrent clients for a bounded time against the server; prints p50/p99 latency,
    throughput and the number of responses that differ from the offline runtime's result
    for the same frames (exit status 3 if any request failed or mismatched, 1 if none was sent)."""
    import json

    from ..data.video import read_clip
    from ..runtime.backends import load_backend
    from ..serve.client import load_test

    url = url or _default_url(protocol)
    with cli_errors("cmdcl-client", debug):  # BackendError, VideoError: their messages name the file
        backend = load_backend(engine)
        clips = [read_clip(video, backend.info.num_frames, backend.info.image_size).frames for video in videos]
        expected = list(backend.classify_clips(np.stack(clips)))
    with cli_errors("cmdcl-client", debug, prefix=f"{url}: ", expected=Exception):  # connection refused, server errors
        report = load_test(url, protocol, clips, expected, clients, seconds, max_requests)
    click.echo(json.dumps(report.summary()))
    if not report.requests:
        sys.exit(ExitCode.FAILED)
    sys.exit(ExitCode.INPUTS_FAILED if report.errors or report.mismatches else ExitCode.OK)


def _default_url(protocol: str) -> str:
    return "127.0.0.1:8000" if protocol == "http" else "127.0.0.1:8001"
