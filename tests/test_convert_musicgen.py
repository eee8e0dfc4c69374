"""MusicGen importers (transformers and audiocraft formats) -> STAGE base experts.

The sources are tiny checkpoints built here with the real key names: a random
`MusicgenForConditionalGeneration` saved with `save_pretrained`, and the audiocraft dicts derived
from it with the renaming of transformers' own conversion script
(`convert_musicgen_transformers.py`), run backwards. The reference for the numbers is
transformers' Musicgen decoder itself.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration, T5Config

import stage_stack.cli.convert  # noqa: F401  (registers `stage-stack convert`)
from stage_stack.cli import cli
from stage_stack.convert.encodec import encodec_state_dict_to_hf, infer_codec_config
from stage_stack.convert.musicgen import (AudiocraftXpConfig, HFMusicgenConfig, add_special_rows, audiocraft_key_map,
                                          convert_musicgen_audiocraft, convert_musicgen_hf, hf_key_map,
                                          plan_audiocraft_lm, plan_hf_lm)
from stage_stack.errors import CheckpointKeyError, StageStackError
from stage_stack.expert import load_expert, read_metadata, sha256_file
from stage_stack.models.codec import CodecConfig
from stage_stack.models.stage_lm import StageLM, StageLMConfig
from stage_stack.testing import TINY_CODEC

CARD, N_Q, DIM, HEADS, LAYERS, FFN, TEXT_DIM = 16, 2, 32, 4, 2, 48, 16
LOGIT_TOL = 1e-5


# -- building the sources ----------------------------------------------------------------------

def tiny_musicgen(seed: int = 0, dim: int = DIM, heads: int = HEADS) -> MusicgenForConditionalGeneration:
    torch.manual_seed(seed)
    decoder = MusicgenDecoderConfig(vocab_size=CARD, hidden_size=dim, num_hidden_layers=LAYERS, num_attention_heads=heads,
                                    ffn_dim=FFN, num_codebooks=N_Q)
    text = T5Config(vocab_size=40, d_model=TEXT_DIM, d_kv=8, d_ff=24, num_layers=1, num_heads=2)
    config = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=TINY_CODEC.to_hf().to_dict(),
                            decoder=decoder.to_dict())
    model = MusicgenForConditionalGeneration(config).eval()
    with torch.no_grad():  # well away from the init values, so a swapped or missed tensor shows
        for name, p in model.decoder.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "norm" in name else 0.1))
        for p in model.enc_to_dec_proj.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for layer in model.audio_encoder.quantizer.layers:  # distinct codewords, so codes vary
            layer.codebook.embed.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def hf_model() -> MusicgenForConditionalGeneration:
    return tiny_musicgen()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("musicgen-tiny")
    hf_model.save_pretrained(path)
    (path / "tokenizer.json").write_text("{}")  # stands in for the processor's tokenizer files
    return path


def copy_hf_dir(src: Path, dst: Path, edit_tensors=None, edit_config=None) -> Path:
    dst.mkdir(parents=True)
    tensors = load_file(str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def audiocraft_lm_state(model: MusicgenForConditionalGeneration) -> dict[str, torch.Tensor]:
    """audiocraft `LMModel` names for the tiny model: transformers' conversion mapping, reversed."""
    sd = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("decoder.", "enc_to_dec_proj."))}
    out = {}
    dec = "decoder.model.decoder."
    renames = [("self_attn_layer_norm", "norm1"), ("encoder_attn_layer_norm", "norm_cross"),
               ("final_layer_norm", "norm2"), ("encoder_attn", "cross_attention"), ("fc1", "linear1"), ("fc2", "linear2")]
    for key, value in sd.items():
        if key.startswith(f"{dec}embed_tokens."):
            out[key.replace(f"{dec}embed_tokens.", "emb.")] = value
        elif key.startswith(f"{dec}layers."):
            if re.search(r"_attn\.[qkv]_proj\.weight$", key):
                continue  # fused below
            new = key.replace(f"{dec}layers.", "transformer.layers.")
            for theirs, ours in renames:
                new = new.replace(theirs, ours)
            out[new] = value
        elif key.startswith(f"{dec}layer_norm."):
            out[key.replace(f"{dec}layer_norm.", "out_norm.")] = value
        elif key.startswith("decoder.lm_heads."):
            out[key.replace("decoder.lm_heads.", "linears.")] = value
        elif key.startswith("enc_to_dec_proj."):
            out[key.replace("enc_to_dec_proj.", "condition_provider.conditioners.description.output_proj.")] = value
    for i in range(model.config.decoder.num_hidden_layers):
        for theirs, ours in (("self_attn", "self_attn"), ("encoder_attn", "cross_attention")):
            q, k, v = (sd[f"{dec}layers.{i}.{theirs}.{p}_proj.weight"] for p in "qkv")
            out[f"transformer.layers.{i}.{ours}.in_proj_weight"] = torch.cat([q, k, v])
    return out


