"""Finding, downloading and loading a CSM checkpoint, with errors a person can act on.

The order matters for the messages: check that ``transformers`` has CSM, resolve the model (local
directory or Hugging Face id, downloading only the files the server needs), check it *is* a CSM
checkpoint, then load processor and weights on the chosen device and dtype.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csmserve.config import DEFAULT_MODEL
from csmserve.errors import (
    GatedModelError,
    LoadOutOfMemory,
    ModelDiskFull,
    ModelLoadError,
    ModelNotFound,
    ModelUnavailableOffline,
    NotACsmCheckpoint,
    UnsupportedTransformers,
)

log = logging.getLogger(__name__)

# The server needs configs, tokenizer and safetensors weights; the real repo also holds a 6 GB ckpt.pt.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
TOKEN_HELP = (
    "create a read token at https://huggingface.co/settings/tokens and export HF_TOKEN=<token> "
    "(or run `hf auth login`)"
)


def licence_help(model: str) -> str:
    return f"accept the licence at https://huggingface.co/{model} while logged in to Hugging Face"


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    path: Path
    device: str
    dtype: str


def hub_token() -> str | None:
    """The Hugging Face token from HF_TOKEN or the saved login, never prompting."""
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token()


def is_cached(model: str) -> bool:
    """True when the hub cache holds a config for ``model`` (no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model, "config.json")
    return isinstance(found, str)


def default_model_available() -> bool:
    """Whether ``make serve`` can use sesame/csm-1b: a token or a cached copy exists."""
    return bool(hub_token()) or is_cached(DEFAULT_MODEL)


def require_csm() -> str:
    """Return the transformers version, or raise when it has no CSM."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - a dependency
        raise UnsupportedTransformers(f"transformers is not installed ({exc}); pip install 'transformers>=4.52.1'")
    version = getattr(transformers, "__version__", "unknown")
    try:
        from transformers import CsmForConditionalGeneration  # noqa: F401
    except ImportError:
        raise UnsupportedTransformers(
            f"transformers {version} has no CSM support (added in 4.52.1); "
            "upgrade with: pip install -U 'transformers>=4.52.1'"
        ) from None
    return version


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "--device cuda was requested but torch sees no CUDA device (CPU-only torch build, or no driver); "
            "use --device cpu, or install a CUDA build of torch"
        )
    return device


#: CPU features that make bfloat16 matrix products native (AVX-512 BF16 dot products, AMX tiles).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class DtypeChoice:
    """A resolved dtype and the reason for it, in words for the start-up log."""

    dtype: str
    reason: str


def cpu_bf16_native(capability: str, flags: Iterable[str]) -> bool:
    """Whether a CPU runs bfloat16 natively: ATen's vector level is AVX-512 and the CPU has AVX-512 BF16
    or AMX.

    ``capability`` is :func:`torch.backends.cpu.get_cpu_capability` ("AVX512", "AVX2", "DEFAULT", ...),
    ``flags`` the CPU's feature names (``avx512_bf16``, ``amx_bf16``, ...). Anything less emulates
    bfloat16 by converting to float32 and back, which is slower than float32 itself
    (ATEN_CPU_CAPABILITY=avx2 forces that path on any CPU).
    """
    present = set(flags)
    return _avx512(capability) and any(flag in present for flag in NATIVE_BF16_FLAGS)


def _avx512(capability: str) -> bool:
    return capability.strip().upper().startswith("AVX512")


def choose_cpu_dtype(capability: str, flags: Iterable[str]) -> DtypeChoice:
    """``--dtype auto`` on a CPU: bfloat16 where it is native (2.6x float32's matmul throughput
    measured on AVX-512 BF16), float32 where it would be emulated."""
    flags = set(flags)
    if cpu_bf16_native(capability, flags):
        found = ", ".join(f for f in NATIVE_BF16_FLAGS if f in flags)
        return DtypeChoice("bfloat16", f"the CPU runs bfloat16 natively ({capability} with {found})")
    if _avx512(capability):
        why = f"{capability} without AVX512_BF16 or AMX: bfloat16 would be emulated, slower than float32"
    else:
        why = f"{capability} kernels have no native bfloat16: it would be emulated, slower than float32"
    return DtypeChoice("float32", why)


def cpu_features() -> tuple[str, frozenset[str]]:
    """This machine's ATen capability string and CPU feature flags (torch's cpuinfo, else /proc/cpuinfo)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    try:
        found = torch._C._cpu._get_cpu_capability()  # {"avx512_bf16": True, ...}; private, hence the fallback
        flags = frozenset(name for name, present in found.items() if present is True)
    except (AttributeError, RuntimeError, TypeError):
        flags = frozenset()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("flags"):
                    flags = frozenset(line.split(":", 1)[1].split())
                    break
        except OSError:
            pass
    return capability, flags


