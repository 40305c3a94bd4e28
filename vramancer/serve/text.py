"""Token ids -> text, incrementally, and stop strings that never leak into the output.

``IncrementalDetokenizer`` turns one new token at a time into the text it adds, holding
back tokens that end in the middle of a UTF-8 character (byte-level BPE) until the
character is complete. ``StopMatcher`` holds back the tail of the text that could be the
start of a stop string, so a stop string split over several tokens is never streamed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["IncrementalDetokenizer", "StopMatcher"]

_REPLACEMENT = "\ufffd"


@dataclass
class IncrementalDetokenizer:
    """Decode a growing list of token ids into text deltas.

    ``prefix_offset:read_offset`` is a window of ids already turned into text, decoded again
    with the new ids so that tokenizers which merge spaces or bytes across tokens see the
    context they need; the delta is what the window's text gained.
    """

    tokenizer: Any
    skip_special_tokens: bool = True
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one id; return the text it completes ("" while a character is unfinished)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """The text of ids still held back (an unfinished character decodes as U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""


@dataclass
class StopMatcher:
    """Cut generated text at the first stop string; the stop string itself is never emitted."""

    stops: tuple[str, ...] = ()
    held: str = ""
    stopped: bool = False

    def push(self, delta: str) -> str:
        """Feed new text; return what may be sent now. After a stop string, ``stopped`` is True."""
        if self.stopped:
            return ""
        text = self.held + delta
        if not self.stops:
            self.held = ""
            return text
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held, self.stopped = "", True
            return text[:cut]
        keep = 0  # longest tail of text that is a proper prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """At the end of generation: the held tail was not a stop string after all."""
        text, self.held = ("" if self.stopped else self.held), ""
        return text
