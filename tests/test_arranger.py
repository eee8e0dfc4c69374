"""The Arranger with tiny random-weight experts: layers, click modes, candidates, gain staging, manifest."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from arranger_helpers import SR, band, heard  # noqa: F401  (fixtures)
from stage_stack import Arranger, Layer
from stage_stack.errors import InputError, UnknownInstrumentError
from stage_stack.expert import sha256_file
from stage_stack.generation import SamplingParams
from stage_stack.mixing import CLICK_GAIN_DB, db_to_gain, limit, metronome, mix_bus, render_mix


def test_two_layers_from_nothing(band, heard):
    arranger = Arranger(band)
    song = arranger.arrange(["drums", "bass"], context=None, duration=2.0, seed=0)
    samples = 2 * SR
    assert song.sample_rate == SR and song.layers == ["drums", "bass"]
    assert {k: v.shape for k, v in song.stems.items()} == {"drums": (samples,), "bass": (samples,)}
    assert song.mix.shape == (samples,) and np.all(np.isfinite(song.mix))
    for stem in song.stems.values():
        assert np.sqrt(np.mean(stem ** 2)) > 1e-3  # the experts made sound
    m = song.manifest
    assert (m.bpm, m.bpm_source, m.click) == (120.0, "default", "none")
    # no context: the first expert hears the click alone; the second the mix alone (the default
    # mode: the experts were trained on a mix or a click, never both)
    click = metronome(120.0, samples, SR)
    assert [layer.click for layer in m.layers] == ["click", "none"]
    np.testing.assert_array_equal(heard[0]["context"], click)
    mix_after_drums = render_mix(None, [(song.stems["drums"], m.layers[0].gain_db)], SR, samples)
    np.testing.assert_array_equal(heard[1]["context"], limit(mix_after_drums, SR))
    # the mix is the gain-staged, limited sum of the stems
    np.testing.assert_array_equal(song.mix, render_mix(None, [(s, 0.0) for s in song.stems.values()], SR, samples))
    # the manifest says how to reproduce it
    assert [layer.seed for layer in m.layers] == [0, 1]
    assert m.layers[1].expert.sha256 == sha256_file(band["bass"])
    assert m.layers[1].conditioned_on == {"drums": "1.0 +0 dB"}
    assert m.layers[0].window_plan.windows[-1].end_frame == 50  # 2 s at 25 frames/s
    assert m.layers[0].timings.generate_s > 0 and m.layers[0].timings.total_s >= m.layers[0].timings.generate_s


def test_same_seed_same_song_other_seed_other_song(band):
    arranger = Arranger(band)
    a = arranger.arrange(["drums"], duration=1.5, seed=3)
    b = arranger.arrange(["drums"], duration=1.5, seed=3)
    c = arranger.arrange(["drums"], duration=1.5, seed=4)
    assert np.array_equal(a.mix, b.mix)
    assert not np.array_equal(a.mix, c.mix)


def test_click_modes_with_a_context(band, heard):
    rng = np.random.default_rng(0)
    context = (rng.standard_normal(2 * SR) * 0.1).astype(np.float32)
    arranger = Arranger(band)
    song = arranger.arrange([Layer("bass", click="none"), Layer("keys", click="click"), "drums"], context=context,
                            context_sample_rate=SR, bpm=100, seed=1, click="mix+click")
    click = metronome(100, 2 * SR, SR)
    np.testing.assert_array_equal(heard[0]["context"], limit(context, SR))  # the input mix alone
    np.testing.assert_array_equal(heard[1]["context"], click)  # the click alone
    mix = song.render_mix(upto=2)
    np.testing.assert_array_equal(heard[2]["context"], limit(mix + db_to_gain(CLICK_GAIN_DB) * click, SR))
    assert [layer.click for layer in song.manifest.layers] == ["none", "click", "mix+click"]
    # the context is in the mix at 0 dB
    stems = [(song.stems[n], song.manifest.layer(n).gain_db) for n in song.layers]
    np.testing.assert_array_equal(song.mix, render_mix(context, stems, SR, 2 * SR))


def test_context_without_bpm_conditions_on_the_mix(band, heard):
    context = (np.random.default_rng(1).standard_normal(SR + SR // 2) * 0.1).astype(np.float32)
    song = Arranger(band).arrange(["bass"], context=context, context_sample_rate=SR)
    assert song.manifest.click == "none" and song.manifest.bpm is None
    assert song.manifest.duration == 1.5  # the context's length
    with pytest.raises(InputError, match="click mode 'mix\\+click' needs a tempo"):
        Arranger(band).arrange(["bass"], context=context, context_sample_rate=SR, click="mix+click")


def test_context_at_another_rate_is_resampled(band, heard, tmp_path):
    rate = 22050
    t = np.arange(int(1.5 * rate)) / rate
    stereo = np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)], axis=1).astype(np.float32) * 0.2
    path = tmp_path / "mix.wav"
    sf.write(str(path), stereo, rate, subtype="FLOAT")
    song = Arranger(band).arrange(["drums"], context=path, bpm=90)
    assert song.sample_rate == rate  # the song keeps the context's rate
    assert song.stems["drums"].shape == (int(1.5 * rate),)
    assert song.manifest.context.channels == 2 and song.manifest.context.sample_rate == rate
    assert heard[0]["sample_rate"] == rate  # the pipeline resamples to the expert's 16 kHz
    assert song.manifest.layers[0].expert.sample_rate == SR


def test_candidates_are_kept_and_the_pick_is_heard(band, heard):
    arranger = Arranger(band)
    song = arranger.arrange([Layer("drums", candidates=3, pick=1), "bass"], duration=1.5, click="none")
    drums = song.candidates["drums"]
    assert drums.shape == (3, int(1.5 * SR))
    assert not np.array_equal(drums[0], drums[1]) and not np.array_equal(drums[1], drums[2])
    assert np.array_equal(song.stems["drums"], drums[1])
    assert heard[0]["candidates"] == 3  # one batch
    np.testing.assert_array_equal(heard[1]["context"], render_mix(None, [(drums[1], 0.0)], SR, len(drums[1])))


def test_gains(band):
    song = Arranger(band).arrange([Layer("drums", gain_db=-6.0), Layer("bass", gain_db=3.0)], duration=1.0)
    assert [layer.gain_db for layer in song.manifest.layers] == [-6.0, 3.0]
    drums, bass = song.stems["drums"], song.stems["bass"]
    bus = mix_bus(None, [(drums, -6.0), (bass, 3.0)], SR)
    np.testing.assert_allclose(bus, db_to_gain(-6.0) * drums + db_to_gain(3.0) * bass, atol=1e-6)
    np.testing.assert_array_equal(song.mix, limit(bus, SR))


def test_sampling_params_and_seeds_reach_the_pipeline(band, heard):
    params = SamplingParams(cfg_coef=1.0, top_k=5)
    Arranger(band).arrange([Layer("drums", seed=42, params=params), "bass"], duration=1.0, seed=7)
    assert heard[0]["seed"] == 42 and heard[0]["params"] == params
    assert heard[1]["seed"] == 8 and heard[1]["params"] == SamplingParams()  # song seed + position


def test_prompt_without_text_encoder_warns_and_is_ignored(band, heard):
    with pytest.warns(UserWarning, match="no text encoder: prompt 'funky' is ignored"):
        song = Arranger(band).arrange([Layer("drums", prompt="funky")], duration=1.0)
    assert heard[0]["prompt_text"] is None
    assert song.manifest.layers[0].prompt is None and song.manifest.layers[0].prompt_source == "none"


def test_progress_callback(band):
    events = []
    Arranger(band).arrange(["drums", Layer("bass", candidates=2)], duration=1.0, callback=events.append)
    for layer, index in (("drums", 0), ("bass", 1)):
        mine = [e for e in events if e.layer == layer]
        assert all(e.index == index and e.layers == 2 for e in mine)
        steps = [e.step for e in mine if e.step > 0]
        assert steps == sorted(steps) and steps[-1] == mine[-1].steps
        # one window of 25 frames: 25 + n_q - 1 steps
        assert mine[-1].steps == 26


def test_bad_input_is_caught_before_any_work(band, heard, tmp_path):
    arranger = Arranger(band)
    with pytest.raises(UnknownInstrumentError, match="known instruments: bass, drums, keys"):
        arranger.arrange(["drums", "tuba"], duration=1.0)
    with pytest.raises(InputError, match="used twice"):
        arranger.arrange(["keys", "keys"], duration=1.0)
    with pytest.raises(InputError, match="outside 30-300"):
        arranger.arrange(["drums"], bpm=500, duration=1.0)
    with pytest.raises(InputError, match="more than 0 seconds"):
        arranger.arrange(["drums"], duration=0)
    with pytest.raises(InputError, match="no such file"):
        arranger.arrange(["drums"], context=tmp_path / "missing.wav")
    with pytest.raises(InputError, match="candidates must be an integer from 1 to 16"):
        Layer("drums", candidates=0)
    with pytest.raises(InputError, match="pick 3 is not one of its 2"):
        Layer("drums", candidates=2, pick=3)
    with pytest.raises(InputError, match="not usable as a file name"):
        Layer("drums", name="../evil")
    assert heard == []  # nothing was generated
    assert list(tmp_path.iterdir()) == []


def test_arranger_rejects_a_bad_click_mode(band):
    with pytest.raises(InputError, match="click must be one of none, mix\\+click, click"):
        Arranger(band, click="metronome")


def test_instruments_and_expert_checks(band, tmp_path):
    assert Arranger(band).instruments == ["bass", "drums", "keys"]
    from stage_stack.errors import IncompatibleExpertError

    wrong = Arranger({"bass": band["drums"]})
    with pytest.raises(IncompatibleExpertError, match="expert for 'drums'"):
        wrong.arrange(["bass"], duration=1.0)


def test_in_memory_expert(band):
    from stage_stack.expert import load_expert

    expert = load_expert(band["drums"])
    song = Arranger({"drums": expert}).arrange(["drums"], duration=1.0)
    reference = Arranger(band).arrange(["drums"], duration=1.0)
    assert np.array_equal(song.mix, reference.mix)
    assert song.manifest.layers[0].expert.origin == "in-memory"


class FakeText:
    """Stands in for the T5 conditioner: a fixed random embedding per word."""

    dim = 8

    def encode(self, texts):
        rows = []
        for text in texts:
            g = torch.Generator().manual_seed(sum(map(ord, text)))
            rows.append(torch.randn(3, self.dim, generator=g))
        return torch.stack(rows), torch.ones(len(texts), 3, dtype=torch.bool)


def test_prompts_reach_a_text_conditioned_expert(tmp_path, monkeypatch):
    from dataclasses import replace

    from arranger_helpers import FAST_CODEC, SHORT_WINDOW
    from stage_stack import pipeline as pipeline_module
    from stage_stack.expert import load_expert
    from stage_stack.testing import TINY_LM, make_tiny_expert

    lm_config = replace(TINY_LM, cross_attention=True, text_dim=FakeText.dim)
    path = make_tiny_expert(tmp_path / "keys.safetensors", instrument="keys", lm_config=lm_config,
                            codec_config=FAST_CODEC, training=SHORT_WINDOW, default_prompt="soft chords")
    expert = load_expert(path)
    expert.text = FakeText()
    with torch.no_grad():  # random init makes the text's effect on the logits negligible: amplify it
        expert.lm.text_proj.weight.mul_(50)
        for block in expert.lm.blocks:
            block.cross_attn.kv.weight.mul_(50)
            block.cross_attn.out.weight.mul_(50)
    memories = []
    real_generate = pipeline_module.generate

    def spy(lm, context, n_frames, **kwargs):
        memories.append(kwargs["text_memory"])
        return real_generate(lm, context, n_frames, **kwargs)

    monkeypatch.setattr(pipeline_module, "generate", spy)
    arranger = Arranger({"keys": expert})
    default = arranger.arrange(["keys"], duration=1.0)
    assert default.manifest.layers[0].prompt == "soft chords" and default.manifest.layers[0].prompt_source == "default"
    assert memories[-1][0].shape == (1, 3, lm_config.dim)
    bright = arranger.arrange([Layer("keys", prompt="bright stabs", candidates=2)], duration=1.6)
    assert bright.manifest.layers[0].prompt_source == "user"
    assert memories[-1][0].shape[0] == 2  # the continued window: one text row per candidate
    assert not np.array_equal(arranger.arrange([Layer("keys", prompt="bright stabs")], duration=1.0).mix, default.mix)
