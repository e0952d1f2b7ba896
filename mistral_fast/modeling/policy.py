"""Backend and compute-dtype choice: which engine trains, in which precision, and why.

Each choice returns its reason as well, which is logged and recorded in the run manifest.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from typing import TYPE_CHECKING

from mistral_fast.errors import ModelError
from mistral_fast.policies import BF16_CAPABILITY, auto_compute_dtype

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mistral_fast")

_BACKENDS = ("auto", "unsloth", "hf")
_INSTALL_UNSLOTH = "pip install 'mistral-fast[unsloth]'"


def resolve_backend(requested: str) -> tuple[str, str]:
    """Choose the backend: ``"unsloth"`` or ``"hf"``, and say why.

    ``auto`` picks unsloth only with a CUDA GPU *and* an unsloth that imports. CUDA and the package's
    presence are checked first, so unsloth is imported (which patches transformers and TRL in place)
    only when it will be used. An explicit ``unsloth`` is honoured without CUDA too: Unsloth then
    runs its CPU fallback, which is how CI tests this backend.

    Args:
        requested: ``model.backend``: ``"auto"``, ``"unsloth"`` or ``"hf"``.

    Returns:
        ``(backend, reason)``; the reason is also logged.

    Raises:
        ModelError: unknown backend, or unsloth requested but not installed or not importable.
    """
    import torch

    if requested not in _BACKENDS:
        raise ModelError(f"model.backend={requested!r} is unknown: use one of {list(_BACKENDS)}")
    if requested == "hf":
        backend, reason = "hf", "model.backend=hf requested"
    elif requested == "unsloth":
        _import_unsloth(required=True)
        where = "on CUDA" if torch.cuda.is_available() else "without CUDA: Unsloth's CPU fallback (slow; for tests)"
        backend, reason = "unsloth", f"model.backend=unsloth requested, running {where}"
    elif not torch.cuda.is_available():
        backend, reason = "hf", "auto: no CUDA GPU (torch.cuda.is_available() is False), so the hf backend"
    elif importlib.util.find_spec("unsloth") is None:
        backend = "hf"
        reason = f"auto: CUDA is available but unsloth is not installed ({_INSTALL_UNSLOTH} for ~2x faster training)"
    else:
        error = _import_unsloth(required=False)
        if error:
            backend, reason = "hf", f"auto: unsloth is installed but failed to import ({error}), so the hf backend"
        else:
            backend, reason = "unsloth", f"auto: CUDA GPU {torch.cuda.get_device_name(0)!r} and unsloth imports"
    log.info("backend: %s (%s)", backend, reason)
    return backend, reason


def _import_unsloth(*, required: bool) -> str:
    """Import unsloth; return "" on success or the error text (raising ModelError when required)."""
    if importlib.util.find_spec("unsloth") is None:
        if required:
            raise ModelError(f"model.backend=unsloth but unsloth is not installed: {_INSTALL_UNSLOTH}, or use hf")
        return "not installed"
    # Unsloth patches these in place at import; ones already imported keep their unpatched code.
    early = sorted({"transformers", "trl", "peft"} & set(sys.modules))
    if early and "unsloth" not in sys.modules:
        log.warning(
            "unsloth is being imported after %s, so some of its patches may not apply: call "
            "mistral_fast.modeling.resolve_backend() before anything imports them",
            ", ".join(early),
        )
    try:
        importlib.import_module("unsloth")
    except Exception as err:  # unsloth raises many kinds on unsupported set-ups; all mean "not usable"
        if required:
            raise ModelError(
                f"model.backend=unsloth but `import unsloth` failed: {type(err).__name__}: {err}; "
                f"reinstall with {_INSTALL_UNSLOTH}, or set model.backend=hf"
            ) from err
        return f"{type(err).__name__}: {err}"
    return ""


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); else torch emulates it."""
    import torch

    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_compute_dtype(requested: str) -> tuple[torch.dtype, str]:
    """Choose the compute dtype of the 4-bit matmuls (and the 16-bit parts of the base), and say why.

    ``auto`` follows `mistral_fast.policies.auto_compute_dtype` (bf16 on Ampere+ GPUs and on CPUs with
    native bf16; fp16 on older GPUs; fp32 on other CPUs) for the machine this runs on.

    Args:
        requested: ``model.compute_dtype``: ``"auto"``, ``"bfloat16"``, ``"float16"`` or ``"float32"``.

    Returns:
        ``(dtype, reason)``; the reason is also logged.

    Raises:
        ModelError: unknown dtype, or bf16 requested on a GPU without bf16.
    """
    import torch

    names = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if requested != "auto" and requested not in names:
        raise ModelError(f"model.compute_dtype={requested!r} is unknown: use auto or one of {sorted(names)}")
    capability = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None
    where = f"GPU {torch.cuda.get_device_name(0)!r}" if capability is not None else "CPU"
    if requested == "bfloat16" and capability is not None and capability < BF16_CAPABILITY:
        raise ModelError(
            f"model.compute_dtype=bfloat16 but {where} has no bf16 (it predates Ampere): use float16 or auto"
        )
    if requested != "auto":
        dtype, reason = names[requested], f"model.compute_dtype={requested} requested"
    else:
        native = capability is None and cpu_has_native_bf16()
        name, why = auto_compute_dtype(cuda_capability=capability, cpu_native_bf16=native)
        dtype, reason = names[name], f"auto on {where}: {why}"
    log.info("compute dtype: %s (%s)", str(dtype).removeprefix("torch."), reason)
    return dtype, reason
