"""Expert file format v1: round trip, loading choices and every bad-input path."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from stage_stack.errors import CheckpointKeyError, DeviceError, ExpertFormatError, IntegrityError
from stage_stack.expert import (ExpertMetadata, WeightsRef, load_expert, read_header, read_metadata, save_codec,
                                save_expert, sha256_file)
from stage_stack.generation import SamplingParams, generate
from stage_stack.testing import TINY_CODEC, TINY_LM, expert_metadata, make_tiny_expert, tiny_codec, tiny_lm


@pytest.fixture
def expert_path(tmp_path):
    return make_tiny_expert(tmp_path / "drums.safetensors", instrument="drums", seed=3)


def test_round_trip_weights_and_metadata(expert_path):
    meta = read_metadata(expert_path)
    assert meta.instrument == "drums" and meta.format_version == 1
    assert meta.special_tokens.pad == TINY_LM.card and meta.special_tokens.sep == TINY_LM.card + 1
    header, _ = read_header(expert_path)
    assert all(isinstance(v, str) for v in header.values())  # string -> string, JSON values
    assert json.loads(header["lm_config"])["dim"] == TINY_LM.dim
    expert = load_expert(expert_path)
    ref = tiny_lm(TINY_LM, seed=3)
    for name, value in ref.state_dict().items():
        assert torch.equal(expert.lm.state_dict()[name], value), name
    assert expert.codec.config == TINY_CODEC
    assert expert.sha256 is None


@pytest.mark.parametrize("dtype,torch_dtype", [("float32", torch.float32), ("bf16", torch.bfloat16),
                                                ("float16", torch.float16)])
def test_dtype_choice(expert_path, dtype, torch_dtype):
    expert = load_expert(expert_path, dtype=dtype)
    assert expert.lm.heads[0].weight.dtype == torch_dtype
    assert expert.codec.model.encoder.layers[0].conv.bias.dtype == torch.float32  # codec stays fp32
    assert not any(p.is_meta for p in expert.lm.parameters())


def test_loaded_expert_generates(expert_path):
    expert = load_expert(expert_path)
    audio = torch.randn(1, 1, TINY_CODEC.sample_rate)
    codes = expert.codec.encode(audio)
    out = generate(expert.lm, codes, 10, params=SamplingParams(greedy=True))
    wav = expert.codec.decode(out)
    assert wav.shape == (1, 1, 10 * TINY_CODEC.hop_length)
    assert torch.isfinite(wav).all()


def test_sha256_verified(expert_path):
    good = sha256_file(expert_path)
    assert load_expert(expert_path, sha256=good).sha256 == good
    with pytest.raises(IntegrityError, match="sha256"):
        load_expert(expert_path, sha256="0" * 64)


def test_unknown_metadata_version(tmp_path, expert_path):
    tensors = load_file(str(expert_path))
    header, _ = read_header(expert_path)
    header["format_version"] = "2"
    bad = tmp_path / "v2.safetensors"
    save_file(tensors, str(bad), metadata=header)
    with pytest.raises(ExpertFormatError, match="format_version.*unknown expert format version 2"):
        load_expert(bad)


def test_invalid_metadata_names_field(tmp_path, expert_path):
    tensors = load_file(str(expert_path))
    header, _ = read_header(expert_path)
    header["sample_rate"] = "44100"
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=header)
    with pytest.raises(ExpertFormatError, match="sample_rate is 44100"):
        read_metadata(bad)


def test_file_without_metadata(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ExpertFormatError, match="format_version"):
        load_expert(plain)


@pytest.mark.parametrize("cut", [4, 100, -10])
def test_truncated_file(tmp_path, expert_path, cut):
    data = expert_path.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[:cut])
    with pytest.raises(ExpertFormatError, match="not a valid safetensors file"):
        load_expert(bad)


def test_bad_header(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}")
    with pytest.raises(ExpertFormatError, match="not a valid safetensors file"):
        read_metadata(bad)


def test_missing_unexpected_and_misshaped_keys_are_all_named(tmp_path, expert_path):
    tensors = load_file(str(expert_path))
    header, _ = read_header(expert_path)
    del tensors["lm.final_norm.bias"]
    tensors["lm.extra.weight"] = torch.zeros(3)
    tensors["lm.heads.0.weight"] = torch.zeros(5, 5)
    bad = tmp_path / "keys.safetensors"
    save_file(tensors, str(bad), metadata=header)
    with pytest.raises(CheckpointKeyError) as err:
        load_expert(bad)
    msg = str(err.value)
    assert "lm.final_norm.bias" in msg and "lm.extra.weight" in msg and "lm.heads.0.weight" in msg
    assert "(5, 5)" in msg


def test_unavailable_device_and_dtype(expert_path):
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            load_expert(expert_path, device="cuda")
    with pytest.raises(DeviceError, match="not supported"):
        load_expert(expert_path, dtype="int3")
    with pytest.raises(DeviceError, match="not a valid torch device"):
        load_expert(expert_path, device="gpu7")


def test_save_is_atomic_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import stage_stack.expert as expert_module

    target = tmp_path / "out.safetensors"
    make_tiny_expert(target, seed=1)
    before = target.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        expert_module.save_expert(target, expert_metadata("drums", TINY_LM, TINY_CODEC), tiny_lm(), tiny_codec())
    assert target.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]  # no temp left behind


def test_referenced_codec_is_resolved_and_verified(tmp_path):
    codec = tiny_codec(seed=5)
    codec_file = save_codec(tmp_path / "codecs" / "tiny_codec.safetensors", codec, id="tiny")
    ref = WeightsRef(embedded=False, id="tiny", filename="tiny_codec.safetensors", sha256=sha256_file(codec_file))
    meta = expert_metadata("bass", TINY_LM, TINY_CODEC, codec=ref)
    path = save_expert(tmp_path / "bass.safetensors", meta, tiny_lm())
    assert not any(k.startswith("codec.") for k in read_header(path)[1])  # not embedded
    with pytest.raises(ExpertFormatError, match="install-codec"):
        load_expert(path)  # not beside the expert nor in the codec dir
    loaded = load_expert(path, codec_dirs=[tmp_path / "codecs"])
    for name, value in codec.model.state_dict().items():
        assert torch.equal(loaded.codec.model.state_dict()[name], value)
    codec_file.write_bytes(codec_file.read_bytes()[:-4] + b"abcd")
    with pytest.raises(IntegrityError, match="sha256"):
        load_expert(path, codec_dirs=[tmp_path / "codecs"])


def test_a_wrong_codec_beside_the_expert_does_not_hide_the_right_one(tmp_path):
    codec = tiny_codec(seed=5)
    right = save_codec(tmp_path / "codecs" / "tiny_codec.safetensors", codec, id="tiny")
    wrong = save_codec(tmp_path / "tiny_codec.safetensors", tiny_codec(seed=6), id="tiny")  # beside the expert
    ref = WeightsRef(embedded=False, id="tiny", filename="tiny_codec.safetensors", sha256=sha256_file(right))
    path = save_expert(tmp_path / "bass.safetensors", expert_metadata("bass", TINY_LM, TINY_CODEC, codec=ref),
                       tiny_lm())
    loaded = load_expert(path, codec_dirs=[tmp_path / "codecs"])
    for name, value in codec.model.state_dict().items():
        assert torch.equal(loaded.codec.model.state_dict()[name], value)
    # With only the wrong one around, the error names it and its digest.
    with pytest.raises(IntegrityError, match=f"found only: {wrong}"):
        load_expert(path)


def test_weights_ref_validation():
    with pytest.raises(ValueError, match="filename"):
        WeightsRef(embedded=False, id="x")
    with pytest.raises(ValueError, match="64 lowercase hex"):
        WeightsRef(embedded=False, filename="a", sha256="xyz")


def test_metadata_rejects_inconsistent_tokens():
    meta = expert_metadata("drums", TINY_LM, TINY_CODEC).model_dump()
    meta["special_tokens"]["sep"] = 3
    with pytest.raises(ValueError, match="special_tokens.sep"):
        ExpertMetadata.model_validate(meta)


def test_same_weights_give_the_same_sha256(tmp_path):
    """Shared codec files are identified by hash, so identical content must hash identically."""
    a = save_codec(tmp_path / "a.safetensors", tiny_codec(seed=4), id="tiny")
    b = save_codec(tmp_path / "b.safetensors", tiny_codec(seed=4), id="tiny")
    c = save_codec(tmp_path / "c.safetensors", tiny_codec(seed=5), id="tiny")
    assert sha256_file(a) == sha256_file(b) != sha256_file(c)


def test_a_big_empty_build_stays_on_meta_without_importing_dynamo():
    """A MusicGen-small-size LM and its 32 kHz codec built for filling from a file: every tensor
    on the meta device, and no init kernel that pulls in torch._dynamo (~73 MB of RSS)."""
    import subprocess
    import sys

    code = ("import sys, torch; from stage_stack.expert import build_empty; "
            "from stage_stack.models.stage_lm import StageLM, StageLMConfig; "
            "from stage_stack.models.codec import Codec, CodecConfig; "
            "lm = build_empty(lambda: StageLM(StageLMConfig())); "
            "codec = build_empty(lambda: Codec(CodecConfig(sample_rate=32000, dimension=128, n_filters=64, "
            "ratios=[8, 5, 4, 4], n_q=4, card=2048))); "
            "params = list(lm.parameters()) + list(codec.parameters()); "
            "print(sum(p.numel() for p in params) > 400_000_000, all(p.is_meta for p in params), "
            "'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "False"]


def test_small_builds_are_still_initialised():
    from stage_stack.expert import build_empty
    from stage_stack.models.stage_lm import StageLM

    lm = build_empty(lambda: StageLM(TINY_LM), n_params=1000)
    table = lm.embeddings[0].weight
    assert not table.is_meta and 0.5 < float(table.std()) < 1.5  # nn.Embedding's N(0, 1)
