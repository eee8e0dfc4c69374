"""Our EnCodec (stage_stack.models.encodec) against transformers' EncodecModel, its reference:
the same tensor names and shapes, the same codes and the same audio from the same weights."""

import pytest
import torch
from transformers import EncodecModel as ReferenceEncodec

from stage_stack.models.codec import Codec, CodecConfig
from stage_stack.testing import TINY_CODEC, tiny_codec

CONFIGS = {
    "tiny": TINY_CODEC,
    "causal, conv shortcut, 2 residual layers": CodecConfig(
        sample_rate=8000, dimension=8, n_filters=4, ratios=(4, 2), lstm_layers=2, n_q=3, card=32,
        causal=True, true_skip=False, n_residual_layers=2, trim_right_ratio=0.5, pad_mode="constant"),
}


def _pair(config: CodecConfig, seed: int = 0) -> tuple[Codec, ReferenceEncodec]:
    ours = tiny_codec(config, seed)
    reference = ReferenceEncodec(config.to_hf()).eval()
    reference.load_state_dict(ours.model.state_dict())  # strict: every name and shape must match
    return ours, reference


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_tensor_names_and_shapes_as_transformers(name):
    config = CONFIGS[name]
    ours = {k: tuple(v.shape) for k, v in Codec(config).model.state_dict().items()}
    reference = {k: tuple(v.shape) for k, v in ReferenceEncodec(config.to_hf()).state_dict().items()}
    assert ours == reference


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("samples", [1, 37, 4000, 16001])
def test_same_codes_and_audio_as_transformers(name, samples):
    config = CONFIGS[name]
    ours, reference = _pair(config)
    audio = 0.3 * torch.randn(2, config.channels, samples, generator=torch.Generator().manual_seed(samples))
    with torch.no_grad():
        codes = ours.encode(audio)
        theirs = reference.quantizer.encode(reference.encoder(audio), config.bandwidth).transpose(0, 1)
        assert codes.shape == (2, config.n_q, -(-samples // config.hop_length))
        assert torch.equal(codes, theirs)
        assert len(codes.unique()) > 1  # the comparison is not between two constant outputs
        decoded = ours.decode(codes)
        expected = reference.decoder(reference.quantizer.decode(codes.transpose(0, 1)))
        assert decoded.shape == expected.shape
        torch.testing.assert_close(decoded, expected, rtol=1e-5, atol=1e-6)
        assert decoded.abs().max() > 1e-4


def test_a_prefix_of_the_codebooks_decodes_like_transformers():
    ours, reference = _pair(TINY_CODEC)
    audio = 0.3 * torch.randn(1, 1, 8000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = ours.model.encode(audio)[:, :1]
        torch.testing.assert_close(ours.model.quantizer.decode(first.transpose(0, 1)),
                                   reference.quantizer.decode(first.transpose(0, 1)))


def test_the_codec_does_not_import_transformers():
    import subprocess
    import sys

    code = ("import sys, torch; from stage_stack.models.codec import Codec; from stage_stack.testing import TINY_CODEC; "
            "c = Codec(TINY_CODEC); c.decode(c.encode(torch.zeros(1, 1, 1600))); "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
