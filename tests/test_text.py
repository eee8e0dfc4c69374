"""Text conditioning (reference §1): a tiny T5 and tokenizer built here, nothing downloaded."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from stage_stack.errors import CheckpointKeyError, ExpertFormatError, IntegrityError
from stage_stack.expert import WeightsRef, atomic_save_safetensors, load_expert, read_metadata, save_expert, sha256_file
from stage_stack.generation import SamplingParams, generate
from stage_stack.models.stage_lm import StageLMConfig
from stage_stack.models.text import (
    WORD_DROPOUT,
    TextConditioner,
    conditioning_for,
    drop_words,
    encoder_state_dict,
    load_text_conditioner,
)
from stage_stack.testing import TINY_CODEC, expert_metadata, tiny_codec, tiny_lm

sentencepiece = pytest.importorskip("sentencepiece")
from transformers import T5Config, T5EncoderModel, T5Tokenizer  # noqa: E402

CORPUS = [
    "Genres: rock, pop. Moods: happy, energetic.",
    "Genre: jazz. Mood: calm.",
    "a funky bass line with slap and ghost notes",
    "heavy drums, fast tempo, punk energy",
    "soft piano ballad in a minor key",
    "electronic dance music with a four on the floor kick",
]
ENCODER_ID = "tiny/t5"  # has a "/" so the directory slug "tiny--t5" is exercised
SLUG = "tiny--t5"
TINY_T5 = dict(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
               relative_attention_max_distance=16, feed_forward_proj="relu",
               dropout_rate=0.1)  # non-zero so that a T5 left in train mode would be caught


def train_spiece(directory: Path) -> Path:
    """A 60-piece unigram sentencepiece model with T5's special ids (<pad> 0, </s> 1, <unk> 2)."""
    directory.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 5), model_prefix=str(directory / "spiece"), vocab_size=60,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
        unk_piece="<unk>", hard_vocab_limit=False, minloglevel=2)
    return directory / "spiece.model"


