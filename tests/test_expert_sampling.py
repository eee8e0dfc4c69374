"""An expert's own sampling (`ExpertMetadata.sampling`, a training config's `export.sampling`):
checked when read, used by the Arranger for a layer that gives none, recorded in the manifest."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from safetensors import safe_open

from stage_stack import Arranger, Layer
from stage_stack.expert import load_expert
from stage_stack.generation import SamplingParams
from stage_stack.testing import TINY_CODEC, TINY_LM, expert_metadata, make_tiny_expert
from stage_stack.training.config import ExportConfig


def test_an_experts_sampling_is_checked_and_left_out_of_the_header_when_unset(tmp_path):
    own = expert_metadata("keys", TINY_LM, TINY_CODEC, sampling={"temperature": 0.5, "top_k": 50})
    assert own.sampling_params() == SamplingParams(temperature=0.5, top_k=50)
    assert expert_metadata("keys", TINY_LM, TINY_CODEC).sampling_params() == SamplingParams()
    with pytest.raises(ValidationError, match=r"(?s)sampling.*unknown sampling field\(s\) \['temprature'\]"):
        expert_metadata("keys", TINY_LM, TINY_CODEC, sampling={"temprature": 0.5})
    with pytest.raises(ValidationError, match="(?s)sampling.*temperature must be > 0"):
        expert_metadata("keys", TINY_LM, TINY_CODEC, sampling={"temperature": 0})
    with pytest.raises(ValidationError, match=r"(?s)sampling.*unknown sampling field\(s\) \['cfg'\]"):
        ExportConfig(output=tmp_path / "x.safetensors", sampling={"cfg": 2})
    # a file without it has the header of versions before the field; one with it carries it
    plain = make_tiny_expert(tmp_path / "plain.safetensors", "keys")
    with safe_open(str(plain), framework="pt") as f:
        assert "sampling" not in f.metadata()
    path = make_tiny_expert(tmp_path / "own.safetensors", "keys", sampling={"temperature": 0.5})
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["sampling"]) == {"temperature": 0.5}
    assert load_expert(path).metadata.sampling_params().temperature == 0.5


def test_the_arranger_samples_with_the_experts_own_unless_the_layer_says(tmp_path):
    drums = make_tiny_expert(tmp_path / "drums.safetensors", "drums", sampling={"temperature": 0.5, "cfg_coef": 2.0})
    arranger = Arranger({"drums": drums}, device_map="cpu", dtype="fp32")
    song = arranger.arrange(["drums"], context=None, bpm=120, duration=1.0, seed=0)
    recorded = song.manifest.layer("drums").sampling
    assert (recorded.temperature, recorded.cfg_coef, recorded.top_k) == (0.5, 2.0, 250)
    again = arranger.arrange([Layer("drums", params=SamplingParams(temperature=0.9))], context=None, bpm=120,
                             duration=1.0, seed=0)
    assert again.manifest.layer("drums").sampling.temperature == 0.9
    assert again.manifest.layer("drums").sampling.cfg_coef == 3.0  # the layer's params, whole
    chords = arranger.arrange([Layer("drums", params=SamplingParams(temperature=0.5, chord_temperature=1.0))],
                              context=None, bpm=120, duration=1.0, seed=0)
    assert chords.manifest.layer("drums").sampling.params() == SamplingParams(temperature=0.5, chord_temperature=1.0)
