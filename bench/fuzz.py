"""A seeded fuzzer over the server's HTTP surface, with a health check after every case.

    python -m bench.fuzz --cases 1000 --seed 1          # starts a server on the tests' tiny model
    python -m bench.fuzz --url http://127.0.0.1:8000 --cases 200 --families json,headers

Families (each a generator of cases from one ``random.Random(seed)``, so a seed replays a run):

* ``audio``      — uploads of random, truncated, bit-flipped, header-swapped and repeated audio;
* ``containers`` — structurally broken WAV/FLAC/Ogg/MP3 (zero or huge rates, channels, sizes);
* ``multipart``  — form fields with wrong types, huge or odd values, duplicates, broken framing;
* ``json``       — chat-completion bodies with wrong types, deep nesting, odd numbers and text;
* ``headers``    — Content-Type, Authorization, X-Request-ID and body-length lies (raw sockets);
* ``archives``   — ``POST /v1/adapters`` of mutated adapter archives (bit flips, hostile member
  names, links, lying sizes, bombs in ``aura_config.json``), through ``file://``.

What a case must get: a 2xx or a 4xx with the JSON error shape — never a 5xx, never a hang. And
after every case the server must still be itself: a fixed good request returns exactly the tokens
it returned before, and ``/health`` and ``/metrics`` answer in under 100 ms. The run prints one
row per family (cases, outcomes by status, violations) and the latency of the probes.

Without a GPU this runs on the tiny random model (the tests'), which measures the serving
machinery; ``--url`` points it at any server (loopback only; archives need an admin or open
server on the same machine).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("audio", "containers", "multipart", "json", "headers", "archives")
GOOD_FIELDS = {"adapter": "alpha", "max_tokens": "5", "return_token_ids": "true"}
PROBE_LIMIT_S = 0.100
CASE_TIMEOUT_S = 60.0


@dataclass
class Case:
    """One request. ``raw``: bytes sent as they are over a socket (for lies httpx would not tell)."""

    family: str
    name: str
    path: str = "/v1/audio/chat"
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    raw: bytes | None = None
    method: str = "POST"


@dataclass
class Seeds:
    """The well-formed inputs every mutation starts from."""

    wav: bytes
    flac: bytes
    ogg: bytes
    mp3: bytes | None
    adapter: Path
    workdir: Path


# ---- building blocks ------------------------------------------------------------------------------

def multipart(fields: list[tuple[str, str | bytes, str | None]], boundary: str = "fuzzboundary1234") -> tuple[bytes, str]:
    """A multipart body by hand (so it can be broken on purpose). fields: (name, value, filename)."""
    out = io.BytesIO()
    for name, value, filename in fields:
        out.write(f"--{boundary}\r\n".encode())
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out.write(f"Content-Disposition: {disp}\r\n".encode("utf-8", "surrogateescape"))
        if filename is not None:
            out.write(b"Content-Type: application/octet-stream\r\n")
        out.write(b"\r\n")
        out.write(value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass"))
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def upload_case(family: str, name: str, audio: bytes, fields: dict[str, str] | None = None) -> Case:
    body, ctype = multipart([("file", audio, "clip"), *((k, v, None) for k, v in
                                                       {**GOOD_FIELDS, "max_tokens": "3", **(fields or {})}.items())])
    return Case(family, name, headers={"content-type": ctype}, body=body)


def _encode(wav: bytes, fmt: str) -> bytes:
    import soundfile as sf

    samples, sr = sf.read(io.BytesIO(wav), dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format=fmt)
    return buf.getvalue()


def _mp3(wav: bytes) -> bytes | None:
    try:
        out = subprocess.run(["ffmpeg", "-v", "quiet", "-i", "pipe:0", "-f", "mp3", "pipe:1"], input=wav,
                             capture_output=True, timeout=30)
        return out.stdout or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _weird_text(rng: random.Random, n: int) -> str:
    pools = ["a", "é", "日本", "\u202e", "\x00", "\x1b[31m", "\ufeff", "🙂", " ", "\n", '"', "\\", "%s", "{}",
             "<audio>", "</audio>", "\ud800"]
    return "".join(rng.choice(pools) for _ in range(n))


def _odd_number(rng: random.Random) -> str:
    return rng.choice(["-1", "0", "1e9", "1e400", "nan", "inf", "-inf", "abc", "", " 3", "3.5", "0x10",
                       str(2**64), str(-2**63 - 1), "9" * 400, "١٢", "true", "null", "[]"])


def _nested(depth: int, leaf: object = 0) -> str:
    return "[" * depth + json.dumps(leaf) + "]" * depth


# ---- families --------------------------------------------------------------------------------------

def gen_audio(rng: random.Random, s: Seeds, i: int) -> Case:
    sources = {"wav": s.wav, "flac": s.flac, "ogg": s.ogg, **({"mp3": s.mp3} if s.mp3 else {})}
    kind = rng.choice(["random", "truncated", "bitflip", "header_swap", "repeat", "good"])
    name, src = rng.choice(sorted(sources.items()))
    if kind == "random":
        data = rng.randbytes(rng.choice([0, 1, 7, 44, 512, 4096, 65536]))
    elif kind == "truncated":
        data = src[: rng.randrange(0, len(src))]
    elif kind == "bitflip":
        b = bytearray(src)
        for _ in range(rng.choice([1, 8, 64])):
            pos = rng.randrange(min(len(b), 256) if rng.random() < 0.5 else len(b))
            b[pos] ^= 1 << rng.randrange(8)
        data = bytes(b)
    elif kind == "header_swap":
        other = rng.choice([v for k, v in sources.items() if k != name])
        cut = rng.randrange(4, 64)
        data = other[:cut] + src[cut:]
    elif kind == "repeat":
        data = src[: rng.randrange(1, 200)] * rng.randrange(2, 50)
    else:
        data = src
    return upload_case("audio", f"{kind}-{name}-{i}", data)


def _wav_header(rate: int, channels: int, bits: int, data_len: int, fmt: int = 1) -> bytes:
    block = max(1, channels * bits // 8) & 0xFFFF
    return (b"RIFF" + struct.pack("<I", (36 + data_len) & 0xFFFFFFFF) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, fmt, channels & 0xFFFF, rate & 0xFFFFFFFF,
                        (rate * block) & 0xFFFFFFFF, block, bits & 0xFFFF) +
            b"data" + struct.pack("<I", data_len & 0xFFFFFFFF))


def gen_containers(rng: random.Random, s: Seeds, i: int) -> Case:
    kind = rng.choice(["wav_fields", "wav_huge_size", "wav_float", "flac_streaminfo", "ogg_pages", "mp3_frames",
                       "wav_short"])
    if kind == "wav_fields":
        rate = rng.choice([0, 1, 8000, 16000, 44100, 192000, 2**31 - 1, 2**32 - 1])
        ch = rng.choice([0, 1, 2, 8, 255, 65535])
        bits = rng.choice([0, 1, 7, 8, 16, 24, 32, 64])
        payload = rng.randbytes(rng.choice([0, 2, 320, 32000]))
        data = _wav_header(rate, ch, bits, len(payload)) + payload
    elif kind == "wav_huge_size":
        data = _wav_header(16000, 1, 16, 0xFFFFFFF0) + rng.randbytes(1024)
    elif kind == "wav_float":
        payload = struct.pack("<" + "f" * 1600, *[rng.choice([float("nan"), float("inf"), 1e30, -1e30, 0.5])
                                                 for _ in range(1600)])
        data = _wav_header(16000, 1, 32, len(payload), fmt=3) + payload
    elif kind == "wav_short":
        data = s.wav[: rng.choice([44, 46, 100, 300, 1000])]
    elif kind == "flac_streaminfo":
        b = bytearray(s.flac)
        for pos in range(8, min(42, len(b))):  # STREAMINFO: block sizes, rate, channels, bits, sample count
            if rng.random() < 0.3:
                b[pos] = rng.randrange(256)
        data = bytes(b)
    elif kind == "ogg_pages":
        b = bytearray(s.ogg)
        for _ in range(rng.randrange(1, 20)):
            at = b.find(b"OggS", rng.randrange(len(b)))
            if at >= 0 and at + 27 < len(b):
                b[at + rng.randrange(4, 27)] = rng.randrange(256)
        data = bytes(b)
    else:
        header = bytes([0xFF, rng.choice([0xFB, 0xF3, 0xE3, 0xFF]), rng.randrange(256), rng.randrange(256)])
        data = (header + rng.randbytes(rng.choice([0, 100, 413]))) * rng.randrange(1, 200)
    return upload_case("containers", f"{kind}-{i}", data)


def gen_multipart(rng: random.Random, s: Seeds, i: int) -> Case:
    kind = rng.choice(["odd_numbers", "odd_text", "duplicates", "no_file", "many_fields", "broken_framing",
                       "no_boundary", "bad_filename"])
    if kind == "odd_numbers":
        key = rng.choice(["max_tokens", "temperature", "top_p", "seed", "timeout", "stream", "return_token_ids"])
        return upload_case("multipart", f"{kind}-{key}-{i}", s.wav, {key: _odd_number(rng)})
    if kind == "odd_text":
        key = rng.choice(["prompt", "adapter", "model", "stop"])
        return upload_case("multipart", f"{kind}-{key}-{i}", s.wav,
                           {key: _weird_text(rng, rng.choice([1, 10, 1000, 20000]))})
    if kind == "duplicates":
        fields = [("file", s.wav, "a"), ("file", s.wav[:100], "b"), ("max_tokens", "3", None),
                  ("max_tokens", "abc", None), ("adapter", "alpha", None), ("adapter", "nope", None)]
        rng.shuffle(fields)
        body, ctype = multipart(fields)
        return Case("multipart", f"{kind}-{i}", headers={"content-type": ctype}, body=body)
    if kind == "no_file":
        body, ctype = multipart([("max_tokens", "3", None), ("prompt", "hi", None)])
        return Case("multipart", f"{kind}-{i}", headers={"content-type": ctype}, body=body)
    if kind == "many_fields":
        fields = [(f"f{j}", "x" * rng.choice([1, 100]), None) for j in range(rng.choice([100, 1000, 3000]))]
        body, ctype = multipart([("file", s.wav, "clip"), *fields])
        return Case("multipart", f"{kind}-{i}", headers={"content-type": ctype}, body=body)
    if kind == "broken_framing":
        body, ctype = upload_case("multipart", "", s.wav).body, "multipart/form-data; boundary=fuzzboundary1234"
        cut = rng.choice(["truncate", "no_end", "garbage", "crlf"])
        if cut == "truncate":
            body = body[: rng.randrange(len(body))]
        elif cut == "no_end":
            body = body.replace(b"--fuzzboundary1234--", b"")
        elif cut == "garbage":
            pos = rng.randrange(len(body))
            body = body[:pos] + rng.randbytes(64) + body[pos:]
        else:
            body = body.replace(b"\r\n", b"\n")
        return Case("multipart", f"{kind}-{cut}-{i}", headers={"content-type": ctype}, body=body)
    if kind == "no_boundary":
        body = upload_case("multipart", "", s.wav).body
        ctype = rng.choice(["multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; boundary=x" * 50,
                            "multipart/mixed; boundary=fuzzboundary1234"])
        return Case("multipart", f"{kind}-{i}", headers={"content-type": ctype}, body=body)
    name = rng.choice(["../../etc/passwd", "a" * 5000, "\x00.wav", "日本.wav", "", "a\r\nX-Injected: 1"])
    body, ctype = multipart([("file", s.wav, name), ("max_tokens", "3", None), ("adapter", "alpha", None)])
    return Case("multipart", f"{kind}-{i}", headers={"content-type": ctype}, body=body)


def gen_json(rng: random.Random, s: Seeds, i: int) -> Case:
    audio = base64.b64encode(s.wav).decode()
    good: dict = {"model": "alpha", "max_tokens": 3, "return_token_ids": True,
                  "messages": [{"role": "user", "content": [
                      {"type": "text", "text": "Answer:"},
                      {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}]}]}
    kind = rng.choice(["wrong_type", "odd_value", "deep", "bad_audio", "broken_json", "weird_text",
                       "many_stops", "extra"])
    body: bytes
    key = ""
    if kind == "wrong_type":
        key = rng.choice(["model", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "n"])
        good[key] = rng.choice([None, True, 3, -1, 1.5, "x", [], {}, [1, 2], {"a": 1}])
        body = json.dumps(good).encode()
    elif kind == "odd_value":
        key = rng.choice(["max_tokens", "temperature", "top_p", "seed", "timeout", "n", "max_completion_tokens"])
        raw = rng.choice(["1e400", "-1e400", str(2**64), str(-2**64), "0", "-0", "1e-400", "NaN", "Infinity"])
        body = json.dumps(good).encode()[:-1] + f', "{key}": {raw}}}'.encode()
    elif kind == "deep":
        depth = rng.choice([40, 1000, 100_000])
        where = rng.choice(["root", "content", "stop"])
        if where == "root":
            body = _nested(depth).encode()
        else:
            body = json.dumps(good).encode()[:-1] + f', "{where}_x": {_nested(depth)}}}'.encode()
    elif kind == "bad_audio":
        part = good["messages"][0]["content"][1]["input_audio"]
        part["data"] = rng.choice(["", "!!!!", "a", base64.b64encode(rng.randbytes(300)).decode(), audio[:-3],
                                   audio.replace("A", "-")])
        part["format"] = rng.choice(["wav", "mp3", "exe", "", "../x", None])
        body = json.dumps(good).encode()
    elif kind == "broken_json":
        full = json.dumps(good).encode()
        body = rng.choice([full[: rng.randrange(len(full))], b"\xff\xfe" + full, full.replace(b'"', b"'", 3),
                           b"", b"null", b"[]", b"{}", full + b"garbage"])
    elif kind == "weird_text":
        good["messages"][0]["content"][0]["text"] = _weird_text(rng, rng.choice([1, 100, 5000]))
        good["model"] = rng.choice(["alpha", _weird_text(rng, 5), "a" * 10000])
        body = json.dumps(good, ensure_ascii=True).encode()
    elif kind == "many_stops":
        good["stop"] = [_weird_text(rng, rng.choice([0, 1, 5, 300])) for _ in range(rng.choice([1, 10, 500]))]
        good["stream"] = rng.random() < 0.5
        body = json.dumps(good, ensure_ascii=True).encode()
    else:
        good.update({f"x{j}": j for j in range(rng.choice([10, 1000]))})
        good["messages"] = good["messages"] * rng.choice([1, 3, 50])
        body = json.dumps(good).encode()
    return Case("json", f"{kind}-{key}-{i}" if key else f"{kind}-{i}", path="/v1/chat/completions",
                headers={"content-type": "application/json"}, body=body)


def gen_headers(rng: random.Random, s: Seeds, i: int) -> Case:
    base = upload_case("headers", "", s.wav)
    kind = rng.choice(["content_type", "auth", "request_id", "length_short", "length_long_closed", "chunked_garbage",
                       "accept"])
    headers = dict(base.headers)
    if kind == "content_type":
        headers["content-type"] = rng.choice(["", "text/plain", "application/json", "audio/wav", "*/*",
                                              "multipart/form-data; boundary=\"unterminated", "a" * 8000])
    elif kind == "auth":
        headers["authorization"] = rng.choice(["Bearer", "Bearer " + "k" * 8000, "Basic Zm9vOmJhcg==", "bearer  x",
                                               "Bearer \u00e9"])
    elif kind == "request_id":
        headers["x-request-id"] = rng.choice(["a" * 8000, "\u00ff\u00fe", "../../x", "", "id\twith\ttabs"])
    elif kind == "accept":
        headers["accept"] = rng.choice(["text/event-stream", "application/xml", "*/*;q=abc", "a" * 4000])
    else:
        host = "127.0.0.1"
        head = ["POST /v1/audio/chat HTTP/1.1", f"Host: {host}", f"Content-Type: {base.headers['content-type']}"]
        body = base.body
        if kind == "length_short":  # declares more than it sends, then half-closes
            head.append(f"Content-Length: {len(body) + rng.choice([1, 1000, 10**9])}")
        elif kind == "length_long_closed":  # declares less than it sends
            head.append(f"Content-Length: {rng.randrange(0, len(body))}")
        else:
            head.append("Transfer-Encoding: chunked")
            body = b"zz\r\n" + body[:100] + b"\r\n0\r\n\r\n"
        raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        return Case("headers", f"{kind}-{i}", raw=raw)
    return Case("headers", f"{kind}-{i}", headers={k: v for k, v in headers.items()}, body=base.body)


def _tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]], gz: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _adapter_members(folder: Path, top: str = "adapter") -> list[tuple[tarfile.TarInfo, bytes | None]]:
    out = []
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        info = tarfile.TarInfo(f"{top}/{f.name}")
        info.size = len(data)
        out.append((info, data))
    return out


def gen_archives(rng: random.Random, s: Seeds, i: int) -> Case:
    kind = rng.choice(["bitflip", "truncated", "member_names", "links", "lying_zip", "config_values", "many_members",
                       "good"])
    members = _adapter_members(s.adapter)
    suffix = ".tar.gz"
    if kind in ("bitflip", "truncated", "good"):
        data = _tar_bytes(members)
        if kind == "bitflip":
            b = bytearray(data)
            for _ in range(rng.choice([1, 4, 32])):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            data = bytes(b)
        elif kind == "truncated":
            data = data[: rng.randrange(len(data))]
    elif kind == "member_names":
        info, payload = rng.choice(members)
        info.name = rng.choice(["../escape.json", "/abs.json", "adapter/../../x", "a/" * 200 + "x", "\x00x",
                                "adapter/" + "n" * 300, "C:\\x.json", "adapter/./aura_config.json"])
        data = _tar_bytes([*members, (info, payload)])
    elif kind == "links":
        info = tarfile.TarInfo("adapter/adapter_model.safetensors")
        info.type = rng.choice([tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE, tarfile.BLKTYPE])
        info.linkname = rng.choice(["/dev/zero", "/etc/shadow", "../../x", "adapter/aura_config.json"])
        data = _tar_bytes([m for m in members if not m[0].name.endswith("adapter_model.safetensors")] + [(info, None)])
    elif kind == "lying_zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for info, payload in members:
                z.writestr(info.name, payload or b"")
            z.writestr("adapter/bomb.bin", b"\0" * rng.choice([10_000, 5_000_000]))
        b = bytearray(buf.getvalue())
        # make the central directory under-declare sizes: patch every "uncompressed size" field to 1
        at = 0
        while (at := b.find(b"PK\x01\x02", at)) >= 0:
            b[at + 24:at + 28] = struct.pack("<I", 1)
            at += 4
        data, suffix = bytes(b), ".zip"
    elif kind == "config_values":
        cfg = json.loads((s.adapter / "aura_config.json").read_text())
        key = rng.choice(["conv_channels", "n_mels", "stack_factor", "hidden_size", "training", "format_version",
                          "n_fft"])
        value = rng.choice([0, -1, 10_000, 2**40, "x", None, [], {"a": [{}] * 1000}, 1e308])
        if key in ("conv_channels", "n_mels", "stack_factor", "hidden_size"):
            cfg["audio_layer"][key] = value
        elif key == "n_fft":
            cfg["features"][key] = value
        else:
            cfg[key] = value
        payload = json.dumps(cfg).encode()
        info = tarfile.TarInfo("adapter/aura_config.json")
        info.size = len(payload)
        data = _tar_bytes([m for m in members if not m[0].name.endswith("aura_config.json")] + [(info, payload)])
    else:
        extra = []
        for j in range(rng.choice([100, 2000])):
            info = tarfile.TarInfo(f"adapter/extra/{j}.txt")
            info.size = 1
            extra.append((info, b"x"))
        data = _tar_bytes(members + extra)
    path = s.workdir / f"case-{i}{suffix}"
    path.write_bytes(data)
    body = json.dumps({"name": "fuzzed", "source": path.as_uri()}).encode()
    return Case("archives", f"{kind}-{i}", path="/v1/adapters", headers={"content-type": "application/json"},
                body=body)


GENERATORS: dict[str, Callable[[random.Random, Seeds, int], Case]] = {
    "audio": gen_audio, "containers": gen_containers, "multipart": gen_multipart, "json": gen_json,
    "headers": gen_headers, "archives": gen_archives,
}


def cases(seeds: Seeds, n: int, seed: int, families: tuple[str, ...] = FAMILIES) -> Iterator[Case]:
    """``n`` cases, round-robin over ``families``; the same seed and seeds give the same cases."""
    rng = random.Random(seed)
    for i in range(n):
        yield GENERATORS[families[i % len(families)]](rng, seeds, i)


def make_seeds(wav: bytes, adapter: Path, workdir: Path) -> Seeds:
    return Seeds(wav=wav, flac=_encode(wav, "FLAC"), ogg=_encode(wav, "OGG"), mp3=_mp3(wav), adapter=adapter,
                 workdir=workdir)


# ---- running ------------------------------------------------------------------------------------

@dataclass
class Outcome:
    status: int  # 0: no answer (transport error, timeout); -1: a lying raw request closed unanswered
    error_shape_ok: bool
    detail: str = ""


def send(url: str, case: Case, client: httpx.Client) -> Outcome:
    if case.raw is not None:
        return _send_raw(url, case.raw)
    headers = {k: _header_bytes(v) for k, v in case.headers.items()}
    try:
        r = client.request(case.method, url + case.path, content=case.body, headers=headers,
                           timeout=CASE_TIMEOUT_S)
    except httpx.HTTPError as e:
        return Outcome(0, False, f"{type(e).__name__}: {e}")
    shape = True
    if r.status_code >= 400:
        try:
            err = r.json()["error"]
            shape = isinstance(err.get("message"), str) and isinstance(err.get("code"), (str, type(None)))
        except (ValueError, KeyError, TypeError, AttributeError):
            shape = False
    return Outcome(r.status_code, shape, r.text[:300] if r.status_code >= 500 or not shape else "")


def _header_bytes(value: str) -> bytes:
    """Header values as a client would put them on the wire (latin-1, else UTF-8 bytes)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


