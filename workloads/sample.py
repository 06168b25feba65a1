"""The one record every workload produces: a multimodal (possibly multi-turn) prompt."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field

from PIL import Image

TOPICS: tuple[str, ...] = (
    "general vqa",
    "text vqa",
    "image captioning",
    "chart understanding",
    "complex reasoning pro",
    "multi-turn conversation",
)

# Valid JSON ("\ud800") and YAML can spell a surrogate on its own: a Python str holds it, but
# it is not Unicode text and cannot be encoded (hashed, written, printed) as UTF-8.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate in `text` (unencodable as UTF-8), or None."""
    found = _LONE_SURROGATE.search(text)
    return found.start() if found else None


class SampleError(ValueError):
    """A sample that cannot be run (missing or corrupt image, empty turns)."""


@dataclass(frozen=True)
class Sample:
    """One benchmark prompt.

    The image travels as encoded bytes (JPEG/PNG as on disk) so a shard can be shipped to a
    worker on another node without a shared file system; it is decoded only where it runs.
    `error` is set by a loader that could not read the image: the sample still exists, so the
    run records an error row for it instead of silently dropping it.
    """

    id: str
    topic: str
    category: str
    turns: tuple[str, ...]  # user turns; the image belongs to the first
    image_bytes: bytes | None = field(default=None, repr=False)
    image_name: str = ""  # where the image came from, for error messages
    error: str | None = None

    def load_image(self) -> Image.Image | None:
        """Decode the image (RGB), raising SampleError that names the sample and file."""
        if self.error:
            raise SampleError(f"sample {self.id}: {self.error}")
        if self.image_bytes is None:
            return None
        try:
            with Image.open(io.BytesIO(self.image_bytes)) as im:
                return im.convert("RGB")
        except Exception as exc:  # PIL raises several unrelated types for bad files
            raise SampleError(
                f"sample {self.id}: image {self.image_name or '<bytes>'} cannot be decoded: {exc}"
            ) from exc
