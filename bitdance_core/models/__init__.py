"""The networks and their configs: Qwen3 backbone, diffusion heads and their sampler, binary autoencoder,
projector, ImageNet backbone. Imports formats and errors only.
"""
