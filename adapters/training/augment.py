"""Audio augmentation for the spoken corpus (numpy only): noise at a chosen SNR, reverberation,
gain, band-limiting and speed perturbation.

espeak-ng speech is clean, level and flat; real requests are not. Each training clip gets a
random chain drawn from a seeded ``random.Random`` (so a corpus rebuild writes the same audio),
and the chain is recorded in the manifest row, so what a clip went through is always known.
Babble noise is made from other clips of the corpus (several speakers summed), which is the
hardest noise for a speech model: it is speech.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

SNR_RANGE = (0.0, 30.0)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x.astype(np.float64))) + 1e-20))


def snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    """Measured SNR of ``noisy`` against ``clean`` (same length): what the tests check."""
    noise = noisy.astype(np.float64) - clean.astype(np.float64)
    return 20.0 * np.log10(rms(clean) / max(rms(noise), 1e-12))


def white_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(n).astype(np.float32)


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """1/f power spectrum, made by shaping white noise in the frequency domain."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spec), dtype=np.float64)
    f[0] = 1.0
    return np.fft.irfft(spec / np.sqrt(f), n).astype(np.float32)


def babble_noise(n: int, rng: np.random.Generator, others: Sequence[np.ndarray], talkers: int = 4) -> np.ndarray:
    """Several other clips summed, each looped/cut to ``n`` samples at a random offset."""
    if not others:
        return pink_noise(n, rng)
    out = np.zeros(n, dtype=np.float32)
    for _ in range(talkers):
        clip = others[int(rng.integers(len(others)))]
        if len(clip) == 0:
            continue
        reps = -(-(n + len(clip)) // len(clip))
        loop = np.tile(clip, reps)
        start = int(rng.integers(len(clip)))
        seg = loop[start : start + n]
        out += seg / max(rms(seg), 1e-6)
    return out


def add_noise(x: np.ndarray, noise: np.ndarray, snr: float) -> np.ndarray:
    """``x`` plus ``noise`` scaled so the result has exactly ``snr`` dB against ``x``."""
    scale = rms(x) / (max(rms(noise), 1e-12) * 10 ** (snr / 20.0))
    return (x + scale * noise[: len(x)]).astype(np.float32)


def reverb(x: np.ndarray, rng: np.random.Generator, sample_rate: int, rt60: float) -> np.ndarray:
    """Convolution with a synthetic room response: exponentially decaying noise for ``rt60`` seconds
    after a direct path (amplitude falls 60 dB over rt60)."""
    n = max(1, int(rt60 * sample_rate))
    t = np.arange(n) / sample_rate
    ir = rng.standard_normal(n) * np.exp(-6.9078 * t / rt60)
    ir[0] = 1.0 / 0.3  # the direct path dominates; the tail is the room
    ir *= 0.3
    size = 1 << int(np.ceil(np.log2(len(x) + n)))
    y = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(ir, size), size)[: len(x)]
    return (y * (rms(x) / max(rms(y), 1e-12))).astype(np.float32)


def band_limit(x: np.ndarray, sample_rate: int, low: float, high: float) -> np.ndarray:
    """Keep ``low``..``high`` Hz (a telephone channel is 300-3400)."""
    spec = np.fft.rfft(x)
    f = np.fft.rfftfreq(len(x), 1.0 / sample_rate)
    spec[(f < low) | (f > high)] = 0
    return np.fft.irfft(spec, len(x)).astype(np.float32)


def speed(x: np.ndarray, factor: float) -> np.ndarray:
    """Speed perturbation as in Kaldi/sox ``speed``: resample by 1/factor (tempo and pitch change)."""
    from adapters.training.voices import resample

    n_out = max(1, int(round(len(x) / factor)))
    return resample(x, len(x), n_out)


def gain_db(x: np.ndarray, db: float) -> np.ndarray:
    return np.clip(x * 10 ** (db / 20.0), -1.0, 1.0).astype(np.float32)


def augment(x: np.ndarray, rng: random.Random, *, sample_rate: int = 16000, others: Sequence[np.ndarray] = (),
            noise_prob: float = 0.6, reverb_prob: float = 0.3, band_prob: float = 0.2,
            speed_prob: float = 0.3) -> tuple[np.ndarray, dict[str, float | str]]:
    """A random augmentation chain; returns the audio and what was done (for the manifest)."""
    nrng = np.random.default_rng(rng.getrandbits(63))
    info: dict[str, float | str] = {}
    y = x.astype(np.float32)
    if rng.random() < speed_prob:
        f = round(rng.uniform(0.9, 1.1), 3)
        y = speed(y, f)
        info["speed"] = f
    if rng.random() < reverb_prob:
        rt = round(rng.uniform(0.15, 0.7), 3)
        y = reverb(y, nrng, sample_rate, rt)
        info["rt60"] = rt
    if rng.random() < band_prob:
        low, high = rng.choice([(300.0, 3400.0), (100.0, 4000.0), (0.0, 6000.0)])
        y = band_limit(y, sample_rate, low, high)
        info["band"] = f"{int(low)}-{int(high)}"
    if rng.random() < noise_prob:
        kind = rng.choice(["white", "pink", "babble"])
        snr = round(rng.uniform(*SNR_RANGE), 2)
        noise = {"white": lambda: white_noise(len(y), nrng), "pink": lambda: pink_noise(len(y), nrng),
                 "babble": lambda: babble_noise(len(y), nrng, others)}[kind]()
        y = add_noise(y, noise, snr)
        info["noise"], info["snr_db"] = kind, snr
    g = round(rng.uniform(-12.0, 6.0), 2)
    peak = float(np.max(np.abs(y))) if len(y) else 0.0
    g = min(g, -20 * np.log10(max(peak, 1e-6)) - 0.1)  # never clip
    y = gain_db(y, g)
    info["gain_db"] = round(float(g), 2)
    return y, info
