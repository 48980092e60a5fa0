"""The user's words as Realtime input transcriptions: with a transcriber (`--transcriber`) and a
session that asks for `audio.input.transcription` (any model name), each user item gets
`conversation.item.input_audio_transcription.delta` events, one per word, and one `.completed`.

A user item is the speech between `speech_started` and `speech_stopped`. A word belongs to the
first item whose span, from its `audio_start_ms` to `GRACE_S` after its `audio_end_ms`, holds the
word's start (the transcriber's times are estimates; the grace keeps a last word whose start falls
just after the VAD's end). Deltas wait for the item's commit (as OpenAI's transcription starts at
the commit); `.completed` comes once every word that could still fall in the item is out: the
transcriber's clock has passed the span's end by its delay and the one second a word may take to
close (agent/transcriber.py). Words outside every item are counted in `unplaced_words`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from duplex_agent.agent.transcriber import SEGMENT_STEPS
from duplex_agent.agent.config import FRAME_RATE

GRACE_S = 0.5


@dataclass
class _Item:
    item_id: str
    start: float
    end: float | None = None  # None while the user speaks
    committed: bool = False
    words: list[str] = field(default_factory=list)
    sent: int = 0  # words already sent as deltas

    def holds(self, t: float) -> bool:
        return self.start <= t and (self.end is None or t < self.end + GRACE_S)


class InputTranscripts:
    """One session's user items and the words that fall in them; every method but `started`
    returns the events to send, in order."""

    def __init__(self, delay_s: float):
        # When a word starting at the end of the span is out, at the latest (conversation time).
        self.settle_s = GRACE_S + delay_s + (SEGMENT_STEPS + 1) / FRAME_RATE
        self._items: list[_Item] = []
        self.unplaced_words = 0

    def started(self, item_id: str, start: float) -> None:
        """The user started speaking: a new item (its words go out from its commit)."""
        self._items.append(_Item(item_id, start))

    def stopped(self, item_id: str, end: float) -> list[dict]:
        """The item was committed: its words so far go out as deltas."""
        for item in self._items:
            if item.item_id == item_id:
                item.end, item.committed = end, True
                return self._deltas(item)
        return []

    def word(self, text: str, start: float) -> list[dict]:
        for item in self._items:
            if item.holds(start):
                item.words.append(text)
                return self._deltas(item) if item.committed else []
        self.unplaced_words += 1
        return []

    def tick(self, now: float) -> list[dict]:
        """The transcriber has heard the conversation up to `now` seconds: the items it is done
        with are completed, in order."""
        events = []
        while self._items and self._items[0].end is not None and (
                now >= self._items[0].end + self.settle_s):
            item = self._items.pop(0)
            events += self._deltas(item)
            events.append({"type": "conversation.item.input_audio_transcription.completed",
                           "item_id": item.item_id, "content_index": 0,
                           "transcript": " ".join(item.words),
                           "usage": {"type": "duration",
                                     "seconds": round(item.end - item.start, 3)}})
        return events

    def _deltas(self, item: _Item) -> list[dict]:
        events = []
        for i in range(item.sent, len(item.words)):
            events.append({"type": "conversation.item.input_audio_transcription.delta",
                           "item_id": item.item_id, "content_index": 0,
                           "delta": item.words[i] if i == 0 else " " + item.words[i]})
        item.sent = len(item.words)
        return events
