"""One call from a hub id or a local folder to a ready model and processor.

``load_model("deepseek-ai/deepseek-vl2-tiny", quantization="4bit")`` resolves the checkpoint
(hub download or local directory with the same files), builds the config from the published
``config.json``, loads the unchanged safetensors through transformers' own loader (renames
registered in ``model/modeling.py``), checks that no weight was missing, unexpected or left
unquantized, and returns the model in eval mode with its processor.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from . import compute_thread
from .accelerate import accelerate
from .configuration import ConfigError, load_official_config, variant_name
from .experts import RoutedExperts
from .inspect import summarize
from .modeling import DeepseekVL2ForCausalLM
from .placement import (
    Placement,
    PlacementError,
    apply_placement,
    compute_share_on_cpu,
    cpu_share,
    parse_size,
    plan_for_model,
)
from .prefix_cache import PrefixCache
from .processing import DeepseekVL2Processor
from .vision_cache import VisionFeatureCache

Quantization = Literal["4bit", "8bit"] | None
KNOWN_MODELS = ("deepseek-ai/deepseek-vl2-tiny", "deepseek-ai/deepseek-vl2-small", "deepseek-ai/deepseek-vl2")
CHECKPOINT_FILES = [
    "config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model.safetensors.index.json",
    "*.safetensors",
]
# Modules that stay in full precision under 4/8-bit: the vision tower and projector are small and
# sensitive, and lm_head is the logit layer (quantizing it costs accuracy for little memory).
# MLA's kv_b_proj (2 % of Small) stays too: it is applied to a 4-D latent, which bitsandbytes'
# int8 CPU path mishandles, and absorbed-MLA decoding needs its real values.
UNQUANTIZED_MODULES = ["vision", "projector", "lm_head", "kv_b_proj"]
# Prompt tokens per prefill forward when a GPU budget is tight (model/placement.py's reserve).
PLACED_PREFILL_CHUNK = 1024


class ModelLoadError(RuntimeError):
    """Loading failed for a reason the user can act on; the message says what to do."""


class QuantizationUnavailable(ModelLoadError):
    """4-bit/8-bit was requested where bitsandbytes cannot run."""


@dataclass
class LoadInfo:
    model_id: str
    path: str
    variant: str
    device: str
    dtype: str
    quantization: str | None
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    parts: dict[str, dict] = field(default_factory=dict)  # model.inspect's by-kind table
    placement: str = ""  # the GPU budget plan, when one was given
    compute: str = ""  # the CPU's per-phase GEMM dtype choice, on the CPU

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_dtype.values())

    @property
    def weights(self) -> dict:
        """The load-time walk in ``model.inspect.summarize``'s form (for its table and JSON)."""
        return {"total_bytes": self.total_bytes, "by_dtype": self.bytes_by_dtype, "by_kind": self.parts}

    def summary(self) -> str:
        precision = self.quantization or self.dtype.removeprefix("torch.")
        return f"{self.model_id} · {self.variant} · {precision} · {self.device} · {self.total_bytes / 2**30:.2f} GiB"


@dataclass
class LoadedModel:
    model: DeepseekVL2ForCausalLM
    processor: DeepseekVL2Processor
    info: LoadInfo


# -- checkpoint resolution ------------------------------------------------------------------------
Progress = Callable[[str], None]


def _progress_bar(progress: Progress):
    """A tqdm class that also reports each update as one line of text (for the app's header)."""
    from tqdm.auto import tqdm

    class ReportingBar(tqdm):
        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            if self.total:
                unit = 2**30 if self.unit == "B" else 1
                suffix = " GB" if unit > 1 else ""
                progress(f"downloading: {self.n / unit:.2f}/{self.total / unit:.2f}{suffix}")
            return shown

    return ReportingBar


