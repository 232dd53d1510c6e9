"""qgtrain: adversarial training with quantized-gradient attacks (Liu & Tsang).

Layers, bottom to top: ``attacks`` (pure PyTorch) -> ``models``, ``data`` -> ``training``,
``evaluation``, ``callbacks`` -> ``cli``.
"""

__version__ = "0.2.0"
