"""Prometheus metrics of one server, served on `GET /metrics`.

Each app gets its own `CollectorRegistry` (not prometheus_client's global one), so several apps,
as in the tests, can share a process. All names start with `duplex_`:

    conversations_active, conversations_capacity  gauges, read from the agent at scrape time
    conversations_opened_total
    conversations_ended_total{reason}             closed, error, idle, max_length, bad_input, ...
    ticks_total, ticks_failed_total               the engine driver's counters
    tick_seconds                                  histogram of whole engine ticks
    tick_stage_seconds{stage}                     encode / lm / decode (/ transcriber), when stages
                                                  are profiled
    user_words_total                              the user's words the transcriber delivered
    tick_batch_size                               conversations per tick
    frame_latency_seconds                         input frame complete -> output frame ready
    late_frames_total                             output frames later than one frame (80 ms)
    skipped_frames_total                          a conversation's input frame missed a tick
    dropped_input_frames_total                    client faster than real time (backlog full)
    dropped_output_frames_total                   consumer did not read its events in time
    refusals_total{reason}                        full, auth, origin, per_client, size, bad_input
    websocket_errors_total{kind}                  bad_audio, too_big, protocol, ignored,
                                                  bad_event (Realtime events answered with an error)
    prompt_cache_hits_total, prompt_cache_misses_total, prompt_cache_evictions_total
                                                  persona prompts whose prefill was reused, computed
    prompt_cache_bytes, prompt_cache_entries      host memory the prefilled prompts hold
    kernel_path{kernel, path}                     1 for what each kernel runs: triton or torch
    phone_playback_lag_seconds                    phone calls: our mark sent -> Twilio's echo
                                                  (the caller has heard the audio before it)
    phone_call_playback_lag_seconds{call_sid}     the last such lag of each live call
    phone_dtmf_digits_total                       keys callers pressed
    phone_cut_seconds_total                       agent audio cut (and `clear`ed) after a stall

Per-tick figures come from the engine driver's tick listeners, on the engine thread (prometheus
metrics are thread-safe); per-conversation drops from the conversation tracker's sweep.

Stage timings need `engine.profile`, which synchronises the GPU between stages: it is switched on
by default only on CPU, where it costs nothing; on CUDA only the whole tick is timed unless asked.
"""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from duplex_agent.agent.config import FRAME_RATE

REFUSAL_REASONS = ("full", "auth", "origin", "per_client", "size", "bad_input")
WEBSOCKET_ERRORS = ("bad_audio", "too_big", "protocol", "ignored", "bad_event")
END_REASONS = ("closed", "error", "idle", "max_length", "bad_input", "too_big", "protocol")
STAGES = ("encode", "lm", "decode")
FRAME_S = 1 / FRAME_RATE

_TIME_BUCKETS = (.002, .005, .01, .02, .04, .06, .08, .1, .15, .2, .3, .5, 1.0, 2.0, 5.0)


class _AgentCollector:
    """Values the agent already keeps, read at scrape time."""

    def __init__(self, agent):
        self.agent = agent

    def collect(self):
        yield GaugeMetricFamily("duplex_conversations_active", "Conversations open now",
                                value=self.agent.active)
        yield GaugeMetricFamily("duplex_conversations_capacity", "Conversations the engine can hold",
                                value=self.agent.max_conversations)
        driver = self.agent._driver
        yield CounterMetricFamily("duplex_ticks", "Engine ticks run", value=driver.ticks)
        yield CounterMetricFamily("duplex_ticks_failed", "Engine ticks that raised (their "
                                  "conversations ended with an error)", value=driver.failed_ticks)
        yield CounterMetricFamily("duplex_user_words", "The user's words the transcriber "
                                  "delivered (--transcriber)", value=driver.user_words)
        cache = self.agent.engine.prompt_cache.stats()
        for name, what in (("hits", "Persona prompts whose prefill was reused from the cache"),
                           ("misses", "Persona prompts prefilled from scratch"),
                           ("evictions", "Prefilled prompts evicted to stay within the budget")):
            yield CounterMetricFamily(f"duplex_prompt_cache_{name}", what, value=cache[name])
        yield GaugeMetricFamily("duplex_prompt_cache_bytes", "Host memory held by prefilled "
                                "persona prompts", value=cache["bytes"])
        yield GaugeMetricFamily("duplex_prompt_cache_entries", "Prefilled persona prompts cached",
                                value=cache["entries"])
        kernels = GaugeMetricFamily("duplex_kernel_path", "1 for the implementation each kernel "
                                    "runs (triton, or its torch reference)",
                                    labels=["kernel", "path"])
        for kernel, path in self.agent.engine.describe()["kernels"].items():
            kernels.add_metric([kernel, path["path"]], 1)
        yield kernels


