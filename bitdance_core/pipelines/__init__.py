"""Generation flows and loading them from files: text-to-image, ImageNet, tokenizers, prompts, pixels.
Imports models, formats and errors.
"""
