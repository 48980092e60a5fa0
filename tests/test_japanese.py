"""J-Moshi-style text: a Japanese SentencePiece tokenizer with byte fallback reaches transcripts as
correct UTF-8, through the real decoding path of `file` mode and of the websocket.

The tiny model's text choices are random, so these tests script them: the text sampler's output
(only the text stream; everything after it is the real engine) is replaced by the token ids of a
Japanese sentence, with pads between them and inside one character's byte pieces, as a model that
speaks over several frames would emit them.
"""
from __future__ import annotations

import asyncio
import io
import json

import numpy as np
import pytest
import sentencepiece
import soundfile
import torch
from aiohttp import web
from moshi.models import loaders
from safetensors.torch import save_file

from duplex_agent.agent.config import FRAME_SIZE, SAMPLE_RATE, TEXT_PAD_ID, LMConfig
from duplex_agent.agent.text import PieceTable, TextDecoder
from duplex_agent.checkpoints.kyutai_format import moshi_to_disk
from duplex_agent.checkpoints.tiny_random import (build_tiny_tokenizer, synthetic_audio,
                                                  tiny_mimi_config, tiny_mimi_state)

CORPUS = """\
こんにちは、今日はいい天気ですね。
はい、とても暖かくて気持ちがいいです。
週末は何をする予定ですか？
友達と一緒に京都へ行こうと思っています。
それは楽しそうですね。お寺を見に行くんですか？
ええ、清水寺と金閣寺を見たいです。
私は東京に住んでいますが、京都にはまだ行ったことがありません。
ぜひ一度行ってみてください。紅葉の季節が一番きれいですよ。
ありがとうございます。考えてみます。
ところで、最近どんな音楽を聴いていますか？
ジャズをよく聴きます。夜に聴くと落ち着きます。
お昼ご飯はもう食べましたか？
まだです。一緒にラーメンを食べに行きませんか？
すみません、もう一度言ってもらえますか？
明日は雨が降るそうです。傘を忘れないでください。
じゃあ、また明日。おやすみなさい。
"""
# 鰻 and 世界 are not in the corpus: byte-fallback pieces, three per character; "Hello" too.
SENTENCE = "鰻を食べに京都へ行きます。 Hello 世界"
VOCAB = 384  # 4 specials + 256 byte pieces + the corpus's pieces


@pytest.fixture(scope="module")
def tokenizer_bytes() -> bytes:
    writer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 3), model_writer=writer, vocab_size=VOCAB,
        model_type="unigram", character_coverage=0.98, byte_fallback=True, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1, minloglevel=2)
    return writer.getvalue()


@pytest.fixture(scope="module")
def sp(tokenizer_bytes):
    return sentencepiece.SentencePieceProcessor(model_proto=tokenizer_bytes)


@pytest.fixture(scope="module")
def script(sp) -> tuple[list[int], str]:
    """Text ids as the model would emit them, one per frame: the sentence's pieces with pads
    between words and between the bytes of one character; and the text they spell."""
    ids = sp.encode(SENTENCE)
    assert sum(sp.is_byte(i) for i in ids) >= 9 and any(sp.id_to_piece(i) == "\u2581" for i in ids)
    frames = [TEXT_PAD_ID, TEXT_PAD_ID]
    for n, i in enumerate(ids):
        frames.append(i)
        if n % 4 == 1:  # lands inside 鰻's bytes (ids 1..3), and elsewhere
            frames.append(TEXT_PAD_ID)
    assert frames[3:6] == [ids[1], TEXT_PAD_ID, ids[2]] and sp.is_byte(ids[1])
    return frames, sp.decode(ids)


@pytest.fixture(scope="module")
def ja_checkpoint(tmp_path_factory, tokenizer_bytes, sp):
    """A Kyutai-layout directory: the tiny architecture with a text vocabulary as large as the
    Japanese tokenizer, random weights, the tiny Mimi."""
    path = tmp_path_factory.mktemp("j-moshi")
    cfg = LMConfig.tiny()
    kwargs = cfg.to_moshi_lm_kwargs() | {"text_card": sp.get_piece_size()}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        lm = loaders.get_moshi_lm(None, lm_kwargs=kwargs, dtype=torch.float32, device="cpu")
    save_file(moshi_to_disk({k: v.detach() for k, v in lm.state_dict().items()}),
              str(path / "model.safetensors"))
    save_file(tiny_mimi_state(), str(path / "mimi.safetensors"))
    (path / "mimi_config.json").write_text(json.dumps(tiny_mimi_config()))
    (path / "tokenizer_ja.model").write_bytes(tokenizer_bytes)
    (path / "config.json").write_text(json.dumps(kwargs | {
        "moshi_name": "model.safetensors", "mimi_name": "mimi.safetensors",
        "mimi_config_name": "mimi_config.json", "tokenizer_name": "tokenizer_ja.model"}))
    return path


@pytest.fixture
def scripted_text(monkeypatch, script):
    """The text stream's draws follow the script, by each conversation's own step counter."""
    from duplex_agent.agent.sampling import BatchSampler
    frames, _ = script
    table = torch.tensor(frames + [TEXT_PAD_ID])
    real = BatchSampler.sample

    def sample(self, logits, counter, stream):
        tokens = real(self, logits, counter, stream)
        if stream != 0:
            return tokens
        return table.to(tokens.device)[counter.clamp(max=len(frames))]
    monkeypatch.setattr(BatchSampler, "sample", sample)


