"""The object-key scheme."""

from __future__ import annotations

import pytest

from storage import keys

SHA = "AB" + "0" * 62


def test_key_layout() -> None:
    sha = SHA.lower()
    assert keys.image_key(SHA, ".PNG") == f"images/sha256/ab/{sha}.png"
    assert keys.anomaly_map_key("1234-abcd") == "inspections/1234-abcd/anomaly_map.npy"
    assert keys.overlay_key("1234-abcd") == "inspections/1234-abcd/overlay.png"
    assert keys.weights_key("clip_b16.v1", SHA) == f"models/clip_b16.v1/{sha}.safetensors"
    assert keys.text_features_key("fp-1", SHA) == f"text-features/fp-1/{sha}.safetensors"


@pytest.mark.parametrize(
    "make",
    [
        lambda: keys.image_key("abc", "png"),
        lambda: keys.image_key(SHA, "p/ng"),
        lambda: keys.weights_key("../evil", SHA),
        lambda: keys.weights_key("..", SHA),
        lambda: keys.weights_key("a b", SHA),
        lambda: keys.text_features_key("fp/x", SHA),
        lambda: keys.overlay_key("../x"),
    ],
)
def test_unsafe_parts_are_refused(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]
