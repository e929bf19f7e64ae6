"""Dropdown values checked when a prompt is queued (400 with node_errors), not at run time.

ComfyUI 0.3.75 does not check V3 combo values itself, so each node with dropdowns checks them in
its validate_inputs against the options it offers now (the model lists follow the disk).
"""
from __future__ import annotations

from comfy_api.latest import io


def check_combos(node_cls, **values) -> bool | str:
    problems = []
    for inp in node_cls.define_schema().inputs or []:
        if not isinstance(inp, io.Combo.Input) or values.get(inp.id) is None:
            continue
        value = values[inp.id]
        if value not in inp.options:
            shown = inp.options if len(inp.options) <= 12 else inp.options[:12] + ["..."]
            problems.append(f"{inp.id} '{value}' is not available; choose one of {shown}")
    return "; ".join(problems) if problems else True