def _send_raw(url: str, raw: bytes) -> Outcome:
    """Send bytes as they are, half-close, read the status line (a server may also just hang up)."""
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname, u.port or 80), timeout=CASE_TIMEOUT_S) as sock:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        return Outcome(0, False, f"{type(e).__name__}: {e}")
    if not data:
        return Outcome(-1, True, "closed without an answer")  # acceptable for a lying client
    try:
        return Outcome(int(data.split(b" ", 2)[1]), True)
    except (IndexError, ValueError):
        return Outcome(0, False, repr(data[:100]))


@dataclass
class Tally:
    cases: int = 0
    by_status: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)


def _good_tokens(url: str, wav: bytes, client: httpx.Client) -> list[int]:
    """The fixed good request. One retry on a transport error: a server may close a kept-alive
    connection after answering a bad request, which says nothing about its health."""
    try:
        r = client.post(f"{url}/v1/audio/chat", files={"file": ("q.wav", wav)}, data=GOOD_FIELDS,
                        timeout=CASE_TIMEOUT_S)
    except httpx.TransportError:
        r = client.post(f"{url}/v1/audio/chat", files={"file": ("q.wav", wav)}, data=GOOD_FIELDS,
                        timeout=CASE_TIMEOUT_S)
    r.raise_for_status()
    return r.json()["choices"][0]["token_ids"]


