"""The transcriber: Kyutai's streaming speech-to-text model as one more row per conversation in the
engine's tick, giving the user's words and, with pause heads, semantic turn ends.

Per tick, for each conversation: the user's frame as 32 Mimi codebooks goes in, one greedy text
token (and the pause heads' probabilities) comes out. The model is a `MoshiLM` with no depformer
stepped by the same `LMGen` as the dialogue model (its own static KV cache, B rows, one CUDA graph),
so its semantics are moshi's `LMGen`: step 0 sees the initial tokens, never frame 0's codes.

Kyutai's reference (`scripts/stt_from_file_pytorch.py` in delayed-streams-modeling) runs
`ceil(prefix_s x 12.5)` frames of silence through Mimi and the model before the audio, and
`ceil(delay_s x 12.5)` after it. Here the prefix happens when the conversation's row is reset:
the Mimi rows encode the prefix's silence, and the model's row gets the K/V the prefix leaves,
computed once (greedy decoding of a fixed input is the same for every
conversation) and copied in. The live stream is not delayed beyond those Mimi calls (one per
prefix frame, batched over the starting rows, when the tick begins). `Engine.flush_words` runs
the delay-worth of silence at the end of a file.

Mimi: when the transcriber's Mimi has the dialogue Mimi's weights and no silence prefix, one
32-codebook encode serves both (residual VQ is prefix-consistent: its first 8 codes are the
8-codebook encode). With a prefix, the transcriber's Mimi has heard silence the dialogue's has not,
so their streaming states differ: it encodes on its own (with the same weight tensors).

Words follow the segmentation of Kyutai's script: an end-of-padding token (0) opens a segment at
the next step; the text tokens of a segment (ids above the pad id 3) are decoded together and
split on spaces, each word of a multi-word segment taking as many steps as it has tokens. A segment
closes at the next end-of-padding token, or after 12 steps (about a second: the script's cut of its
last segment), so the last word of a turn comes out without waiting for the next word. Text
tokens after those 12 steps and before the next end-of-padding token are dropped, as the script
drops them from its last segment (it keeps them in an earlier one; a trained model writes none:
it opens each word with an end-of-padding token). Times
are seconds of the conversation: step x 0.08 less the prefix and the delay, never below 0 (the
script subtracts the prefix rounded down to whole seconds: 1 s for 13 frames, where we subtract
1.04 s).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from duplex_agent.agent.config import FRAME_RATE, FRAME_SIZE, TEXT_EOS_ID, SamplingConfig
from duplex_agent.agent.lm_gen import LMGen
from duplex_agent.checkpoints.stt import PAUSE_HEAD, TranscriberBundle

# The script's cut of its last segment: the tokens of int(12.5) steps, about a second.
SEGMENT_STEPS = int(FRAME_RATE)


@dataclass(frozen=True)
class Word:
    """A word the user said: its text and where it is, in seconds of the conversation."""
    text: str
    start: float
    end: float

    def to_json(self) -> dict:
        return {"text": self.text, "start": round(self.start, 3), "end": round(self.end, 3)}


class WordTracker:
    """One conversation's text tokens, step by step, into words (see the module docstring)."""

    def __init__(self, tokenizer, pad_id: int, epad_id: int, prefix_frames: int, delay_s: float):
        self._tokenizer = tokenizer
        self._pad, self._epad = pad_id, epad_id
        self._offset_steps = prefix_frames
        self._delay_s = delay_s
        self._start: int | None = None  # the open segment's first step
        self._tokens: list[tuple[int, int]] = []  # its (step, id): text tokens, end-of-sequence
        self.steps = 0  # steps fed

    def feed(self, step: int, token: int) -> list[Word]:
        """The text token of `step` (-2 when the model produced none); returns words that
        became complete."""
        self.steps = step + 1
        words = []
        if self._start is not None and step - self._start >= SEGMENT_STEPS:
            words = self._close(self._start + SEGMENT_STEPS)
        if token == self._epad:
            if self._start is not None:
                words += self._close(step)
            self._start = step + 1
        elif (token > self._pad or token == TEXT_EOS_ID) and self._start is not None:
            self._tokens.append((step, token))
        return words

    def finish(self) -> list[Word]:
        """End of the audio: the open segment ends at its first end-of-sequence token, else one
        second after it opened or at the last step, as the script ends its last segment."""
        if self._start is None:
            return []
        eos = [step for step, token in self._tokens if token == TEXT_EOS_ID]
        return self._close(eos[0] if eos else min(self.steps, self._start + SEGMENT_STEPS))

    def _close(self, end: float) -> list[Word]:
        start = self._start
        ids = [token for step, token in self._tokens if step < end and token > self._pad]
        self._start, self._tokens = None, []
        text = self._tokenizer.decode(ids) if ids else ""
        parts = text.split()
        words = []
        for part in parts[:-1]:  # several words in one segment: one step per token each
            n = len(self._tokenizer.encode(part))
            words.append(Word(part, self._time(start), self._time(start + n)))
            start += n
        if parts:
            words.append(Word(parts[-1], self._time(start), self._time(end)))
        return words

    def _time(self, step: float) -> float:
        return max(0.0, (step - self._offset_steps) / FRAME_RATE - self._delay_s)