def audiocraft_codec_state(model: MusicgenForConditionalGeneration) -> dict[str, torch.Tensor]:
    """audiocraft / original-encodec names (`weight_g`/`weight_v`) for the tiny model's EnCodec."""
    encodec = model.audio_encoder
    transposed = {name for name, m in encodec.named_modules() if type(m).__name__ == "EncodecConvTranspose1d"}
    out = {}
    for key, value in encodec.state_dict().items():
        key = key.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                                   "weight_v")
        m = re.fullmatch(r"(.+?)\.conv\.(bias|weight_g|weight_v)", key)
        if m:
            key = f"{m.group(1)}.{'convtr.convtr' if m.group(1) in transposed else 'conv.conv'}.{m.group(2)}"
        key = re.sub(r"^(encoder|decoder)\.layers\.", r"\1.model.", key)
        key = re.sub(r"^quantizer\.layers\.(\d+)\.codebook\.", r"quantizer.vq.layers.\1._codebook.", key)
        out[key] = value.clone()
    return out


XP_CFG = {
    "transformer_lm": {"dim": DIM, "num_heads": HEADS, "num_layers": LAYERS, "n_q": "${compression.n_q}", "card": CARD,
                       "hidden_scale": FFN / DIM, "activation": "gelu", "norm": "layer_norm", "norm_first": True,
                       "positional_embedding": "sin", "layer_scale": None, "bias_ff": False, "bias_attn": False},
    "compression": {"n_q": N_Q},
    "codebooks_pattern": {"modeling": "delay", "delay": {"delays": list(range(N_Q))}},
    "fuser": {"cross_attention_pos_emb": False, "cross": ["description"]},
    "conditioners": {"description": {"model": "t5", "t5": {"name": "t5-base", "finetune": False}}},
}
COMPRESSION_CFG = {"sample_rate": TINY_CODEC.sample_rate,
                   "seanet": {"pad_mode": "constant", "causal": False, "dilation_base": 2,
                              "decoder": {"trim_right_ratio": 1.0}},
                   "encodec": {"renormalize": False}}


def write_audiocraft(model, directory: Path, lm_state=None, xp_cfg=XP_CFG) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    lm_package = {"best_state": audiocraft_lm_state(model) if lm_state is None else lm_state,
                  "version": "1.3.0", "exported": True}
    if xp_cfg is not None:
        lm_package["xp.cfg"] = yaml.safe_dump(xp_cfg)
    torch.save(lm_package, directory / "state_dict.bin")
    torch.save({"best_state": audiocraft_codec_state(model), "xp.cfg": yaml.safe_dump(COMPRESSION_CFG),
                "version": "1.3.0", "exported": True}, directory / "compression_state_dict.bin")
    return directory / "state_dict.bin", directory / "compression_state_dict.bin"


@pytest.fixture(scope="module")
def audiocraft_files(hf_model, tmp_path_factory) -> tuple[Path, Path]:
    return write_audiocraft(hf_model, tmp_path_factory.mktemp("audiocraft"))


# -- the reference numbers ---------------------------------------------------------------------

def inputs(seed: int = 1, batch: int = 2, steps: int = 7, text_len: int = 5):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, CARD, (batch, N_Q, steps), generator=gen)  # audio codes only: no PAD
    hidden = torch.randn(batch, text_len, TEXT_DIM, generator=gen)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[1, 3:] = False  # a shorter description: its padding keys must be masked in both models
    return codes, hidden, mask


