"""Type stubs of the graft Python bindings (native module graft._graft)."""

from os import PathLike
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

#: Adapters to apply: one name (scale 1), or names and (name, scale) pairs, stacked.
AdapterSpec = Union[None, str, Sequence[Union[str, Tuple[str, float]]]]
StrPath = Union[str, "PathLike[str]"]

class GraftError(Exception):
    """An error reported by graft (loading, adapters, inference); the message is
    graft's own, as the `graft` command line prints it."""

class Adapter:
    """A loaded adapter, as `Model.adapters()` and `Model.load_adapter()` report it."""

    name: str
    """The name it is loaded under."""
    generation: int
    """Version number; a new one at every load or replace (never reused)."""
    bytes: int
    """Bytes of adapter data (memory-mapped bytes included)."""
    format: str
    """"gguf-lora", "peft", "sara", "rps" or "memory"."""
    path: str
    """The file or folder it was loaded from."""

class TextStream(Iterator[str]):
    """Iterator of text pieces returned by `Model.stream`; generation runs in a
    background thread and is cancelled by close() or by dropping the iterator."""

    def __iter__(self) -> "TextStream": ...
    def __next__(self) -> str: ...
    def close(self) -> None:
        """Stops generation; the iterator then ends."""
    @property
    def finish_reason(self) -> Optional[str]:
        """"length", "stop" or "cancelled" once generation has ended; else None."""
    @property
    def tokens(self) -> Optional[List[int]]:
        """The generated token ids (EOS excluded) once generation has ended; else None."""

class Model:
    """A model (GGUF file, Hugging Face checkpoint folder or llama2.c checkpoint) with
    its tokenizer and a registry of named adapters that can be loaded, replaced and
    unloaded at any time, also while other threads generate.

    threads sizes the process-wide worker pool (all cores by default; settable once
    per process). tokenizer: a tokenizer.json, tokenizer.bin or GGUF to use instead
    of the model's own. quantize: convert an HF checkpoint's matrices at load
    ("Q8_0", "Q4_0", ...). Raises GraftError if the model cannot be loaded.
    """

    def __init__(
        self,
        path: StrPath,
        threads: Optional[int] = None,
        tokenizer: Optional[StrPath] = None,
        quantize: Optional[str] = None,
    ) -> None: ...
    @property
    def path(self) -> str: ...
    @property
    def n_vocab(self) -> int:
        """Vocabulary size (width of a logits row)."""
    @property
    def n_layer(self) -> int: ...
    @property
    def n_ctx_train(self) -> int:
        """Training context length (0 if the file does not say)."""
    @property
    def bos(self) -> Optional[int]: ...
    @property
    def eos(self) -> Optional[int]: ...
    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> List[int]:
        """Token ids of text; special parses special-token text such as "<s>"."""
    def detokenize(self, ids: Sequence[int], special: bool = False) -> str:
        """Concatenated pieces of ids, as generation streams them."""
    def load_adapter(self, name: str, path: StrPath) -> Adapter:
        """Loads a GGUF LoRA file, PEFT folder or SaRA .safetensors file under name
        (a new version if name is loaded). GraftError if it does not fit the model."""
    def replace_adapter(self, name: str, path: StrPath) -> Adapter:
        """Replaces the loaded adapter name (GraftError if not loaded). Sessions and
        streams already started keep the version they started with."""
    def unload_adapter(self, name: str) -> None:
        """Unloads name (GraftError if not loaded)."""
    def adapters(self) -> List[Adapter]:
        """The loaded adapters, most recently used first."""
    def logits(
        self, tokens: Sequence[int], adapters: AdapterSpec = None
    ) -> npt.NDArray[np.float32]:
        """Logits at every position of tokens (used as given, no BOS added):
        float32 array of shape (len(tokens), n_vocab), as `graft logits --tokens`."""
    def generate(
        self,
        prompt: Union[str, Sequence[int]],
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        seed: int = 0,
        stop: Optional[Sequence[str]] = None,
        adapters: AdapterSpec = None,
        add_bos: bool = True,
        ignore_eos: bool = False,
        kv_type: str = "f16",
    ) -> str:
        """Text continuing prompt (text, tokenized with BOS unless add_bos=False, or
        token ids used as given). Greedy by default (temperature 0): equals
        `graft run --temp 0` for the same model, prompt and adapters. Generation
        ends at max_tokens, an end-of-generation token (unless ignore_eos) or
        before a stop string."""
    def stream(
        self,
        prompt: Union[str, Sequence[int]],
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        seed: int = 0,
        stop: Optional[Sequence[str]] = None,
        adapters: AdapterSpec = None,
        add_bos: bool = True,
        ignore_eos: bool = False,
        kv_type: str = "f16",
    ) -> TextStream:
        """generate() as an iterator of text pieces that concatenate to its text."""

class Session:
    """A sequence with its own KV cache for incremental decoding: each append runs
    only the new tokens. n_ctx: tokens the cache holds (default: the training
    context, at most 4096). The adapters' current versions are kept for the
    session's life."""

    def __init__(
        self,
        model: Model,
        n_ctx: Optional[int] = None,
        adapters: AdapterSpec = None,
        kv_type: str = "f16",
    ) -> None: ...
    def append(
        self, tokens: Sequence[int], all_logits: bool = False
    ) -> npt.NDArray[np.float32]:
        """Runs tokens after those in the session; returns the last one's logits
        (shape (n_vocab,)), or each one's with all_logits=True (shape
        (len(tokens), n_vocab)). GraftError when the cache is full; on any error
        the session is unchanged."""
    def reset(self) -> None:
        """Forgets every token."""
    def truncate(self, n: int) -> None:
        """Keeps the first n tokens."""
    @property
    def tokens(self) -> List[int]: ...
    @property
    def n_ctx(self) -> int: ...
    @property
    def adapters(self) -> List[Tuple[str, float]]: ...
    def __len__(self) -> int: ...
