"""Architecture facts learned from ``transformers`` on the meta device: :mod:`.layers` (the decoder layers: key
prefix, count, each layer's parameters, the residual-writing projections, the per-layer config entries). Tensor
roles (embeddings, heads, tying) are in :mod:`adapter_surgery.arch`."""

from adapter_surgery.model.layers import Layers, layer_facts, renumbered_config

__all__ = ["Layers", "layer_facts", "renumbered_config"]
