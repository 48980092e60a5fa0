"""Turn-taking metrics for one conversation: who speaks when, how fast the agent answers, and how
fast it yields when interrupted.

Both sides are fed as they are heard (`add_user`, `add_agent`: mono float32 with the conversation
time of their first sample). Each side goes through webrtcvad (aggressiveness 3, 30 ms frames at
16 kHz) and a small segmenter:

* a frame counts as speech only if webrtcvad says so and it is not near-silent;
* pauses shorter than `merge_gap_s` stay inside a segment (words of one utterance);
* segments shorter than `min_speech_s` are dropped (clicks, breaths);
* webrtcvad keeps marking frames as speech for up to ~300 ms after speech stops (its built-in
  hangover), so each segment's tail is trimmed back to its last frame within `edge_db` of the
  segment's loudest frame; and it misses unvoiced onsets ("s", "t"), so the start is extended
  back over up to 150 ms of just-preceding frames that are that loud.

From the segments:

* response latency: a user segment ends, and the agent starts within `max_response_s` (before the
  user speaks again); latency = agent start - user end;
* barge-in: the user starts while the agent speaks; reaction = agent end - user start, and the
  agent "yielded" if that is within `max_reaction_s`;
* agent interruption: the agent starts while the user speaks;
* overlap: total time both speak.

Semantic turn ends: with a transcriber that has pause heads (`--transcriber stt-1b-en_fr-candle`),
each frame also brings the probability that the user says nothing in the next 2 s (`add_pause`).
`PauseDetector` applies Kyutai's rule as Unmute does: skip the first 12 steps, smooth with an
exponential moving average (attack and release half-life 0.01 s, so at 80 ms steps it follows the
model almost at once), and the user's turn has ended when the smoothed value rises above 0.6
(`TURN_END_ABOVE`). The user's segments are then turns: consecutive webrtcvad segments are
merged unless a turn end was detected between the start of one and the start of the next (a pause
mid-sentence is no turn end), and response latencies are measured from the end of a turn.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque

import numpy as np
import soxr
import webrtcvad

VAD_RATE = 16_000
FRAME_S = 0.030
FRAME = int(VAD_RATE * FRAME_S)  # 480 samples
SILENCE_DBFS = -55.0  # frames quieter than this are never speech (digital or near silence)
PREROLL_FRAMES = 5  # how far back a segment's start may be extended (150 ms)


class _Track:
    """One side of the conversation: resampling, VAD frames and the segments they make."""

    def __init__(self, rate: int, merge_gap_s: float, min_speech_s: float, edge_db: float,
                 resync_s: float = 0.2):
        self.rate = rate
        self.merge_gap_s, self.min_speech_s, self.edge_db = merge_gap_s, min_speech_s, edge_db
        self.resync_s = resync_s
        self._vad = webrtcvad.Vad(3)
        self._resampler = None if rate == VAD_RATE else soxr.ResampleStream(
            rate, VAD_RATE, 1, dtype="float32", quality="HQ")
        self._pending = np.zeros(0, dtype=np.float32)  # 16 kHz samples not yet in a frame
        self._t_next: float | None = None  # conversation time of the next 16 kHz sample
        self.closed: list[tuple[float, float]] = []
        self._open: list[tuple[float, float]] = []  # (frame start, frame dB) of the open segment
        self._preroll: list[tuple[float, float]] = []  # non-speech frames just before it
        self._recent: deque[tuple[float, float]] = deque(maxlen=PREROLL_FRAMES)
        self._last_speech_end = 0.0

    def add(self, pcm: np.ndarray, t: float) -> None:
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        expected = None if self._t_next is None else self._expected_start()
        if expected is None or t > expected + self.resync_s:
            # First audio, or a gap in the timeline (lost audio): restart the frame clock at t.
            self._pending = np.zeros(0, dtype=np.float32)
            self._t_next = t
        elif t < expected - self.resync_s:
            # Stamped earlier than audio already analysed (a burst of stale, buffered audio):
            # only the part after what was analysed counts.
            pcm = pcm[int(round((expected - t) * self.rate)):]
            if not len(pcm):
                return
        x = self._resampler.resample_chunk(pcm) if self._resampler else pcm
        buf = np.concatenate([self._pending, x])
        n = len(buf) // FRAME
        for i in range(n):
            self._frame(buf[i * FRAME:(i + 1) * FRAME], self._t_next)
            self._t_next += FRAME_S
        self._pending = buf[n * FRAME:]

    def _expected_start(self) -> float:
        """Where the next input chunk should start if it follows the last one without a gap."""
        return self._t_next + len(self._pending) / VAD_RATE

    def _frame(self, frame: np.ndarray, t: float) -> None:
        db = 10 * np.log10(float(np.mean(frame.astype(np.float64) ** 2)) + 1e-12)
        pcm16 = (np.clip(frame, -1.0, 1.0) * 32767).astype(np.int16).tobytes()
        speech = db > SILENCE_DBFS and self._vad.is_speech(pcm16, VAD_RATE)
        if self._open and t - self._last_speech_end >= self.merge_gap_s:
            self._close()
        if speech:
            if not self._open:
                self._preroll = list(self._recent)
            self._open.append((t, db))
            self._last_speech_end = t + FRAME_S
            self._recent.clear()
        else:
            self._recent.append((t, db))

    def _close(self) -> None:
        seg = self._finished()
        if seg is not None:
            self.closed.append(seg)
        self._open = []

    def _finished(self) -> tuple[float, float] | None:
        """(start, end) of the open segment with its edges refined; None if too short."""
        frames = self._open
        floor = max(db for _, db in frames) - self.edge_db
        last = max(i for i, (_, db) in enumerate(frames) if db >= floor)
        start, end = frames[0][0], frames[last][0] + FRAME_S
        for t, db in reversed(self._preroll):  # contiguous loud frames just before the start
            if db < floor or abs(t + FRAME_S - start) > 1e-6:
                break
            start = t
        return (round(start, 3), round(end, 3)) if end - start >= self.min_speech_s else None

    def cut(self) -> tuple[float, float] | None:
        """End the open segment now (the user's turn ended by other means than silence); the
        next speech opens a new one. Returns the segment, None if it was too short to count."""
        if not self._open:
            return None
        count = len(self.closed)
        self._close()
        return self.closed[-1] if len(self.closed) > count else None

    def segments(self) -> list[tuple[float, float]]:
        """Closed segments, plus the open one as if it ended now."""
        seg = self._finished() if self._open else None
        return self.closed + ([seg] if seg else [])


# Kyutai's semantic VAD as Unmute applies it (unmute/stt/speech_to_text.py, unmute_handler.py).
PAUSE_SKIP_STEPS = 12  # the first predictions are unreliable
PAUSE_HALF_LIFE_S = 0.01  # EMA attack and release
TURN_END_ABOVE = 0.6


class PauseDetector:
    """The smoothed pause probability of one conversation, and where the user's turn ended."""

    def __init__(self, step_s: float = 0.08):
        self.alpha = 1.0 - 0.5 ** (step_s / PAUSE_HALF_LIFE_S)  # same for attack and release
        self.value = 1.0  # Unmute starts it at 1: nobody has spoken yet
        self.steps = 0
        self.turn_ends: list[float] = []  # times the smoothed value rose above TURN_END_ABOVE

    def update(self, prob: float, t: float) -> bool:
        """The pause probability of the frame at `t`; True if the user's turn ended there."""
        self.steps += 1
        if self.steps <= PAUSE_SKIP_STEPS:
            return False
        was_above = self.value > TURN_END_ABOVE
        self.value += self.alpha * (prob - self.value)
        if self.value > TURN_END_ABOVE and not was_above:
            self.turn_ends.append(round(t, 3))
            return True
        return False


class TurnTaking:
    """Turn-taking metrics from the user's and the agent's audio (see the module docstring)."""

    def __init__(self, rate: int = 24_000, merge_gap_s: float = 0.3, min_speech_s: float = 0.12,
                 edge_db: float = 30.0, max_response_s: float = 3.0, max_reaction_s: float = 2.0):
        self.rate = rate
        self.max_response_s, self.max_reaction_s = max_response_s, max_reaction_s
        self._track_args = (merge_gap_s, min_speech_s, edge_db)
        self.user: _Track | None = None
        self.agent: _Track | None = None
        self.pauses: PauseDetector | None = None  # with a transcriber's pause heads

    def add_user(self, pcm: np.ndarray, t: float, rate: int | None = None) -> None:
        """The user's audio as heard (mic, after echo cancellation); `t` = time of pcm[0] in s."""
        if self.user is None:
            self.user = _Track(rate or self.rate, *self._track_args)
        self.user.add(pcm, t)

    def add_agent(self, pcm: np.ndarray, t: float, rate: int | None = None) -> None:
        """The agent's audio as played; `t` = time of pcm[0] in seconds."""
        if self.agent is None:
            self.agent = _Track(rate or self.rate, *self._track_args)
        self.agent.add(pcm, t)

    def add_pause(self, prob: float, t: float) -> None:
        """The transcriber's P(no user voice in the next 2 s) for the frame at `t`."""
        if self.pauses is None:
            self.pauses = PauseDetector()
        self.pauses.update(prob, t)

    def segments(self) -> dict[str, list[tuple[float, float]]]:
        user = self.user.segments() if self.user else []
        if self.pauses is not None:
            user = _turns(user, self.pauses.turn_ends)
        return {"user": user, "agent": self.agent.segments() if self.agent else []}

    # Each side's segments are in time order and do not overlap (a segment closes before the
    # next one starts), so every lookup below is a binary search, not a scan: summary() runs
    # on the event loop every half second for conversations of any length.
    def response_latencies(self, segs: dict | None = None) -> list[float]:
        segs = segs or self.segments()
        user, agent = segs["user"], segs["agent"]
        agent_starts = [a0 for a0, _ in agent]
        out = []
        for i, (_, u_end) in enumerate(user):
            next_user = user[i + 1][0] if i + 1 < len(user) else float("inf")
            if _speaking(agent, agent_starts, u_end):
                continue  # the agent was already talking: overlap, not an answer
            j = bisect_left(agent_starts, u_end)  # the first agent start at or after u_end
            if j < len(agent) and agent_starts[j] <= u_end + self.max_response_s \
                    and agent_starts[j] < next_user:
                out.append(agent_starts[j] - u_end)
        return out

    def barge_ins(self, segs: dict | None = None) -> list[dict]:
        """Each user start during agent speech: {"t", "reaction" (s until the agent stopped),
        "yielded"}."""
        segs = segs or self.segments()
        agent = segs["agent"]
        agent_starts = [a0 for a0, _ in agent]
        out = []
        for u0, _ in segs["user"]:
            j = bisect_left(agent_starts, u0) - 1  # the last agent segment starting before u0
            if j >= 0 and u0 < agent[j][1]:
                reaction = agent[j][1] - u0
                out.append({"t": round(u0, 3), "reaction": round(reaction, 3),
                            "yielded": reaction <= self.max_reaction_s})
        return out

    def agent_interruptions(self, segs: dict | None = None) -> int:
        """How often the agent started while the user was speaking."""
        segs = segs or self.segments()
        user_starts = [u0 for u0, _ in segs["user"]]
        return sum(_speaking(segs["user"], user_starts, a0, strict=True) for a0, _ in segs["agent"])

    def overlap_s(self, segs: dict | None = None) -> float:
        segs = segs or self.segments()
        agent = segs["agent"]
        agent_ends = [a1 for _, a1 in agent]
        total = 0.0
        for u0, u1 in segs["user"]:
            j = bisect_right(agent_ends, u0)  # the first agent segment ending after u0
            while j < len(agent) and agent[j][0] < u1:
                total += max(0.0, min(u1, agent[j][1]) - max(u0, agent[j][0]))
                j += 1
        return total

    def summary(self) -> dict:
        segs = self.segments()
        lat = self.response_latencies(segs)
        barge = self.barge_ins(segs)
        reactions = [b["reaction"] for b in barge if b["yielded"]]
        return {
            "user_segments": len(segs["user"]),
            "agent_segments": len(segs["agent"]),
            "user_speech_s": round(sum(e - s for s, e in segs["user"]), 3),
            "agent_speech_s": round(sum(e - s for s, e in segs["agent"]), 3),
            "responses": len(lat),
            "response_latency_p50_s": _p50(lat),
            "response_latency_mean_s": _mean(lat),
            "barge_ins": len(barge),
            "barge_ins_yielded": len(reactions),
            "barge_in_reaction_p50_s": _p50(reactions),
            "barge_in_reaction_mean_s": _mean(reactions),
            "agent_interruptions": self.agent_interruptions(segs),
            "overlap_s": round(self.overlap_s(segs), 3),
            "turn_ends": "semantic" if self.pauses is not None else "webrtcvad",
            "semantic_turn_ends": len(self.pauses.turn_ends) if self.pauses is not None else None,
        }


def _turns(segments: list[tuple[float, float]], ends: list[float]) -> list[tuple[float, float]]:
    """Speech segments merged into turns: a segment joins the previous one unless a turn end
    (sorted times) fell between the previous one's start and its own."""
    out: list[tuple[float, float]] = []
    for start, end in segments:
        if out and not _any_between(ends, out[-1][0], start):
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def _any_between(sorted_times: list[float], lo: float, hi: float) -> bool:
    i = bisect_left(sorted_times, lo)
    return i < len(sorted_times) and sorted_times[i] < hi


def _speaking(segs: list[tuple[float, float]], starts: list[float], t: float,
              strict: bool = False) -> bool:
    """Whether t falls inside one of the (ordered, disjoint) segments, whose starts are given:
    only the last one starting before t (or at t, unless strict) can hold it."""
    j = (bisect_left if strict else bisect_right)(starts, t) - 1
    return j >= 0 and t < segs[j][1]


def _p50(xs: list[float]) -> float | None:
    return round(float(np.median(xs)), 3) if xs else None


def _mean(xs: list[float]) -> float | None:
    return round(float(np.mean(xs)), 3) if xs else None