def resolve_checkpoint(
    model_id_or_path: str | os.PathLike[str], *, revision: str | None = None, progress: Progress | None = None
) -> Path:
    """A local directory as is, or a hub repo downloaded (or found in the cache)."""
    local = Path(model_id_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelLoadError(f"{local} has no config.json: point --model at a DeepSeek-VL2 checkpoint folder")
        return local
    repo_id = str(model_id_or_path)
    if local.exists() or repo_id.startswith((".", "/", "~")) or repo_id.count("/") != 1:
        raise ModelLoadError(
            f"{repo_id}: no checkpoint folder there, and it is not a hub id like deepseek-ai/deepseek-vl2-tiny"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        if progress is not None:
            progress(f"fetching {repo_id} from the Hugging Face hub")
        tqdm_class = _progress_bar(progress) if progress is not None else None
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_FILES, tqdm_class=tqdm_class)
        )
    except GatedRepoError as exc:
        raise ModelLoadError(
            f"{repo_id} is gated: accept its licence on huggingface.co and log in with `hf auth login`"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(
            f"{repo_id} was not found on the Hugging Face hub (or is private). Known models: {', '.join(KNOWN_MODELS)}"
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(
            f"cannot reach the Hugging Face hub to download {repo_id}, and it is not in the local cache. "
            "Download it elsewhere (`hf download " + repo_id + " --local-dir DIR`) and pass --model DIR."
        ) from exc
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ModelLoadError(
                f"disk full while downloading {repo_id}; free space or set HF_HOME to a larger disk"
            ) from exc
        raise ModelLoadError(f"could not download {repo_id}: {exc}") from exc


# -- device, dtype, quantization -------------------------------------------------------------------
def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """bf16 (the checkpoints' own dtype); fp16 on GPUs without bf16.

    On the CPU too: half the memory of fp32 (full-size Tiny: 6.7 GB against 13.5 GB), and where
    bf16 products are slow (AVX2 chips) ``model/cpu/compute.py`` multiplies prefill and vision in
    fp32 from the bf16 weights. ``--dtype fp32`` stays available.
    """
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def parse_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}  # fmt: skip
    if dtype not in names:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32")
    return names[dtype]


def normalize_quantization(quantization: str | None) -> Quantization:
    if quantization in (None, "", "none", "None"):
        return None
    aliases = {
        "4bit": "4bit",
        "4-bit": "4bit",
        "nf4": "4bit",
        "8bit": "8bit",
        "8-bit": "8bit",
        "int8": "8bit",
    }
    if quantization not in aliases:
        raise ModelLoadError(f"unknown quantization {quantization!r}; use 4bit, 8bit or none")
    return aliases[quantization]  # type: ignore[return-value]


def check_bitsandbytes(device: str, quantization: str) -> None:
    """Raise :class:`QuantizationUnavailable` with the alternative when bitsandbytes cannot run here."""
    alternative = (
        "Run without quantization (--quantization none; Tiny needs about 7 GB in bf16), "
        "or use a CUDA GPU or CPU with bitsandbytes installed."
    )
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a broken native library
        raise QuantizationUnavailable(
            f"{quantization} needs bitsandbytes, which is not usable here ({exc.__class__.__name__}: {exc}). "
            f"Install it with `pip install bitsandbytes`. {alternative}"
        ) from exc
    device_type = torch.device(device).type
    supported = set(getattr(bnb, "supported_torch_devices", {"cuda", "cpu"}))
    if device_type not in supported:
        raise QuantizationUnavailable(
            f"bitsandbytes {getattr(bnb, '__version__', '')} has no {device_type} backend "
            f"(supported: {', '.join(sorted(supported))}). {alternative}"
        )


def bnb_config(quantization: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=UNQUANTIZED_MODULES,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=UNQUANTIZED_MODULES)


# -- checks -----------------------------------------------------------------------------------------
def unquantized_expert_weights(model: nn.Module) -> list[str]:
    """Names of routed/shared expert weights still stored in floating point (should be empty under bnb)."""
    leftovers = []
    for name, module in model.named_modules():
        is_expert = isinstance(module, RoutedExperts) or name.endswith("shared_experts")
        if not is_expert:
            continue
        for sub_name, param in module.named_parameters():
            if param.dtype.is_floating_point and sub_name.endswith("weight"):
                leftovers.append(f"{name}.{sub_name}")
    return leftovers


def _check_loading_info(info: dict) -> None:
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        details = "; ".join(f"{k}: {sorted(map(str, v))[:8]}" for k, v in problems.items())
        raise ModelLoadError(f"the checkpoint does not match the DeepSeek-VL2 layout ({details})")


# -- GPU memory budget ------------------------------------------------------------------------------
def gpu_budget_bytes(gpu_memory: str | int, device: str) -> int:
    """``"auto"`` → what the card has free now; otherwise a size like ``8GiB``."""
    if isinstance(gpu_memory, int):
        return gpu_memory
    if str(gpu_memory).lower() == "auto":
        if torch.device(device).type != "cuda" or not torch.cuda.is_available():
            raise ModelLoadError(
                "--gpu-memory auto reads the free memory of a CUDA card, and there is none here; "
                "give a size instead, e.g. --gpu-memory 8GiB"
            )
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        return parse_size(gpu_memory)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc


def plan_before_loading(config, budget: int, dtype: torch.dtype, quantization: str | None) -> Placement:
    """A placement from sizes estimated on the meta device (nothing allocated)."""
    with torch.device("meta"):
        skeleton = DeepseekVL2ForCausalLM(config).to(dtype)
    return plan_for_model(skeleton, budget, quantization=quantization, unquantized=tuple(UNQUANTIZED_MODULES))


# -- the one call -----------------------------------------------------------------------------------
@compute_thread.runs_on_compute_thread  # where the model will also run (model/compute_thread.py)
def load_model(
    model_id_or_path: str | os.PathLike[str],
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    quantization: str | None = None,
    revision: str | None = None,
    attn_implementation: str = "sdpa",
    gpu_memory: str | int | None = None,
    progress: Progress | None = None,
) -> LoadedModel:
    """Load an official DeepSeek-VL2 checkpoint (hub id or local folder) ready for inference.

    ``gpu_memory`` (``"8GiB"``, ``"auto"``) is a budget for a CUDA device: when the model does not
    fit it, the routed experts of the first MoE layers stay on the CPU (``model/placement.py``).
    """
    quantization = normalize_quantization(quantization)
    device = device or default_device()
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} was asked for, but no CUDA GPU is visible; use --device cpu")
    if gpu_memory is not None and torch.device(device).type != "cuda":
        raise ModelLoadError("--gpu-memory is a budget for a CUDA device; it does not apply to --device cpu")
    torch_dtype = parse_dtype(dtype, device)
    if quantization:
        check_bitsandbytes(device, quantization)
    path = resolve_checkpoint(model_id_or_path, revision=revision, progress=progress)
    say = progress if progress is not None else (lambda _message: None)
    say(f"loading weights into memory ({quantization or torch_dtype} on {device})")
    try:
        config = load_official_config(path)
    except (ConfigError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"{path}/config.json is not a DeepSeek-VL2 config: {exc}") from exc
    try:  # the processor first: a broken tokenizer should fail before minutes of weight loading
        processor = DeepseekVL2Processor.from_pretrained(path)
    except (OSError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"{path}: tokenizer or processor files are missing or broken ({exc})") from exc
    kwargs = {}
    if quantization:
        kwargs["quantization_config"] = bnb_config(quantization, torch_dtype)
    placement, load_device = None, device
    if gpu_memory is not None:
        budget = gpu_budget_bytes(gpu_memory, device)
        try:
            placement = plan_before_loading(config, budget, torch_dtype, quantization)
        except PlacementError as exc:
            raise ModelLoadError(str(exc)) from exc
        if placement.offloads:
            if quantization == "8bit":
                # bitsandbytes' int8 weights keep their row statistics on the device they were made
                # on; moving them afterwards leaves the two apart. 4-bit moves cleanly.
                raise ModelLoadError(
                    f"{model_id_or_path} in 8-bit does not fit {placement.budget_bytes / 2**30:.1f} GiB; "
                    "use --quantization 4bit (experts that do not fit then run on the CPU) or a larger --gpu-memory"
                )
            # Load (and quantize) on the CPU, then move all but the offloaded experts to the GPU.
            load_device = "cpu"
            if quantization:
                check_bitsandbytes("cpu", quantization)
    try:
        model, info = DeepseekVL2ForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=torch_dtype,
            device_map={"": load_device},
            attn_implementation=attn_implementation,
            output_loading_info=True,
            **kwargs,
        )
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(
            f"out of memory loading {model_id_or_path} on {device} in {quantization or torch_dtype}; "
            "try --quantization 4bit, a smaller model, or --device cpu"
        ) from exc
    _check_loading_info(info)
    # from_pretrained sets the implementation on the top-level config only; the vision tower and
    # the language model are built from their own configs and would keep SDPA.
    model.set_attn_implementation(attn_implementation)
    if quantization:
        leftovers = unquantized_expert_weights(model)
        if leftovers:
            raise ModelLoadError(f"{len(leftovers)} expert weights were not quantized, e.g. {leftovers[:3]}")
    model.eval()
    # A follow-up question about the same image skips the vision tower (VL2_VISION_CACHE_MB=0: off)
    # and prefills only its new tokens (VL2_PREFIX_CACHE_MB=0: off); smaller budgets on a GPU.
    on_gpu = torch.device(device).type == "cuda"
    model.vision_cache = VisionFeatureCache.from_env(on_gpu=on_gpu)
    model.prefix_cache = PrefixCache.from_env(on_gpu=on_gpu)
    compute, cpu_share_bytes = None, 0
    if placement is not None and placement.offloads:
        say(f"placing the model in the GPU budget ({placement.budget_bytes / 2**30:.1f} GiB)")
        # Re-plan from the exact stored sizes now that they are known, then place.
        try:
            placement = plan_for_model(model, placement.budget_bytes)
            apply_placement(model, placement, gpu=device)
        except (PlacementError, torch.OutOfMemoryError) as exc:
            raise ModelLoadError(f"could not place {model_id_or_path} in the GPU budget: {exc}") from exc
        # The activation reserve assumes prefill in chunks.
        model.prefill_chunk_size = PLACED_PREFILL_CHUNK
        compute = compute_share_on_cpu(model, placement, torch_dtype, via=device, progress=say)
        cpu_share_bytes = sum(p.numel() * p.element_size() for p in cpu_share(model, placement).parameters())
    if torch.device(device).type == "cpu":
        say("measuring this CPU and compiling its decode kernels")
    compute_line = accelerate(model, device)
    if compute is not None:  # the experts placed on the CPU beside a GPU have a plan of their own
        compute_line = "; ".join(line for line in (compute_line, compute.describe()) if line)
    placement_text = placement.describe() if placement is not None else ""
    if cpu_share_bytes:
        held_as = str(torch_dtype).removeprefix("torch.")
        placement_text += f"; held there in {held_as}: {cpu_share_bytes / 2**30:.2f} GiB of RAM"
    summary = summarize(model)
    load_info = LoadInfo(
        model_id=str(model_id_or_path),
        path=str(path),
        variant=variant_name(config),
        device=device,
        dtype=str(torch_dtype),
        quantization=quantization,
        bytes_by_dtype=summary["by_dtype"],
        parts=summary["by_kind"],
        placement=placement_text,
        compute=compute_line,
    )
    return LoadedModel(model=model, processor=processor, info=load_info)
