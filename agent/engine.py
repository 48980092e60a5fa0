"""The batched engine: a fixed slot table of conversations, advanced together one 80 ms tick at a time.

One tick = batched Mimi encode of the slots that have an input frame -> one batched LM step ->
batched Mimi decode. A slot without an input frame this tick does not execute: its codec, KV cache,
token ring and random stream are left exactly as they were. Slots are opened and closed between
ticks without touching the others.

A translating checkpoint (Hibiki-Zero, `model_type` "hibiki") runs each conversation as its
inference does (kyutai-labs/hibiki-zero `generate`): the model first steps over `max_delay` frames
of encoded silence; the user's frames are the source speech; after `end_input`, the next frame
carries the end-of-input marker (the codebook size on every source codebook) and the following
ones silence, until the model says EOS (text id 2), which ends the translation. An EOS sampled
before the end of the input is ignored (the loader makes the model read it back as PAD).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from duplex_agent.agent.config import FRAME_RATE, FRAME_SIZE, TEXT_EOS_ID, SamplingConfig
from duplex_agent.agent.lm_gen import LMGen
from duplex_agent.agent.text import PieceTable, TextDecoder
from duplex_agent.agent.persona import DEFAULT_PROMPT_CACHE_BYTES, Prompt, PromptCache, prefill
from duplex_agent.agent.transcriber import Transcriber, Word, WordTracker
from duplex_agent.checkpoints.bundle import AgentBundle
from duplex_agent.checkpoints.quantize import weight_bytes

log = logging.getLogger(__name__)


class EngineFull(Exception):
    """Every slot is taken."""


class KernelCheckError(RuntimeError):
    """AGENT_KERNELS=triton was asked for, and a Triton kernel failed its check on this device."""


class CapacityError(ValueError):
    """More conversations were asked for than fit in the device's memory. The message says how
    many fit."""


# Per-conversation memory besides the KV caches (Mimi's streaming state, sampling buffers,
# activations of one tick), and what the device keeps free for allocator slack and kernels.
PER_SLOT_OVERHEAD_BYTES = 64 << 20
RESERVED_BYTES = 1 << 30


# `--kv-cache` choices: the weights' dtype, or float8 (half the memory of bf16, twice the slots).
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn}

# A translation that never says EOS after its input ended is ended after 30 s of silence.
FLUSH_LIMIT_FRAMES = int(30 * FRAME_RATE)


def kv_bytes_per_step(cfg, kv_dtype: torch.dtype) -> int:
    """Temporal KV cache bytes of one step of one conversation: keys and values of the KV heads
    only (512 KiB for moshiko in bf16; Hibiki-Zero's 8 of 16 heads over 28 layers: 112 KiB)."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv_dtype.itemsize


def bytes_per_conversation(cfg, dtype: torch.dtype, kv_dtype: torch.dtype | None = None,
                           transcriber=None) -> int:
    """Memory one slot needs: the temporal ring KV cache (3000 steps x 32 layers for moshiko:
    1.57 GB in bf16, 0.79 GB in float8), the depformer's, and a fixed overhead; with a
    `transcriber` (its LMConfig) also its KV cache, always in the weights' dtype (stt-1b-en_fr:
    16 layers x 2 x 2048 x 750 steps, 98 MB in bf16)."""
    temporal = kv_bytes_per_step(cfg, kv_dtype or dtype) * cfg.context
    depformer_kv_dim = cfg.depformer_dim // cfg.depformer_num_heads * cfg.depformer_num_kv_heads
    depth = 2 * cfg.depformer_num_layers * depformer_kv_dim * cfg.dep_q * dtype.itemsize
    listener = 0 if transcriber is None else kv_bytes_per_step(transcriber, dtype) * transcriber.context
    return temporal + depth + listener + PER_SLOT_OVERHEAD_BYTES


def conversations_that_fit(cfg, dtype: torch.dtype, free_bytes: int,
                           kv_dtype: torch.dtype | None = None, transcriber=None) -> int:
    return max(0, (free_bytes - RESERVED_BYTES)
               // bytes_per_conversation(cfg, dtype, kv_dtype, transcriber))


@functools.lru_cache(maxsize=16)
def model_weight_bytes(cfg, dtype: torch.dtype) -> int:
    """Bytes of the LM's weights in memory: with `cfg.quantize` the linears are int8 plus a
    float32 scale per row, everything else (embeddings, norms) is in `dtype`. Moshiko: 15.4 GB
    in bf16, 8.0 GB with int8 linears."""
    from duplex_agent.agent.model import MoshiLM
    with torch.device("meta"):
        state = MoshiLM(cfg).state_dict()
    return sum(t.numel() * (t.element_size() if t.dtype == torch.int8 or k.endswith("_scb")
                            else dtype.itemsize) for k, t in state.items())


@functools.lru_cache(maxsize=1)
def mimi_weight_bytes() -> int:
    """Bytes of Kyutai's Mimi codec (float32, 385 MB), which shares the device with the LM."""
    from moshi.models.loaders import get_mimi
    return sum(t.numel() * t.element_size() for t in get_mimi(None, device="meta").state_dict().values())


def conversations_on_device(cfg, dtype: torch.dtype, device_bytes: int,
                            kv_dtype: torch.dtype | None = None, transcriber=None) -> int:
    """How many conversations a device with `device_bytes` of memory holds next to the LM
    weights (int8 linears when `cfg.quantize`) and Mimi, and a `transcriber`'s weights (its
    LMConfig; its Mimi is the dialogue's): the capacity table of the README."""
    free = device_bytes - model_weight_bytes(cfg, dtype) - mimi_weight_bytes()
    if transcriber is not None:
        free -= model_weight_bytes(transcriber, dtype)
    return conversations_that_fit(cfg, dtype, free, kv_dtype, transcriber)


def free_device_memory(device: torch.device) -> int:
    """Bytes the engine may still allocate on `device` (the weights are already loaded)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _capacity_message(cfg, dtype, free_bytes: int, asked: int, kv_dtype=None,
                      transcriber=None) -> str:
    fit = conversations_that_fit(cfg, dtype, free_bytes, kv_dtype, transcriber)
    per = bytes_per_conversation(cfg, dtype, kv_dtype, transcriber)
    weights = model_weight_bytes(cfg, dtype)
    listener = "" if transcriber is None else f" and the transcriber's of {transcriber.context}"
    msg = (f"{asked} conversations do not fit: {free_bytes / 2**30:.1f} GiB is free after the "
           f"weights ({'int8' if cfg.quantize else str(dtype).removeprefix('torch.')}, "
           f"{weights / 2**30:.1f} GiB) and each conversation needs {per / 2**30:.2f} GiB (its KV "
           f"cache of {cfg.context} steps{listener}); at most {fit} fit here. Ask for "
           f"--max-sessions {fit} or fewer")
    fit_fp8 = conversations_that_fit(cfg, dtype, free_bytes, KV_CACHE_DTYPES["fp8"], transcriber)
    if fit_fp8 > fit:
        msg += f", or use --kv-cache fp8 (float8 KV cache, slightly less exact): {fit_fp8} fit"
    if not cfg.quantize:  # int8 linears would free the difference
        saved = weights - model_weight_bytes(dataclasses.replace(cfg, quantize=True), dtype)
        fit_int8 = conversations_that_fit(cfg, dtype, free_bytes + saved, kv_dtype, transcriber)
        if fit_int8 > fit:
            msg += (f", or use --quantize int8 (int8 weights, {saved / 2**30:.1f} GiB less): "
                    f"{fit_int8} fit")
    return msg + "."


@dataclass
class FrameOut:
    """What one conversation gets back from one tick."""
    pcm: np.ndarray  # [1920] float32, 24 kHz; silence until the model is past its delays
    text_id: int  # -2 while not yet generated
    text: str | None  # the text this id completes (whole characters); None for pad/end-of-pad,
    # not generated, or a byte piece of an unfinished character
    step: int  # index of this conversation's frame (0-based)
    words: list[Word] = dataclasses.field(default_factory=list)  # the user's, completed this tick
    pause: float | None = None  # the transcriber's P(no user voice in the next 2 s), with pause heads
    # A translation is complete: the model said EOS after the end of the input (or stayed silent
    # for FLUSH_LIMIT_FRAMES). This frame's audio and text are not part of it.
    end: bool = False


@dataclass
class Slot:
    sampling: SamplingConfig  # a seed of None is drawn at reset (LMGen.reset)
    prompt: Prompt | None = None  # a persona's prompt, prefilled at reset
    steps: int = 0
    error: str | None = None  # why this conversation cannot go on (its prompt failed); not ticked
    text: TextDecoder | None = None  # this conversation's text ids -> whole UTF-8 characters
    words: WordTracker | None = None  # the transcriber's text ids -> the user's words
    warmup: int = 0  # LM steps taken at reset (a translation's encoded silence)
    input_ended: bool = False  # translation: the source speech is over
    flushed: int = 0  # translation: frames stepped since the end-of-input marker

    @property
    def offset(self) -> int:
        """The LM position of this conversation's next frame."""
        return self.steps + self.warmup + (self.prompt.length if self.prompt is not None else 0)


class Engine:
    def __init__(self, bundle: AgentBundle, max_sessions: int, free_bytes: int | None = None,
                 kv_dtype: torch.dtype | None = None,
                 prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES, encode_once: bool = True):
        """`kv_dtype`: the temporal KV caches' dtype (default the weights'; see KV_CACHE_DTYPES).
        `free_bytes` overrides the measured free device memory (for tests). With a transcriber
        (`bundle.transcriber`), `encode_once=False` makes it encode with its own Mimi even where
        one encode could serve both models (for tests)."""
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self.bundle = bundle
        self.cfg = bundle.config
        self.max_sessions = max_sessions
        self.device = bundle.model.text_linear.weight.device
        dtype = bundle.model.out_norm.alpha.dtype  # the compute dtype, also with int8 weights
        free = free_device_memory(self.device) if free_bytes is None else free_bytes
        listener = bundle.transcriber.config if bundle.transcriber is not None else None
        if max_sessions > conversations_that_fit(self.cfg, dtype, free, kv_dtype, listener):
            raise CapacityError(_capacity_message(self.cfg, dtype, free, max_sessions, kv_dtype,
                                                  listener))
        try:
            self.lm = LMGen(bundle.model, max_sessions, kv_dtype=kv_dtype)
            self.transcriber = (Transcriber(bundle.transcriber, max_sessions, encode_once)
                                if bundle.transcriber is not None else None)
        except torch.OutOfMemoryError:  # the estimate was optimistic (fragmentation, other users)
            raise CapacityError(_capacity_message(self.cfg, dtype, free_device_memory(self.device),
                                                  max_sessions, kv_dtype, listener)) from None

        self.mimi = bundle.mimi
        if self.transcriber is not None and self.transcriber.shared_encode:
            # The transcriber's Mimi holds the dialogue Mimi's tensors and 32 codebooks: its
            # encode gives both models their codes (the dialogue's are the first 8).
            self.mimi = bundle.transcriber.mimi
        self.mimi.streaming_forever(max_sessions)
        self.slots: list[Slot | None] = [None] * max_sessions
        self._pending_reset: set[int] = set()
        self._lock = threading.Lock()  # open/close may come from other threads than tick
        # Per-tick inputs live in preallocated buffers: filled on the host, then one copy each
        # to the device from pinned memory (on CPU the host buffer is the device buffer).
        self._pcm_host, self._pcm_in = self._buffer_pair((max_sessions, 1, FRAME_SIZE), torch.float32)
        self._exec_host, self._exec_dev = self._buffer_pair((max_sessions,), torch.bool)
        self._ready_host, self._ready_dev = self._buffer_pair((max_sessions,), torch.bool)
        self._reset_host, self._reset_dev = self._buffer_pair((max_sessions,), torch.bool)
        self._persona_host, self._persona_dev = self._buffer_pair((max_sessions,), torch.bool)
        self._marker_host, self._marker_dev = self._buffer_pair((max_sessions,), torch.bool)
        # Per-tick results small enough to copy whole: the text ids, and the transcriber's ids and
        # pause probabilities, queued into (pinned) host memory and read with the PCM in one sync.
        self._text_host = self._host_buffer((max_sessions,), torch.long)
        self._heard_host = self._host_buffer((max_sessions,), torch.long)
        self._pause_host = self._host_buffer((max_sessions,), torch.float32)
        self.translates = bundle.translates
        self._silence_codes: torch.Tensor | None = None  # [user codebooks, max_delay], once made
        self._silence = np.zeros(FRAME_SIZE, dtype=np.float32)
        self._pieces = PieceTable(bundle.tokenizer, {self.cfg.text_pad_id, self.cfg.text_epad_id})
        self.weight_bytes = weight_bytes(bundle.model)  # as held: int8 linears count one byte
        # Benchmarks set `profile` to time the stages (it synchronises the device between them).
        self.profile = False
        # Prefilled persona prompts, reused by the next conversation with the same persona.
        self.prompt_cache = PromptCache(prompt_cache_bytes)
        self.last_timings: dict[str, float] = {}
        self.selfcheck_seconds: float | None = None  # set by warm_up
        # The transcriber's part of each profiled tick (its own encode, if any, and its step).
        self.transcriber_ms: deque[float] = deque(maxlen=2000)

    def describe(self) -> dict:
        """What this engine runs on, for /api/stats and logs: `kernels` maps each kernel to the
        implementation that runs ("triton" or "torch", with "why" for a fallback)."""
        from duplex_agent.kernels.dispatch import kernel_backend, kernel_paths
        probe = self.lm.model.out_norm.alpha
        dtype = str(probe.dtype).removeprefix("torch.")
        described = {"checkpoint": self.bundle.name, "device": str(self.device), "dtype": dtype,
                     "weights": "int8" if self.cfg.quantize else dtype,
                     "weight_bytes": self.weight_bytes,
                     "kv_cache": str(self.lm.model.caches[0].k.dtype).removeprefix("torch."),
                     "kernels": kernel_paths(self.device, self._kernels()),
                     "kernels_setting": kernel_backend(), "cuda_graphs": self.lm.cuda_graph,
                     "selfcheck_s": self.selfcheck_seconds,
                     "transcriber": self._describe_transcriber()}
        if self.lm.graph_fallback:
            described["cuda_graphs_why"] = self.lm.graph_fallback
        return described

    def kernel_shapes(self) -> list:
        """The shapes and dtypes this engine's kernels run at (for the self-check): the dialogue
        model's, and the transcriber's."""
        return [_kernel_shapes(gen, self.max_sessions) for gen in
                (self.lm, *((self.transcriber.lm,) if self.transcriber is not None else ()))]

    def _kernels(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for shapes in self.kernel_shapes() for k in shapes.kernels()))

    def _describe_transcriber(self) -> dict | None:
        if self.transcriber is None:
            return None
        stt = self.transcriber.bundle
        return {"checkpoint": stt.name, "prefix_s": stt.prefix_s, "delay_s": stt.delay_s,
                "pause_heads": stt.pause_heads,
                "encode": "shared" if self.transcriber.shared_encode else "own",
                "weight_bytes": weight_bytes(stt.model)}

    # -- slot table ------------------------------------------------------------------------------
    @property
    def active(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is not None]

    def open(self, sampling: SamplingConfig | None = None, prompt: Prompt | None = None) -> int:
        """Claim a free slot for a new conversation, starting from a persona's `prompt` if given
        (see agent/persona.py). Its state is reset (and the prompt prefilled) at the start of the
        next tick, on the thread that runs ticks, so this is safe to call while a tick runs."""
        sampling = (sampling or self.bundle.sampling).validated()  # errors on the caller's thread
        with self._lock:
            free = [i for i, s in enumerate(self.slots) if s is None]
            if not free:
                raise EngineFull(f"all {self.max_sessions} conversation slots are in use")
            row = free[0]
            self.slots[row] = Slot(sampling, prompt, text=TextDecoder(self._pieces),
                                   words=self.transcriber.new_tracker() if self.transcriber
                                   else None)
            self._pending_reset.add(row)
        return row

    def close(self, row: int) -> None:
        with self._lock:
            self.slots[row] = None

    def end_input(self, row: int) -> None:
        """A translation's source speech is over: the row's next frame carries the end-of-input
        marker, and its frames after that are silence (what they hold is ignored), until the
        model completes the translation (`FrameOut.end`). Call once every input frame is ticked."""
        if not self.translates:
            raise ValueError(f"{self.bundle.name} is a dialogue model: its input has no end "
                             "(end of input is for translation models such as Hibiki-Zero)")
        with self._lock:
            if self.slots[row] is not None:
                self.slots[row].input_ended = True

    def _apply_resets(self) -> None:
        with self._lock:
            rows = [(r, self.slots[r]) for r in self._pending_reset if self.slots[r] is not None]
            self._pending_reset.clear()
        if not rows:
            return
        for row, slot in rows:
            self.lm.reset(row, slot.sampling)
            if slot.prompt is not None:
                try:
                    self._prefill(row, slot.prompt)
                except Exception as e:  # only this conversation ends (the driver ends it)
                    log.exception("persona prompt failed in slot %d", row)
                    slot.error = f"internal error while preparing the persona: {type(e).__name__}"
        reset = self._row_mask([row for row, _ in rows], self._reset_host, self._reset_dev)
        self.mimi.reset_streaming(reset)
        if self.translates:
            self._warm_up_translations(rows, reset)
            self.mimi.reset_streaming(reset)  # the source is encoded from a fresh state
        if self.transcriber is not None:
            try:
                self.transcriber.reset([row for row, _ in rows], reset,
                                       {row: slot.words for row, slot in rows})
            except Exception as e:  # only these conversations end (the driver ends them)
                log.exception("transcriber start failed in slots %s", [row for row, _ in rows])
                for _, slot in rows:
                    slot.error = f"internal error while starting the transcriber: {type(e).__name__}"
        persona_rows = [(row, slot.prompt) for row, slot in rows if slot.prompt is not None]
        if persona_rows:
            # The reference's decoder hears the last prompt frame before the conversation.
            codes = torch.zeros(self.max_sessions, self.cfg.dep_q, 1, dtype=torch.long,
                                device=self.device)
            for row, prompt in persona_rows:
                codes[row, :, 0] = prompt.last_agent_frame
            self.mimi.set_exec_mask(self._row_mask([row for row, _ in persona_rows],
                                                   self._persona_host, self._persona_dev))
            self.mimi.decode(codes)

    def _warm_up_translations(self, rows: list[tuple[int, Slot]], reset: torch.Tensor) -> None:
        """Hibiki-Zero's first steps for the `rows` just reset (their device mask `reset`):
        `max_delay` frames of encoded silence, so that the first source frame is stepped with
        every stream past its delay, as `generate` does."""
        cfg = self.cfg
        if self._silence_codes is None:  # the same for every conversation: encoded once
            self.mimi.set_exec_mask(reset)  # fresh codec states, reset again afterwards
            self._pcm_in.zero_()
            first = rows[0][0]
            self._silence_codes = torch.stack(
                [self.mimi.encode(self._pcm_in)[first, :cfg.num_user_codebooks, 0]
                 for _ in range(cfg.max_delay)], dim=1)
        for t in range(cfg.max_delay):
            self.lm.step(self._silence_codes[:, t].expand(self.max_sessions, -1), reset)
        for _, slot in rows:
            slot.warmup = cfg.max_delay

    def _prefill(self, row: int, prompt: Prompt) -> None:
        """Start `row` from a persona's prompt: all its positions in one causal pass through the
        temporal transformer, or a copy of the KV that pass left for an earlier conversation with
        the same prompt. Writes only the row's state, in place (a captured step graph stays
        valid); the other conversations are untouched."""
        entry = self.prompt_cache.get(prompt.key)
        if entry is None:
            entry = prefill(self.lm.model, row, prompt)
            self.prompt_cache.put(prompt.key, entry)
        else:
            self.lm.model.load_prompt_kv(row, entry.k, entry.v)
        self.lm.finish_prompt(row, entry.h, entry.text_logits, prompt.carry, prompt.length)

    # -- one tick --------------------------------------------------------------------------------
    @torch.no_grad()
    def warm_up(self) -> None:
        """Before the first conversation: the kernel self-check, then a tick's work with no row
        executing, so that Triton compiles, the CUDA graphs (the LM step's, moshi's Mimi's) are
        captured and lazy tables are built now, not while a first caller's frames pile up behind
        them (seconds on a GPU). Rows that do not execute keep their state, and each row is reset
        when a conversation opens anyway. A step graph that cannot be captured falls back to
        eager steps (an error where AGENT_CUDA_GRAPHS=1 forces graphs)."""
        self.check_kernels()
        self.lm.prepare_graph()
        if self.transcriber is not None:
            self.transcriber.lm.prepare_graph()
        idle = self._row_mask([], self._exec_host, self._exec_dev)
        self.mimi.set_exec_mask(idle)
        codes = self.mimi.encode(self._pcm_in)[:, :, 0]
        out = self.lm.step(codes[:, :self.cfg.num_user_codebooks], idle).tokens
        if self.transcriber is not None:
            self.transcriber.step(self._transcriber_codes(codes, idle), idle)
        self.mimi.decode(out[:, 1:].clamp(min=0).unsqueeze(-1))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def check_kernels(self) -> None:
        """Run each Triton kernel this engine will use once on its own shapes against its
        reference (kernels/selfcheck.py). Under AGENT_KERNELS=auto a kernel that fails is
        switched to its reference for this process, with one warning; forced Triton
        (AGENT_KERNELS=triton) makes a failure a KernelCheckError."""
        from duplex_agent.kernels import dispatch, selfcheck
        t0 = time.perf_counter()
        failed = {}
        for shapes in self.kernel_shapes():
            wanted = tuple(k for k in shapes.kernels()
                           if dispatch.runs_triton(self.device, k) and k not in failed)
            failed |= {c.kernel: c for c in selfcheck.check_kernels(shapes, self.device, wanted)
                       if not c.ok}
        failed = list(failed.values())
        self.selfcheck_seconds = round(time.perf_counter() - t0, 3)
        if failed and dispatch.kernel_backend() == "triton":
            raise KernelCheckError("AGENT_KERNELS=triton, but " + "; ".join(
                selfcheck.describe_failure(c) for c in failed))
        for check in failed:
            dispatch.fall_back(check.kernel, check.problem)
            log.warning("%s: running its torch reference instead for this process",
                        selfcheck.describe_failure(check))

    @torch.no_grad()
    def tick(self, frames: dict[int, np.ndarray | torch.Tensor],
             owners: dict[int, Slot] | None = None) -> dict[int, FrameOut]:
        """Advance the slots in `frames` (each a [1920] float32 24 kHz frame) by one step.
        `owners` names the Slot each frame was meant for (as `slots[row]` was when it was taken)."""
        self._apply_resets()
        with self._lock:
            # A conversation may close while its frame is on the way here, and its row may even be
            # reopened by someone else: that frame is skipped (and left out of the results).
            slots = {row: self.slots[row] for row in frames if self.slots[row] is not None
                     and self.slots[row].error is None
                     and (owners is None or owners.get(row) is self.slots[row])}
        frames = {row: frames[row] for row in slots}
        if not frames:
            return {}
        rows = list(frames)
        # Which rows run, and which are past the model's delays (their first frame returns no
        # audio), is known here on the host: no device round trip until the results are read.
        ready_rows = [row for row in rows if slots[row].offset >= self.cfg.max_delay]
        # Translations whose input is over hear silence; the first such frame carries the marker.
        silent = [row for row in rows if slots[row].input_ended]
        marked = [row for row in silent if slots[row].flushed == 0]
        exec_mask = self._row_mask(rows, self._exec_host, self._exec_dev)
        self._pcm_host.zero_()
        for row, pcm in frames.items():
            if row not in silent:
                self._pcm_host[row, 0] = torch.as_tensor(pcm, dtype=torch.float32)
        self._to_device(self._pcm_host, self._pcm_in)

        t0 = self._mark()
        self.mimi.set_exec_mask(exec_mask)
        codes = self.mimi.encode(self._pcm_in)[:, :, 0]  # [B, K] ([B, 32] when shared)
        user = codes[:, :self.cfg.num_user_codebooks]
        if marked:  # the encoder still hears the frame's silence, as in `generate`
            marker = self._row_mask(marked, self._marker_host, self._marker_dev).view(-1, 1)
            user = torch.where(marker, self.cfg.card, user)
        t1 = self._mark()
        out = self.lm.step(user, exec_mask).tokens  # [B, 1 + dep_q]
        t2 = self._mark()
        heard = pause = None
        if self.transcriber is not None:
            heard, pause = self.transcriber.step(self._transcriber_codes(codes, exec_mask),
                                                 exec_mask)
        t3 = self._mark()
        # One sync per tick: the small results are queued to the host first, and the PCM's
        # blocking read (or, with no audio to read, a stream sync) drains them.
        text_ids = self._read_back(out[:, 0], self._text_host)
        if heard is not None:
            heard = self._read_back(heard, self._heard_host)
            if pause is not None:
                pause = self._read_back(pause, self._pause_host)
        pcm_out = None
        if ready_rows:
            ready = self._row_mask(ready_rows, self._ready_host, self._ready_dev)
            self.mimi.set_exec_mask(ready)
            agent_codes = out[:, 1:].clamp(min=0)  # rows not ready hold -2: decode zeros there
            pcm_out = self.mimi.decode(agent_codes.unsqueeze(-1))[:, 0].float().cpu().numpy()
        elif self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        text_ids = text_ids.tolist()
        heard = heard.tolist() if heard is not None else None
        pause = pause.tolist() if pause is not None else None
        if self.profile:
            t4 = self._mark()
            self.last_timings = {"encode": (t1 - t0) * 1e3, "lm": (t2 - t1) * 1e3,
                                 "decode": (t4 - t3) * 1e3}
            if self.transcriber is not None:
                self.last_timings["transcriber"] = (t3 - t2) * 1e3
                self.transcriber_ms.append(self.last_timings["transcriber"])

        results = {}
        for row, slot in slots.items():
            text_id = text_ids[row]
            end = False
            if row in silent:
                slot.flushed += 1
                end = text_id == TEXT_EOS_ID or slot.flushed > FLUSH_LIMIT_FRAMES
            results[row] = FrameOut(
                pcm=pcm_out[row].copy() if row in ready_rows else self._silence.copy(),
                text_id=text_id, text=slot.text.feed(text_id), step=slot.steps, end=end)
            if heard is not None:
                results[row].words = slot.words.feed(self.transcriber.prefix_frames + slot.steps,
                                                     heard[row])
                results[row].pause = pause[row] if pause is not None else None
            slot.steps += 1
        return results

    def _transcriber_codes(self, codes: torch.Tensor, exec_mask: torch.Tensor) -> torch.Tensor:
        """The transcriber's 32 codes of this tick's frames: those of the shared encode, or its
        own Mimi's."""
        if self.transcriber.shared_encode:
            return codes[:, :self.transcriber.codebooks]
        return self.transcriber.encode(self._pcm_in, exec_mask)

    @torch.no_grad()
    def flush_words(self, row: int) -> list[Word]:
        """End of the user's audio (a file's): the transcriber hears its delay's worth of silence,
        as Kyutai's reference ends a file, and the open segment closes. Returns the words that
        completed. Only the transcriber runs: the conversation's agent side is over, and the
        conversation can only be closed afterwards."""
        slot = self.slots[row]
        if self.transcriber is None or slot is None or slot.words is None:
            return []
        self._apply_resets()
        # Between ticks, on the thread that runs them: the tick's exec mask buffers are free.
        only = self._row_mask([row], self._exec_host, self._exec_dev)
        self._pcm_host.zero_()
        self._to_device(self._pcm_host, self._pcm_in)
        words = []
        step = self.transcriber.prefix_frames + slot.steps
        for i in range(self.transcriber.bundle.delay_frames):
            codes = None
            if self.transcriber.shared_encode:
                self.mimi.set_exec_mask(only)
                codes = self.mimi.encode(self._pcm_in)[:, :, 0]
            heard, _ = self.transcriber.step(self._transcriber_codes(codes, only), only)
            words += slot.words.feed(step + i, int(heard[row]))
        return words + slot.words.finish()

    def _host_buffer(self, shape, dtype) -> torch.Tensor:
        """A host buffer, pinned where the device is not the CPU (asynchronous copies)."""
        return torch.zeros(shape, dtype=dtype, pin_memory=self.device.type != "cpu")

    def _buffer_pair(self, shape, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cpu":
            buf = self._host_buffer(shape, dtype)
            return buf, buf
        return (self._host_buffer(shape, dtype),
                torch.zeros(shape, dtype=dtype, device=self.device))

    def _read_back(self, src: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
        """`src` on the host: on CUDA queued into `host` (pinned), complete after the tick's sync;
        on the CPU `src` itself."""
        if self.device.type == "cpu":
            return src
        host.copy_(src, non_blocking=self.device.type == "cuda")
        return host

    @staticmethod
    def _to_device(host: torch.Tensor, dev: torch.Tensor) -> None:
        # Safe to refill `host` next tick: every tick ends by reading its results back (a sync).
        if host is not dev:
            dev.copy_(host, non_blocking=True)

    def _row_mask(self, rows: list[int], host: torch.Tensor, dev: torch.Tensor) -> torch.Tensor:
        host.zero_()
        host[rows] = True
        self._to_device(host, dev)
        return dev

    def _mark(self) -> float:
        if self.profile and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def _kernel_shapes(gen: LMGen, batch: int):
    """The kernel shapes of one model stepped by `gen` (kernels/selfcheck.py)."""
    from duplex_agent.kernels.selfcheck import KernelShapes
    cfg, model = gen.cfg, gen.model
    return KernelShapes(
        batch=batch, dtype=model.out_norm.alpha.dtype, kv_dtype=model.caches[0].k.dtype,
        dim=cfg.dim, heads=cfg.num_heads, context=cfg.context, max_period=cfg.max_period,
        ffn_hidden=cfg.ffn_hidden, dep_dim=cfg.depformer_dim if cfg.dep_q else 0,
        dep_heads=cfg.depformer_num_heads if cfg.dep_q else 0, dep_context=cfg.dep_q,
        dep_ffn_hidden=cfg.depformer_ffn_hidden if cfg.dep_q else 0,
        vocabularies=(cfg.text_card, cfg.card), int8=cfg.quantize, kv_heads=cfg.num_kv_heads,
        dep_kv_heads=cfg.depformer_num_kv_heads if cfg.dep_q else 0,
        rope_interleaved=cfg.rope_interleaved)