@dataclass
class _Prefix:
    """What the silence prefix leaves in a model row: K/V of its positions, the row's token ring
    and the tokens it produced (the same for every conversation, so computed once)."""
    k: torch.Tensor
    v: torch.Tensor
    ring: torch.Tensor
    tokens: list[int]


class Transcriber:
    """B rows of the transcriber next to the engine's B dialogue rows (row i = slot i)."""

    def __init__(self, bundle: TranscriberBundle, batch: int, encode_once: bool = True):
        self.bundle = bundle
        self.cfg = bundle.config
        self.lm = LMGen(bundle.model, batch)
        self.device = self.lm.offsets.device
        # One encode for both models: same weights, and no prefix to set the states apart.
        self.shared_encode = encode_once and bundle.same_mimi and bundle.prefix_frames == 0
        self.mimi = None if self.shared_encode else bundle.mimi
        if self.mimi is not None:
            self.mimi.streaming_forever(batch)
        self.prefix_frames = bundle.prefix_frames
        self._prefix: _Prefix | None = None
        self._greedy = SamplingConfig(greedy=True, seed=0)  # Kyutai decodes at temperature 0
        self._silence = torch.zeros(batch, 1, FRAME_SIZE, device=self.device)

    @property
    def codebooks(self) -> int:
        return self.cfg.n_q

    def new_tracker(self) -> WordTracker:
        return WordTracker(self.bundle.tokenizer, self.cfg.text_pad_id, self.cfg.text_epad_id,
                           self.prefix_frames, self.bundle.delay_s)

    # -- a conversation starts -------------------------------------------------------------------
    @torch.no_grad()
    def reset(self, rows: list[int], mask: torch.Tensor, trackers: dict) -> None:
        """Start `rows` (`mask`: the same rows as a [B] bool tensor on the device): reset their
        model and Mimi state, and run the silence prefix into them. `trackers[row]` (each a new
        WordTracker) get the prefix's tokens."""
        for row in rows:
            self.lm.reset(row, self._greedy)
        if self.mimi is not None:
            self.mimi.reset_streaming(mask)
            if self.prefix_frames:
                # Every starting row's prefix at once, one frame per call: on CUDA moshi's Mimi
                # replays a graph captured for one frame (and the reference encodes frame by frame).
                self.mimi.set_exec_mask(mask)
                codes = torch.cat([self.mimi.encode(self._silence) for _ in
                                   range(self.prefix_frames)], dim=-1)
        if not self.prefix_frames:
            return
        if self._prefix is None:
            self._prefix = self._run_prefix(rows[0], codes)
        for row in rows:
            self.lm.model.load_prompt_kv(row, self._prefix.k, self._prefix.v)
            self.lm.cache[row] = self._prefix.ring.to(self.device)
            self.lm.offsets[row] = self.prefix_frames
            for step, token in enumerate(self._prefix.tokens):
                trackers[row].feed(step, token)

    def _run_prefix(self, row: int, codes: torch.Tensor) -> _Prefix:
        """Step the prefix in `row` (the rest of the batch does not execute), as the reference
        steps it, and keep what it leaves."""
        only = torch.zeros(self.lm.offsets.shape[0], dtype=torch.bool, device=self.device)
        only[row] = True
        tokens = []
        for t in range(self.prefix_frames):
            out = self.lm.step(codes[:, :, t], only)
            tokens.append(int(out.tokens[row, 0]))
        k, v = self.lm.model.prompt_kv(row, self.prefix_frames)
        return _Prefix(k, v, self.lm.cache[row].cpu().clone(), tokens)

    # -- one tick --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, pcm: torch.Tensor, exec_mask: torch.Tensor) -> torch.Tensor:
        """The user's frames [B, 1, 1920] -> codes [B, 32] with the transcriber's own Mimi."""
        self.mimi.set_exec_mask(exec_mask)
        return self.mimi.encode(pcm)[:, :, 0]

    @torch.no_grad()
    def step(self, codes: torch.Tensor, exec_mask: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """codes [B, 32] -> (text tokens [B], pause probabilities [B] or None). The pause
        probability is head 2's: no voice activity over the next 2 seconds."""
        out = self.lm.step(codes, exec_mask)
        pause = None if out.extra_heads is None or not self.bundle.pause_heads else \
            out.extra_heads[:, PAUSE_HEAD, 0]
        return out.tokens[:, 0], pause


__all__ = ["SEGMENT_STEPS", "Transcriber", "Word", "WordTracker"]
