"""adapter-surgery: add tokens, LoRA adapters and heads to pretrained safetensors checkpoints.

The core (``io``, ``model``, ``initializers``, ``ops``) knows nothing of HTTP; ``api`` and ``cli`` translate.
"""

__version__ = "0.1.0"
