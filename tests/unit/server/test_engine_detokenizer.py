"""Incremental detokenization: multi-byte characters and stop strings split across tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from autoglm_server.engine.detokenizer import IncrementalDetokenizer, TokenDecoder

pytest.importorskip("transformers")

TEXT = "héllo 你好 🚀 wörld, naïve ✨ end"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> tuple[list[str], bool]:
    pieces = []
    for tok in ids:
        result = detok.add([tok])
        pieces.append(result.text)
        if result.stopped:
            return pieces, True
    pieces.append(detok.flush())
    return pieces, False


def test_multibyte_characters_split_across_tokens_are_never_broken(tokenizer: Any) -> None:
    ids = tokenizer.encode(TEXT)
    # The byte-level BPE really does split some characters across tokens here.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    pieces, stopped = stream(IncrementalDetokenizer(TokenDecoder(tokenizer)), ids)
    assert not stopped
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces)


def test_eos_is_not_emitted(tokenizer: Any) -> None:
    ids = [*tokenizer.encode("ok"), tokenizer.eos_token_id]
    detok = IncrementalDetokenizer(TokenDecoder(tokenizer))
    text = "".join(detok.add([i]).text for i in ids[:-1]) + detok.add([ids[-1]], final=True).text
    assert text == "ok"


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (("wörld",), "héllo 你好 🚀 "),
        (("你好",), "héllo "),
        (("🚀",), "héllo 你好 "),
        ((", na", "nothing"), "héllo 你好 🚀 wörld"),
        (("zzz", "llo 你"), "hé"),
    ],
)
def test_stop_string_split_across_tokens_ends_the_output_before_it(
    tokenizer: Any, stop: tuple[str, ...], expected: str
) -> None:
    ids = tokenizer.encode(TEXT)  # splits "🚀", "ö" and "ï" across tokens
    pieces, stopped = stream(IncrementalDetokenizer(TokenDecoder(tokenizer), stop), ids)
    assert stopped
    assert "".join(pieces) == expected


def test_stop_prefix_that_does_not_complete_is_released(tokenizer: Any) -> None:
    detok = IncrementalDetokenizer(TokenDecoder(tokenizer), ("wörldX",))
    pieces, stopped = stream(detok, tokenizer.encode(TEXT))
    assert not stopped
    assert "".join(pieces) == TEXT


def test_text_that_might_start_a_stop_string_is_held_back(tokenizer: Any) -> None:
    detok = IncrementalDetokenizer(TokenDecoder(tokenizer), ("STOP",))
    sent = ""
    for tok in tokenizer.encode("abc ST"):
        sent += detok.add([tok]).text
    assert sent == "abc "  # "ST" may be the start of "STOP"
    tail = "".join(detok.add([t]).text for t in tokenizer.encode("OP and more"))
    assert tail == "" and detok.stopped


def test_dangling_partial_character_is_flushed_at_the_end(tokenizer: Any) -> None:
    ids = tokenizer.encode("🚀")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(TokenDecoder(tokenizer))
    assert detok.add(ids[:1]).text == ""
    assert detok.flush() != ""
