"""The request types every operation and the preservation report share: one ``StrictModel``, the seed, the device
name and the path fields of a spec.

It sits outside :mod:`adapter_surgery.ops` (whose package imports every operation) so that the report library
(:mod:`adapter_surgery.report`), which the operations import, can use the same types without an import cycle.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from adapter_surgery.devices import DeviceName

__all__ = ["DeviceName", "PathFields", "Seed", "StrictModel"]

#: A request seed: any value ``torch.manual_seed`` and ``torch.Generator.manual_seed`` accept.
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]


class StrictModel(BaseModel):
    """A request model that refuses unknown fields (a typo gets a 422 naming it instead of being ignored) and
    NaN/Infinity in float fields."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class PathFields(StrictModel):
    """Where to read and write, relative to the data directory."""

    checkpoint: str = Field(description="Model directory or .safetensors file, relative to the data directory.")
    output: str = Field(description="Output directory (or .safetensors file for a bare-file checkpoint), relative "
                                    "to the data directory; built beside it and renamed into place.")
    overwrite: bool = Field(
        False, description="Replace an existing output (atomically, after the new one is complete)."
    )