class _CallLagCollector:
    def __init__(self, lags):
        self.lags = lags

    def collect(self):
        family = GaugeMetricFamily("duplex_phone_call_playback_lag_seconds", "The last playback "
                                   "lag (mark sent -> echoed) of each live phone call",
                                   labels=["call_sid"])
        for call_sid, seconds in self.lags():
            family.add_metric([call_sid], seconds)
        yield family


class Metrics:
    """The metrics of one app. `attach` connects them to an agent; the server's handlers call
    `refused`, `websocket_error`, `opened`, `ended` and `dropped` as things happen."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.opened_total = Counter("duplex_conversations_opened", "Conversations opened",
                                    registry=r)
        self.ended_total = Counter("duplex_conversations_ended", "Conversations ended, by reason",
                                   ["reason"], registry=r)
        self.tick_seconds = Histogram("duplex_tick_seconds",
                                      "Engine tick time (encode, LM, decode)",
                                      buckets=_TIME_BUCKETS, registry=r)
        self.stage_seconds = Histogram("duplex_tick_stage_seconds", "Engine tick time per stage",
                                       ["stage"], buckets=_TIME_BUCKETS, registry=r)
        self.batch_size = Histogram("duplex_tick_batch_size", "Conversations advanced per tick",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.frame_latency = Histogram("duplex_frame_latency_seconds",
                                       "Input frame complete -> its output frame ready",
                                       buckets=_TIME_BUCKETS, registry=r)
        self.late_frames = Counter("duplex_late_frames", "Output frames ready more than one frame "
                                   "duration (80 ms) after their input", registry=r)
        self.skipped_frames = Counter("duplex_skipped_frames", "Ticks an open conversation missed "
                                      "because its next input frame had not arrived", registry=r)
        self.dropped_input = Counter("duplex_dropped_input_frames", "Input frames dropped: the "
                                     "client sent faster than real time", registry=r)
        self.dropped_output = Counter("duplex_dropped_output_frames", "Output frames dropped: the "
                                      "consumer did not read them in time", registry=r)
        self.refusals = Counter("duplex_refusals", "Requests refused, by reason", ["reason"],
                                registry=r)
        self.websocket_errors = Counter("duplex_websocket_errors", "Websocket protocol errors and "
                                        "ignored messages, by kind", ["kind"], registry=r)
        # Turn taking (webrtcvad on both sides), recorded when each conversation ends.
        turn_buckets = (.1, .2, .3, .4, .6, .8, 1.0, 1.5, 2.0, 3.0)
        self.response_latency = Histogram(
            "duplex_response_latency_seconds", "User stops speaking -> agent starts",
            buckets=turn_buckets, registry=r)
        self.barge_in_reaction = Histogram(
            "duplex_barge_in_reaction_seconds", "User starts while the agent speaks -> agent "
            "stops (barge-ins the agent yielded to)", buckets=turn_buckets, registry=r)
        self.barge_ins = Counter("duplex_barge_ins", "User starts while the agent speaks, by "
                                 "whether the agent yielded", ["yielded"], registry=r)
        self.overlap_seconds = Counter("duplex_overlap_seconds", "Time both sides spoke at once",
                                       registry=r)
        self.phone_lag_seconds = Histogram(
            "duplex_phone_playback_lag_seconds", "Phone calls: a mark sent -> Twilio's echo, once "
            "the audio before it has played", buckets=_TIME_BUCKETS, registry=r)
        self.phone_dtmf_digits = Counter("duplex_phone_dtmf_digits", "Phone keys callers pressed",
                                         registry=r)
        self.phone_cut_seconds = Counter(
            "duplex_phone_cut_seconds", "Phone calls: agent audio cut (and cleared at Twilio) "
            "when it piled up after a stall", registry=r)
        for reason in REFUSAL_REASONS:  # every label appears from the start, at zero
            self.refusals.labels(reason)
        for kind in WEBSOCKET_ERRORS:
            self.websocket_errors.labels(kind)
        for reason in END_REASONS:
            self.ended_total.labels(reason)
        self._agent = None
        self._collector = None

    # -- wiring ----------------------------------------------------------------------------------
    def attach(self, agent, profile_stages: bool | None = None) -> None:
        """Feed from `agent`'s engine. profile_stages=None: on for CPU engines, off on GPUs."""
        self._agent = agent
        self._collector = _AgentCollector(agent)
        self.registry.register(self._collector)
        engine = agent.engine
        if profile_stages is None:
            profile_stages = engine.device.type == "cpu"
        engine.profile = profile_stages
        if profile_stages:
            for stage in STAGES + (("transcriber",) if engine.transcriber is not None else ()):
                self.stage_seconds.labels(stage)
        agent._driver.tick_listeners.append(self._on_tick)

    def detach(self) -> None:
        if self._agent is None:
            return
        listeners = self._agent._driver.tick_listeners
        if self._on_tick in listeners:
            listeners.remove(self._on_tick)
        self.registry.unregister(self._collector)
        self._agent = self._collector = None

    def _on_tick(self, tick_ms: float, batch: int, skipped: int, latencies_ms: list[float]) -> None:
        """On the engine thread, after each tick."""
        self.tick_seconds.observe(tick_ms / 1000)
        self.batch_size.observe(batch)
        if skipped > 0:
            self.skipped_frames.inc(skipped)
        late = 0
        for ms in latencies_ms:
            self.frame_latency.observe(ms / 1000)
            late += ms / 1000 > FRAME_S
        if late:
            self.late_frames.inc(late)
        engine = self._agent.engine if self._agent else None
        if engine is not None and engine.profile:
            for stage, ms in engine.last_timings.items():
                self.stage_seconds.labels(stage).observe(ms / 1000)

    # -- events from the server ------------------------------------------------------------------
    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def websocket_error(self, kind: str) -> None:
        self.websocket_errors.labels(kind).inc()

    def opened(self) -> None:
        self.opened_total.inc()

    def ended(self, reason: str) -> None:
        self.ended_total.labels(reason).inc()

    def dropped(self, input_frames: int, output_frames: int) -> None:
        if input_frames > 0:
            self.dropped_input.inc(input_frames)
        if output_frames > 0:
            self.dropped_output.inc(output_frames)

    def phone_lag(self, seconds: float) -> None:
        self.phone_lag_seconds.observe(seconds)

    def phone_dtmf(self) -> None:
        self.phone_dtmf_digits.inc()

    def phone_cut(self, seconds: float) -> None:
        self.phone_cut_seconds.inc(seconds)

    def watch_calls(self, lags) -> None:
        """`lags()` -> [(call_sid, seconds)]: each live phone call's last playback lag, read at
        scrape time (a call's label goes with it)."""
        self.registry.register(_CallLagCollector(lags))

    def turn_taking(self, turns) -> None:
        """Fold one finished conversation's `agent.turns.TurnTaking` into the histograms."""
        for latency in turns.response_latencies():
            self.response_latency.observe(latency)
        for barge in turns.barge_ins():
            self.barge_ins.labels("yes" if barge["yielded"] else "no").inc()
            if barge["yielded"]:
                self.barge_in_reaction.observe(barge["reaction"])
        self.overlap_seconds.inc(turns.overlap_s())

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
