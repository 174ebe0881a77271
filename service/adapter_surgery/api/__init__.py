"""The HTTP layer: FastAPI routes generated from ``adapter_surgery.ops.OPERATIONS``; no logic of its own."""
