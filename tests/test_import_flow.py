"""Imports follow the run's flow: config -> data -> embeddings -> method -> task -> results.

Each module of asif_exp has a layer; a module imports only modules of its own layer or earlier
ones (read from the source with `ast`, so a new import against the flow fails here). Inside the
engine package the stages have an order of their own.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "asif_exp"

# Earlier layers first. A module is placed by its longest matching prefix.
LAYERS = [
    # shared by everything: errors, device helpers, the config schema and its checks, the
    # typed records that flow between the stages
    [
        "asif_exp",
        "asif_exp.allocator",
        "asif_exp.errors",
        "asif_exp.cli",
        "asif_exp.tensors",
        "asif_exp.config",
        "asif_exp.options",
        "asif_exp.problem",
        "asif_exp.results",
    ],
    ["asif_exp.data"],
    ["asif_exp.encoders", "asif_exp.embeddings"],
    ["asif_exp.methods"],
    ["asif_exp.tasks"],
    ["asif_exp.memory", "asif_exp.tracking", "asif_exp.reports"],
    [
        "asif_exp.pipeline",
        "asif_exp.explain",
        "asif_exp.extract",
        "asif_exp.__main__",
        # the explain job: builds its workspace through the pipeline, as a run does
        "asif_exp.memory.job",
        "asif_exp.memory.workspace",
    ],
]
ENGINE_STAGES = ["cpu_kernels", "options", "topk", "layouts", "scoring", "grid", "method"]
ENGINE = "asif_exp.methods.asif"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, layer = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), index
    if layer is None:
        raise KeyError(f"{module}: in no layer of tests/test_import_flow.py (place it there)")
    return layer


def imported_modules(source: str, known: set[str]) -> set[str]:
    """The asif_exp modules a source imports, at any depth of the file (`from asif_exp.x
    import y` counts as asif_exp.x.y when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "asif_exp"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "asif_exp":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found


def violations(modules: dict[str, str]) -> list[str]:
    """`importer -> imported` for every import against the flow, in {module: source}."""
    known = set(modules)
    bad = []
    for module, source in sorted(modules.items()):
        for imported in sorted(imported_modules(source, known)):
            if imported == "asif_exp" or imported == module:
                continue
            if layer_of(imported) > layer_of(module):
                bad.append(f"{module} -> {imported}")
            stage_of = {f"{ENGINE}.{s}": i for i, s in enumerate(ENGINE_STAGES)}
            if module in stage_of and imported in stage_of:
                if stage_of[imported] > stage_of[module]:
                    bad.append(f"{module} -> {imported} (engine stages)")
    return bad


def package_modules() -> dict[str, str]:
    return {module_name(p): p.read_text() for p in PACKAGE.rglob("*.py")}


def test_every_import_follows_the_flow():
    modules = package_modules()
    assert f"{ENGINE}.scoring" in modules and "asif_exp.tasks.classification" in modules
    assert violations(modules) == []


def test_every_engine_module_has_a_stage():
    engine = {m for m in package_modules() if m.startswith(ENGINE + ".")}
    assert engine == {f"{ENGINE}.{s}" for s in ENGINE_STAGES}


@pytest.mark.parametrize(
    "module, source",
    [
        ("asif_exp.encoders", "from asif_exp.methods.asif import resolve_device"),
        ("asif_exp.methods.asif.grid", "import asif_exp.tasks.classification"),
        ("asif_exp.options", "from asif_exp import embeddings"),
        ("asif_exp.cli", "from asif_exp.memory import ModelFormatError"),
        ("asif_exp.methods.asif.topk", "from asif_exp.methods.asif.scoring import cell_scores"),
    ],
)
def test_an_import_against_the_flow_is_found(module, source):
    modules = package_modules()
    modules[module] = modules[module] + "\n" + source + "\n"
    assert len(violations(modules)) == 1


def private_imports(source: str) -> list[str]:
    """Names starting with `_` that a source imports from asif_exp."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "asif_exp":
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if "._" in a.name and a.name.startswith("asif_")]
    return found


def test_scripts_and_tests_use_only_public_names():
    root = PACKAGE.parent
    sources = [*root.joinpath("tests").rglob("*.py"), *root.joinpath("experiments").rglob("*.py")]
    found = {str(p.relative_to(root)): private_imports(p.read_text()) for p in sources}
    assert {path: names for path, names in found.items() if names} == {}
    assert private_imports("from asif_exp.methods.asif.topk import _keep_topk") != []