def tiny_tokenizer(spiece_model: Path) -> T5Tokenizer:
    """The sentencepiece vocabulary as a T5Tokenizer (read without protobuf: pieces and scores)."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spiece_model))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_conditioner(tokenizer: T5Tokenizer, seed: int = 0) -> TextConditioner:
    torch.manual_seed(seed)
    return TextConditioner(T5EncoderModel(T5Config(vocab_size=64, **TINY_T5)), tokenizer)


@pytest.fixture(scope="module")
def spiece_model(tmp_path_factory) -> Path:
    return train_spiece(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def tokenizer(spiece_model) -> T5Tokenizer:
    return tiny_tokenizer(spiece_model)


@pytest.fixture(scope="module")
def cond(tokenizer) -> TextConditioner:
    return tiny_conditioner(tokenizer)


@pytest.fixture(scope="module")
def t5_dir(cond, tmp_path_factory) -> Path:
    return cond.save_pretrained(tmp_path_factory.mktemp("t5") / SLUG)


# -- tokenization and masks ---------------------------------------------------------------------

def test_pads_to_longest_and_appends_eos(cond, tokenizer):
    texts = ["a funky bass line with slap", "jazz", "punk drums"]
    ids, token_mask = cond.tokenize(texts)
    pieces = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert ids.shape == (3, max(len(p) for p in pieces) + 1)
    for row, p in enumerate(pieces):
        n = len(p) + 1
        assert ids[row, : n].tolist() == p + [tokenizer.eos_token_id]
        assert ids[row, n:].eq(tokenizer.pad_token_id).all()
        assert token_mask[row].tolist() == [True] * n + [False] * (ids.shape[1] - n)
    # Same ids and mask as the T5 tokenizer's own padded batch.
    ref = tokenizer(texts, padding="longest", return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(token_mask, ref["attention_mask"].bool())

    hidden, mask = cond.encode(texts)
    assert hidden.shape == (3, ids.shape[1], 16) and hidden.dtype == torch.float32
    assert torch.equal(mask, token_mask)


def test_long_text_is_not_truncated(cond):
    text = " ".join(CORPUS * 4)
    ids, _ = cond.tokenize([text])
    assert ids.shape[1] > 512  # t5's model_max_length; the reference does not truncate
    hidden, mask = cond.encode([text])
    assert hidden.shape[1] == ids.shape[1] and bool(mask.all())


def test_empty_text_gets_all_false_mask_and_leaves_other_rows_alone(cond):
    hidden, mask = cond.encode(["heavy drums, fast tempo", "", None])
    assert mask[0].all() and not mask[1].any() and not mask[2].any()
    alone, alone_mask = cond.encode(["heavy drums, fast tempo"])
    assert torch.equal(alone_mask[0], mask[0])
    assert (hidden[0] - alone[0]).abs().max() < 1e-5  # padding in the batch does not leak in

    only_empty, only_empty_mask = cond.encode([""])
    assert only_empty.shape == (1, 1, 16) and only_empty_mask.tolist() == [[False]]  # T5 ran on "</s>"
    assert torch.isfinite(only_empty).all()


def test_encode_rejects_a_bare_string_and_an_empty_batch(cond):
    with pytest.raises(TypeError, match="list of strings"):
        cond.encode("rock drums")
    with pytest.raises(ValueError, match="texts is empty"):
        cond.encode([])


# -- word dropout -------------------------------------------------------------------------------

def test_word_dropout_drops_about_thirty_percent_and_is_seeded():
    words = "one two three four five six seven eight nine ten".split()
    rng = random.Random(0)
    kept = sum(len(drop_words(" ".join(words), WORD_DROPOUT, rng).split(" ")) for _ in range(2000))
    dropped = 1 - kept / (2000 * len(words))
    assert abs(dropped - 0.3) < 0.02  # binomial std is 0.003 here

    text = " ".join(words)

    def draws(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [drop_words(text, 0.3, rng) for _ in range(20)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)
    assert drop_words(text, 0.0, random.Random(0)) == text
    assert drop_words(text, 1.0, random.Random(0)) == ""
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drop_words(text, 1.5, random.Random(0))


def test_encode_word_dropout_is_reproducible_and_can_empty_a_row(cond):
    texts = ["a funky bass line with slap and ghost notes", "soft piano ballad in a minor key"]
    a = cond.encode(texts, word_dropout=0.3, rng=random.Random(7))
    b = cond.encode(texts, word_dropout=0.3, rng=random.Random(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    full_lengths = cond.encode(texts)[1].sum(dim=1)
    assert (a[1].sum(dim=1) < full_lengths).any()  # some words went

    _, mask = cond.encode(texts, word_dropout=1.0, rng=random.Random(0))
    assert not mask.any()  # every word dropped -> "" -> null condition, as upstream


# -- precision and mode -------------------------------------------------------------------------

def test_float32_and_eval_inside_a_bfloat16_training_module(tokenizer):
    cond = tiny_conditioner(tokenizer)
    texts = ["heavy drums, fast tempo", "Genre: jazz."]
    ref_hidden, ref_mask = cond.encode(texts)
    lm = tiny_lm(StageLMConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, card=16, n_q=2, text_dim=16))
    parent = torch.nn.ModuleDict({"lm": lm, "text": cond}).to(torch.bfloat16).train()
    assert lm.final_norm.weight.dtype == torch.bfloat16
    assert {p.dtype for p in cond.parameters()} == {torch.float32}
    assert not cond.encoder.training and parent.training
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden, mask = cond.encode(texts)
    assert hidden.dtype == torch.float32
    assert torch.equal(hidden, ref_hidden) and torch.equal(mask, ref_mask)  # dropout off, autocast off


# -- directories --------------------------------------------------------------------------------

def test_save_and_load_a_local_directory(cond, t5_dir):
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in t5_dir.iterdir()}
    loaded = TextConditioner.from_pretrained_dir(t5_dir)
    texts = ["a funky bass line", "", "Genres: rock, pop."]
    for a, b in zip(cond.encode(texts), loaded.encode(texts)):
        assert torch.equal(a, b)
    assert loaded.encoder.shared is loaded.encoder.encoder.embed_tokens  # one embedding, as T5 ties it


def test_directory_errors_name_the_missing_file(t5_dir, tmp_path):
    with pytest.raises(ExpertFormatError, match="no config.json"):
        TextConditioner.from_pretrained_dir(tmp_path / "nowhere")
    garbled = tmp_path / "garbled"
    shutil.copytree(t5_dir, garbled)
    (garbled / "config.json").write_text("{not json")
    with pytest.raises(ExpertFormatError, match="config.json: not a readable T5 config"):
        TextConditioner.from_pretrained_dir(garbled)
    partial = tmp_path / "no-weights"
    shutil.copytree(t5_dir, partial)
    (partial / "model.safetensors").unlink()
    with pytest.raises(ExpertFormatError, match="no model.safetensors"):
        TextConditioner.from_pretrained_dir(partial)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (partial / name).unlink()
    with pytest.raises(ExpertFormatError, match=r"no tokenizer \(tokenizer.json or spiece.model\)"):
        TextConditioner.from_pretrained_dir(partial)


def test_tokenizer_larger_than_the_vocabulary_is_refused(t5_dir, tmp_path):
    small = tmp_path / "small"
    shutil.copytree(t5_dir, small)
    config = T5Config.from_pretrained(small)
    config.vocab_size = 32
    config.save_pretrained(small)
    with pytest.raises(ExpertFormatError, match="60 tokens but config.json's vocab_size is 32"):
        TextConditioner.from_pretrained_dir(small)


def _spiece_only_dir(t5_dir: Path, spiece_model: Path, tmp_path: Path) -> Path:
    d = tmp_path / "spiece-only"
    d.mkdir()
    shutil.copy(t5_dir / "config.json", d)
    shutil.copy(t5_dir / "model.safetensors", d)
    shutil.copy(spiece_model, d / "spiece.model")
    (d / "tokenizer_config.json").write_text('{"extra_ids": 0}')
    return d


def test_spiece_model_directory_loads_with_protobuf(t5_dir, spiece_model, tmp_path):
    pytest.importorskip("google.protobuf")
    cond = TextConditioner.from_pretrained_dir(_spiece_only_dir(t5_dir, spiece_model, tmp_path))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spiece_model))
    ids, _ = cond.tokenize(["a funky bass line"])
    assert ids[0].tolist() == sp.encode("a funky bass line") + [1]


def test_spiece_model_without_protobuf_says_what_to_install(t5_dir, spiece_model, tmp_path):
    try:
        import google.protobuf  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("protobuf is installed: spiece.model is readable")
    with pytest.raises(ExpertFormatError, match="pip install protobuf"):
        TextConditioner.from_pretrained_dir(_spiece_only_dir(t5_dir, spiece_model, tmp_path))


# -- experts ------------------------------------------------------------------------------------

TEXT_LM = StageLMConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, card=16, n_q=2, cross_attention=True, text_dim=16)


def _text_expert(path: Path, cond: TextConditioner, ref: WeightsRef) -> Path:
    meta = expert_metadata("bass", TEXT_LM, TINY_CODEC, text_encoder=ref, text_encoder_id=ENCODER_ID)
    return save_expert(path, meta, tiny_lm(TEXT_LM), tiny_codec(), text_encoder=cond)


def _config_only(t5_dir: Path, where: Path) -> Path:
    """The HF directory without weights: what an embedded expert needs beside it."""
    where.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(t5_dir / name, where)
    return where


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("STAGE_STACK_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_embedded_text_encoder_round_trip(cond, t5_dir, home, tmp_path):
    path = _text_expert(tmp_path / "bass.safetensors", cond, WeightsRef(embedded=True, id=ENCODER_ID))
    with safe_open(str(path), framework="pt") as f:
        t5_keys = sorted(k for k in f.keys() if k.startswith("text_encoder."))
    assert "text_encoder.encoder.embed_tokens.weight" in t5_keys and "text_encoder.shared.weight" not in t5_keys
    assert len(t5_keys) == len(encoder_state_dict(cond))

    _config_only(t5_dir, home / "text_encoders" / SLUG)  # config + tokenizer only: weights must come from the expert
    expert = load_expert(path)
    assert isinstance(expert.text, TextConditioner)
    for name, value in cond.encoder.state_dict().items():
        assert torch.equal(expert.text.encoder.state_dict()[name], value), name
    texts = ["heavy drums, fast tempo", ""]
    assert torch.equal(expert.text.encode(texts)[0], cond.encode(texts)[0])


def test_directory_beside_the_expert_wins(cond, t5_dir, home, tmp_path):
    path = _text_expert(tmp_path / "bass.safetensors", cond, WeightsRef(embedded=True, id=ENCODER_ID))
    _config_only(t5_dir, tmp_path / SLUG)
    broken = _config_only(t5_dir, home / "text_encoders" / SLUG)
    (broken / "config.json").write_text("{not json")  # would fail if it were read
    conditioner = load_text_conditioner(read_metadata(path), path, "cpu")
    assert conditioner.dim == 16


def test_missing_text_encoder_directory_says_where_to_put_it(cond, home, tmp_path):
    path = _text_expert(tmp_path / "bass.safetensors", cond, WeightsRef(embedded=True, id=ENCODER_ID))
    with pytest.raises(ExpertFormatError) as e:
        load_expert(path)
    message = str(e.value)
    assert str(tmp_path / SLUG) in message and str(home / "text_encoders" / SLUG) in message
    assert f"Put a HF-format {ENCODER_ID} directory at {home / 'text_encoders' / SLUG}" in message
    assert "config.json" in message and "spiece.model" in message
    assert load_expert(path, load_text=False).text is None


def test_text_dim_mismatch_is_reported(cond, t5_dir, home, tmp_path):
    path = _text_expert(tmp_path / "bass.safetensors", cond, WeightsRef(embedded=True, id=ENCODER_ID))
    wide = _config_only(t5_dir, home / "text_encoders" / SLUG)
    config = T5Config.from_pretrained(wide)
    config.d_model = 24
    config.save_pretrained(wide)
    with pytest.raises(ExpertFormatError, match="d_model is 24 but bass.safetensors has lm_config.text_dim 16"):
        load_expert(path)


def _referenced_expert(cond: TextConditioner, weights: Path, expert_path: Path) -> Path:
    atomic_save_safetensors(encoder_state_dict(cond), weights, {"kind": '"text_encoder"'})
    ref = WeightsRef(embedded=False, id=ENCODER_ID, filename=weights.name, sha256=sha256_file(weights))
    return _text_expert(expert_path, cond, ref)


def test_referenced_text_encoder_is_found_and_verified(cond, t5_dir, home, tmp_path):
    _config_only(t5_dir, home / "text_encoders" / SLUG)
    weights = tmp_path / "tiny-t5-encoder.safetensors"  # beside the expert, as `stage-stack convert` writes it
    path = _referenced_expert(cond, weights, tmp_path / "bass.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert not any(k.startswith("text_encoder.") for k in f.keys())  # not carried by the expert
    expert = load_expert(path)
    texts = ["soft piano ballad", "Genre: jazz."]
    assert torch.equal(expert.text.encode(texts)[0], cond.encode(texts)[0])

    other = tiny_conditioner(cond.tokenizer, seed=1)  # same shapes, other values
    atomic_save_safetensors(encoder_state_dict(other), weights, {})
    with pytest.raises(IntegrityError, match=f"{weights}: sha256 is .* expects"):
        load_expert(path)

    weights.unlink()
    with pytest.raises(ExpertFormatError, match="tiny-t5-encoder.safetensors .* not found in: .*Copy that file"):
        load_expert(path)


def test_hugging_face_weights_file_can_be_referenced(cond, t5_dir, home, tmp_path):
    """HF's model.safetensors keeps `shared.weight` instead of `encoder.embed_tokens.weight`."""
    shutil.copytree(t5_dir, home / "text_encoders" / SLUG)
    hf_weights = home / "text_encoders" / SLUG / "model.safetensors"
    with safe_open(str(hf_weights), framework="pt") as f:
        assert "shared.weight" in f.keys() and "encoder.embed_tokens.weight" not in f.keys()
    ref = WeightsRef(embedded=False, id=ENCODER_ID, filename="model.safetensors", sha256=sha256_file(hf_weights))
    path = _text_expert(tmp_path / "bass.safetensors", cond, ref)
    assert torch.equal(load_expert(path).text.encode(["rock"])[0], cond.encode(["rock"])[0])


