"""An expert that hears its context through a second codec (`StageLMConfig.context_card`,
`ExpertMetadata.context_codec_config`): layout, file format, inference encoding and training."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from stage_stack.errors import TrainingConfigError
from stage_stack.expert import load_expert, save_codec, save_expert
from stage_stack.layout import TokenLayout
from stage_stack.models.codec import CodecConfig
from stage_stack.models.stage_lm import StageLMConfig
from stage_stack.pipeline import _encode
from stage_stack.testing import TINY_CODEC, TINY_LM, expert_metadata, tiny_codec, tiny_lm
from stage_stack.training.token_cache import TokenPairDataset
from stage_stack.training.train import build_datasets, cache_dirs, load_base, train

from test_train import make_config, shared  # noqa: F401  (the shared songs and codec file)

CTX_LM = dataclasses.replace(TINY_LM, context_card=TINY_CODEC.card)


def test_layout_shifts_context_codes_into_their_own_rows_and_keeps_pad():
    cfg = StageLMConfig(dim=16, n_layers=1, n_heads=2, ffn_dim=32, card=16, n_q=2, cross_attention=False,
                        context_card=16)
    layout = TokenLayout.for_config(cfg)
    assert layout.context_offset == 18 == cfg.context_offset and cfg.embedding_rows == 34
    context = torch.tensor([[[3, 5, 16], [0, 15, 16]]])  # 16 = PAD (left-padded or dropped)
    target = torch.tensor([[[7, 8], [9, 10]]])
    plain = TokenLayout.for_card(16, 2).training_batch(context, target)
    shifted = layout.training_batch(context, target)
    C = context.shape[-1]
    # codebook q holds frame s - q - 1 at step s: the context region is steps q+1 .. q+C
    for q in range(2):
        got = shifted.codes[0, q, q + 1 : q + 1 + C]
        want = torch.where(context[0, q] == 16, context[0, q], context[0, q] + 18)
        assert torch.equal(got, want)
        assert torch.equal(shifted.codes[0, q, q + 1 + C :], plain.codes[0, q, q + 1 + C :])  # SEP and target
    assert torch.equal(shifted.final_mask, plain.final_mask) and torch.equal(shifted.positions, plain.positions)
    assert int(shifted.codes.max()) < cfg.embedding_rows


def test_config_and_metadata_errors_name_the_field():
    with pytest.raises(ValueError, match="context_card must be 0"):
        dataclasses.replace(TINY_LM, context_card=-1)
    with pytest.raises(ValueError, match="context_card is 16 but context_codec_config is missing"):
        expert_metadata("drums", CTX_LM, TINY_CODEC)
    with pytest.raises(ValueError, match="context_card is 0 but context_codec_config is set"):
        expert_metadata("drums", TINY_LM, TINY_CODEC, context_codec_config=TINY_CODEC.to_dict())
    other_rate = dataclasses.replace(TINY_CODEC, sample_rate=TINY_CODEC.sample_rate * 2)
    with pytest.raises(ValueError, match="context_codec_config.sample_rate"):
        expert_metadata("drums", CTX_LM, TINY_CODEC, context_codec_config=other_rate.to_dict())
    bigger = dataclasses.replace(TINY_CODEC, card=TINY_CODEC.card * 2)
    with pytest.raises(ValueError, match="smaller than context_codec_config.card"):
        expert_metadata("drums", CTX_LM, TINY_CODEC, context_codec_config=bigger.to_dict())


@pytest.fixture
def context_expert(tmp_path):
    lm = tiny_lm(CTX_LM)
    codec, heard = tiny_codec(seed=0), tiny_codec(seed=1)
    meta = expert_metadata("drums", CTX_LM, TINY_CODEC, context_codec_config=TINY_CODEC.to_dict())
    path = save_expert(tmp_path / "drums.safetensors", meta, lm, codec, context_codec=heard)
    return path, lm, codec, heard


def test_file_round_trip_and_the_context_is_encoded_with_the_context_codec(context_expert):
    path, lm, codec, heard = context_expert
    expert = load_expert(path)
    assert expert.context_codec is not None and expert.context_encoder is expert.context_codec
    for name, tensor in heard.model.state_dict().items():
        assert torch.equal(expert.context_codec.model.state_dict()[name], tensor)
    assert expert.lm.embeddings[0].weight.shape[0] == TINY_CODEC.card * 2 + 2
    audio = np.random.default_rng(0).standard_normal(TINY_CODEC.sample_rate).astype(np.float32) * 0.3
    wave = torch.from_numpy(audio)[None, None]
    got = _encode(expert, audio)
    assert torch.equal(got, heard.encode(wave))
    assert not torch.equal(got, codec.encode(wave))  # the two codecs really differ


def test_a_context_codec_without_its_tensors_or_stray_tensors_are_refused(context_expert, tmp_path):
    path, lm, codec, heard = context_expert
    meta = expert_metadata("drums", CTX_LM, TINY_CODEC, context_codec_config=TINY_CODEC.to_dict())
    with pytest.raises(ValueError, match="pass context_codec exactly when"):
        save_expert(tmp_path / "x.safetensors", meta, lm, codec)
    plain = expert_metadata("drums", TINY_LM, TINY_CODEC)
    with pytest.raises(ValueError, match="pass context_codec exactly when"):
        save_expert(tmp_path / "y.safetensors", plain, tiny_lm(), codec, context_codec=heard)
    # a file whose metadata says one codec but which carries context_codec.* tensors
    from safetensors import safe_open
    from stage_stack.expert import atomic_save_safetensors

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(("codec.", "context_codec."))}
    tensors.update({f"lm.{k}": v for k, v in tiny_lm().state_dict().items()})
    bad = atomic_save_safetensors(tensors, tmp_path / "stray.safetensors", plain.to_header())
    with pytest.raises(Exception, match="context_codec"):
        load_expert(bad)


def _context_config(shared, run, **overrides):  # noqa: F811
    heard = shared["root"] / "heard.safetensors"
    if not heard.is_file():
        save_codec(heard, tiny_codec(seed=1), id="tiny-heard")
    config = make_config(shared, run, **overrides)
    config.base.fresh.context_codec = heard
    return config


def test_pairs_take_contexts_from_the_context_cache_and_targets_from_the_other(shared, tmp_path):  # noqa: F811
    config = _context_config(shared, tmp_path / "run")
    base = load_base(config)
    assert base.lm.config.context_card == TINY_CODEC.card
    train_set, _ = build_datasets(config, base.codec, context_codec=base.context_codec)
    plain = TokenPairDataset(cache_dirs(config, base.codec)[0], "drums", segment_seconds=1.0,
                             context_seconds=(0.5, 1.0), seed=config.seed, split="train", n_valid=1,
                             samples_per_epoch=len(train_set))
    heard = TokenPairDataset(cache_dirs(config, base.context_codec)[0], "drums", segment_seconds=1.0,
                             context_seconds=(0.5, 1.0), seed=config.seed, split="train", n_valid=1,
                             samples_per_epoch=len(train_set))
    differs = 0
    for i in range(len(train_set)):
        pair, a, b = train_set[i], plain[i], heard[i]
        assert pair.info == a.info == b.info  # the same draws from both caches
        assert np.array_equal(pair.target_codes, a.target_codes)
        assert np.array_equal(pair.context_codes, b.context_codes)
        assert np.array_equal(pair.target_as_context, b.target_codes)
        differs += not np.array_equal(pair.context_codes, a.context_codes)
    assert differs > 0


def test_a_context_cache_of_other_songs_is_refused(shared, tmp_path):  # noqa: F811
    import json
    import shutil

    from stage_stack.training.data import DatasetError

    config = _context_config(shared, tmp_path / "run")
    base = load_base(config)
    build_datasets(config, base.codec, context_codec=base.context_codec)
    partial = tmp_path / "partial-cache"
    shutil.copytree(cache_dirs(config, base.context_codec)[0], partial)
    index = json.loads((partial / "index.json").read_text())
    dropped = index["entries"].pop(0)
    (partial / "index.json").write_text(json.dumps(index))
    with pytest.raises(DatasetError, match=f"song {dropped['song_id']} variant 0 is missing in the context cache"):
        TokenPairDataset(cache_dirs(config, base.codec)[0], "drums", segment_seconds=1.0, context_seconds=(0.5, 1.0),
                         context_cache_dir=partial)


def test_mismatched_codecs_are_refused_at_load(shared, tmp_path):  # noqa: F811
    odd = shared["root"] / "odd.safetensors"
    save_codec(odd, tiny_codec(dataclasses.replace(TINY_CODEC, n_q=TINY_CODEC.n_q + 1)))
    config = make_config(shared, tmp_path / "run")
    config.base.fresh.context_codec = odd
    with pytest.raises(TrainingConfigError, match="base.fresh.context_codec .* has n_q"):
        load_base(config)


@pytest.mark.slow
def test_training_with_a_context_codec_exports_an_expert_that_carries_it(shared, tmp_path):  # noqa: F811
    config = _context_config(shared, tmp_path / "run", dropout={"self_context": 0.5, "history": 0.5})
    result = train(config, progress=False)
    expert = load_expert(result.output)
    assert expert.metadata.context_codec_cfg == CodecConfig.from_dict(TINY_CODEC.to_dict())
    assert expert.lm.config.context_card == TINY_CODEC.card
    heard = load_base(config).context_codec
    for name, tensor in heard.model.state_dict().items():
        assert torch.allclose(expert.context_codec.model.state_dict()[name], tensor)
    assert "| context codec | heard: the context is heard through this second codec" in expert.metadata.model_card
    vals = [r["val_loss"] for r in result.history if "val_loss" in r]
    assert vals[-1] < vals[0]
    # resuming with the context codec left out is refused: the run heard through it
    plain = make_config(shared, tmp_path / "run", schedule={"max_steps": 12}, dropout={"self_context": 0.5,
                                                                                     "history": 0.5})
    with pytest.raises(TrainingConfigError, match="the context codec .* encodes differently"):
        train(plain, resume=True, progress=False)
    again = _context_config(shared, tmp_path / "run", dropout={"self_context": 0.5, "history": 0.5},
                            schedule={"max_steps": 10, "embed_only_steps": 2, "unfreeze_ramp_steps": 2})
    assert train(again, resume=True, progress=False, export=False).step == 10


def test_fine_tuning_a_context_codec_expert_keeps_both_codecs(shared, tmp_path):  # noqa: F811
    first = _context_config(shared, tmp_path / "first", schedule={"max_steps": 2, "embed_only_steps": 0,
                                                                    "unfreeze_ramp_steps": 0})
    stage1 = train(first, progress=False).output
    second = make_config(shared, tmp_path / "second", schedule={"max_steps": 2, "embed_only_steps": 0,
                                                                  "unfreeze_ramp_steps": 0})
    second.base.fresh, second.base.expert = None, stage1
    expert = load_expert(train(second, progress=False).output)
    before = load_expert(stage1)
    assert expert.lm.config.context_card == TINY_CODEC.card
    for name, tensor in before.context_codec.model.state_dict().items():
        assert torch.equal(expert.context_codec.model.state_dict()[name], tensor)
    assert not torch.equal(expert.lm.embeddings[0].weight, before.lm.embeddings[0].weight)  # it trained
