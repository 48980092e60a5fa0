"""Registered names of the RL-aligned checkpoints, and what the Hub's answers become: the real
huggingface_hub client downloads from a small local stand-in for the Hub (HF_ENDPOINT's role) that
serves files, or refuses a repo the way the Hub does (status and X-Error-Code headers), so every
error is the client's own (GatedRepoError, HfHubHTTPError 401/403) raised its own way."""
from __future__ import annotations

import hashlib
import http.server
import io
import logging
import os
import tarfile
import threading
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
from safetensors.torch import save_file

from duplex_agent.checkpoints import tiny_random
from duplex_agent.checkpoints.loader import CheckpointError, load_checkpoint
from duplex_agent.checkpoints.registry import lookup


class _Handler(http.server.BaseHTTPRequestHandler):
    """`/{owner}/{name}/resolve/{revision}/{file}`, as hf_hub_download asks for it (HEAD, GET)."""

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def log_message(self, *args):
        pass

    def _answer(self, body: bool):
        owner, name, _, _, *rest = unquote(self.path.split("?")[0]).lstrip("/").split("/")
        repo, filename = f"{owner}/{name}", "/".join(rest)
        hub = self.server
        hub.asked.append(f"{repo}/{filename}")
        if repo in hub.refusals:
            self._send(*hub.refusals[repo], b"")
        elif repo not in hub.repos:
            self._send(401, {"X-Error-Code": "RepoNotFound"}, b"")  # what the Hub answers
        elif not (hub.repos[repo] / filename).is_file():
            self._send(404, {"X-Error-Code": "EntryNotFound"}, b"")
        else:
            data = (hub.repos[repo] / filename).read_bytes()
            self._send(200, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                             "X-Repo-Commit": "a" * 40}, data if body else b"", len(data))

    def _send(self, status: int, headers: dict, data: bytes, length: int | None = None):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data) if length is None else length))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The stand-in Hub, with the client pointed at it and a fresh cache."""
    import huggingface_hub.constants
    import huggingface_hub.file_download
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.repos, server.refusals, server.asked = {}, {}, []
    url = f"http://127.0.0.1:{server.server_port}"
    # HF_ENDPOINT is read when huggingface_hub is imported; these are the values it sets.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    monkeypatch.setattr(huggingface_hub.file_download, "HUGGINGFACE_CO_URL_TEMPLATE",
                        url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("DUPLEX_AGENT_CACHE", str(tmp_path / "cache"))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_rl_names_resolve():
    moshika, persona = lookup("moshika-rl-seamless"), lookup("personaplex-rl-seamless")
    assert moshika.repo == "kyutai/moshika-rl-seamless" and not moshika.personas
    assert persona.repo == "kyutai/personaplex-rl-seamless" and persona.personas
    assert lookup("kyutai/personaplex-rl-seamless") is persona
    assert moshika.gated and persona.gated and "CC BY-NC 4.0" in persona.licence
    assert persona.voices == "hf://nvidia/personaplex-7b-v1/voices.tgz"


@pytest.mark.parametrize("status,headers", [
    (401, {"X-Error-Code": "GatedRepo"}),  # no token
    (403, {"X-Error-Code": "GatedRepo",  # a token whose account has not accepted the licence
           "X-Error-Message": "Access to model kyutai/moshika-rl-seamless is restricted."}),
    (403, {}),  # a plain 403: hf_hub_download reports it as a missing cache entry
])
def test_a_gated_answer_says_accept_the_licence_and_set_hf_token(hub, status, headers):
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError
    hub.refusals["kyutai/moshika-rl-seamless"] = (status, headers)
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint("moshika-rl-seamless", "cpu")
    message = str(raised.value)
    assert f"HTTP {status}" in message
    assert (f"Accept the licence (CC BY-NC 4.0) on {hub_url(hub)}/kyutai/moshika-rl-seamless "
            "while logged in") in message
    assert "set HF_TOKEN" in message and "`hf auth login`" in message
    assert "Could not download" not in message  # not the offline paragraph
    cause = _chain(raised.value)
    if headers:
        assert any(type(e) is GatedRepoError for e in cause)
    assert any(isinstance(e, HfHubHTTPError) and getattr(e.response, "status_code", None) == status
               for e in cause)


def test_an_unregistered_gated_repo_and_a_refused_token(hub):
    hub.refusals["someone/gated-moshi"] = (403, {"X-Error-Code": "GatedRepo"})
    with pytest.raises(CheckpointError, match=r"refused the download \(HTTP 403, gated repository\)"
                                              r"\. Accept the licence on .*HF_TOKEN"):
        load_checkpoint("someone/gated-moshi", "cpu")
    hub.refusals["someone/gated-moshi"] = (
        401, {"X-Error-Message": "Invalid credentials in Authorization header"})
    with pytest.raises(CheckpointError, match=r"refused the access token \(HTTP 401"):
        load_checkpoint("someone/gated-moshi", "cpu")
    with pytest.raises(CheckpointError, match="no such repository, or it is private or gated"):
        load_checkpoint("someone/missing", "cpu")


def test_offline_still_gives_the_offline_paragraph(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"^Could not download the checkpoint "
                                              r"'kyutai/moshika-rl-seamless' .*tiny-random"):
        load_checkpoint("moshika-rl-seamless", "cpu")
    assert hub.asked == []


def test_rl_checkpoints_load_from_the_hub_with_licence_and_voices(hub, tmp_path, caplog):
    """Both RL names download (tiny stand-ins in their layouts); personaplex-rl-seamless has no
    voices.tgz of its own and takes PersonaPlex's; each licence is named in the log."""
    moshika = tiny_random.write_checkpoint_dir(tmp_path / "moshika")
    persona = tiny_random.write_checkpoint_dir(tmp_path / "persona")
    save_file(tiny_random.build_tiny_personaplex_lm_state(), str(persona / "model.safetensors"))
    voices = tmp_path / "personaplex-7b-v1"
    voices.mkdir()
    preset = tiny_random.tiny_voice_presets()["NATF2.pt"]
    with tarfile.open(voices / "voices.tgz", "w:gz") as tar:
        data = io.BytesIO()
        torch.save(preset, data)
        info = tarfile.TarInfo("voices/NATF2.pt")
        info.size = len(data.getvalue())
        tar.addfile(info, io.BytesIO(data.getvalue()))
    hub.repos.update({"kyutai/moshika-rl-seamless": moshika,
                      "kyutai/personaplex-rl-seamless": persona,
                      "nvidia/personaplex-7b-v1": voices})
    with caplog.at_level(logging.INFO, logger="duplex_agent.checkpoints.loader"):
        plain = load_checkpoint("moshika-rl-seamless", "cpu")
        bundle = load_checkpoint("personaplex-rl-seamless", "cpu")
    assert plain.name == "kyutai/moshika-rl-seamless" and plain.personas is None
    assert bundle.name == "kyutai/personaplex-rl-seamless" and bundle.config.dep_q == 8
    assert bundle.personas.voices() == ["NATF2.pt"]
    assert torch.equal(bundle.personas.voice("NATF2.pt").ring, preset["cache"][0])
    assert "kyutai/personaplex-rl-seamless/voices.tgz" in hub.asked  # its own first
    assert "nvidia/personaplex-7b-v1/voices.tgz" in hub.asked
    logged = caplog.text
    assert "kyutai/moshika-rl-seamless is under the CC BY-NC 4.0 licence (gated" in logged
    assert ("kyutai/personaplex-rl-seamless is under the CC BY-NC 4.0 and the NVIDIA Open Model "
            "License licence") in logged


def hub_url(hub) -> str:
    return f"http://127.0.0.1:{hub.server_port}"


def _chain(error: BaseException) -> list[BaseException]:
    out = []
    while error is not None:
        out.append(error)
        error = error.__cause__ or error.__context__
    return out
