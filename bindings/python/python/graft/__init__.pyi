"""Type stubs of the graft Python bindings (native module graft._graft)."""

from os import PathLike
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

#: Adapters to apply: one name (scale 1), or names and (name, scale) pairs, stacked.
AdapterSpec = Union[None, str, Sequence[Union[str, Tuple[str, float]]]]
StrPath = Union[str, "PathLike[str]"]

class GraftError(Exception):
    """An error reported by graft (loading, adapters, inference); the message is
    graft's own, as the `graft` command line prints it."""

class TrainCancelled(GraftError):
    """Training stopped because the progress callback returned a true value. No
    result was written (a checkpoint was, if one was asked for)."""

    step: int
    """The last finished step."""

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
        """Loads a GGUF LoRA file, PEFT folder, SaRA .safetensors file or STABLE-RPS
        .rps file under name (a new version if name is loaded). GraftError if it does
        not fit the model."""
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

class TrainProgress:
    """One progress event of `train`, given to its progress callback. Fields that do
    not belong to the event's kind are None."""

    kind: str
    """"started", "step" (after every optimizer step), "eval" (every eval_every
    steps) or "finishing" (training done; evaluation and saving follow)."""
    step: int
    """Steps finished ("started": where training starts, non-zero on resume)."""
    steps: int
    """Steps in all."""
    loss: Optional[float]
    """"step": the step's mean loss per target token; "eval": the last step's."""
    eval_loss: Optional[float]
    """"eval": loss on the held-out examples."""
    lr: Optional[float]
    """"step": learning rate of the step."""
    grad_norm: Optional[float]
    """"step": gradient norm before clipping."""
    tokens: Optional[int]
    """"step": tokens the step ran through."""
    tokens_per_s: Optional[float]
    """"step": tokens per second since training started."""
    method: Optional[str]
    """"started": the method's name."""
    trainable_params: Optional[int]
    """"started": trainable parameters."""
    train_examples: Optional[int]
    """"started": training examples."""
    eval_examples: Optional[int]
    """"started": held-out examples."""

class TrainReport:
    """The outcome of `train`: the fields of `graft train`'s JSON report."""

    method: str
    """"lora", "full", "sara" or "rps"."""
    steps: int
    """Optimizer steps run (resumed ones included)."""
    trainable_params: int
    train_loss: float
    """Loss of the last step."""
    eval_loss: float
    """Loss on the held-out examples at the end (NaN without any)."""
    eval_exact_match: Optional[float]
    """Exact match of greedy completions on held-out records (None without records)."""
    eval_records: int
    """Held-out records the exact match ran on."""
    retention_exact_match: Optional[float]
    """Exact match on retention_data with the result active (None without it)."""
    train_seconds: float
    """Seconds in the training loop."""
    tokens_per_s: float
    out: str
    """The written file or directory."""
    out_bytes: int
    """Its size in bytes."""

#: Training data: a path to a .jsonl file of {"prompt", "completion"} records (or a
#: plain text file), or the records themselves ({"text": ...} trains on all its text).
TrainData = Union[StrPath, Sequence[Mapping[str, str]]]

def train(
    model: Model,
    data: Optional[TrainData],
    out: StrPath,
    *,
    text: Optional[str] = None,
    method: str = "lora",
    format: Optional[str] = None,
    rank: int = 8,
    alpha: float = 16.0,
    rslora: bool = False,
    targets: str = "all",
    steps: int = 200,
    lr: Optional[float] = None,
    theta: float = 0.002,
    lambda_rank: float = 0.0005,
    progressive: bool = True,
    rps_mode: str = "lora",
    rho: float = 0.1,
    budget: Optional[int] = None,
    scaler: str = "v1",
    rps_seed: int = 123321,
    batch: int = 8,
    accum: int = 1,
    warmup: int = 10,
    clip: float = 1.0,
    weight_decay: float = 0.01,
    seed: int = 0,
    max_len: int = 256,
    eval_frac: float = 0.1,
    eval_every: int = 0,
    eval_max: int = 64,
    retention_data: Optional[StrPath] = None,
    recompute: bool = False,
    checkpoint: Optional[StrPath] = None,
    checkpoint_every: int = 100,
    resume: Optional[StrPath] = None,
    progress: Optional[Callable[[TrainProgress], Optional[bool]]] = None,
) -> TrainReport:
    """Trains an adapter (or with method="full" the whole model) on model and writes
    it to out, as `graft train` does (same options, defaults and report; the
    defaults are train_defaults()).

    data: a path (str or os.PathLike) to a .jsonl file of {"prompt", "completion"}
    records or to a plain text file, or a list of {"prompt", "completion"} dicts. A
    str is always a path: for text given directly pass data=None and text=... .

    method: "lora", "full", "sara" or "rps". format: "gguf" (lora, full), "peft"
    (lora, a directory), "sara" or "rps"; None picks the method's own. targets:
    "all", "attn", "mlp" or a list like "q,v". lr: None is 1e-3 (SaRA:
    1e-3 * exp(-350 theta)). theta, lambda_rank, progressive: SaRA. rps_mode
    ("lora", "delta"), rho, budget, scaler ("v1", "v5", "none"), rps_seed: RPS.
    eval_frac of the records is held out; eval_every N steps reports an "eval"
    event; checkpoint / checkpoint_every / resume as `graft train`.

    progress is called with a TrainProgress at the start, after every step, at every
    evaluation and before the result is written. A true return value stops training
    after the current step and raises TrainCancelled; an exception raised by it stops
    training the same way and propagates (raised at "finishing", the result is
    still written). Ctrl-C stops training after the current step (KeyboardInterrupt).
    A stopped run writes no result. The GIL is released while training, except while
    the callback runs.

    Unknown method, format, rps_mode or scaler names raise ValueError; errors from
    graft (data, options that do not fit the model, I/O) raise GraftError."""

def train_defaults() -> Dict[str, Any]:
    """The keyword defaults of train() (those of `graft train`), by name."""