def _timed_get(client: httpx.Client, url: str, headers: dict[str, str]) -> tuple[int, float]:
    t0 = time.perf_counter()
    try:
        r = client.get(url, headers=headers, timeout=10)
        return r.status_code, time.perf_counter() - t0
    except httpx.HTTPError:
        return 0, time.perf_counter() - t0


def run(url: str, seeds: Seeds, n: int, seed: int, families: tuple[str, ...] = FAMILIES, *,
        budget_s: float = 3600.0, metrics_headers: dict[str, str] | None = None,
        on_case: Callable[[Case, Outcome], None] | None = None) -> dict:
    """Run the cases with the checks after each; returns the per-family tallies and probe latencies."""
    tallies: dict[str, Tally] = defaultdict(Tally)
    health_s: list[float] = []
    metrics_s: list[float] = []
    slow_once = 0
    t0 = time.monotonic()
    with httpx.Client() as client:
        expected = _good_tokens(url, seeds.wav, client)
        done = 0
        for case in cases(seeds, n, seed, families):
            if time.monotonic() - t0 > budget_s:
                break
            out = send(url, case, client)
            t = tallies[case.family]
            t.cases += 1
            t.by_status[out.status] += 1
            if out.status == 0 or out.status >= 500:
                t.violations.append(f"{case.name}: status {out.status} {out.detail}")
            elif out.status >= 400 and not out.error_shape_ok:
                t.violations.append(f"{case.name}: {out.status} without the JSON error shape {out.detail}")
            try:
                if _good_tokens(url, seeds.wav, client) != expected:
                    t.violations.append(f"{case.name}: a good request changed its tokens afterwards")
            except httpx.HTTPError as e:
                t.violations.append(f"{case.name}: a good request failed afterwards ({e})")
            hs, ht = _timed_get(client, f"{url}/health", {})
            ms, mt = _timed_get(client, f"{url}/metrics", metrics_headers or {})
            health_s.append(ht)
            metrics_s.append(mt)
            if max(ht, mt) > PROBE_LIMIT_S and hs == ms == 200:
                # One re-probe: on a shared machine a single slow scrape is noise; a server the case
                # broke (a blocked loop, threads still busy) is slow again.
                slow_once += 1
                time.sleep(0.05)
                hs, ht = _timed_get(client, f"{url}/health", {})
                ms, mt = _timed_get(client, f"{url}/metrics", metrics_headers or {})
            if hs != 200 or ms != 200 or ht > PROBE_LIMIT_S or mt > PROBE_LIMIT_S:
                t.violations.append(f"{case.name}: /health {hs} in {ht * 1e3:.0f} ms, /metrics {ms} in {mt * 1e3:.0f} ms")
            if on_case is not None:
                on_case(case, out)
            done += 1
    import numpy as np

    def ms_(xs: list[float], q: float) -> float:
        return round(float(np.percentile(xs, q)) * 1e3, 1) if xs else float("nan")

    return {
        "cases": done, "seed": seed, "wall_s": round(time.monotonic() - t0, 1),
        "families": {f: {"cases": t.cases, "by_status": dict(sorted(t.by_status.items())),
                          "violations": t.violations} for f, t in tallies.items()},
        "health_ms": {"p50": ms_(health_s, 50), "p99": ms_(health_s, 99), "max": ms_(health_s, 100)},
        "metrics_ms": {"p50": ms_(metrics_s, 50), "p99": ms_(metrics_s, 99), "max": ms_(metrics_s, 100)},
        "probes_slow_once": slow_once,
    }


