"""Incremental detokenization and stop strings."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vramancer.serve.text import IncrementalDetokenizer, StopMatcher


def test_deltas_add_up_to_the_whole_decode(tiny):
    _, tok = tiny
    text = "héllo wörld 😀 — GPU€ splits ∑ models 日本語"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) // 2  # multi-byte characters span several byte-level tokens
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) + detok.flush() == text
    assert all("\ufffd" not in d for d in deltas)  # never a half character


def test_unfinished_character_is_held_then_flushed_as_replacement(tiny):
    _, tok = tiny
    ids = tok("😀", add_special_tokens=False)["input_ids"]
    assert len(ids) == 4  # one token per UTF-8 byte: no emoji in the training text
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in ids[:3]] == ["", "", ""]
    assert detok.flush() == "\ufffd"


def test_special_tokens_are_skipped(tiny):
    _, tok = tiny
    detok = IncrementalDetokenizer(tok)
    assert detok.add(tok.eos_token_id) == ""
    assert detok.add(tok("ok", add_special_tokens=False)["input_ids"][0]) == "o"


def _run(stops, chunks):
    m = StopMatcher(tuple(stops))
    out = "".join(m.push(c) for c in chunks)
    return out + m.flush(), m.stopped


def test_stop_split_over_chunks_is_not_emitted():
    assert _run(["STOP"], ["abc S", "T", "O", "Pxyz"]) == ("abc ", True)
    assert _run(["\n\n", "END"], ["a\n", "b", "\n", "\nc"]) == ("a\nb", True)
    assert _run(["abc"], ["ab", "ab", "c"]) == ("ab", True)
    assert _run(["xyz"], ["xy"]) == ("xy", False)  # held tail comes out at the end


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="abcST\n", max_size=40),
       stops=st.lists(st.text(alphabet="abcST\n", min_size=1, max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 40), max_size=8))
def test_stop_matcher_cuts_before_the_first_stop_it_sees(text, stops, cuts):
    bounds = sorted({0, len(text), *[min(c, len(text)) for c in cuts]})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    out, stopped = _run(stops, chunks)
    if not any(s in text for s in stops):
        assert (out, stopped) == (text, False)
        return
    # the output is the text up to a stop string, and holds no stop string itself
    assert stopped and text.startswith(out)
    assert any(text.startswith(s, len(out)) for s in stops)
    assert not any(s in out for s in stops)
    if len(chunks) == 1:  # all text at once: cut at the earliest stop
        assert len(out) == min(text.find(s) for s in stops if s in text)
