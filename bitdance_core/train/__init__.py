"""Training the demo models on CPU: the binary tokenizer, a class-conditional BitDance (ImageNet
format) and a text-to-image BitDance (official T2I layout), on scikit-learn's handwritten digits.

    python -m bitdance_core.train --seed 0 --out bitdance_core/demo_models

Modules: data (digits, prompts), tokenizer (sign quantiser + entropy/commitment), diffusion (head loss,
bit flips, label dropout), classcond, text_tokenizer, text2image, evaluate, common.
"""
