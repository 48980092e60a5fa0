"""pipecat's OpenAI Realtime service, unmodified and with its defaults, as a voice app would use
it, against the server at URL: run with .venv-clients' python by tests/test_realtime_frameworks.py.

    pipecat_agent.py URL TOKEN TURN1.wav TURN2.wav

A Pipeline takes the user's speech as InputAudioRawFrames in real time (24 kHz 16-bit mono WAVs):
the first turn, then, once the agent's audio arrives, the second one while it talks. The
LLMContext has a system and a user message, with its aggregator pair around the service; a sink
counts the agent's audio. Prints one JSON line: what arrived, every ErrorFrame, and whether the
service's receive loop still runs at the end.
"""
import asyncio
import json
import sys
import time
import wave

from loguru import logger
from pipecat.frames.frames import (EndFrame, ErrorFrame, InputAudioRawFrame, LLMRunFrame,
                                   TTSAudioRawFrame, UserStartedSpeakingFrame)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
from pipecat.workers.runner import WorkerRunner

CHUNK_S = 0.02


class AgentAudioSink(FrameProcessor):
    """Where a transport's output would be: counts the agent's audio."""

    def __init__(self):
        super().__init__()
        self.audio_bytes = 0
        self.heard = asyncio.Event()

    async def process_frame(self, frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self.audio_bytes += len(frame.audio)
            self.heard.set()
        await self.push_frame(frame, direction)


class Watcher(BaseObserver):
    """Every ErrorFrame anywhere in the pipeline, and the user turns the service reported."""

    def __init__(self):
        super().__init__(observe_every_push=False)
        self.errors: list[str] = []
        self.user_turns = 0

    async def on_push_frame(self, data: FramePushed):
        if isinstance(data.frame, ErrorFrame):
            self.errors.append(str(data.frame.error))
        elif isinstance(data.frame, UserStartedSpeakingFrame):
            self.user_turns += 1


def read_pcm(path: str) -> bytes:
    with wave.open(path, "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        return w.readframes(w.getnframes())


async def speak(worker: PipelineWorker, pcm: bytes) -> None:
    """20 ms InputAudioRawFrames on an absolute real-time schedule."""
    n, t0 = int(24000 * CHUNK_S) * 2, time.monotonic()
    for i, k in enumerate(range(0, len(pcm), n)):
        await asyncio.sleep(max(0.0, t0 + i * CHUNK_S - time.monotonic()))
        await worker.queue_frame(InputAudioRawFrame(audio=pcm[k:k + n], sample_rate=24000,
                                                    num_channels=1))


async def main(url: str, token: str, turn1: str, turn2: str) -> dict:
    ws_url = url.replace("http", "ws", 1)
    llm = OpenAIRealtimeLLMService(base_url=f"{ws_url}/v1/realtime", api_key=token)
    context = LLMContext([{"role": "system", "content": "You are a helpful assistant."},
                          {"role": "user", "content": "Hello!"}])
    user_aggregator, assistant_aggregator = LLMContextAggregatorPair(context)
    sink, watcher = AgentAudioSink(), Watcher()
    worker = PipelineWorker(Pipeline([user_aggregator, llm, sink, assistant_aggregator]),
                            observers=[watcher])
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    silence = bytes(int(24000 * 0.5) * 2)
    await worker.queue_frames([LLMRunFrame()])
    await speak(worker, read_pcm(turn1) + silence)
    async with asyncio.timeout(30):
        await sink.heard.wait()
    await speak(worker, read_pcm(turn2) + silence)  # over the agent, which talks all the time
    receive_loop_running = llm._receive_task is not None and not llm._receive_task.done()
    await worker.queue_frame(EndFrame())
    async with asyncio.timeout(30):
        await running
    return {"agent_audio_ms": sink.audio_bytes // 48, "errors": watcher.errors,
            "user_turns": watcher.user_turns, "receive_loop_running": receive_loop_running}


if __name__ == "__main__":
    logger.remove()
    logger.add(sys.stderr, level="INFO")
    print(json.dumps(asyncio.run(main(*sys.argv[1:5]))), flush=True)
