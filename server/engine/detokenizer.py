"""Incremental detokenization with stop sequences.

Two things make streaming text harder than ``decode(all_ids)``:

- A byte-level BPE token can end in the middle of a multi-byte UTF-8
  character; decoding it alone gives U+FFFD. Text is therefore decoded over a
  small window of recent tokens (vLLM's prefix/read offsets) and held back
  while it ends in U+FFFD, until the following token completes the character.
- A stop sequence can be split across tokens. Text that could still be the
  start of a stop sequence is held back until it either completes one (then
  the output ends just before it, and the stop text itself is never sent) or
  stops matching (then it is released).

One :class:`IncrementalDetokenizer` per request; it is not thread-safe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_REPLACEMENT = "\ufffd"
# Window start: how many already-emitted tokens are decoded again as context, so
# that tokenizers which strip a leading space (SentencePiece) still join words.
_CONTEXT_TOKENS = 5


class TokenDecoder:
    """Fast ``ids -> str``: the Rust tokenizer directly when there is one."""

    def __init__(self, tokenizer: Any) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(
            tokenizer, "_tokenizer", None
        )
        self._backend = backend if hasattr(backend, "decode") else None
        self._tokenizer = tokenizer
        self.special_ids: frozenset[int] = frozenset(getattr(tokenizer, "all_special_ids", ()))

    def decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return str(self._backend.decode(ids, skip_special_tokens=True))
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))


@dataclass(slots=True)
class DetokenizerResult:
    text: str  # new text safe to send
    stopped: bool  # a stop sequence was found: the request must finish with STOP


@dataclass(slots=True)
class IncrementalDetokenizer:
    """Streams valid text for one request; see the module docstring."""

    decoder: TokenDecoder
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0  # window start in token_ids
    read_offset: int = 0  # tokens whose text is already in self.text
    text: str = ""  # all decoded text so far (including held-back stop-prefix text)
    sent: int = 0  # characters of self.text already returned
    stopped: bool = False
    _max_stop: int = 0

    def __post_init__(self) -> None:
        self.stop = tuple(s for s in self.stop if s)
        self._max_stop = max((len(s) for s in self.stop), default=0)

    def add(self, new_ids: list[int], *, final: bool = False) -> DetokenizerResult:
        """Add sampled tokens; return the text that may be sent now.

        ``final`` flushes everything still held back (the request is ending for
        another reason: EOS or length), including a dangling partial character.
        """
        if self.stopped:
            return DetokenizerResult("", True)
        self.token_ids.extend(new_ids)
        window = self.token_ids[self.prefix_offset :]
        prefix_text = self.decoder.decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self.decoder.decode(window)
        if len(full_text) > len(prefix_text) and (final or not full_text.endswith(_REPLACEMENT)):
            self.text += full_text[len(prefix_text) :]
            self.read_offset = len(self.token_ids)
            self.prefix_offset = max(0, self.read_offset - _CONTEXT_TOKENS)

        if self.stop:
            # A stop sequence can only start where it could not have been seen before.
            search_from = max(0, self.sent - self._max_stop + 1)
            hit = -1
            for s in self.stop:
                i = self.text.find(s, search_from)
                if i != -1 and (hit == -1 or i < hit):
                    hit = i
            if hit != -1:
                self.stopped = True
                out = self.text[self.sent : hit]
                self.text = self.text[:hit]
                self.sent = hit
                return DetokenizerResult(out, True)
        end = len(self.text) if final else len(self.text) - self._held_back()
        end = max(end, self.sent)
        out = self.text[self.sent : end]
        self.sent = end
        return DetokenizerResult(out, False)

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        if not self.stop:
            return 0
        text = self.text
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def flush(self) -> str:
        """Everything still held back (the request ended without a stop sequence)."""
        return self.add([], final=True).text