@torch.no_grad()
def musicgen_logits(model: MusicgenForConditionalGeneration, codes, hidden, mask) -> torch.Tensor:
    memory = model.enc_to_dec_proj(hidden) * mask[..., None]
    B, K, S = codes.shape
    out = model.decoder(input_ids=codes.reshape(B * K, S), encoder_hidden_states=memory,
                        encoder_attention_mask=mask.long())
    return out.logits.reshape(B, K, S, -1)


@torch.no_grad()
def stage_logits(lm: StageLM, codes, hidden, mask) -> torch.Tensor:
    B, _, S = codes.shape
    memory = lm.project_text(hidden, mask)
    return lm(codes, torch.ones(B, S, dtype=torch.bool), memory=memory, memory_mask=mask,
              positions=torch.arange(S).expand(B, S))


def max_logit_error(lm: StageLM, model: MusicgenForConditionalGeneration, seed: int) -> float:
    codes, hidden, mask = inputs(seed=seed)
    return (stage_logits(lm, codes, hidden, mask) - musicgen_logits(model, codes, hidden, mask)).abs().max().item()


def expected_sep_rows(seed: int, dim: int = DIM) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(N_Q):
        row = torch.empty(1, dim)
        torch.nn.init.kaiming_normal_(row, mode="fan_in", nonlinearity="leaky_relu", a=0, generator=gen)
        rows.append(row[0])
    return rows


def assert_base_expert_rows(lm: StageLM, source_tables: list[torch.Tensor], seed: int) -> None:
    for k, (table, sep) in enumerate(zip(source_tables, expected_sep_rows(seed))):
        ours = lm.embeddings[k].weight
        assert ours.shape == (CARD + 2, DIM)
        torch.testing.assert_close(ours[:CARD], table[:CARD], rtol=0, atol=0)
        assert torch.count_nonzero(ours[CARD]) == 0, "PAD row must be zeros"
        assert torch.count_nonzero(table[CARD]) > 0, "the source's special row must not be what we zeroed already"
        torch.testing.assert_close(ours[CARD + 1], sep, rtol=0, atol=0)


# -- transformers format -----------------------------------------------------------------------

def test_hf_import_reproduces_musicgen_logits(hf_model, hf_dir, tmp_path):
    result = convert_musicgen_hf(hf_dir, tmp_path / "base.safetensors", seed=3)
    expert = load_expert(result.expert, load_text=False)

    codes, hidden, mask = inputs()
    ours, theirs = stage_logits(expert.lm, codes, hidden, mask), musicgen_logits(hf_model, codes, hidden, mask)
    assert ours.shape == theirs.shape == (2, N_Q, 7, CARD)
    assert (ours - theirs).abs().max().item() <= LOGIT_TOL
    assert theirs.abs().max().item() > 1.0  # the comparison is not between near-zero outputs

    cfg = expert.lm.config
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.ffn_dim, cfg.card, cfg.n_q, cfg.text_dim, cfg.cross_attention) == (
        DIM, LAYERS, HEADS, FFN, CARD, N_Q, TEXT_DIM, True)
    assert_base_expert_rows(expert.lm, [e.weight for e in hf_model.decoder.model.decoder.embed_tokens], seed=3)


