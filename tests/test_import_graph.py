"""The dependency rule between the parts of compiled-llm (docs/architecture.md): each part
imports only parts of lower layers, so there are no import cycles between packages.

Read from the sources (no import runs): every `import`/`from` anywhere in a module counts, inside
functions too; imports under `if TYPE_CHECKING:` do not, since they never run.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {  # import name -> folder (pyproject.toml's package-dir mapping)
    "compiled_llm": ROOT / "compiled_llm",
    "compiled_llm.passes": ROOT / "passes",
    "compiled_llm.attention_backends": ROOT / "attention_backends",
    "compiled_llm.server": ROOT / "server",
}

# Lowest first. A part may import its own layer's other parts only where listed together in
# one tuple and no cycle results; anything above is off limits.
LAYERS: list[tuple[str, ...]] = [
    ("envs", "sampling_params", "outputs", "profiler", "layers", "child_process"),
    ("request", "kernels", "forward_context", "generation_config"),
    ("attention_backends", "quantization", "distributed"),
    ("models", "passes"),
    ("config",),
    ("compilation", "kv_cache", "sampling", "structured_output", "spec_decode"),
    ("engine",),
    ("beam_search",),
    ("llm",),
    ("__init__",),  # the package itself: `from compiled_llm import LLM`
    ("server",),
    ("cli",),
]
RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}


def part_of(module: str) -> str:
    """`compiled_llm.engine.core` -> "engine"; `compiled_llm` -> "__init__"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def is_module(name: str) -> bool:
    package = max((p for p in FOLDERS if name.startswith(p + ".")), key=len, default=None)
    if package is None:
        return False
    path = FOLDERS[package].joinpath(*name[len(package) + 1 :].split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def runtime_imports(tree: ast.Module) -> list[str]:
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from compiled_llm import envs` imports the module compiled_llm.envs;
            # `from compiled_llm import LLM`, the package
            found.extend(
                f"{node.module}.{a.name}" if is_module(f"{node.module}.{a.name}") else node.module
                for a in node.names
            )
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return [m for m in found if m == "compiled_llm" or m.startswith("compiled_llm.")]


def package_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            module = ".".join([package, *path.relative_to(folder).with_suffix("").parts])
            source = part_of(module.removesuffix(".__init__"))
            for target in runtime_imports(ast.parse(path.read_text())):
                if part_of(target) != source:
                    edges[source].add(part_of(target))
    return edges


def test_every_part_has_a_layer() -> None:
    graph = package_graph()
    parts = set(graph) | {t for targets in graph.values() for t in targets}
    assert parts <= set(RANK), sorted(parts - set(RANK))


def test_imports_go_down_the_layers() -> None:
    upward = [
        f"{source} -> {target}"
        for source, targets in package_graph().items()
        for target in targets
        if RANK[target] > RANK[source]
    ]
    assert not upward, upward


def test_no_import_cycles_between_parts() -> None:
    graph = package_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path, node, target]
            if target not in state and (found := cycle_from(target, [*path, node])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            assert cycle_from(node, []) is None
