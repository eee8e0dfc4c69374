"""Training data and training.

- `synth`: the synthetic band (numpy, deterministic by seed) that writes MoisesDB-style songs;
- `data`: song folders, `SongMetadata`, and `StemDataset`, STAGE pairs at audio level
  (reference §5);
- `token_cache`: `pretokenize` (codes on disk, augmented variants) and `TokenPairDataset`,
  the same pairs as codes, so that training is not bound by the codec;
- `train`: the STAGE recipe on Accelerate; `codec_train`: the demo EnCodec, with
  `codec_features` (optional onset and chroma targets for its first codebook).
"""