def test_hf_import_codec_and_metadata(hf_model, hf_dir, tmp_path):
    result = convert_musicgen_hf(hf_dir, tmp_path / "base.safetensors", instrument="keys")
    expert = load_expert(result.expert, load_text=False)
    meta = expert.metadata

    assert result.codec_file.parent == tmp_path and not meta.codec.embedded
    assert meta.codec.filename == result.codec_file.name and meta.codec.sha256 == sha256_file(result.codec_file)
    assert meta.codec_cfg == TINY_CODEC
    audio = torch.randn(2, 1, TINY_CODEC.hop_length * 12, generator=torch.Generator().manual_seed(0)) * 0.3
    ours = expert.codec.encode(audio)
    theirs = hf_model.audio_encoder.encode(audio, bandwidth=TINY_CODEC.bandwidth).audio_codes[0]
    assert torch.equal(ours, theirs) and ours.unique().numel() > 2

    assert (meta.instrument, meta.license, meta.base_model) == ("keys", "CC-BY-NC-4.0", "facebook/musicgen-small")
    assert meta.training["source_format"] == "transformers" and meta.training["converted_from"] == hf_dir.name
    assert meta.training["sep_init"]["seed"] == 0 and meta.training["fine_tuned"] is False
    assert (meta.special_tokens.pad, meta.special_tokens.sep) == (CARD, CARD + 1)
    with safe_open(str(result.expert), "pt") as f:
        assert not any(k.startswith(("codec.", "text_encoder.")) for k in f.keys())


