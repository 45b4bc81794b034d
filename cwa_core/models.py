"""Load a Hugging Face CausalLM (local directory or Hub id) with its provenance.

``load_model`` reads the config first and refuses an architecture that
:mod:`cwa_core.architectures` does not know before any weights are read. A Hub id with no
network fails at once (one metadata request with a short timeout, no retries) with a
:class:`ModelLoadError` that says to pass a local directory instead.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase

from .architectures import ARCHITECTURES, decoder_layers, unsupported_message

HUB_TIMEOUT_S = 10.0  # one metadata request to the Hub; no retries
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
# transformers renamed from_pretrained's torch_dtype to dtype in 4.56
_DTYPE_KW = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


@dataclass(frozen=True)
class ModelInfo:
    """Provenance recorded in every result."""

    model_id: str
    source: str  # "local" or "hub"
    revision: str | None  # hub commit hash; local dirs: "sha256:<16 hex>" of config + weight files
    model_type: str
    dtype: str  # e.g. "float32", "bfloat16"
    device: str  # e.g. "cpu", "cuda:0"; with a device_map the devices used, comma-separated
    n_params: int  # distinct parameters (tied tensors once)
    trust_remote_code: bool
    attn_implementation: str = "sdpa"
    n_layers: int | None = None  # decoder blocks (relative depth = layer / n_layers)
    context: int | None = None  # tokens the model was built for (config.max_position_embeddings)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    info: ModelInfo


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message is one line and says what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


# --------------------------------------------------------------------------- device, dtype


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cpu``; ``cuda`` / ``cuda:N`` (must exist)."""
    if isinstance(name, torch.device):
        name = str(name)
    key = str(name).strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(key)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r} requested but CUDA is not available "
                f"(torch {torch.__version__}); use device 'cpu' or 'auto'"
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {name!r} requested but only {n} CUDA device(s) are visible")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"device {name!r} requested but MPS is not available; use cpu")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return dev


