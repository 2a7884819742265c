"""POST /v1/audio/transcriptions: OpenAI's transcription API on the same pipeline as chat."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from adapters.prompt import DEFAULT_TRANSCRIBE_PROMPT


def transcribe(url: str, wav, **fields) -> httpx.Response:
    data = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}
    with open(wav, "rb") as f:
        return httpx.post(f"{url}/v1/audio/transcriptions", files={"file": ("q.wav", f, "audio/wav")},
                          data=data, timeout=120)


def test_a_transcription_is_the_adapter_answering_its_training_prompt(server, speech):
    """Token for token what /v1/audio/chat answers to the audio plus the transcription prompt."""
    r = transcribe(server.url, speech["capital"], model="alpha", max_tokens=12)
    assert r.status_code == 200, r.text
    body = r.json()
    with open(speech["capital"], "rb") as f:
        chat = httpx.post(f"{server.url}/v1/audio/chat", files={"file": ("q.wav", f, "audio/wav")},
                          data={"adapter": "alpha", "prompt": DEFAULT_TRANSCRIBE_PROMPT, "max_tokens": "12"},
                          timeout=120).json()
    assert body["text"] == chat["choices"][0]["message"]["content"].strip()
    assert body["usage"]["output_tokens"] == chat["usage"]["completion_tokens"] == 12
    assert body["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    details = body["usage"]["input_token_details"]
    assert details["audio_tokens"] == chat["usage"]["prompt_tokens_details"]["audio_tokens"] > 0
    assert details["audio_tokens"] + details["text_tokens"] == body["usage"]["input_tokens"]
    assert body["usage"]["seconds"] == pytest.approx(chat["usage"]["audio_seconds"])
    # A different adapter transcribes differently: the model field is honoured.
    other = transcribe(server.url, speech["capital"], model="beta", max_tokens=12).json()
    assert other["text"] != body["text"]


def test_text_and_verbose_json_formats(server, speech):
    base = transcribe(server.url, speech["sky"], model="beta", max_tokens=8).json()
    text = transcribe(server.url, speech["sky"], model="beta", max_tokens=8, response_format="text")
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    assert text.text == base["text"]
    verbose = transcribe(server.url, speech["sky"], model="beta", max_tokens=8, response_format="verbose_json",
                         language="en").json()
    assert verbose["task"] == "transcribe" and verbose["language"] == "english"
    assert verbose["text"] == base["text"]
    assert verbose["duration"] == pytest.approx(base["usage"]["seconds"]) and verbose["duration"] > 0.5


def test_streaming_sends_deltas_then_done_with_the_whole_text(server, speech):
    base = transcribe(server.url, speech["water"], model="alpha", max_tokens=10).json()
    with open(speech["water"], "rb") as f, httpx.stream(
            "POST", f"{server.url}/v1/audio/transcriptions", files={"file": ("q.wav", f, "audio/wav")},
            data={"model": "alpha", "max_tokens": "10", "stream": "true"}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line]
    types = [e["type"] for e in events]
    assert types[-1] == "transcript.text.done" and set(types[:-1]) == {"transcript.text.delta"}
    assert len(types) >= 3
    assert "".join(e["delta"] for e in events[:-1]).strip() == events[-1]["text"] == base["text"]
    assert events[-1]["usage"] == base["usage"]


def test_the_openai_client_works_unchanged(server, speech):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    base = transcribe(server.url, speech["spider"], model="beta", max_tokens=8).json()
    with open(speech["spider"], "rb") as f:
        done = client.audio.transcriptions.create(model="beta", file=f, extra_body={"max_tokens": 8})
    assert done.text == base["text"]
    with open(speech["spider"], "rb") as f:
        verbose = client.audio.transcriptions.create(model="beta", file=f, response_format="verbose_json",
                                                     extra_body={"max_tokens": 8})
    assert verbose.text == base["text"] and verbose.duration > 0.5
    with open(speech["spider"], "rb") as f:
        stream = client.audio.transcriptions.create(model="beta", file=f, stream=True, extra_body={"max_tokens": 8})
        events = list(stream)
    assert events[-1].type == "transcript.text.done" and events[-1].text == base["text"]
    assert all(e.type == "transcript.text.delta" for e in events[:-1])


@pytest.mark.parametrize("fields, status, code", [
    ({"response_format": "srt"}, 400, "unsupported_response_format"),
    ({"response_format": "vtt"}, 400, "unsupported_response_format"),
    ({"timestamp_granularities[]": "word"}, 400, "unsupported_response_format"),
    ({"response_format": "mp3"}, 422, None),
    ({"temperature": "1.5"}, 422, None),
    ({"language": "not a language"}, 422, None),
    ({"model": "nope"}, 404, None),
    ({"include[]": "logprobs"}, 400, "unsupported_include"),
    ({"unknown_field": "x"}, 422, None),
])
def test_bad_requests_get_a_clear_error(server, speech, fields, status, code):
    r = transcribe(server.url, speech["sky"], max_tokens=4, **fields)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"]
    if code:
        assert err["code"] == code
    # ... and the server keeps answering.
    assert transcribe(server.url, speech["sky"], model="alpha", max_tokens=2).status_code == 200


def test_a_missing_file_or_a_json_body_is_refused(server):
    r = httpx.post(f"{server.url}/v1/audio/transcriptions", data={"model": "alpha"}, files={"x": ("a", b"1")})
    assert r.status_code == 422 and r.json()["error"]["param"] == "file"
    r = httpx.post(f"{server.url}/v1/audio/transcriptions", json={"model": "alpha"})
    assert r.status_code == 415
