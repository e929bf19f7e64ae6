"""Entry points: `python -m bitdance_core {t2i,tokenizer,imagenet,demo,bench}` (main.py), one module a command,
and the random-weight pipelines of the benchmark (synthetic.py).
"""
