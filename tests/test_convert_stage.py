"""Importer for official STAGE checkpoints: sizes from shapes, the 611-key layout, key errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stage_stack.convert.stage import LM, check_stage_key_list, convert_stage_checkpoint, infer_lm_config
from stage_stack.errors import CheckpointKeyError, ExpertFormatError
from stage_stack.expert import load_expert, read_header, read_metadata

SHARED = Path(__file__).resolve().parents[2] / "shared"
KEYS = SHARED / "reference" / "stage_small_keys.json"
FIXTURE = SHARED / "fixtures" / "stage_ref_small" / "lightning_musicgen_small.safetensors"
needs_keys = pytest.mark.skipif(not KEYS.is_file(), reason=f"{KEYS} not present")
needs_fixture = pytest.mark.skipif(not FIXTURE.is_file(), reason=f"{FIXTURE} not present")


@needs_keys
def test_full_size_611_key_layout_is_accepted():
    entries = json.loads(KEYS.read_text())["keys"]
    assert len(entries) == 611
    config = check_stage_key_list(entries)
    assert (config.dim, config.n_layers, config.n_heads, config.ffn_dim) == (1024, 24, 16, 4096)
    assert (config.card, config.n_q, config.cross_attention, config.text_dim) == (2048, 4, True, 768)


@needs_keys
def test_full_size_layout_with_a_missing_and_a_misshaped_key_names_both():
    entries = json.loads(KEYS.read_text())["keys"]
    entries = [e for e in entries if e["key"] != f"{LM}attn_layers.layers.40.1.to_v.weight"]
    for e in entries:
        if e["key"] == f"{LM}attn_layers.layers.5.1.ff.2.weight":
            e["shape"] = [1024, 4000]
    with pytest.raises(CheckpointKeyError) as err:
        check_stage_key_list(entries)
    assert f"{LM}attn_layers.layers.40.1.to_v.weight" in err.value.missing
    assert err.value.mis_shaped == [(f"{LM}attn_layers.layers.5.1.ff.2.weight", (1024, 4000), (1024, 4096))]


def _shapes(config_layers: int, cross: bool, dim: int = 128, card: int = 64, n_q: int = 2) -> dict:
    shapes = {f"{LM}token_emb.emb.{k}.weight": (card + 2, dim) for k in range(n_q)}
    shapes.update({f"{LM}to_logits.linears.{k}.weight": (card, dim) for k in range(n_q)})
    period = 3 if cross else 2
    for i in range(config_layers * period):
        if i % period == period - 1:
            shapes[f"{LM}attn_layers.layers.{i}.1.ff.0.0.weight"] = (4 * dim, dim)
        else:
            shapes[f"{LM}attn_layers.layers.{i}.1.to_q.weight"] = (dim, dim)
    return shapes


@pytest.mark.parametrize("layers,cross", [(3, True), (5, False)])
def test_sizes_are_inferred_from_shapes(layers, cross):
    config = infer_lm_config(_shapes(layers, cross), "test")
    assert (config.n_layers, config.cross_attention, config.dim, config.n_heads) == (layers, cross, 128, 2)
    assert (config.card, config.n_q, config.ffn_dim) == (64, 2, 512)


@needs_fixture
def test_fixture_checkpoint_converts_with_embedded_or_referenced_codec(tmp_path):
    embedded = convert_stage_checkpoint(FIXTURE, tmp_path / "a" / "drums.safetensors", instrument="drums",
                                        embed_codec=True)
    referenced = convert_stage_checkpoint(FIXTURE, tmp_path / "b" / "drums.safetensors", instrument="drums",
                                          embed_codec=False)
    assert any(k.startswith("codec.") for k in read_header(embedded)[1])
    meta = read_metadata(referenced)
    assert not meta.codec.embedded and (referenced.parent / meta.codec.filename).is_file()
    a, b = load_expert(embedded), load_expert(referenced)
    for (name, x), y in zip(a.codec.model.state_dict().items(), b.codec.model.state_dict().values()):
        assert torch.equal(x, y), name
    assert meta.instrument == "drums" and meta.license == "CC-BY-NC-4.0"


@needs_fixture
def test_bad_checkpoint_names_every_key_and_writes_nothing(tmp_path):
    tensors = load_file(str(FIXTURE))
    del tensors[f"{LM}attn_layers.layers.1.1.to_k.weight"]
    tensors[f"{LM}attn_layers.final_norm.bias"] = torch.zeros(7)
    tensors["something.else"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    out = tmp_path / "out" / "expert.safetensors"
    with pytest.raises(CheckpointKeyError, match="something.else"):
        convert_stage_checkpoint(bad, out, instrument="drums")
    del tensors["something.else"]
    save_file(tensors, str(bad))
    with pytest.raises(CheckpointKeyError) as err:
        convert_stage_checkpoint(bad, out, instrument="drums")
    assert err.value.missing == [f"{LM}attn_layers.layers.1.1.to_k.weight"]
    assert err.value.mis_shaped[0][0] == f"{LM}attn_layers.final_norm.bias"
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no partial codec/T5 files


def test_truncated_checkpoint_is_reported(tmp_path):
    bad = tmp_path / "cut.safetensors"
    save_file({"lm.decoder.x": torch.zeros(100)}, str(bad))
    bad.write_bytes(bad.read_bytes()[:-50])
    with pytest.raises(ExpertFormatError, match="truncated"):
        convert_stage_checkpoint(bad, tmp_path / "o.safetensors", instrument="drums")
