"""Audio front end: decode -> log-mel -> the adapter's audio layer, micro-batched per adapter.

Decoding runs per request on the default thread pool (it is I/O-shaped and releases the GIL in
FFmpeg). Features and the audio layer run batched on a single dedicated thread, so torch work in
this process never fights the engine for cores. Batching is adaptive, like continuous batching:
when the thread is idle a clip runs at once (no added latency at low load); while a batch runs,
clips for the same adapter version queue up and go together as the next batch (a burst of N
clips costs about one forward). ``window_ms`` only caps how long a queued clip may wait. Batching cannot change results: the layer and the
features mask each example to its own length (tested).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from adapters.adapter import AuraAdapter
from adapters.audio import DecodedAudio, decode_audio
from adapters.features import log_mel


@dataclass
class FrontendTimings:
    decode_s: float = 0.0
    queue_s: float = 0.0
    features_s: float = 0.0
    embed_s: float = 0.0
    batch_size: int = 1

    @property
    def total_s(self) -> float:
        return self.decode_s + self.queue_s + self.features_s + self.embed_s


@dataclass
class _Pending:
    samples: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class AudioFrontend:
    def __init__(self, *, device: str = "cpu", max_batch: int = 16, window_ms: float = 2.0,
                 threads: int = 1, max_upload_bytes: int | None = None,
                 max_audio_seconds: float | None = None) -> None:
        self.device = torch.device(device)
        self.max_batch = max_batch
        self.window_s = window_ms / 1000.0
        self.max_upload_bytes = max_upload_bytes
        self.max_audio_seconds = max_audio_seconds
        self._torch_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aura-frontend",
                                              initializer=torch.set_num_threads, initargs=(threads,))
        self._pending: dict[int, list[_Pending]] = {}
        self._flushers: dict[int, asyncio.TimerHandle] = {}
        self._adapters: dict[int, AuraAdapter] = {}
        self._running = 0  # batches submitted to the torch thread and not finished

    def close(self) -> None:
        self._torch_pool.shutdown(wait=False, cancel_futures=True)

    async def decode(self, data: bytes, sample_rate: int) -> tuple[DecodedAudio, float]:
        t0 = time.perf_counter()
        decoded = await asyncio.to_thread(
            decode_audio, data, sample_rate=sample_rate, max_bytes=self.max_upload_bytes,
            max_duration_s=self.max_audio_seconds,
        )
        return decoded, time.perf_counter() - t0

    async def embed(self, adapter: AuraAdapter, samples: np.ndarray) -> tuple[torch.Tensor, FrontendTimings]:
        """Audio vectors (num_tokens, hidden) on the CPU for one clip, and where the time went."""
        loop = asyncio.get_running_loop()
        key = id(adapter)
        self._adapters[key] = adapter
        item = _Pending(samples, loop.create_future())
        queue = self._pending.setdefault(key, [])
        queue.append(item)
        if len(queue) >= self.max_batch or self._running == 0:
            self._flush(key)
        elif key not in self._flushers:
            self._flushers[key] = loop.call_later(self.window_s, self._flush, key)
        return await item.future

    def _flush(self, key: int) -> None:
        handle = self._flushers.pop(key, None)
        if handle is not None:
            handle.cancel()
        batch = self._pending.pop(key, [])
        if not batch:
            return
        adapter = self._adapters.pop(key)
        loop = asyncio.get_running_loop()
        self._running += 1
        work = loop.run_in_executor(self._torch_pool, self._run_batch, adapter, [p.samples for p in batch])

        def done(fut: asyncio.Future) -> None:
            self._running -= 1
            if self._running == 0:
                for waiting in list(self._pending):
                    self._flush(waiting)
            exc = fut.exception()
            for i, p in enumerate(batch):
                if p.future.done():
                    continue
                if exc is not None:
                    p.future.set_exception(exc)
                else:
                    embeds, feat_s, embed_s, ran_at = fut.result()
                    p.future.set_result((embeds[i], FrontendTimings(
                        queue_s=ran_at - p.enqueued, features_s=feat_s, embed_s=embed_s,
                        batch_size=len(batch))))

        work.add_done_callback(done)

    @torch.inference_mode()
    def _run_batch(self, adapter: AuraAdapter, clips: list[np.ndarray]):
        ran_at = time.perf_counter()
        layer = adapter.audio_layer
        waves = [torch.from_numpy(c).to(self.device) for c in clips]
        feats, frames = log_mel(waves, adapter.config.features)
        t1 = time.perf_counter()
        param = next(layer.parameters())
        embeds, n_tokens = layer(feats.to(param.dtype), frames)
        out = [embeds[i, : int(n_tokens[i])].float().cpu() for i in range(len(clips))]
        t2 = time.perf_counter()
        return out, t1 - ran_at, t2 - t1, ran_at