def test_hf_import_t5_weights_load_with_the_text_loader(hf_model, hf_dir, tmp_path):
    from stage_stack.models.text import load_encoder

    result = convert_musicgen_hf(hf_dir, tmp_path / "base.safetensors")
    meta = read_metadata(result.expert)
    assert meta.text_encoder_id == "t5-base" and meta.text_encoder.filename == result.text_encoder_file.name
    assert meta.text_encoder.sha256 == sha256_file(result.text_encoder_file)
    stored = load_file(str(result.text_encoder_file))
    assert "shared.weight" not in stored  # the text loader's convention: each tensor once

    # the loader's T5 directory: config.json from the MusicGen config, the tokenizer copied over
    t5_dir = tmp_path / "t5-base"
    assert (t5_dir / "tokenizer.json").is_file()
    encoder = load_encoder(T5Config.from_pretrained(t5_dir), result.text_encoder_file, "", "cpu")
    ids = torch.tensor([[3, 7, 1], [5, 1, 0]])
    with torch.no_grad():
        ours = encoder(input_ids=ids).last_hidden_state
        theirs = hf_model.text_encoder(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_hf_import_is_deterministic_and_seeded(hf_dir, tmp_path):
    a = convert_musicgen_hf(hf_dir, tmp_path / "a.safetensors", seed=5).expert
    b = convert_musicgen_hf(hf_dir, tmp_path / "b.safetensors", seed=5).expert
    c = convert_musicgen_hf(hf_dir, tmp_path / "c.safetensors", seed=6).expert
    ta, tb, tc = (load_file(str(p)) for p in (a, b, c))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    sep = "lm.embeddings.0.weight"
    assert not torch.equal(ta[sep][CARD + 1], tc[sep][CARD + 1])
    assert torch.equal(ta[sep][: CARD + 1], tc[sep][: CARD + 1])
    # the two SEP rows of one expert are separate draws
    assert not torch.equal(ta["lm.embeddings.0.weight"][CARD + 1], ta["lm.embeddings.1.weight"][CARD + 1])


def test_hf_import_embedded_codec(hf_dir, tmp_path):
    result = convert_musicgen_hf(hf_dir, tmp_path / "base.safetensors", embed_codec=True)
    assert result.codec_file is None and read_metadata(result.expert).codec.embedded
    assert not list(tmp_path.glob("encodec_*"))
    load_expert(result.expert, load_text=False)


def test_hf_import_sharded_checkpoint(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    result = convert_musicgen_hf(tmp_path / "sharded", tmp_path / "base.safetensors")
    assert max_logit_error(load_expert(result.expert, load_text=False).lm, hf_model, seed=4) <= LOGIT_TOL


def test_special_rows_have_kaiming_fan_in_statistics():
    dim = 4096  # enough samples to pin the std to a few percent
    table = torch.randn(8, dim)
    out = add_special_rows(table, torch.Generator().manual_seed(0))
    assert out.shape == (10, dim) and torch.equal(out[:8], table)
    assert torch.count_nonzero(out[8]) == 0
    assert abs(out[9].std().item() / math.sqrt(2 / dim) - 1) < 0.05
    assert abs(out[9].mean().item()) < 0.005


# -- audiocraft format -------------------------------------------------------------------------

def test_audiocraft_import_reproduces_musicgen_logits(hf_model, audiocraft_files, tmp_path):
    result = convert_musicgen_audiocraft(*audiocraft_files, tmp_path / "base.safetensors", seed=3)
    expert = load_expert(result.expert, load_text=False)

    codes, hidden, mask = inputs(seed=2)
    ours, theirs = stage_logits(expert.lm, codes, hidden, mask), musicgen_logits(hf_model, codes, hidden, mask)
    assert (ours - theirs).abs().max().item() <= LOGIT_TOL
    assert expert.lm.config.n_heads == HEADS  # from xp.cfg, not dim // 64
    assert_base_expert_rows(expert.lm, [e.weight for e in hf_model.decoder.model.decoder.embed_tokens], seed=3)

    meta = expert.metadata
    assert meta.training["source_format"] == "audiocraft" and meta.text_encoder is None
    assert meta.text_encoder_id == "t5-base" and result.text_encoder_file is None
    assert any("no T5 weights" in note for note in result.notes)
    assert meta.codec_cfg == TINY_CODEC  # pad_mode "constant" from xp.cfg replaced by STAGE's "reflect"
    audio = torch.randn(1, 1, TINY_CODEC.hop_length * 10, generator=torch.Generator().manual_seed(1)) * 0.3
    theirs_codes = hf_model.audio_encoder.encode(audio, bandwidth=TINY_CODEC.bandwidth).audio_codes[0]
    assert torch.equal(expert.codec.encode(audio), theirs_codes)


def test_audiocraft_pad_mode_from_config(audiocraft_files, tmp_path):
    result = convert_musicgen_audiocraft(*audiocraft_files, tmp_path / "base.safetensors", pad_mode=None)
    assert read_metadata(result.expert).codec_config["pad_mode"] == "constant"


def test_audiocraft_multihead_attention_names_and_finetuned_t5(hf_model, tmp_path):
    """nn.MultiheadAttention names (`self_attn.mha.*`) and T5 weights kept in the LM state."""
    state = audiocraft_lm_state(hf_model)
    state = {re.sub(r"\.(self_attn|cross_attention)\.", r".\1.mha.", k): v for k, v in state.items()}
    t5 = {k: v.clone() for k, v in hf_model.text_encoder.state_dict().items()}
    state.update({f"condition_provider.conditioners.description.t5.{k}": v for k, v in t5.items()})
    files = write_audiocraft(hf_model, tmp_path / "src", lm_state=state)
    result = convert_musicgen_audiocraft(*files, tmp_path / "base.safetensors")

    assert max_logit_error(load_expert(result.expert, load_text=False).lm, hf_model, seed=5) <= LOGIT_TOL
    stored = load_file(str(result.text_encoder_file))
    assert torch.equal(stored["encoder.embed_tokens.weight"], t5["shared.weight"])
    assert read_metadata(result.expert).text_encoder.sha256 == sha256_file(result.text_encoder_file)


def test_audiocraft_without_xp_cfg_uses_64_wide_heads(tmp_path):
    model = tiny_musicgen(seed=1, dim=128, heads=2)
    files = write_audiocraft(model, tmp_path / "src", xp_cfg=None)
    result = convert_musicgen_audiocraft(*files, tmp_path / "base.safetensors")
    lm = load_expert(result.expert, load_text=False).lm
    assert lm.config.n_heads == 2 and lm.config.dim == 128
    assert any("no 'xp.cfg'" in note for note in result.notes)
    assert max_logit_error(lm, model, seed=6) <= LOGIT_TOL


# -- key maps ----------------------------------------------------------------------------------

@pytest.mark.parametrize("key_map", [hf_key_map, audiocraft_key_map])
def test_key_maps_cover_every_stage_lm_tensor(key_map):
    config = StageLMConfig(dim=DIM, n_layers=3, n_heads=HEADS, ffn_dim=FFN, card=CARD, n_q=3, text_dim=TEXT_DIM)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in StageLM(config).state_dict().items()}
    mapped = key_map(config)
    assert set(mapped) == set(expected)
    for ours, pieces in mapped.items():
        rows = sum((p.rows[1] - p.rows[0]) if p.rows else p.shape[0] for p in pieces)
        extra = 2 if ours.startswith("embeddings.") else 0  # PAD and SEP are added by the importer
        assert (rows + extra, *pieces[0].shape[1:]) == expected[ours], ours


def test_musicgen_small_layout_at_full_size():
    """The real sizes (reference §1) from a meta-device musicgen-small: no weights, only shapes."""
    text = T5Config(d_model=768, d_ff=3072, d_kv=64, num_layers=12, num_heads=12)  # t5-base
    config = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=CodecConfig.musicgen_32khz().to_hf().to_dict(),
                            decoder=MusicgenDecoderConfig().to_dict())  # transformers' defaults are musicgen-small's
    with torch.device("meta"):
        model = MusicgenForConditionalGeneration(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    lm_config, _ = plan_hf_lm(shapes, HFMusicgenConfig.model_validate(config.to_dict()), "musicgen-small (meta)")
    assert lm_config == StageLMConfig(dim=1024, n_layers=24, n_heads=16, ffn_dim=4096, card=2048, n_q=4,
                                      cross_attention=True, text_dim=768)
    with torch.device("meta"):
        assert sum(p.numel() for p in StageLM(lm_config).parameters()) == 419_588_096 + 1024 * 768 + 1024  # + text_proj

    audiocraft = {k: tuple(v.shape) for k, v in audiocraft_lm_state(model).items()}
    assert plan_audiocraft_lm(audiocraft, AudiocraftXpConfig(), "state_dict.bin (meta)")[0] == lm_config

    codec_state = encodec_state_dict_to_hf(model.audio_encoder.state_dict())
    assert infer_codec_config(codec_state, sample_rate=32000) == CodecConfig.musicgen_32khz()


# -- bad input ---------------------------------------------------------------------------------

def assert_nothing_written(directory: Path, before: set[str]) -> None:
    assert {p.name for p in directory.iterdir()} == before


def test_hf_bad_keys_are_all_named(hf_dir, tmp_path):
    dec = "decoder.model.decoder."

    def damage(tensors):
        del tensors[f"{dec}layers.1.encoder_attn.v_proj.weight"]
        tensors["decoder.model.decoder.extra.weight"] = torch.zeros(3)
        tensors[f"{dec}layers.0.fc2.weight"] = torch.zeros(DIM, FFN + 1)

    src = copy_hf_dir(hf_dir, tmp_path / "src", edit_tensors=damage)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(CheckpointKeyError) as err:
        convert_musicgen_hf(src, out_dir / "base.safetensors")
    assert err.value.missing == [f"{dec}layers.1.encoder_attn.v_proj.weight"]
    assert err.value.unexpected == ["decoder.model.decoder.extra.weight"]
    assert err.value.mis_shaped == [(f"{dec}layers.0.fc2.weight", (DIM, FFN + 1), (DIM, FFN))]
    message = str(err.value)
    for name in ("layers.1.encoder_attn.v_proj.weight", "decoder.extra.weight", "layers.0.fc2.weight"):
        assert name in message
    assert_nothing_written(out_dir, set())


def test_hf_bad_codec_keys_are_named(hf_dir, tmp_path):
    def damage(tensors):
        del tensors["audio_encoder.quantizer.layers.1.codebook.embed_avg"]

    src = copy_hf_dir(hf_dir, tmp_path / "src", edit_tensors=damage)
    with pytest.raises(CheckpointKeyError, match=r"quantizer\.layers\.1\.codebook\.embed_avg"):
        convert_musicgen_hf(src, tmp_path / "base.safetensors")
    assert not (tmp_path / "base.safetensors").exists() and not list(tmp_path.glob("encodec_*"))


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["decoder"].update(num_codebooks=3), r"decoder\.num_codebooks is 3 but the weights give 2"),
    (lambda c: c["decoder"].update(activation_function="relu"), r"field 'decoder\.activation_function'"),
    (lambda c: c["decoder"].update(audio_channels=2), r"field 'decoder\.audio_channels'"),
    (lambda c: c.pop("audio_encoder"), r"field 'audio_encoder'"),
])
def test_hf_bad_config_is_named(hf_dir, tmp_path, edit, match):
    src = copy_hf_dir(hf_dir, tmp_path / "src", edit_config=edit)
    with pytest.raises(StageStackError, match=match):
        convert_musicgen_hf(src, tmp_path / "base.safetensors")
    assert not (tmp_path / "base.safetensors").exists()


