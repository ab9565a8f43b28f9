"""The one object-key scheme. Pure functions; every key is relative and slash-separated.

Images are content-addressed (two frames with identical bytes share one object); per-inspection
artefacts live under the inspection id; weights and cached text features are keyed by hash so a
key never points at different bytes over time.
"""

from __future__ import annotations

import re

_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9._-]+")
_EXT = re.compile(r"[a-z0-9]{1,10}")
_ID = re.compile(r"[A-Za-z0-9-]{1,64}")


def _sha(value: str) -> str:
    value = value.lower()
    if not _HEX64.fullmatch(value):
        raise ValueError(f"not a hex SHA-256 digest: {value!r}")
    return value


def _name(value: str, what: str) -> str:
    # '.' and '..' match the character class but would be path segments, not names.
    if not _NAME.fullmatch(value) or value in {".", ".."}:
        raise ValueError(f"{what} {value!r} must match [A-Za-z0-9._-]+")
    return value


def _inspection(inspection_id: str) -> str:
    if not _ID.fullmatch(inspection_id):
        raise ValueError(f"not an inspection id: {inspection_id!r}")
    return inspection_id


def image_key(sha256: str, ext: str) -> str:
    ext = ext.lower().removeprefix(".")
    if not _EXT.fullmatch(ext):
        raise ValueError(f"bad image extension: {ext!r}")
    sha = _sha(sha256)
    return f"images/sha256/{sha[:2]}/{sha}.{ext}"


def anomaly_map_key(inspection_id: str) -> str:
    return f"inspections/{_inspection(inspection_id)}/anomaly_map.npy"


def overlay_key(inspection_id: str) -> str:
    return f"inspections/{_inspection(inspection_id)}/overlay.png"


def weights_key(name: str, sha256: str) -> str:
    return f"models/{_name(name, 'model name')}/{_sha(sha256)}.safetensors"


def text_features_key(model_fingerprint: str, prompt_sha256: str) -> str:
    fp = _name(model_fingerprint, "model fingerprint")
    return f"text-features/{fp}/{_sha(prompt_sha256)}.safetensors"
