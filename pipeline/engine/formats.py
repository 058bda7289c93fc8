"""Learned concepts and the file formats the ecosystem already reads.

oneword's own file *is* a diffusers ``learned_embeds.safetensors`` (``{"<name>": tensor[n, dim]}``)
whose safetensors header also carries oneword's metadata, so one file serves both. Exports:
diffusers and AUTOMATIC1111 (``string_to_param``; for SDXL the ``clip_l``/``clip_g`` pair). Imports:
diffusers (.safetensors / .bin), AUTOMATIC1111 (.pt / .safetensors), kohya (``emb_params``) and
SDXL's ``clip_l``/``clip_g`` pair (both halves, side by side: one concept for both encoders).
Nothing is unpickled: legacy ``.pt``/``.bin`` files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from pipeline.atomic_files import atomic_write
from pipeline.engine.concepts import placeholder, validate_name
from pipeline.errors import InputError

DIFFUSERS_FILENAME = "learned_embeds.safetensors"
METADATA_FILENAME = "concept.json"
# A1111 stores a token id next to the vector; any id works, its loader only reads the vector.
_A1111_TOKEN_ID = 265


class ConceptFileError(InputError):
    """A concept file that cannot be read or written; the message names the file."""


@dataclass
class LearnedConcept:
    """A pseudo-word's vectors and what is known about how they were made."""

    name: str
    vectors: torch.Tensor  # [n, dim], float32
    base_model: str | None = None  # text-encoder identity, see pipeline.engine.model.text_encoder_identity
    steps: int | None = None
    final_loss: float | None = None
    config: dict[str, Any] | None = None
    source: str = "oneword"
    extra: dict[str, Any] = field(default_factory=dict)
    # with several text encoders (SDXL: CLIP-L 768, then OpenCLIP bigG 1280), each one's width: a
    # row holds their vectors side by side, in this order; None for one encoder
    widths: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        validate_name(self.name)
        vectors = self.vectors
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2 or not vectors.is_floating_point() or vectors.shape[0] < 1:
            raise ConceptFileError(f"vectors must be a float tensor [n, dim], got {tuple(vectors.shape)}")
        self.vectors = vectors.detach().to("cpu", torch.float32).contiguous()
        if self.widths is not None:
            self.widths = tuple(int(w) for w in self.widths)
            if len(self.widths) != 2 or sum(self.widths) != self.dim:
                raise ConceptFileError(f"widths {self.widths} do not split {self.dim}-dimensional vectors in two")

    @property
    def architecture(self) -> str:
        return "sdxl" if self.widths else "sd"

    @property
    def placeholder(self) -> str:
        return placeholder(self.name)

    @property
    def num_vectors(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "placeholder": self.placeholder,
            "num_vectors": self.num_vectors,
            "dim": self.dim,
            "base_model": self.base_model,
            "steps": self.steps,
            "final_loss": self.final_loss,
            "config": self.config,
            "source": self.source,
            **({"widths": list(self.widths)} if self.widths else {}),
            **self.extra,
        }


# --- writing --------------------------------------------------------------------------------------


def second_file(path: Path) -> Path:
    """Where diffusers' SDXL example keeps the second text encoder's rows: ``X_2.safetensors`` beside ``X``."""
    return path.with_name(f"{path.stem}_2{path.suffix}")


def save_diffusers(concept: LearnedConcept, path: Path) -> Path:
    """diffusers' ``learned_embeds.safetensors``, with oneword's metadata in the header. For SDXL,
    as diffusers' SDXL example writes it: the first encoder's rows there, the second's in
    ``learned_embeds_2.safetensors`` (one ``load_textual_inversion`` call each)."""
    path = Path(path)
    header = {"format": "pt", "oneword": json.dumps(concept.metadata())}
    if concept.widths:
        first = concept.widths[0]
        second = {concept.placeholder: concept.vectors[:, first:].contiguous()}
        atomic_write(second_file(path), lambda tmp: save_file(second, str(tmp), metadata={"format": "pt"}))
        rows = concept.vectors[:, :first].contiguous()
    else:
        rows = concept.vectors
    atomic_write(path, lambda tmp: save_file({concept.placeholder: rows}, str(tmp), metadata=header))
    return path


