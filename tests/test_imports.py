"""The import graph of spcl_jax/ has no circle, imports inside functions included (they only hide one): the
floors stay floors, and the validation of a config imports no module that runs a training or an evaluation. The
ConfigDict stops at the edge, and public functions carry type hints."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "spcl_jax"


def module_names():
    """{dotted module name: path} of every module of the package."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported(path, modules):
    """The package's modules that `path` imports anywhere in its code (`from a import b` counts as a.b where that
    is a module, else as a)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            submodules = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            found |= submodules
            if len(submodules) < len(node.names) and node.module in modules:
                found.add(node.module)
    return found


def cycles(graph):
    """The circles of a {node: successors} graph, each as the list of its nodes (Tarjan's strongly connected
    components of more than one node, or one node importing itself)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_circles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"c"}}) == [["c"]]
    source = ROOT / "tests" / "test_imports.py"
    assert imported(source, {"pathlib": source, "ast": source, "json": source}) == {"pathlib", "ast"}


def test_the_package_has_no_import_circle():
    modules = module_names()
    graph = {name: imported(path, modules) - {name} for name, path in modules.items()}
    assert {"spcl_jax.train", "spcl_jax.config_validation"} <= graph.keys()
    assert "spcl_jax.method" in graph["spcl_jax.config_validation"]  # the parser sees the imports
    assert cycles(graph) == []


def test_config_validation_imports_no_orchestration():
    modules = module_names()
    imports = imported(modules["spcl_jax.config_validation"], modules)
    assert not imports & {"spcl_jax.train", "spcl_jax.evaluate", "spcl_jax.preflight", "spcl_jax.plan.planner"}


def config_takers(path):
    """Names of the functions in `path` with a parameter named config or annotated as a ConfigDict."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            if any(a.arg == "config" or (a.annotation is not None and "ConfigDict" in ast.unparse(a.annotation))
                   for a in arguments):
                found.add(node.name)
    return found


def test_the_config_dict_stops_at_the_edge():
    """Below training and evaluation every part takes typed parts (`startup.Parts`), not the ConfigDict: only
    validation, the start-up sequence, the dry run, the trainer, the evaluator and the checkpoint (which stores it)
    take one."""
    takers = {name for name, path in module_names().items() if config_takers(path)}
    assert "spcl_jax.train" in takers  # the parser sees them
    assert takers <= {"spcl_jax.config_validation", "spcl_jax.startup", "spcl_jax.preflight", "spcl_jax.train",
                      "spcl_jax.evaluate", "spcl_jax.checkpoint"}, takers


def unhinted(path):
    """Names of the public functions and methods in `path` (and __init__, __call__) missing a parameter or return
    annotation."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                not node.name.startswith("_") or node.name in ("__init__", "__call__")):
            arguments = [a for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                         if a.arg not in ("self", "cls")] + [a for a in (node.args.vararg, node.args.kwarg) if a]
            if any(a.annotation is None for a in arguments) or (node.returns is None and node.name != "__init__"):
                found.append(node.name)
    return found


def test_public_functions_have_type_hints():
    missing = {name: found for name, path in module_names().items() if (found := unhinted(path))}
    assert unhinted(ROOT / "tests" / "test_imports.py")  # the finder sees a function without hints
    assert missing == {}
