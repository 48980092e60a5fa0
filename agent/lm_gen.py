"""Streaming generation: one call per 80 ms frame, B independent rows (conversations).

Per step, for each executing row: the user's `num_user_codebooks` Mimi codes go in; the temporal
transformer predicts a text token; the depformer predicts the agent's `dep_q` audio codes (Moshi 8
and 8, Hibiki-Zero 16 and 16; the transcriber hears 32 and generates none). Streams carry the
reference's acoustic delays, so the model reads a small ring of past tokens (`cache`,
[B, num_codebooks, max_delay + 2]) and the returned frame is re-aligned (undelayed): text and
agent codes of one instant.

Semantics follow the moshi library's `LMGen` with `support_out_of_sync=True`: every row has its
own offset; a row with `exec_mask` False does not advance and its state is unchanged; a row that
is not yet past the delays returns -2 ("ungenerated") for its frame.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from duplex_agent.agent.config import SamplingConfig
from duplex_agent.agent.model import MoshiLM
from duplex_agent.agent.sampling import BatchSampler

UNGENERATED = -2

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    tokens: torch.Tensor  # [B, 1 + dep_q]: text, agent codes; -2 where not available
    text_logits: torch.Tensor | None = None  # [B, text_card], when asked for
    audio_logits: torch.Tensor | None = None  # [B, dep_q, card], when asked for
    extra_heads: torch.Tensor | None = None  # [B, heads, extra_heads_dim] softmaxed, if the model has any


class LMGen:
    """B rows of streaming generation over one model. Every tensor the step touches is allocated
    here once (static shapes and addresses), so on CUDA the step is captured as one CUDA graph and
    replayed each tick; `AGENT_CUDA_GRAPHS=0` runs it eagerly instead."""

    def __init__(self, model: MoshiLM, batch: int, cuda_graph: bool | None = None,
                 kv_dtype: torch.dtype | None = None):
        cfg = self.cfg = model.cfg
        self.model = model
        device = model.text_linear.weight.device
        model.setup_caches(batch, kv_dtype)
        self.ring = cfg.max_delay + 2
        self.cache = torch.full((batch, cfg.num_codebooks, self.ring), UNGENERATED,
                                dtype=torch.long, device=device)
        self.offsets = torch.zeros(batch, dtype=torch.long, device=device)
        self.delays = torch.tensor(cfg.delays, dtype=torch.long, device=device)
        self.initial = torch.tensor([cfg.text_init_id] + [cfg.audio_init_id] * cfg.n_q,
                                    dtype=torch.long, device=device).view(1, -1)
        self.text_sampler = BatchSampler(batch, cfg.text_card, device)
        self.audio_sampler = BatchSampler(batch, cfg.card, device)
        # Static inputs and output of one step.
        self._user_codes = torch.zeros(batch, cfg.num_user_codebooks, dtype=torch.long, device=device)
        self._exec_mask = torch.zeros(batch, dtype=torch.bool, device=device)
        self._out = torch.full((batch, 1 + cfg.dep_q), UNGENERATED, dtype=torch.long, device=device)
        self._heads = (torch.zeros(batch, cfg.extra_heads_num_heads, cfg.extra_heads_dim,
                                   dtype=torch.float32, device=device)
                       if cfg.extra_heads_num_heads else None)
        setting = os.environ.get("AGENT_CUDA_GRAPHS", "auto").strip().lower()
        if cuda_graph is None:
            cuda_graph = setting != "0"
        self.cuda_graph = cuda_graph and device.type == "cuda"
        self.graph_forced = setting == "1"  # a failed capture is then an error, not a fallback
        self.graph_fallback: str | None = None  # why the step runs eagerly after all
        self._graph = None

    def reset(self, row: int, sampling: SamplingConfig = SamplingConfig()) -> int:
        """Start a new conversation in `row`; returns the seed used. Nothing of the row's previous
        conversation stays reachable: offsets restart at 0, and KV slots are masked until rewritten.
        Only writes into the static tensors, so a captured graph stays valid."""
        sampling = sampling.validated()
        self.offsets[row] = 0
        self.cache[row] = UNGENERATED
        seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(6), "little")
        self.text_sampler.configure(row, seed, sampling.temp_text, sampling.top_k_text,
                                    sampling.greedy)
        self.audio_sampler.configure(row, seed, sampling.temp_audio, sampling.top_k_audio,
                                     sampling.greedy)
        return seed

    @torch.no_grad()
    def finish_prompt(self, row: int, h: torch.Tensor, text_logits: torch.Tensor,
                      carry: torch.Tensor, length: int) -> None:
        """After a prompt of `length` forced positions was prefilled into `row`'s KV cache (call
        `reset` first): sample what the last of them predicts, the text token and the first agent
        codebook of column `length` (as the reference's first live step does, with its own counter
        and seed), take the rest of that column from `carry` [num_codebooks] (the prompt's
        delayed streams), and continue the row at offset `length`. `h` [1, dim] and `text_logits`
        [1, text_card] are the last position's. Writes only the row's state, in place."""
        B, device = self.offsets.shape[0], self.offsets.device
        only = torch.zeros(B, dtype=torch.bool, device=device)
        only[row] = True
        counter = torch.full((B,), length - 1, dtype=torch.long, device=device)
        logits = torch.zeros(B, self.cfg.text_card, dtype=text_logits.dtype, device=device)
        logits[row] = text_logits[0]
        text = self.text_sampler.sample(logits, counter, stream=0)
        hidden = torch.zeros(B, h.shape[-1], dtype=h.dtype, device=device)
        hidden[row] = h[0]
        audio = self.audio_sampler.sample(self.model.forward_depformer(0, hidden, text, only),
                                          counter, stream=1)
        column = carry.to(device).clone()
        column[0], column[1] = text[row], audio[row]
        self.cache[row] = UNGENERATED
        self.cache[row, :, length % self.ring] = column
        self.offsets[row] = length

    @torch.no_grad()
    def step(self, user_codes: torch.Tensor, exec_mask: torch.Tensor,
             return_logits: bool = False) -> StepOutput:
        """user_codes [B, num_user_codebooks] (rows not executing may hold anything), exec_mask
        [B] bool. With CUDA graphs, a step before `prepare_graph` captures the graph through it
        (with its fallback to eager steps); steps replay the graph once there is one."""
        self._user_codes.copy_(user_codes)
        self._exec_mask.copy_(exec_mask)
        if return_logits:  # logits are for tests and tools: always eager
            text_logits, audio_logits = self._step(return_logits=True)
            return StepOutput(self._out.clone(), text_logits, audio_logits, self._heads_out())
        if self.cuda_graph and self._graph is None:
            self.prepare_graph()
        if self._graph is not None:
            self._graph.replay()
        else:
            self._step()
        return StepOutput(self._out.clone(), extra_heads=self._heads_out())

    def _heads_out(self) -> torch.Tensor | None:
        return None if self._heads is None else self._heads.clone()

    def prepare_graph(self) -> None:
        """Capture the step graph now (the engine's warm-up). If capture fails on this device,
        steps run eagerly from now on, with a warning, unless AGENT_CUDA_GRAPHS=1 forced graphs."""
        if not self.cuda_graph or self._graph is not None:
            return
        try:
            self._capture()
        except Exception as e:
            if self.graph_forced:
                raise
            self._graph = None
            self.cuda_graph = False
            self.graph_fallback = f"capture failed: {type(e).__name__}: {str(e).strip()[:300]}"
            log.warning("the LM step's CUDA graph could not be captured (%s); running it eagerly",
                        self.graph_fallback)

    def _capture(self) -> None:
        """Warm up (Triton compiles, lazily built tables) and capture `_step` with no row
        executing: such a step changes no state, so capturing is invisible to the conversations."""
        exec_mask = self._exec_mask.clone()
        self._exec_mask.zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self._graph = graph
        self._exec_mask.copy_(exec_mask)

    def _step(self, return_logits: bool = False):
        """One step on the static tensors. No host sync and no data-dependent Python control flow:
        this is what the CUDA graph records."""
        cfg, model, CT = self.cfg, self.model, self.ring
        n_gen = 1 + cfg.dep_q
        exec_mask, offsets = self._exec_mask, self.offsets
        exec_col = exec_mask.view(-1, 1)

        # 1. user codes enter the ring at their delayed positions.
        user_pos = (offsets.view(-1, 1) + self.delays[n_gen:].view(1, -1)) % CT
        user_view = self.cache[:, n_gen:]
        old = user_view.gather(-1, user_pos.unsqueeze(-1)).squeeze(-1)
        user_view.scatter_(-1, user_pos.unsqueeze(-1),
                           torch.where(exec_col, self._user_codes, old).unsqueeze(-1))

        # 2. model input: this offset's column, initial tokens where the delay is not yet met.
        col = (offsets % CT).view(-1, 1, 1).expand(-1, cfg.num_codebooks, 1)
        tokens = self.cache.gather(-1, col).squeeze(-1)
        is_init = (offsets.view(-1, 1) <= self.delays.view(1, -1)) | ~exec_col
        tokens = torch.where(is_init, self.initial, tokens)

        # 3. temporal transformer, text sample, dep_q depformer sub-steps. The step number is the
        # sampling counter: a row's draws depend on its own progress only.
        h, text_logits = model.forward_temporal(tokens, offsets, exec_mask)
        text = self.text_sampler.sample(text_logits, offsets, stream=0)
        if self._heads is not None:  # the reference's step_with_extra_heads
            self._heads.copy_(torch.stack([torch.softmax(head(h).float(), dim=-1)
                                           for head in model.extra_heads], dim=1))
        prev, audio, audio_logits = text, [], []
        for step in range(cfg.dep_q):
            logits = model.forward_depformer(step, h, prev, exec_mask)
            prev = self.audio_sampler.sample(logits, offsets, stream=1 + step)
            audio.append(prev)
            if return_logits:
                audio_logits.append(logits.float())

        # 4. generated tokens enter the ring at offset + 1.
        offsets.add_(exec_mask.long())
        gen_pos = (offsets % CT).view(-1, 1).expand(-1, n_gen)
        generated = torch.stack([text] + audio, dim=1)
        gen_view = self.cache[:, :n_gen]
        old = gen_view.gather(-1, gen_pos.unsqueeze(-1)).squeeze(-1)
        gen_view.scatter_(-1, gen_pos.unsqueeze(-1), torch.where(exec_col, generated, old).unsqueeze(-1))

        # 5. undelayed output frame.
        out_pos = (offsets.view(-1, 1) - cfg.max_delay + self.delays[:n_gen].view(1, -1)) % CT
        out = gen_view.gather(-1, out_pos.unsqueeze(-1)).squeeze(-1)
        not_ready = (offsets <= cfg.max_delay) | ~exec_mask
        self._out.copy_(torch.where(not_ready.view(-1, 1), UNGENERATED, out))
        if return_logits:
            return text_logits.float(), torch.stack(audio_logits, dim=1) if audio_logits else None
        return None