def resolve_dtype(name: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """``auto`` -> bfloat16 on a CUDA device that supports it, else float32.

    Explicit names: bf16/bfloat16, fp16/float16, fp32/float32.
    """
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {name}; use bf16, fp16 or fp32")
        return name
    key = str(name).strip().lower().removeprefix("torch.")
    if key == "auto":
        dev = device if device is not None else resolve_device("auto")
        if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return _DTYPES[key]
    except KeyError:
        raise ValueError(
            f"unknown dtype {name!r}; allowed: auto, bf16, fp16, fp32 (or bfloat16, float16, float32)"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- locating


def _weight_files(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and (p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".index.json"))
    )


def local_revision(directory: str | Path) -> str:
    """``sha256:<16 hex>`` of config.json's bytes and the weight files' names and sizes."""
    directory = Path(directory)
    h = hashlib.sha256()
    h.update((directory / "config.json").read_bytes())
    for p in _weight_files(directory):
        h.update(f"\0{p.name}\0{p.stat().st_size}".encode())
    return "sha256:" + h.hexdigest()[:16]


def _is_valid_repo_id(s: str) -> bool:
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(s)
    except Exception:
        return False
    return True


def _looks_like_path(model_id: str | Path) -> bool:
    if isinstance(model_id, Path):
        return True
    s = str(model_id)
    if s.startswith((".", "/", "~")) or (os.altsep and os.altsep in s):
        return True
    # a Hub id is "name" or "org/name": anything else with a separator is a path
    return os.sep in s and not _is_valid_repo_id(s)


def _hub_offline() -> bool:
    truthy = {"1", "on", "yes", "true"}
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in truthy:
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return False


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    first = first[:160] + ("..." if len(first) > 160 else "")
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _unreachable(model_id: str, reason: str) -> ModelLoadError:
    return ModelLoadError(
        f"cannot download model {model_id!r} from the Hugging Face Hub (offline or unreachable: "
        f"{reason}); pass a local directory holding config.json and the weights"
    )


def _network_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    for mod in ("httpx2", "httpx"):
        try:
            errs.append(__import__(mod).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errs)


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot directory of a Hub model, if config and weights are there."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cfg = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:
        return None
    if not isinstance(cfg, str):
        return None
    snap = Path(cfg).parent
    return snap if _weight_files(snap) else None


def _gated(model_id: str) -> ModelLoadError:
    return ModelLoadError(
        f"model {model_id!r} is gated on the Hugging Face Hub: accept its licence on its "
        "Hub page, then set HF_TOKEN to a token with access (or run `hf auth login`); "
        "or pass a local directory holding config.json and the weights"
    )


def _hub_error(model_id: str, revision: str | None, err: BaseException) -> ModelLoadError | None:
    """A ModelLoadError for a Hub HTTP error anywhere in ``err``'s cause chain, else None."""
    try:
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - older huggingface_hub
        from huggingface_hub.utils import (  # type: ignore[no-redef]
            GatedRepoError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, GatedRepoError):
            return _gated(model_id)
        if isinstance(e, RevisionNotFoundError):
            return ModelLoadError(
                f"revision {revision!r} of model {model_id!r} not found on the Hugging Face Hub; "
                "pass an existing branch, tag or commit hash"
            )
        if isinstance(e, RepositoryNotFoundError):
            return ModelLoadError(
                f"model {model_id!r} not found on the Hugging Face Hub (if it is private or gated, "
                "set HF_TOKEN to a token with access); or pass a local directory holding "
                "config.json and the weights"
            )
        if isinstance(e, HfHubHTTPError):
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status in (401, 403):
                return ModelLoadError(
                    f"access to model {model_id!r} denied by the Hugging Face Hub (HTTP {status}): "
                    "set HF_TOKEN to a token with access; or pass a local directory holding "
                    "config.json and the weights"
                )
            return _unreachable(model_id, f"HTTP {status}" if status else _short(e))
        e = e.__cause__ or e.__context__
    return None


def _resolve_hub(model_id: str, revision: str | None) -> tuple[str, str | None]:
    """Where to load a Hub model from: (path or id, commit hash). Fails fast offline."""
    if not _is_valid_repo_id(model_id):
        raise ModelLoadError(
            f"{model_id!r} is neither a local directory nor a valid Hugging Face Hub model id; "
            "pass a local directory holding config.json and the weights"
        )
    if _hub_offline():
        snap = _cached_snapshot(model_id, revision)
        if snap is not None:
            return str(snap), snap.name
        raise _unreachable(model_id, "HF_HUB_OFFLINE is set and the model is not in the local cache")
    from huggingface_hub import HfApi, get_token

    try:
        meta = HfApi().model_info(model_id, revision=revision, timeout=HUB_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 - sorted below, the rest re-raised
        translated = _hub_error(model_id, revision, err)
        if translated is not None:
            raise translated from err
        if isinstance(err, _network_errors()):
            snap = _cached_snapshot(model_id, revision)
            if snap is not None:
                return str(snap), snap.name
            raise _unreachable(model_id, _short(err)) from err
        raise
    if getattr(meta, "gated", False) and not get_token():
        raise _gated(model_id)
    return model_id, getattr(meta, "sha", None)


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class ModelLocation:
    """Where a model's files are: a local directory, a cached Hub snapshot, or a Hub id."""

    shown_id: str  # what the user gave
    where: str  # what from_pretrained reads (a directory or the Hub id)
    source: str  # "local" or "hub"
    revision: str | None  # hub commit hash; local dirs: "sha256:<16 hex>" of config + weight files
    hub_revision: str | None  # the revision to pass to from_pretrained (a Hub id read online)


def locate_model(model_id: str | Path, revision: str | None = None) -> ModelLocation:
    """Find a model without reading its weights: a local directory must hold config.json and
    weight files; a Hub id is resolved with one metadata request (fails fast offline)."""
    shown_id = str(model_id)
    local = Path(model_id).expanduser()
    if local.is_dir():
        if revision is not None:
            raise ModelLoadError(
                f"revision {revision!r} given for local directory {shown_id!r}; "
                "revisions apply to Hub ids only"
            )
        if not (local / "config.json").is_file():
            raise ModelLoadError(
                f"{shown_id!r} has no config.json; pass a directory written by save_pretrained "
                "(config.json and the weights)"
            )
        if not _weight_files(local):
            raise ModelLoadError(
                f"{shown_id!r} holds no weight files (*.safetensors or pytorch_model*.bin); "
                "pass a directory written by save_pretrained"
            )
        return ModelLocation(shown_id, str(local), "local", local_revision(local), None)
    if local.exists():
        raise ModelLoadError(f"{shown_id!r} is a file, not a directory; pass the model's directory")
    if _looks_like_path(model_id):
        raise ModelLoadError(
            f"no such directory: {shown_id!r}; pass a local directory holding config.json "
            "and the weights, or a Hugging Face Hub id like org/name"
        )
    where, rev = _resolve_hub(shown_id, revision)  # where: the id, or a cached snapshot
    return ModelLocation(shown_id, where, "hub", rev, rev if where == shown_id else None)


def _common_kwargs(loc: ModelLocation, trust_remote_code: bool) -> dict:
    common: dict = {"trust_remote_code": trust_remote_code}
    if loc.hub_revision is not None:
        common["revision"] = loc.hub_revision
    return common


def load_config(loc: ModelLocation, *, trust_remote_code: bool = False):
    """The model's config, refusing an architecture the table does not know (before any weights)."""
    model_type = _peek_model_type(loc.where)
    if model_type is not None and model_type not in ARCHITECTURES:
        raise _unsupported(model_type)
    try:
        config = AutoConfig.from_pretrained(loc.where, **_common_kwargs(loc, trust_remote_code))
    except Exception as err:  # noqa: BLE001
        raise _translate(loc.shown_id, loc.hub_revision, err, "config") from err
    if config.model_type not in ARCHITECTURES:
        raise _unsupported(config.model_type)
    return config


def load_tokenizer(loc: ModelLocation, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(loc.where, **_common_kwargs(loc, trust_remote_code))
    except Exception as err:  # noqa: BLE001
        raise _translate(loc.shown_id, loc.hub_revision, err, "tokenizer") from err


def load_model(
    model_id: str | Path,
    *,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | dict | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Load a CausalLM and its tokenizer from a local directory or a Hub id, in eval mode.

    ``attn_implementation`` defaults to ``"sdpa"`` (fused kernels: the fast path for forward and
    backward). Hessian-vector products need a double backward, which fused kernels lack: the
    ``hutchinson_diag`` metric switches the model to eager attention for its duration.
    With ``device_map`` the model is placed by ``from_pretrained`` (accelerate), not moved.
    Weights are read through safetensors where the checkpoint has them; a pickled ``.bin``
    checkpoint is read with ``weights_only`` loading (transformers' default), never by
    unpickling arbitrary objects; ``trust_remote_code`` stays off unless asked for.
    """
    try:
        dev = resolve_device(device) if device_map is None else None
        torch_dtype = resolve_dtype(dtype, dev)  # dev None (device_map): "auto" asks resolve_device
    except ValueError as err:
        raise ModelLoadError(str(err)) from None

    loc = locate_model(model_id, revision)
    # 1. the config alone: refuse an unknown architecture before any weights are read
    config = load_config(loc, trust_remote_code=trust_remote_code)
    # 2. the tokenizer (cheap), 3. the weights
    tokenizer = load_tokenizer(loc, trust_remote_code=trust_remote_code)
    kwargs = dict(_common_kwargs(loc, trust_remote_code), config=config, attn_implementation=attn_implementation)
    kwargs[_DTYPE_KW] = torch_dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(loc.where, **kwargs)
    except Exception as err:  # noqa: BLE001
        raise _translate(loc.shown_id, revision, err, "weights") from err
    if device_map is None:
        model.to(dev)
        dev_str = str(dev)
    else:
        dev_str = ",".join(sorted({str(p.device) for p in model.parameters()}))
    model.eval()
    info = ModelInfo(
        model_id=loc.shown_id,
        source=loc.source,
        revision=loc.revision,
        model_type=config.model_type,
        dtype=dtype_name(torch_dtype),
        device=dev_str,
        n_params=sum(p.numel() for p in model.parameters()),
        trust_remote_code=trust_remote_code,
        attn_implementation=getattr(model.config, "_attn_implementation", None) or attn_implementation,
        n_layers=len(decoder_layers(model)),
        context=model_context(config),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def model_context(config) -> int | None:
    """The longest sequence the model was built for (tokens), or None where the config is silent."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _peek_model_type(where: str) -> str | None:
    cfg = Path(where) / "config.json"
    if not cfg.is_file():
        return None  # a Hub id: AutoConfig fetches it
    try:
        return json.loads(cfg.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise ModelLoadError(f"cannot read {cfg}: {_short(err)}") from err


def _unsupported(model_type: str) -> ModelLoadError:
    return ModelLoadError(unsupported_message(model_type))


def _translate(model_id: str, revision: str | None, err: BaseException, what: str) -> BaseException:
    """One-line ModelLoadError for file and Hub problems; other errors pass through unchanged."""
    if isinstance(err, ModelLoadError):
        return err
    hub = _hub_error(model_id, revision, err)
    if hub is not None:
        return hub
    if isinstance(err, pickle.UnpicklingError):  # weights_only loading refused what the pickle asks for
        return ModelLoadError(f"cannot load the {what} of {model_id!r}: its pickled checkpoint holds more than "
                              "tensors (it could run code) and is refused; use a safetensors checkpoint")
    if isinstance(err, (OSError, ValueError, KeyError)):
        hint = ""
        if what == "config" and "trust_remote_code" in str(err):
            hint = "; pass trust_remote_code=True only if you trust its code"
        elif what == "tokenizer":
            hint = "; the model directory needs its tokenizer files (tokenizer.json or tokenizer.model)"
        return ModelLoadError(f"cannot load the {what} of {model_id!r}: {_short(err)}{hint}")
    return err