def test_wrong_tensors_in_the_weights_file_are_listed(cond, t5_dir, home, tmp_path):
    _config_only(t5_dir, home / "text_encoders" / SLUG)
    weights = tmp_path / "t5.safetensors"
    state = encoder_state_dict(cond)
    del state["encoder.final_layer_norm.weight"]
    state["encoder.extra.weight"] = torch.zeros(2)
    atomic_save_safetensors(state, weights, {})
    ref = WeightsRef(embedded=False, id=ENCODER_ID, filename=weights.name, sha256=sha256_file(weights))
    path = _text_expert(tmp_path / "bass.safetensors", cond, ref)
    with pytest.raises(CheckpointKeyError) as e:
        load_expert(path)
    assert e.value.missing == ["encoder.final_layer_norm.weight"] and e.value.unexpected == ["encoder.extra.weight"]


# -- into the LM --------------------------------------------------------------------------------

def test_conditioning_for_generation(cond, t5_dir, home, tmp_path):
    _config_only(t5_dir, home / "text_encoders" / SLUG)
    path = _text_expert(tmp_path / "bass.safetensors", cond, WeightsRef(embedded=True, id=ENCODER_ID))
    expert = load_expert(path, dtype="bfloat16")
    texts = ["a funky bass line with slap", "jazz", ""]

    memory, mask = conditioning_for(expert, texts)
    hidden, ref_mask = cond.encode(texts)
    assert memory.dtype == torch.bfloat16 and memory.shape == (3, hidden.shape[1], TEXT_LM.dim)
    assert torch.equal(mask, ref_mask)
    assert memory[~mask].abs().max() == 0  # padding and the empty row are exact zeros (text_proj has a bias)
    assert memory[mask].abs().amax(dim=-1).min() > 0
    assert torch.equal(memory, expert.lm.project_text(hidden.to(torch.bfloat16), mask))

    assert conditioning_for(expert, None) is None
    assert conditioning_for(load_expert(path, load_text=False), texts) is None

    context = torch.randint(0, 16, (3, 2, 6), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(greedy=True)
    _, with_text = generate(expert.lm, context, 4, text_memory=(memory, mask), params=params, return_steps=True)
    _, without = generate(expert.lm, context, 4, text_memory=None, params=params, return_steps=True)
    difference = (with_text.float() - without.float()).abs().amax(dim=(0, 2, 3))
    assert difference[0] > 1e-3 and difference[1] > 1e-3  # real descriptions change the logits
    assert difference[2] == 0  # "" is the null condition, the same as no text


def test_project_text_zeros_padding_with_a_nonzero_bias(cond):
    lm = tiny_lm(TEXT_LM)
    with torch.no_grad():
        lm.text_proj.bias.fill_(0.5)  # so padding would be visible if it were not masked
    hidden, mask = cond.encode(["a funky bass line with slap", "jazz", ""])
    memory = lm.project_text(hidden, mask)
    assert memory[~mask].abs().max() == 0
    assert (memory[mask] - (hidden[mask] @ lm.text_proj.weight.T + 0.5)).abs().max() < 1e-5


def test_t5_base_layout_matches_the_reference_key_list():
    """Reference §6: 99 T5 tensors under `...description.t5.`, `t5.shared.weight` dropped."""
    config = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
                      relative_attention_num_buckets=32, feed_forward_proj="relu")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in encoder_state_dict(T5EncoderModel(config)).items()}
    block = "encoder.block.{}.layer."
    expected = {"encoder.embed_tokens.weight": (32128, 768), "encoder.final_layer_norm.weight": (768,),
                block.format(0) + "0.SelfAttention.relative_attention_bias.weight": (32, 12)}
    for j in range(12):
        expected.update({block.format(j) + f"0.SelfAttention.{p}.weight": (768, 768) for p in "qkvo"})
        expected.update({block.format(j) + "0.layer_norm.weight": (768,),
                         block.format(j) + "1.layer_norm.weight": (768,),
                         block.format(j) + "1.DenseReluDense.wi.weight": (3072, 768),
                         block.format(j) + "1.DenseReluDense.wo.weight": (768, 3072)})
    assert len(expected) == 99 and shapes == expected