def this_cpu_bf16_native() -> bool:
    """:func:`cpu_bf16_native` for the machine this runs on."""
    return cpu_bf16_native(*cpu_features())


def resolve_dtype(dtype: str, device: str) -> DtypeChoice:
    """The dtype to load in, and why: an explicit one as asked; ``auto`` by what the device does natively."""
    import torch

    if dtype != "auto":
        return DtypeChoice(dtype, "as configured (--dtype / CSM_DTYPE)")
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice("bfloat16", "auto: the GPU supports bfloat16")
        return DtypeChoice("float16", "auto: the GPU has no bfloat16")
    choice = choose_cpu_dtype(*cpu_features())
    return DtypeChoice(choice.dtype, "auto: " + choice.reason)


def keep_codec_float32(device: str, dtype: str, bf16_native: bool) -> bool:
    """Whether the codec runs in float32 while the transformers run in ``dtype``.

    On a CPU without native bfloat16, Mimi's convolutions in half precision run on slow reference
    kernels (2-3x float32's time per frame); the codec is small, so it stays float32. Where bfloat16
    is native (the same test as ``--dtype auto``) a bfloat16 codec runs on native kernels and stays so.
    A float16 codec goes to float32 on every CPU: float16 kernels (AVX512_FP16, AMX-FP16) are rare and
    not detected here. Codes are integers, so the two dtypes never mix.
    """
    if device != "cpu" or dtype == "float32":
        return False
    return not (dtype == "bfloat16" and bf16_native)


def codec_to_float32_on_cpu(model, device: str, bf16_native: bool | None = None) -> bool:
    """Apply :func:`keep_codec_float32` to ``model``'s codec; True when it moved it to float32.

    ``bf16_native``: whether this CPU runs bfloat16 natively (default: detected).
    """
    import torch

    codec = model.codec_model
    dtype = str(next(codec.parameters()).dtype).removeprefix("torch.")
    if bf16_native is None:
        bf16_native = device == "cpu" and this_cpu_bf16_native()
    if not keep_codec_float32(device, dtype, bf16_native):
        return False
    codec.to(torch.float32)
    forget_cached_codebooks(codec)
    return True


def forget_cached_codebooks(codec) -> None:
    """Drop the codebooks Mimi derives from ``embed_sum`` and caches outside its buffers (``_embed``).

    ``.to(dtype)`` and in-place edits of ``embed_sum`` leave that cache stale; it is rebuilt on next use.
    """
    for module in codec.modules():
        if hasattr(module, "_embed"):
            module._embed = None