def save_a1111(concept: LearnedConcept, path: Path) -> Path:
    """AUTOMATIC1111's embedding ``.pt`` (``string_to_param``; the file name is the prompt word). An
    SDXL concept's is a ``.safetensors`` with ``clip_l`` and ``clip_g`` (Forge and ComfyUI read it too)."""
    if concept.widths:
        return save_sdxl_pair(concept, path)
    data = {
        "string_to_token": {"*": _A1111_TOKEN_ID},
        "string_to_param": {"*": concept.vectors.clone()},
        "name": concept.name,
        "step": concept.steps or 0,
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
    }
    atomic_write(path, lambda tmp: torch.save(data, tmp))
    return path


def save_sdxl_pair(concept: LearnedConcept, path: Path) -> Path:
    """The SDXL embedding file of A1111, Forge, ComfyUI and kohya: ``{"clip_l": [n, 768], "clip_g":
    [n, 1280]}`` (``clip_l`` for ``text_encoder``, ``clip_g`` for ``text_encoder_2``)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConceptFileError(f"{path}: an SDXL concept's A1111 file is a .safetensors with clip_l and clip_g; "
                               f"name it {path.with_suffix('.safetensors').name}")  # fmt: skip
    first = concept.widths[0]
    pair = {"clip_l": concept.vectors[:, :first].contiguous(), "clip_g": concept.vectors[:, first:].contiguous()}
    atomic_write(path, lambda tmp: save_file(pair, str(tmp)))
    return path


def a1111_file_name(concept: LearnedConcept) -> str:
    """What ``save_a1111`` should write to: the prompt word, and the suffix of the concept's format."""
    return f"{concept.name}.a1111.{'safetensors' if concept.widths else 'pt'}"


def save_concept(concept: LearnedConcept, out_dir: Path) -> Path:
    """oneword's output folder: the diffusers file (with metadata) and a readable concept.json."""
    out_dir = Path(out_dir)
    path = save_diffusers(concept, out_dir / DIFFUSERS_FILENAME)
    text = json.dumps(concept.metadata(), indent=2) + "\n"
    atomic_write(out_dir / METADATA_FILENAME, lambda tmp: tmp.write_text(text))
    return path


EXPORT_FORMATS = {"diffusers": save_diffusers, "a1111": save_a1111}


# --- reading --------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as err:
        raise ConceptFileError(f"{path}: not a readable safetensors file ({err})") from None


def _read_legacy(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler raises many types; every one means "refused"
        raise ConceptFileError(
            f"{path}: cannot read as a tensor-only file (weights_only=True refuses pickled code and objects): {err}"
        ) from None


def _token_name(token: str) -> str:
    return token.strip().removeprefix("<").removesuffix(">")


# the header fields oneword reads back, and their JSON types (anything else in the header is ignored)
_METADATA_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str, "base_model": str, "steps": int, "final_loss": (int, float), "config": dict, "source": str,
    "widths": list,
}  # fmt: skip


