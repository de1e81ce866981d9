"""A reply's text as its ids arrive, in constant decoding work per id, and stop strings found in it.

Decoding the whole reply again at every id costs time quadratic in its length. Here only a short
window is decoded: the ids since the last text handed out, after a few ids of context (so that
a piece's leading space survives: sentencepiece drops the space of a text's first piece). Text
is held back while it ends in U+FFFD: the ids so far end inside a multi-byte UTF-8 character
whose remaining bytes come as later byte pieces. At the end one whole decode settles the text.
"""

REPLACEMENT = "\ufffd"  # what decoding gives for the bytes of an unfinished character


class Detokenizer:
    """Feed ids one at a time (add), read the new text each one completes."""

    def __init__(self, tokenizer, prompt_ids: list):
        self.tokenizer = tokenizer
        self.prompt_ids = list(prompt_ids)
        self.ids = self.prompt_ids[-1:]  # one id of context before the reply's first
        self.start, self.done = 0, len(self.ids)  # ids[start:done] gave text already handed out
        self.text = ""  # all the text handed out

    def add(self, token: int) -> str:
        """The text that token completes ("" while a character or a piece is unfinished)."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.start:self.done])
        after = self.tokenizer.decode(self.ids[self.start:])
        if after.endswith(REPLACEMENT) or not after.startswith(before):
            return ""  # wait for the rest of the character
        new = after[len(before):]
        self.start, self.done = self.done, len(self.ids)
        self.text += new
        return new

    def finish(self, reply_ids: list) -> str:
        """The text not handed out yet, from one decode of the whole reply (its prompt before
        it); an unfinished character at the very end is dropped."""
        whole = self.tokenizer.decode(self.prompt_ids + list(reply_ids))
        text = whole[len(self.tokenizer.decode(self.prompt_ids)):].rstrip(REPLACEMENT)
        new = text[len(self.text):] if text.startswith(self.text) else ""
        self.text += new
        return new


class StopWatch:
    """Where the first stop string begins in a growing text, searching only what each new
    piece could have completed (linear in the text's length)."""

    def __init__(self, stops: list):
        self.stops = list(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""

    def add(self, piece: str) -> int:
        """Append piece; the index in the whole text of the first stop string, or -1."""
        start = max(len(self.text) - self.longest + 1, 0)
        self.text += piece
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        return min(found, default=-1)

    def safe_end(self) -> int:
        """How much of the text can be handed out: what could still begin a stop string is
        held back."""
        return max(len(self.text) - max(self.longest - 1, 0), 0)
