"""Architecture facts, all in this package, learned from ``transformers`` on the meta device: :mod:`.roles` (tensor
roles: embeddings, heads, tying), :mod:`.layers` (the decoder layers: key prefix, count, each layer's parameters,
the residual-writing projections, the per-layer config entries), :mod:`.keys` (checkpoint keys against the model's
names, with ``transformers``' own key conversion)."""

from adapter_surgery.model.layers import Layers, layer_facts, renumbered_config

__all__ = ["Layers", "layer_facts", "renumbered_config"]