def decode_all(table: PieceTable, ids) -> list[str | None]:
    decoder = TextDecoder(table)
    return [decoder.feed(i) for i in ids]


# -- the decoder -----------------------------------------------------------------------------------

def test_decoder_emits_whole_characters(sp, script):
    frames, expected = script
    table = PieceTable(sp, {TEXT_PAD_ID, 0})
    out = decode_all(table, frames)
    assert "".join(t for t in out if t).strip() == expected == SENTENCE
    # 鰻's three byte pieces (with a pad inside) give nothing until the last, which gives 鰻.
    first = next(n for n, i in enumerate(frames) if sp.is_byte(i))
    assert out[first:first + 3] == [None, None, None] and out[first + 3] == "鰻"
    for text in out:
        assert text is None or "\ufffd" not in text
    # Decoders are per conversation: another one's bytes do not mix in.
    a, b = TextDecoder(table), TextDecoder(table)
    e3, x81, x93 = (sp.piece_to_id(f"<0x{v:02X}>") for v in (0xE3, 0x81, 0x93))
    assert (a.feed(e3), b.feed(e3), a.feed(x81), b.feed(x81), a.feed(x93), b.feed(x93)) == (
        None, None, None, None, "こ", "こ")


def test_broken_bytes_are_visible_not_mojibake(sp):
    table = PieceTable(sp, {TEXT_PAD_ID, 0})
    e3, x81 = sp.piece_to_id("<0xE3>"), sp.piece_to_id("<0x81>")
    kyo = sp.piece_to_id("京")
    # An unfinished character followed by ordinary text: one U+FFFD, then the text.
    assert decode_all(table, [e3, x81, kyo]) == [None, None, "\ufffd京"]
    # A stray continuation byte.
    assert decode_all(table, [x81]) == ["\ufffd"]


def test_ordinary_pieces_unchanged():
    """For a tokenizer without byte pieces (tiny-random's, Moshi's English one), every id gives
    exactly what Engine.piece gave before: the piece with ▁ as a space; None for pad, end-of-pad
    and control pieces."""
    sp = build_tiny_tokenizer()
    decoder = TextDecoder(PieceTable(sp, {TEXT_PAD_ID, 0}))
    for i in range(-2, sp.get_piece_size()):
        before = (None if i < 0 or i in (TEXT_PAD_ID, 0) or sp.is_control(i)
                  else sp.id_to_piece(i).replace("\u2581", " "))
        assert decoder.feed(i) == before, i


# -- through the transports ------------------------------------------------------------------------

def test_file_mode_transcript(ja_checkpoint, script, scripted_text, tmp_path, capsys):
    from duplex_agent.cli import main
    frames, expected = script
    wav = tmp_path / "in.wav"
    soundfile.write(wav, synthetic_audio((len(frames) + 6) * FRAME_SIZE, seed=1).numpy(),
                    SAMPLE_RATE)
    out, transcript = tmp_path / "out.wav", tmp_path / "out.json"
    assert main(["file", str(wav), str(out), "--transcript", str(transcript),
                 "--checkpoint", str(ja_checkpoint), "--device", "cpu", "--greedy"]) == 0
    raw = transcript.read_bytes()
    assert "鰻を食べに".encode() in raw  # UTF-8 as is, readable, not \u escapes
    data = json.loads(raw.decode("utf-8"))
    assert data["text"] == expected
    pieces = [p["text"] for p in data["pieces"]]
    assert {"鰻", "世", "界", " "} <= set(pieces)  # byte-fallback characters, whole; ▁ as a space
    assert all("\ufffd" not in p for p in pieces)
    assert expected in capsys.readouterr().out  # printed as it came, too


async def test_websocket_text_messages(ja_checkpoint, script, scripted_text, tmp_path, session):
    from duplex_agent.agent.api import Agent
    from duplex_agent.streams.server import create_app
    from tests.moshi_client import Client
    frames, expected = script
    agent = Agent.load(str(ja_checkpoint), device="cpu", max_conversations=1)
    runner = web.AppRunner(create_app(agent, static_dir=tmp_path))
    try:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        client = await Client.connect(session, f"http://127.0.0.1:{runner.addresses[0][1]}")
        pcm = synthetic_audio((len(frames) + 6) * FRAME_SIZE, seed=2).numpy()
        for i in range(0, len(pcm), FRAME_SIZE):  # twice real time: well inside the 2 s backlog
            await client.ws.send_bytes(b"\x01" + client.writer.append_pcm(pcm[i:i + FRAME_SIZE]))
            await asyncio.sleep(FRAME_SIZE / SAMPLE_RATE / 2)
        assert await client.wait_for(lambda: "".join(client.text).strip() == expected, timeout=15)
        # Each 0x02 message is whole UTF-8 (Client decodes it strictly) and whole characters.
        assert "鰻" in client.text and all("\ufffd" not in t for t in client.text)
        assert not client.errors
        await client.close()
    finally:
        await runner.cleanup()
        agent.close()
    assert np.concatenate(client.pcm).size > 0
