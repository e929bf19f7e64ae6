"""The engine's structure: no import circles in bitdance_core/ or nodes/ (imports inside functions
count), dependencies that run one way between the layers, nodes that reach only the documented
engine modules, ARCHITECTURE.md listing exactly the modules there are, and each config file read
once per load."""
from __future__ import annotations

import ast
import builtins
import os
import re

import pytest

from paths import REPO, fixture_dirs

PACKAGES = ("bitdance_core", "nodes")

# The layers, bottom to top: a module may import its own layer and the ones below it.
LAYERS = {
    "bitdance_core.errors": 0, "bitdance_core.demo_models": 0,
    "bitdance_core.formats": 1,
    "bitdance_core.models": 2,
    "bitdance_core.pipelines": 3,
    "bitdance_core.runtime": 4,
    "bitdance_core.cli": 5,
    "bitdance_core.train": 6,
    "bitdance_core": 7,  # the public API (__init__) and __main__
}
# What the nodes may import from the engine: the public API and one module per concept.
NODE_ENGINE_MODULES = {"bitdance_core", "bitdance_core.runtime", "bitdance_core.demo_models"}


def _modules() -> dict[str, str]:
    """dotted module name -> file path, for every .py file of the packages."""
    out = {}
    for pkg in PACKAGES:
        for d, dirs, files in os.walk(os.path.join(REPO, pkg)):
            dirs[:] = [x for x in dirs if x != "__pycache__"]
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(d, f), REPO)[:-3].replace(os.sep, ".")
                    out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(d, f)
    return out


def _package_of(name: str, path: str) -> str:
    return name if path.endswith("__init__.py") else name.rpartition(".")[0]


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    """module -> the modules it imports (anywhere in the file), parent packages included (importing
    a.b.c runs a/__init__ and a/b/__init__), except the importer's own parents (already running)."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        pkg = _package_of(name, path)
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                    base = [b for b in base if b]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{mod}.{alias.name}" if mod else alias.name
                    targets.append(sub if sub in mods else mod)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                while t and t not in mods:  # `import a.b.c` of a name that is an attribute
                    t = t.rpartition(".")[0]
                if not t:
                    continue
                for dep in _ancestors(t) + [t]:
                    if dep in mods and dep != name and dep not in _ancestors(name):
                        graph[name].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> int | None:
    best = None
    for prefix, rank in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, rank)
    return best[1] if best else None


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    graph = import_graph()
    assert len(graph) > 50 and graph["bitdance_core.pipelines.t2i_loading"], "the graph was not built"
    assert cycles(graph) == []


def test_dependencies_run_one_way():
    wrong = []
    for mod, deps in import_graph().items():
        if not mod.startswith("bitdance_core"):
            continue
        for dep in deps:
            if dep.startswith("bitdance_core") and layer_of(dep) > layer_of(mod):
                wrong.append(f"{mod} (layer {layer_of(mod)}) imports {dep} (layer {layer_of(dep)})")
    assert wrong == []


def test_every_engine_module_has_a_layer():
    assert [m for m in _modules() if m.startswith("bitdance_core") and layer_of(m) is None] == []


def test_nodes_use_only_the_documented_engine_modules():
    graph = import_graph()
    used = {dep for mod, deps in graph.items() if mod.startswith("nodes") for dep in deps if dep.startswith("bitdance_core")}
    assert used and used <= NODE_ENGINE_MODULES, sorted(used - NODE_ENGINE_MODULES)
    # and only through nodes/engine.py
    reaching = sorted(mod for mod, deps in graph.items() if mod.startswith("nodes")
                      and any(d.startswith("bitdance_core") for d in deps))
    assert reaching == ["nodes.engine"]


def _architecture_tree() -> set[str]:
    """The .py paths the tree in ARCHITECTURE.md shows (indentation: two spaces a level)."""
    text = open(os.path.join(REPO, "ARCHITECTURE.md"), encoding="utf-8").read()
    block = text.split("## The tree", 1)[1].split("```", 2)[1]
    stack, out = [], set()
    for line in block.splitlines():
        m = re.match(r"^( *)(\S+)", line)
        if not m or not (m.group(2).endswith("/") or m.group(2).endswith(".py")):
            continue
        depth = len(m.group(1)) // 2
        stack = stack[:depth]
        name = m.group(2)
        if name.endswith("/"):
            stack.append(name[:-1])
        else:
            out.add("/".join(stack + [name]))
    return out


def test_architecture_lists_every_module_exactly():
    on_disk = {os.path.relpath(p, REPO).replace(os.sep, "/") for p in _modules().values()} | {"__init__.py"}
    listed = _architecture_tree()
    assert sorted(on_disk - listed) == [], "modules missing from ARCHITECTURE.md"
    assert sorted(listed - on_disk) == [], "ARCHITECTURE.md lists modules that do not exist"


CONFIG_FILES = ("config.json", "vision_head_config.json", "ae_config.json")


def _count_config_opens(model: str, monkeypatch) -> list[str]:
    """The names of the model folder's config files each time one is opened from now on (builtins.open)."""
    configs = {os.path.realpath(os.path.join(model, f)) for f in CONFIG_FILES}
    opened = []
    real_open = builtins.open

    def counting_open(file, *a, **kw):
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) in configs:
            opened.append(os.path.basename(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", counting_open)
    return opened


@pytest.mark.parametrize("weights", ["as-is", "fp8"])
@pytest.mark.parametrize("fixture", fixture_dirs("t2i-tiny"))
def test_a_load_reads_each_config_file_once(fixture, weights, monkeypatch):
    """The loader's path (plan, then load as planned) opens each of the three config files once."""
    from bitdance_core.runtime import load_planned, plan_for

    model = os.path.join(fixture, "model")
    opened = _count_config_opens(model, monkeypatch)
    decision = plan_for(model, None, device="cpu", height=64, width=64, weights=weights)
    pipe, _ = load_planned(model, decision, "cpu")
    assert pipe.parallel_num >= 1
    assert sorted(opened) == ["ae_config.json", "config.json", "vision_head_config.json"]


@pytest.mark.parametrize("fixture", fixture_dirs("t2i-tiny"))
def test_the_loader_node_path_reads_each_config_file_once(fixture, monkeypatch):
    """The model loader node's path: the configs read once, then described, planned and loaded from them."""
    from bitdance_core import describe_t2i, read_t2i_configs
    from bitdance_core.runtime import load_planned, plan_for

    model = os.path.join(fixture, "model")
    opened = _count_config_opens(model, monkeypatch)
    source = read_t2i_configs(model)
    assert describe_t2i(source).parallel_num >= 1
    pipe, _ = load_planned(source, plan_for(source, None, device="cpu", height=64, width=64), "cpu")
    assert pipe.parallel_num >= 1
    assert sorted(opened) == ["ae_config.json", "config.json", "vision_head_config.json"]
