"""graft: quantized LLM inference with hot-swappable adapters.

    >>> import graft
    >>> m = graft.Model("model.gguf")
    >>> m.load_adapter("style", "style-lora.gguf")
    >>> m.generate("Once upon a time", max_tokens=32, adapters="style")
    >>> for piece in m.stream("Once upon a time", adapters=[("style", 0.5)]):
    ...     print(piece, end="", flush=True)
    >>> m.logits(m.tokenize("Hello")).shape   # (n_tokens, n_vocab), float32
    >>> graft.train(m, [{"prompt": "2+2=", "completion": " 4"}] * 64, "math.gguf", steps=50)

Errors reported by graft raise ``graft.GraftError`` with graft's own message;
``graft.TrainCancelled`` (a GraftError) when a training progress callback stops it.
"""

from ._graft import (
    Adapter,
    GraftError,
    Model,
    Session,
    TextStream,
    TrainCancelled,
    TrainProgress,
    TrainReport,
    __version__,
    train,
    train_defaults,
)

__all__ = [
    "Adapter",
    "GraftError",
    "Model",
    "Session",
    "TextStream",
    "TrainCancelled",
    "TrainProgress",
    "TrainReport",
    "__version__",
    "train",
    "train_defaults",
]