def download(model: str, token: str | None) -> Path:
    """Fetch ``model`` from the hub (or its cache) and return the local snapshot directory."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    log.info("fetching %s from the Hugging Face hub (or its cache); the first download is ~6 GB", model)
    try:
        path = snapshot_download(model, token=token, allow_patterns=ALLOW_PATTERNS)
    except GatedRepoError:
        if token:
            raise GatedModelError(
                f"{model} is gated and your token has no access yet: {licence_help(model)}, "
                "then retry with the same token"
            ) from None
        raise GatedModelError(
            f"{model} is gated and no Hugging Face token was found: {licence_help(model)}, then {TOKEN_HELP}"
        ) from None
    except RepositoryNotFoundError:
        if token:
            raise ModelNotFound(
                f"{model} was not found on the hub (or your token cannot see it): check the model id, "
                f"and for a gated model {licence_help(model)}"
            ) from None
        raise GatedModelError(
            f"{model} was not found without a token; if it is gated or private, {licence_help(model)}, "
            f"then {TOKEN_HELP}"
        ) from None
    except LocalEntryNotFoundError:
        from huggingface_hub import constants

        if constants.is_offline_mode():
            raise ModelUnavailableOffline(
                f"HF_HUB_OFFLINE is set and {model} is not in the local cache ({constants.HF_HUB_CACHE}): "
                f"unset HF_HUB_OFFLINE to download it, or pass --model /path/to/a/local/checkpoint"
            ) from None
        raise ModelUnavailableOffline(
            f"cannot reach the Hugging Face hub and {model} is not in the local cache: check the network "
            "(or HF_ENDPOINT / proxy settings), download it once with `hf download "
            f"{model}`, or pass --model /path/to/a/local/checkpoint"
        ) from None
    except HFValidationError:
        raise ModelNotFound(
            f"{model!r} is neither an existing local directory nor a valid Hugging Face model id"
        ) from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            raise GatedModelError(
                f"the Hugging Face hub rejected your token (401 invalid credentials): {TOKEN_HELP}"
            ) from None
        raise ModelLoadError(f"the Hugging Face hub answered an error for {model}: {exc}") from None
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        from huggingface_hub import constants

        raise ModelDiskFull(
            f"the disk filled up while downloading {model} into the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); the model needs about 6 GB: free space there, or point HF_HOME "
            "(or HF_HUB_CACHE) at a disk with room, then restart"
        ) from None
    return Path(path)


def check_checkpoint(path: Path) -> dict:
    """Read ``config.json`` and make sure it describes a CSM model."""
    config_path = path / "config.json"
    if not path.is_dir():
        raise NotACsmCheckpoint(f"{path} is not a directory")
    if not config_path.is_file():
        raise NotACsmCheckpoint(
            f"{path} is not a CSM checkpoint: it has no config.json "
            "(expected the files of sesame/csm-1b, or run `csmserve make-tiny-model DIR` for an offline one)"
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise NotACsmCheckpoint(f"{config_path} cannot be read as JSON: {exc}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "csm":
        raise NotACsmCheckpoint(
            f"{path} is not a CSM checkpoint: config.json says model_type={model_type!r}, expected 'csm'"
        )
    if not any(path.glob("*.safetensors")):
        raise NotACsmCheckpoint(f"{path} has a CSM config but no *.safetensors weights")
    return config


def load_csm(
    model: str,
    device: str = "auto",
    dtype: str = "auto",
    *,
    token: str | None = None,
    from_pretrained: Callable[..., Any] | None = None,
) -> LoadedModel:
    """Load processor and model. ``from_pretrained`` replaces the weight loader (tests use it to
    fail the way a GPU does). Raises a :class:`ModelLoadError` subclass on every known failure."""
    require_csm()
    import torch
    from transformers import AutoProcessor, CsmForConditionalGeneration

    local = Path(model).expanduser()
    if local.exists() or model.startswith((".", "/", "~")):
        if not local.exists():
            raise NotACsmCheckpoint(f"{local} does not exist")
        path = local
    else:
        path = download(model, token if token is not None else hub_token())
    check_checkpoint(path)
    device = resolve_device(device)
    choice = resolve_dtype(dtype, device)
    dtype = choice.dtype
    log.info("loading %s on %s in %s (%s)", path, device, dtype, choice.reason)
    try:
        processor = AutoProcessor.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - any failure here means a broken checkpoint
        raise NotACsmCheckpoint(f"{path}: the processor/tokenizer files cannot be loaded: {exc}") from None
    loader = from_pretrained or CsmForConditionalGeneration.from_pretrained
    try:
        loaded = loader(path, dtype=getattr(torch, dtype)).to(device)
    except torch.OutOfMemoryError:
        raise LoadOutOfMemory(
            f"out of memory while loading the model on {device} in {dtype}: free the GPU (other processes?), "
            "use --dtype bfloat16 or float16 (half the memory of float32), or --device cpu"
        ) from None
    except Exception as exc:  # noqa: BLE001 - safetensors, torch and transformers each raise their own
        if "out of memory" in str(exc).lower():
            raise LoadOutOfMemory(
                f"out of memory while loading the model on {device} in {dtype}: {exc}; "
                "use --dtype bfloat16 or float16, or --device cpu"
            ) from None
        raise NotACsmCheckpoint(f"{path}: the weights cannot be loaded as CSM: {type(exc).__name__}: {exc}") from None
    loaded.eval()
    if codec_to_float32_on_cpu(loaded, device):
        log.info("the codec (Mimi) runs in float32: %s is not native on this CPU; the transformers run in %s",
                 dtype, dtype)
    return LoadedModel(model=loaded, processor=processor, path=path, device=device, dtype=dtype)