def test_hf_missing_or_truncated_files(hf_dir, tmp_path):
    src = copy_hf_dir(hf_dir, tmp_path / "src")
    (src / "config.json").rename(src / "config.json.bak")
    with pytest.raises(StageStackError, match="no config.json"):
        convert_musicgen_hf(src, tmp_path / "a.safetensors")
    (src / "config.json.bak").rename(src / "config.json")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(StageStackError, match="truncated"):
        convert_musicgen_hf(src, tmp_path / "a.safetensors")
    (src / "model.safetensors").unlink()
    with pytest.raises(StageStackError, match="no model.safetensors"):
        convert_musicgen_hf(src, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


def test_existing_output_is_kept(hf_dir, tmp_path):
    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"user data")
    with pytest.raises(StageStackError, match="already exists"):
        convert_musicgen_hf(hf_dir, out)
    assert out.read_bytes() == b"user data"
    convert_musicgen_hf(hf_dir, out, overwrite=True)
    assert read_metadata(out).instrument == "base"


def test_invalid_metadata_writes_nothing(hf_dir, tmp_path):
    with pytest.raises(StageStackError, match="field 'instrument'"):
        convert_musicgen_hf(hf_dir, tmp_path / "base.safetensors", instrument="")
    assert list(tmp_path.iterdir()) == []