def _oneword_metadata(path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    """The ``oneword`` header of a safetensors file, checked: a file from elsewhere may carry anything."""
    if "oneword" not in metadata:
        return {}
    try:
        info = json.loads(metadata["oneword"])
    except (json.JSONDecodeError, RecursionError, ValueError) as err:
        reason = err.msg if isinstance(err, json.JSONDecodeError) else type(err).__name__
        raise ConceptFileError(f"{path}: its 'oneword' metadata is not valid JSON ({reason})") from None
    if not isinstance(info, dict):
        raise ConceptFileError(f"{path}: its 'oneword' metadata must be a JSON object, found {type(info).__name__}")
    for key, kind in _METADATA_TYPES.items():
        value = info.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise ConceptFileError(f"{path}: metadata field {key!r} has the wrong type ({type(value).__name__})")
    return info


def load_concept_file(path: Path, name: str | None = None, dim: int | None = None) -> LearnedConcept:
    """Reads any supported embedding file. ``name`` overrides the file's; ``dim`` picks SDXL's half."""
    path = Path(path)
    if not path.is_file():
        raise ConceptFileError(f"{path}: no such file")
    metadata: dict[str, str] = {}
    if path.suffix == ".safetensors":
        data, metadata = _read_safetensors(path)
    else:
        data = _read_legacy(path)
    if not isinstance(data, dict) or not data:
        raise ConceptFileError(f"{path}: expected a mapping of embedding tensors, found {type(data).__name__}")

    file_name: str | None = None
    widths: tuple[int, int] | None = None
    if "string_to_param" in data or any(k.startswith("string_to_param.") for k in data):
        params = data.get("string_to_param") or {k.split(".", 1)[1]: v for k, v in data.items() if "." in k}
        vectors, source = next(iter(params.values())), "a1111"
        file_name = data.get("name") if isinstance(data.get("name"), str) else path.stem
    elif "emb_params" in data:
        vectors, source, file_name = data["emb_params"], "kohya", path.stem
    elif "clip_l" in data and "clip_g" in data:
        clip_l, clip_g = data["clip_l"], data["clip_g"]
        if not all(isinstance(t, torch.Tensor) and t.ndim == 2 for t in (clip_l, clip_g)) or (
            clip_l.shape[0] != clip_g.shape[0]
        ):
            raise ConceptFileError(f"{path}: clip_l and clip_g must be [n, width] tensors with the same n")
        widths = (int(clip_l.shape[1]), int(clip_g.shape[1]))
        if dim is not None and dim != sum(widths):
            raise ConceptFileError(f"{path}: an SDXL embedding (clip_l {widths[0]} + clip_g {widths[1]} wide); this "
                                   f"model is not SDXL ({dim}-dimensional text input)")  # fmt: skip
        vectors, source, file_name = torch.cat([clip_l, clip_g], dim=-1), "sdxl", path.name.split(".")[0]
    elif len(data) == 1:
        token, vectors = next(iter(data.items()))
        source, file_name = "diffusers", _token_name(token)
        if path.suffix == ".safetensors" and second_file(path).is_file():  # SDXL, as diffusers writes it
            rest, _ = _read_safetensors(second_file(path))
            rows = vectors.shape[0] if isinstance(vectors, torch.Tensor) else None
            if set(rest) != {token} or rest[token].shape[0] != rows:
                raise ConceptFileError(f"{second_file(path)}: expected the second encoder's rows of {token!r} "
                                       f"({rows} rows), found keys {sorted(rest)[:4]}")  # fmt: skip
            widths = (int(vectors.shape[-1]), int(rest[token].shape[-1]))
            vectors = torch.cat([vectors, rest[token]], dim=-1)
    else:
        raise ConceptFileError(f"{path}: unrecognised embedding layout with keys {sorted(data)[:8]}")
    if not isinstance(vectors, torch.Tensor):
        raise ConceptFileError(f"{path}: embedding is a {type(vectors).__name__}, not a tensor")

    info = _oneword_metadata(path, metadata)
    if info.get("widths") and not widths:
        raise ConceptFileError(f"{path}: an SDXL concept whose second encoder's rows belong in "
                               f"{second_file(path).name}, which is missing")  # fmt: skip
    chosen = name or info.get("name") or file_name
    try:
        validate_name(chosen)
    except InputError as err:
        raise ConceptFileError(f"{path}: {err}; pass a valid name explicitly") from None
    if dim is not None and vectors.shape[-1] != dim:
        found = f"an SDXL concept ({widths[0]} + {widths[1]} wide)" if widths else f"dimension {vectors.shape[-1]}"
        raise ConceptFileError(f"{path}: vectors have {found}, this model needs {dim}")
    try:
        return LearnedConcept(
            name=chosen,
            vectors=vectors,
            base_model=info.get("base_model"),
            steps=info.get("steps"),
            final_loss=info.get("final_loss"),
            config=info.get("config"),
            source=info.get("source", source),
            widths=widths,
        )
    except ConceptFileError as err:
        raise ConceptFileError(f"{path}: {err}") from None
