"""`run_agent.py file` end to end, through the real command line, on espeak-ng speech."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

ROOT = Path(__file__).resolve().parents[1]
SENTENCE = "Hello, this is a test of the full duplex dialogue agent. Can you hear me?"


def run_agent(*args, env_extra=None, timeout=300):
    env = dict(os.environ, NO_TORCH_COMPILE="1", **(env_extra or {}))
    return subprocess.run([sys.executable, str(ROOT / "run_agent.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    """espeak-ng speech, resampled by sox to 44.1 kHz stereo so resampling and mixdown are used."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.skip("espeak-ng and sox are needed (bash scripts/setup.sh test installs them)")
    d = tmp_path_factory.mktemp("speech")
    raw, wav = d / "raw.wav", d / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(raw), SENTENCE], check=True)
    subprocess.run(["sox", str(raw), "-r", "44100", "-c", "2", str(wav), "pad", "0.3", "0.3"],
                   check=True)
    return wav


def check_outputs(inp: Path, out: Path, transcript: Path) -> tuple[np.ndarray, dict]:
    info_in = soundfile.info(str(inp))
    audio, rate = soundfile.read(str(out), dtype="float32")
    assert rate == 24_000 and audio.ndim == 1
    assert abs(len(audio) / rate - info_in.duration) < 2 / rate
    # Silence for the first frame (the model lags by one step), then the agent's voice.
    assert np.all(audio[:1920] == 0)
    assert np.sqrt(np.mean(audio[1920:] ** 2)) > 1e-3
    data = json.loads(transcript.read_text())
    assert set(data) == {"text", "pieces"}
    assert data["pieces"], "the tiny model always says something over 5 s"
    for p in data["pieces"]:
        assert set(p) == {"text", "start", "end"}
        assert 0 <= p["start"] < p["end"] <= info_in.duration + 0.08
        assert p["text"]
    assert data["text"] == "".join(p["text"] for p in data["pieces"]).strip()
    return audio, data


def test_tiny_random(speech, tmp_path):
    out, tr = tmp_path / "reply.wav", tmp_path / "reply.json"
    r = run_agent("file", speech, out, "--transcript", tr, "--checkpoint", "tiny-random",
                  "--seed", "3", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "tiny-random" in r.stderr  # announced as the smoke model
    check_outputs(speech, out, tr)


def test_local_directory_equals_builtin(speech, tmp_path):
    """A local checkpoint directory (Kyutai layout + moshi config.json) loads through the real
    loader, and with the same weights and seed gives exactly the built-in model's output."""
    from duplex_agent.checkpoints.tiny_random import write_checkpoint_dir
    ckpt = write_checkpoint_dir(tmp_path / "ckpt")
    out_dir, tr_dir = tmp_path / "dir.wav", tmp_path / "dir.json"
    r = run_agent("file", speech, out_dir, "--transcript", tr_dir, "--checkpoint", ckpt,
                  "--greedy")
    assert r.returncode == 0, r.stderr
    audio_dir, data_dir = check_outputs(speech, out_dir, tr_dir)
    out_b, tr_b = tmp_path / "builtin.wav", tmp_path / "builtin.json"
    r = run_agent("file", speech, out_b, "--transcript", tr_b, "--checkpoint", "tiny-random",
                  "--greedy")
    assert r.returncode == 0, r.stderr
    audio_b, data_b = check_outputs(speech, out_b, tr_b)
    assert np.array_equal(audio_dir, audio_b)
    assert data_dir == data_b


@pytest.mark.parametrize("case", ["missing", "empty", "not_audio", "directory"])
def test_bad_input_is_one_line_error(case, tmp_path):
    path = tmp_path / "in.wav"
    if case == "empty":
        soundfile.write(str(path), np.zeros(0, dtype=np.float32), 16000)
    elif case == "not_audio":
        path.write_text("this is not audio\n" * 100)
    elif case == "directory":
        path.mkdir()
    r = run_agent("file", path, tmp_path / "out.wav", "--checkpoint", "tiny-random")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], r.stderr
    assert not (tmp_path / "out.wav").exists()


def test_default_checkpoint_offline_says_what_to_do(speech, tmp_path):
    r = run_agent("file", speech, tmp_path / "out.wav",
                  env_extra={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "kyutai/moshiko-pytorch-bf16" in r.stderr
    assert "--checkpoint tiny-random" in r.stderr and "local directory" in r.stderr


def test_known_short_name_is_its_hub_repo(speech, tmp_path):
    """`--checkpoint moshiko` means kyutai/moshiko-pytorch-bf16 (offline here: the same answer)."""
    r = run_agent("file", speech, tmp_path / "out.wav", "--checkpoint", "moshiko",
                  env_extra={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "kyutai/moshiko-pytorch-bf16" in r.stderr and "not a Hugging Face repo" not in r.stderr


def test_unknown_local_path_is_clear(speech, tmp_path):
    r = run_agent("file", speech, tmp_path / "out.wav", "--checkpoint", tmp_path / "nope")
    assert r.returncode == 2 and "no such directory" in r.stderr and "Traceback" not in r.stderr