def test_audiocraft_bad_keys_are_all_named(hf_model, tmp_path):
    state = audiocraft_lm_state(hf_model)
    del state["transformer.layers.1.norm_cross.bias"]
    state["transformer.layers.0.layer_scale_1.scale"] = torch.ones(DIM)
    state["transformer.layers.0.cross_attention.in_proj_weight"] = torch.zeros(2 * DIM, DIM)
    files = write_audiocraft(hf_model, tmp_path / "src", lm_state=state)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(CheckpointKeyError) as err:
        convert_musicgen_audiocraft(*files, out_dir / "base.safetensors")
    assert err.value.missing == ["transformer.layers.1.norm_cross.bias"]
    assert err.value.unexpected == ["transformer.layers.0.layer_scale_1.scale"]
    assert err.value.mis_shaped == [("transformer.layers.0.cross_attention.in_proj_weight", (2 * DIM, DIM), (3 * DIM, DIM))]
    assert_nothing_written(out_dir, set())


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["transformer_lm"].update(norm_first=False), r"field 'transformer_lm\.norm_first'"),
    (lambda c: c["codebooks_pattern"].update(modeling="parallel"), r"field 'codebooks_pattern\.modeling'"),
    (lambda c: c["fuser"].update(cross_attention_pos_emb=True), r"field 'fuser\.cross_attention_pos_emb'"),
    (lambda c: c["transformer_lm"].update(num_layers=5), r"transformer_lm\.num_layers is 5 but the weights give 2"),
])
def test_audiocraft_bad_xp_cfg_is_named(hf_model, tmp_path, edit, match):
    cfg = json.loads(json.dumps(XP_CFG))
    edit(cfg)
    files = write_audiocraft(hf_model, tmp_path / "src", xp_cfg=cfg)
    with pytest.raises(StageStackError, match=match):
        convert_musicgen_audiocraft(*files, tmp_path / "base.safetensors")
    assert not (tmp_path / "base.safetensors").exists()