def print_table(result: dict) -> None:
    statuses = sorted({int(s) for f in result["families"].values() for s in f["by_status"]})
    head = f"{'family':<11} {'cases':>5} " + " ".join(f"{('xport' if s == 0 else 'drop' if s == -1 else s):>5}"
                                                      for s in statuses) + f" {'violations':>10}"
    print(head)
    print("-" * len(head))
    total: Counter = Counter()
    for fam, f in result["families"].items():
        cells = " ".join(f"{f['by_status'].get(s, 0):>5}" for s in statuses)
        print(f"{fam:<11} {f['cases']:>5} {cells} {len(f['violations']):>10}")
        total.update(f["by_status"])
    viol = sum(len(f["violations"]) for f in result["families"].values())
    print(f"{'all':<11} {result['cases']:>5} " + " ".join(f"{total.get(s, 0):>5}" for s in statuses) + f" {viol:>10}")
    print(f"/health ms: {result['health_ms']}   /metrics ms: {result['metrics_ms']}   "
          f"(probe limit {PROBE_LIMIT_S * 1e3:.0f} ms, slow once then fast on a re-probe: "
          f"{result['probes_slow_once']}; seed {result['seed']}; {result['wall_s']} s)")
    print("xport: the request failed in transport (connection dropped, timeout: a violation); drop: a raw "
          "request with a lying length was closed without an answer (acceptable)")
    for fam, f in result["families"].items():
        for v in f["violations"][:10]:
            print(f"  [{fam}] {v}")


