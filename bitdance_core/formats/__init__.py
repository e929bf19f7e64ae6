"""Weights and file formats: safetensors / .pt reading (strict, lazy), fp8 weights. Imports only errors.
"""