def test_audiocraft_unreadable_files(audiocraft_files, tmp_path):
    state_dict_bin, compression_bin = audiocraft_files
    not_torch = tmp_path / "state_dict.bin"
    not_torch.write_bytes(b"not a checkpoint")
    with pytest.raises(StageStackError, match=r"torch\.load\(weights_only=True\)"):
        convert_musicgen_audiocraft(not_torch, compression_bin, tmp_path / "a.safetensors")
    no_best_state = tmp_path / "other.bin"
    torch.save({"model": {}}, no_best_state)
    with pytest.raises(StageStackError, match="'best_state'"):
        convert_musicgen_audiocraft(no_best_state, compression_bin, tmp_path / "a.safetensors")
    reference_only = tmp_path / "compression_state_dict.bin"
    torch.save({"pretrained": "facebook/encodec_32khz", "exported": True}, reference_only)
    with pytest.raises(StageStackError, match="only a reference"):
        convert_musicgen_audiocraft(state_dict_bin, reference_only, tmp_path / "a.safetensors")
    assert {p.name for p in tmp_path.iterdir()} == {"state_dict.bin", "other.bin", "compression_state_dict.bin"}


def test_lm_and_codec_from_different_musicgens(hf_model, tmp_path):
    state_dict_bin, _ = write_audiocraft(hf_model, tmp_path / "a")
    other = audiocraft_codec_state(hf_model)
    other = {k: v for k, v in other.items() if not k.startswith("quantizer.vq.layers.1.")}  # a 1-codebook codec
    torch.save({"best_state": other, "xp.cfg": yaml.safe_dump(COMPRESSION_CFG)}, tmp_path / "codec.bin")
    with pytest.raises(StageStackError, match="1 codebooks of 16 codes but the LM models 2 of 16"):
        convert_musicgen_audiocraft(state_dict_bin, tmp_path / "codec.bin", tmp_path / "base.safetensors")
    assert not (tmp_path / "base.safetensors").exists()


# -- command line ------------------------------------------------------------------------------

def test_cli_musicgen_hf(hf_dir, tmp_path):
    out = tmp_path / "base.safetensors"
    result = CliRunner().invoke(cli, ["convert", "musicgen-hf", str(hf_dir), str(out), "--instrument", "guitar",
                                      "--seed", "4"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    meta = read_metadata(out)
    assert meta.instrument == "guitar" and meta.training["sep_init"]["seed"] == 4
    again = CliRunner().invoke(cli, ["convert", "musicgen-hf", str(hf_dir), str(out)])
    assert again.exit_code == 1 and "already exists" in again.output and "--force" in again.output


def test_cli_musicgen_audiocraft_reports_errors_without_traceback(hf_model, audiocraft_files, tmp_path):
    out = tmp_path / "base.safetensors"
    ok = CliRunner().invoke(cli, ["convert", "musicgen-audiocraft", *map(str, audiocraft_files), str(out),
                                  "--embed-codec", "--pad-mode", "from-config"])
    assert ok.exit_code == 0, ok.output
    meta = read_metadata(out)
    assert meta.codec.embedded and meta.codec_config["pad_mode"] == "constant"
    assert "no T5 weights" in ok.output  # the note (stderr is mixed into output by CliRunner)

    state = audiocraft_lm_state(hf_model)
    del state["out_norm.weight"]
    files = write_audiocraft(hf_model, tmp_path / "bad", lm_state=state)
    bad = CliRunner().invoke(cli, ["convert", "musicgen-audiocraft", *map(str, files), str(tmp_path / "x.safetensors")])
    assert bad.exit_code == 1 and "missing keys (1): out_norm.weight" in bad.output
    assert bad.exception is None or isinstance(bad.exception, SystemExit)


STAGE_FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "stage_ref_small"


@pytest.mark.skipif(not (STAGE_FIXTURE / "lightning_musicgen_small.safetensors").is_file(),
                    reason="no STAGE fixture checkpoint")
def test_cli_stage(tmp_path):
    out = tmp_path / "drums.safetensors"
    result = CliRunner().invoke(cli, ["convert", "stage", str(STAGE_FIXTURE / "lightning_musicgen_small.safetensors"),
                                      str(out), "--instrument", "drums", "--license", "MIT", "--embed-codec"])
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert (meta.instrument, meta.license, meta.codec.embedded) == ("drums", "MIT", True)
    missing = CliRunner().invoke(cli, ["convert", "stage", str(tmp_path / "nope.safetensors"), str(out),
                                       "--instrument", "drums"])
    assert missing.exit_code == 2 and "does not exist" in missing.output