def _start_tiny_server(work: Path):
    sys.path.insert(0, str(ROOT / "tests"))
    from adapters.adapter import init_adapter
    from launch import start_server
    from tiny_models import make_tiny_llama, save_smollm2_tokenizer

    llm = make_tiny_llama(work / "llm", save_smollm2_tokenizer(work / "tokenizer"))
    adapter = init_adapter(llm, work / "alpha", rank=8, seed=1, lora_init_std=0.05, conv_channels=64)
    srv = start_server(["--model", str(llm), "--dtype", "float32", "--max-model-len", "1024",
                        "--adapter", f"alpha={adapter}", "--log-level", "WARNING"], work / "home", work / "server.log")
    return srv, adapter


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--url", help="a running server on loopback (open mode or --metrics-key); default: start one")
    p.add_argument("--adapter-dir", type=Path, help="with --url: a valid adapter folder to mutate into archives")
    p.add_argument("--metrics-key", help="Bearer key for /metrics when the server needs one")
    p.add_argument("--budget-s", type=float, default=3600.0, help="stop after this many seconds")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    families = tuple(f for f in args.families.split(",") if f)
    unknown = [f for f in families if f not in GENERATORS]
    if unknown:
        p.error(f"unknown families {unknown}; choose from {FAMILIES}")
    sys.path.insert(0, str(ROOT / "tests"))
    from audio_helpers import speak

    srv = None
    with tempfile.TemporaryDirectory(prefix="aura-fuzz-") as tmp:
        work = Path(tmp)
        (work / "home").mkdir()
        wav = speak("What is the capital of France?", work / "q.wav").read_bytes()
        if args.url:
            if urlparse(args.url).hostname not in ("127.0.0.1", "localhost"):
                p.error("loopback only")
            if args.adapter_dir is None and "archives" in families:
                p.error("--url with the archives family needs --adapter-dir")
            url, adapter = args.url, args.adapter_dir
        else:
            print("starting a server on the tiny model ...", file=sys.stderr, flush=True)
            srv, adapter = _start_tiny_server(work)
            url = srv.url
        seeds = make_seeds(wav, adapter, work)
        headers = {"Authorization": f"Bearer {args.metrics_key}"} if args.metrics_key else None
        progress = Counter()

        def report(case: Case, out: Outcome) -> None:
            progress["done"] += 1
            if progress["done"] % 50 == 0:
                print(f"  {progress['done']} cases ...", file=sys.stderr, flush=True)

        try:
            result = run(url, seeds, args.cases, args.seed, families, budget_s=args.budget_s,
                         metrics_headers=headers, on_case=report)
        finally:
            if srv is not None:
                from launch import stop_server

                stop_server(srv)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if all(not f["violations"] for f in result["families"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
