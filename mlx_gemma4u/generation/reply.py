"""A reply's text: its tokens as text to show, cut at stop strings, and when it is finished."""

from __future__ import annotations


class ReplyText:
    """A sequence's new tokens -> the text to show: special tokens hidden, multi-byte characters whole,
    cut before the first stop string; says when the reply is finished and why. Without a tokenizer
    (token ids only, as parity runs want) there is no text and only max_tokens ends a reply."""

    def __init__(self, tokenizer, stop: list[str] | None):
        self.stops = set(tokenizer.eos_token_ids) if tokenizer is not None else set()
        self.hidden = set(tokenizer.all_special_ids) | self.stops if tokenizer is not None else set()
        self.text = _StopText(stop or [])
        self.detokenizer = tokenizer.detokenizer if tokenizer is not None else None
        if self.detokenizer is not None:
            self.detokenizer.reset()

    def add(self, token: int, last: bool) -> tuple[str, str | None]:
        """One new token (`last`: max_tokens reached) -> (text to show now, "stop" / "length" / None)."""
        finish = "stop" if token in self.stops else "length" if last else None
        if self.detokenizer is None:
            return "", finish
        if token not in self.hidden:
            self.detokenizer.add_token(token)
        if finish:
            self.detokenizer.finalize()
        segment, hit = self.text.add(self.detokenizer.last_segment, final=finish is not None)
        return segment, "stop" if hit else finish


class _StopText:
    """Holds back just enough streamed text to cut it at the first stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) - 1 for s in self.stops), default=0)  # a stop string may start this far back
        self.pending = ""

    def add(self, segment: str, final: bool) -> tuple[str, bool]:
        """-> (text safe to show now, whether a stop string was reached)."""
        self.pending += segment
        cuts = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if cuts:
            out, self.pending = self.pending[:min(cuts)], ""
            return out, True
        keep = 0 if final else self.hold
        out = self.pending[:len(self.pending) - keep] if keep else self.pending
        self.pending = self.pending[len(out):]
        return out, False
