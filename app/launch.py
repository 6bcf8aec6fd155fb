"""Command line → backend → Gradio app. ``app.py`` calls :func:`main`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from model.environment import read

from .backends.base import Backend, BackendInfo
from .backends.loading import BackgroundLoadedBackend
from .hosting import default_host
from .limits import Limits
from .storage import PrivateStorage
from .ui import build_demo, launch_options
from .zerogpu import on_zerogpu, prepare

DEFAULT_MODEL = "deepseek-ai/deepseek-vl2-tiny"
log = logging.getLogger("vl2-studio")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose the model and where it runs (the app's and the labelling command's)."""
    parser.add_argument(
        "--model",
        default=read("VL2_MODEL", DEFAULT_MODEL),
        help="hub id or local checkpoint folder (default: %(default)s)",
    )
    parser.add_argument(
        "--quantization",
        choices=["auto", "4bit", "8bit", "none"],
        default="auto",
        help="auto: 4-bit on a CUDA card that needs it, none on CPU",
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    parser.add_argument(
        "--gpu-memory",
        default=read("VL2_GPU_MEMORY", "auto"),
        help="GPU budget like 8GiB; auto: the card's free memory. Experts that do not fit run on the CPU",
    )
    parser.add_argument(
        "--backend",
        choices=["local", "openai", "scripted"],
        default="local",
        help="local: the model in this process; openai: a vLLM/SGLang server; scripted: canned",
    )
    parser.add_argument(
        "--server-url",
        default=read("VL2_SERVER_URL", "http://127.0.0.1:8000/v1"),
        help="OpenAI-compatible base URL for --backend openai",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python app.py",
        description="VL2 Grounding Studio: chat and grounding with DeepSeek-VL2 in your browser.",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--host",
        default=default_host(),
        help="interface to bind (default: GRADIO_SERVER_NAME when set, as on Spaces; else %(default)s, local only)",
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    parser.add_argument(
        "--mcp",
        action="store_true",
        default=os.environ.get("GRADIO_MCP_SERVER", "").lower() == "true",
        help="also serve the API endpoints (ground, identify, label, …) as MCP tools at /gradio_api/mcp/",
    )
    return parser


def choose_quantization(requested: str, device: str | None) -> str | None:
    """``auto``: 4-bit on a CUDA card with under 16 GiB free when bitsandbytes is there; else full precision."""
    if requested != "auto":
        return None if requested == "none" else requested
    import torch

    if not torch.cuda.is_available() or (device or "cuda").startswith("cpu"):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return None
    free, _total = torch.cuda.mem_get_info()
    return "4bit" if free < 16 * 2**30 else None


def gpu_memory_for(requested: str | None, device: str | None) -> str | None:
    """The budget to pass to the loader: ``auto`` only means something on a CUDA device."""
    import torch

    on_cuda = torch.cuda.is_available() and not (device or "cuda").startswith("cpu")
    if requested in (None, "", "none") or (requested == "auto" and not on_cuda):
        return None
    return requested


def load_local(args: argparse.Namespace, progress: Callable[[str], None]) -> Backend:
    """The model in this process, as the flags ask (blocking: minutes on first download)."""
    from model.loading import load_model

    from .backends.local import LocalBackend

    quantization = choose_quantization(args.quantization, args.device)
    log.info("loading %s (quantization=%s, device=%s)", args.model, quantization or "none", args.device or "auto")
    loaded = load_model(
        args.model,
        device=args.device,
        dtype=args.dtype,
        quantization=quantization,
        gpu_memory=gpu_memory_for(args.gpu_memory, args.device),
        progress=progress,
    )
    log.info("ready: %s", loaded.info.summary())
    return LocalBackend(loaded)


def make_backend(args: argparse.Namespace, *, background: bool = True) -> Backend:
    """The backend the flags name; ``background``: a local model loads while the page is already up."""
    if args.backend == "scripted":
        from .backends.scripted import ScriptedBackend, demo_script

        return ScriptedBackend(demo_script, info=BackendInfo("scripted demo", "n/a", "cpu"))
    if args.backend == "openai":
        from .backends.openai_compat import OpenAICompatibleBackend

        return OpenAICompatibleBackend(args.server_url, model=args.model)

    def load(progress: Callable[[str], None]) -> Backend:
        return load_local(args, progress)

    if on_zerogpu() or not background:
        # ZeroGPU moves the weights onto the GPU per call; it wants them loaded at start-up, in the
        # main thread (its CUDA interception is per thread), before the server starts.
        return load(lambda phase: log.info("loading: %s", phase))
    placeholder = BackendInfo(model_id=args.model, precision="loading…", device=args.device or "auto")
    return BackgroundLoadedBackend(load, placeholder)


def main(argv: Sequence[str] | None = None) -> int:
    prepare()  # on ZeroGPU, `spaces` must come before anything that touches CUDA
    # A stop request (SIGTERM, as from a process manager) exits like Ctrl-C, so the private folders
    # are removed on the way out rather than left in the temp dir.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    # Gradio's uploads and cached outputs go to a private folder too (mode 0700, made fresh) unless
    # the deployment chose one; it is removed once the server has stopped.
    gradio_files = None
    if not os.environ.get("GRADIO_TEMP_DIR"):
        gradio_files = PrivateStorage()
        os.environ["GRADIO_TEMP_DIR"] = str(gradio_files.root)
    backend = make_backend(args)
    limits = Limits()
    demo = build_demo(backend, limits=limits)
    # One model lane (concurrency_id "model") and a bounded queue: users see their place in line,
    # and past the bound they are told the queue is full instead of waiting forever.
    demo.queue(max_size=limits.queue_size, default_concurrency_limit=1)
    if args.share:
        print("--share: this app will be reachable by anyone with the gradio.live link", file=sys.stderr)
    options = launch_options(limits, host=args.host, share=args.share)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, mcp_server=args.mcp, **options)
    return 0
