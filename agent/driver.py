"""The engine thread: gathers one input frame from each conversation that has one, runs a tick,
and hands the results back to each conversation's event loop.

GPU work happens only here, never on an asyncio event loop. A conversation whose next frame has
not arrived does not hold the others back for longer than `gather_window_s`: it simply skips the
tick (its state does not advance).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque

from duplex_agent.agent.events import AudioOut, TextOut, UserWord
from duplex_agent.agent.config import FRAME_RATE

log = logging.getLogger(__name__)


class EngineDriver(threading.Thread):
    def __init__(self, agent, gather_window_s: float = 0.010):
        super().__init__(name="engine", daemon=True)
        self.agent, self.engine = agent, agent.engine
        self.gather_window_s = gather_window_s
        self._wake = threading.Event()
        self._stopping = False
        self.ticks = 0
        self.failed_ticks = 0
        self.user_words = 0  # words the transcriber delivered, all conversations
        self.tick_ms: deque[float] = deque(maxlen=2000)
        self.batch_sizes: deque[int] = deque(maxlen=2000)
        # Called on this thread after each tick (metrics):
        # f(tick_ms, batch size, open conversations that had no frame, per-frame latencies in ms).
        self.tick_listeners: list = []
        self.ready = threading.Event()  # set once the engine is warmed up (or failed to)
        self.startup_error: BaseException | None = None

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    def run(self) -> None:
        try:
            self.engine.warm_up()  # here: all GPU work happens on this thread
        except BaseException as e:  # handed to the Agent being built, which raises it
            self.startup_error = e
            return
        finally:
            self.ready.set()
        while not self._stopping:
            self._wake.wait(0.1)
            self._wake.clear()
            while not self._stopping and self._tick_once():
                pass

    def _tick_once(self) -> bool:
        """Run one tick if any conversation has a frame; returns whether it ran."""
        conversations = self.agent.conversations()
        if not any(c.backlog for c in conversations):
            return False
        # Wait for the stragglers, woken by each frame that arrives, until the window closes.
        deadline = time.monotonic() + self.gather_window_s
        while not all(c.backlog for c in conversations):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wake.wait(remaining)
            self._wake.clear()
        frames, taken = {}, {}
        for conv in conversations:
            item = conv._take_frame()
            if item is not None:
                pcm, t_in, ends_input = item
                if ends_input:  # every earlier frame of this conversation has been ticked
                    self.engine.end_input(conv.slot)
                frames[conv.slot] = pcm
                taken[conv.slot] = (conv, t_in)
        if not frames:
            return False
        t0 = time.perf_counter()
        try:
            results = self.engine.tick(frames, {row: c._owner for row, (c, _) in taken.items()})
        except Exception as e:  # the engine keeps serving; only this tick's conversations end
            self.failed_ticks += 1
            log.exception("tick failed for conversations %s", [c.id for c, _ in taken.values()])
            for conv, _ in taken.values():
                self._fail(conv, f"internal error while generating: {type(e).__name__}")
            return True
        tick_ms = (time.perf_counter() - t0) * 1000
        self.tick_ms.append(tick_ms)
        self.batch_sizes.append(len(frames))
        self.ticks += 1
        done = time.monotonic()
        latencies = []
        for row, out in results.items():
            conv, t_in = taken[row]
            if out.end:  # a translation is complete: its conversation ends here
                conv.end(None)
                continue
            conv.stats.frames_out += 1
            latencies.append((done - t_in) * 1000)
            conv.stats.frame_latency_ms.append(latencies[-1])
            events = [AudioOut(out.pcm, out.step, t_in, out.pause)]
            if out.text is not None:
                conv.stats.text_pieces += 1
                events.append(TextOut(out.text, out.step, out.step / FRAME_RATE,
                                      (out.step + 1) / FRAME_RATE))
            if out.words:
                conv.stats.user_words += len(out.words)
                self.user_words += len(out.words)
                events += [UserWord(w.text, w.start, w.end, out.step) for w in out.words]
            self._deliver(conv, frames[row], events)
        for conv in conversations:  # a conversation the engine could not start (its persona)
            if conv._owner.error is not None:
                self._fail(conv, conv._owner.error)
        for listener in tuple(self.tick_listeners):
            try:
                listener(tick_ms, len(frames), len(conversations) - len(frames), latencies)
            except Exception:  # observers must not stop the engine
                log.exception("tick listener failed")
        return True

    def _deliver(self, conv, user_pcm, events) -> None:
        loop = conv._loop
        if loop is None or loop.is_closed() or conv.closed:
            return
        try:
            loop.call_soon_threadsafe(conv._on_tick, user_pcm, events)
        except RuntimeError:  # loop closed in between
            pass

    def _fail(self, conv, message: str) -> None:
        conv.end(message)
