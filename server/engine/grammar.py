"""Grammar-constrained decoding with xgrammar: what a request may emit, compiled once.

A front end describes the output it needs as a :class:`GrammarSpec` (JSON
that validates against a schema, optionally after a literal prefix such as a
tool's name) and compiles it here, off the event loop, into a
:class:`Grammar`. The grammar travels in ``SamplingParams.grammar``; the
sampler keeps one matcher per running request, fills a token bitmask for the
rows that have one, and applies all of them to the logits in one batched
kernel on the device (see :mod:`autoglm_server.engine.sampling`).

Why xgrammar: it compiles a JSON schema once into a pushdown automaton with
precomputed token masks (per-token cost in microseconds, see
``bench/bench_grammar.py``), runs on CPU and CUDA, applies masks to a whole
batch in one call, and is what vLLM and SGLang ship by default.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequestError


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """Output = one of ``alternatives``: a literal prefix, then a JSON value.

    The JSON value validates against the schema (a JSON text); ``None`` means
    any JSON object. Whitespace between JSON tokens is not allowed, so a
    model can't spend its budget on blanks.
    """

    alternatives: tuple[tuple[str, str | None], ...]

    @classmethod
    def json(cls, schema: dict[str, Any] | None) -> GrammarSpec:
        return cls(((("", None if schema is None else json.dumps(schema, sort_keys=True))),))


@dataclass(frozen=True, slots=True)
class Grammar:
    """A compiled grammar (opaque to everything but the sampler)."""

    compiled: Any  # xgrammar.CompiledGrammar
    spec: GrammarSpec


class GrammarCompiler:
    """Compiles specs for one tokenizer; thread-safe, with xgrammar's own cache."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int] | None = None):
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids
        )
        threads = max(1, min(2, os.cpu_count() or 1))  # xgrammar warns above the core count
        self._compiler = xgr.GrammarCompiler(info, max_threads=threads)
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec, field: str) -> Grammar:
        """Compile ``spec``; a schema xgrammar can't handle is the client's error, naming ``field``."""
        xgr = self._xgr
        parts = []
        try:
            for prefix, schema in spec.alternatives:
                body = xgr.Grammar.from_json_schema(
                    schema if schema is not None else '{"type": "object"}',
                    any_whitespace=False,
                    strict_mode=True,
                )
                if prefix:
                    literal = xgr.Grammar.from_ebnf(f"root ::= {json.dumps(prefix)}")
                    body = xgr.Grammar.concat(literal, body)
                parts.append(body)
            grammar = parts[0] if len(parts) == 1 else xgr.Grammar.union(*parts)
            with self._lock:
                compiled = self._compiler.compile_grammar(grammar)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise InvalidRequestError(field, f"cannot be enforced: {exc}") from None
        return Grammar(compiled=compiled, spec=spec)


def new_matcher(grammar: Grammar) -> Any:
    """A fresh matcher (per request) for a compiled grammar."""
    import xgrammar as xgr

    return xgr.GrammarMatcher(grammar.compiled)
