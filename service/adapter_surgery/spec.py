"""The request types every operation and the preservation report share: one ``StrictModel``, the seed, the device
name and the path fields of a spec.

It sits outside :mod:`adapter_surgery.ops` (whose package imports every operation) so that the report library
(:mod:`adapter_surgery.report`), which the operations import, can use the same types without an import cycle.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StringConstraints

from adapter_surgery.devices import DeviceName

__all__ = ["DeviceName", "PathFields", "Seed", "StrictModel", "TokenText"]

#: A request seed: any value ``torch.manual_seed`` and ``torch.Generator.manual_seed`` accept.
Seed = Annotated[StrictInt, Field(ge=0, le=2**63 - 1)]

#: Unicode category Cc (U+0000-U+001F, U+007F-U+009F) but tab, newline and carriage return.
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def token_text(text: str) -> str:
    """Refuse token texts that would silently break tokenization."""
    if not text.strip():
        raise ValueError("a whitespace-only token would match every such run of whitespace in every text, "
                         "replacing the pieces the model was trained on by one untrained token")
    bad = CONTROL.search(text)
    if bad is not None:
        raise ValueError(f"the token holds the control character U+{ord(bad.group()):04X}")
    return text


#: A new token's text (extend-vocab's tokens, attach-head's pad_token_content).
TokenText = Annotated[str, StringConstraints(min_length=1, max_length=1000), AfterValidator(token_text)]


class StrictModel(BaseModel):
    """A request model that refuses unknown fields (a typo gets a 422 naming it instead of being ignored) and
    NaN/Infinity in float fields."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class PathFields(StrictModel):
    """Where to read and write, relative to the data directory."""

    checkpoint: str = Field(description="Model directory or .safetensors file, relative to the data directory.")
    output: str = Field(description="Output directory (or .safetensors file for a bare-file checkpoint), relative "
                                    "to the data directory; built beside it and renamed into place.")
    overwrite: StrictBool = Field(
        False, description="Replace an existing output (atomically, after the new one is complete)."
    )
