"""Dropdown values checked when a prompt is queued (400 with node_errors), not at run time.

ComfyUI 0.3.75 does not check V3 combo values itself, so a node checks the dropdown that lists
files (it follows the disk) in its validate_inputs, against the options it offers now. (Later
ComfyUI versions check every combo that validate_inputs does not take, with their own "Value not in
list"; the inputs taken here keep this module's messages and download hints there too.) ComfyUI
reports a failed validate_inputs once for every input the function takes, so each node's
validate_inputs takes only that one input: each problem appears once. A missing file of a released
model is reported with the command that downloads it. The fixed dropdowns (dtype, offload, ...) can
only be wrong in a hand-written API prompt; the engine refuses such a value when the node runs,
naming it and the choices.
"""
from __future__ import annotations

from comfy_api.latest import io

from . import paths


def check_combo(node_cls, input_id: str, value) -> bool | str:
    if value is None:
        return True
    (inp,) = [i for i in node_cls.define_schema().inputs or [] if i.id == input_id]
    assert isinstance(inp, io.Combo.Input), input_id
    if value in inp.options:
        return True
    hint = paths.download_hint(value)
    if hint is not None:
        return f"{input_id} '{value}' is not on disk: {hint}"
    shown = inp.options if len(inp.options) <= 12 else inp.options[:12] + ["..."]
    return f"{input_id} '{value}' is not available; choose one of {shown}"


def check_combos(node_cls, **values) -> bool | str:
    """check_combo for a node whose files come from several dropdowns (the split loader's three files):
    every problem in one message (ComfyUI shows it once per input checked)."""
    problems = [r for input_id, value in values.items() if (r := check_combo(node_cls, input_id, value)) is not True]
    return "; ".join(problems) if problems else True
