"""No module-level mutable state in the forward path (issue 8: two ForwardBatches alive at once).

A static audit of the forward-path modules (models, layers, attention, kernel wrappers, expert-parallel
dispatchers, TBO, model runner, CUDA-graph runner) with `ast`:
- no `global` statements;
- no module-level mutable container (dict/list/set, their comprehensions, defaultdict, deque, ...) that the
  module mutates, and no module-level `functools.cache`/`lru_cache`, unless allow-listed below with a reason
  (documented, keyed, construction-time registries and caches of immutable data only);
- no class attribute assigned from a method (`cls.x = `, `type(self).x = `, `ClassName.x = `);
- no assignment to another module's attribute from a function (`some_module.NAME = `);
- process-wide registries (`topology.current()`, `get_buffer`, `workspace_pool`, allow-listed containers) are
  read only while building objects (`__init__` or the registry's own function), never per step.
The checker itself is exercised on snippets that break each rule, so the audit can fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

ENGINE = Path(__file__).resolve().parents[2] / "engine"
FORWARD_PATH = sorted(
    {
        *(ENGINE / "models").glob("*.py"),
        *(ENGINE / "layers").glob("*.py"),
        *(ENGINE / "attention").glob("*.py"),
        *(ENGINE / "kernels").glob("*.py"),
        *(
            ENGINE / "distributed" / name
            for name in (
                "a2a.py",
                "symm.py",
                "nvlink.py",
                "workspace_pool.py",
                "deepep.py",
                "ep.py",
                "backends.py",
            )
        ),
        *(
            ENGINE / name
            for name in (
                "tbo.py",
                "model_runner.py",
                "cuda_graph_runner.py",
                "forward_batch.py",
                "dispatch_metrics.py",
                "kv_cache.py",
                "sampler.py",
                "logprobs.py",
                "fp8_weights.py",
            )
        ),
        ENGINE / "bench" / "emulate.py",
    }
)

# (module path relative to engine/, name) -> why the state is safe with two batches alive at once.
ALLOWED = {
    ("distributed/deepep.py", "_BUFFERS"): "construction-time registry of the one deep_ep.Buffer per process "
    "(a DeepEP requirement), keyed by group; dispatchers hold their SharedBuffer, the forward path never looks it up",
    (
        "distributed/symm.py",
        "_POOLS",
    ): "construction-time registry of one symmetric-memory workspace pool per "
    "group; dispatchers hold their WorkspacePool, the forward path never looks it up",
    (
        "distributed/nvlink.py",
        "_POOLS",
    ): "construction-time registry of one nvlink workspace pool per group and device; dispatchers hold "
    "their NvlinkPool, the forward path never looks it up",
    ("distributed/backends.py", "_RESOLVED"): "the backend chosen per (group, requested backend) at "
    "make_dispatcher time (a one-time self-check), never read in a forward",
    ("kernels/fused_moe_configs.py", "_table"): "lru_cache of the checked-in, read-only autotune table",
    ("kernels/fp8_splitk_configs.py", "_table"): "cache of the checked-in, read-only measured split-K table",
}
REGISTRY_READERS = {"current", "get_buffer", "workspace_pool"}
# Functions allowed to read a registry besides __init__: the registry accessors themselves (each is called
# only while objects are built: the last rule checks their callers).
REGISTRY_FUNCTIONS = {
    "get_buffer",
    "workspace_pool",
    "current",
    "set_current",
    "_resolve",
    "_one_node",  # auto's "one node" check, called by _resolve
    "_nvlink_dispatcher",  # builds the nvlink dispatcher, called by make_dispatcher
}
MUTABLE_CALLS = {
    "dict",
    "list",
    "set",
    "defaultdict",
    "OrderedDict",
    "deque",
    "WeakKeyDictionary",
    "WeakValueDictionary",
    "local",
    "Counter",
}
MUTATING_METHODS = {
    "append",
    "extend",
    "insert",
    "update",
    "setdefault",
    "pop",
    "popitem",
    "clear",
    "add",
    "discard",
    "remove",
    "appendleft",
    "__setitem__",
}


def _call_name(node: ast.AST) -> str:
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _is_mutable_value(value: ast.AST) -> bool:
    if isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)):
        return True
    return isinstance(value, ast.Call) and _call_name(value) in MUTABLE_CALLS


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Subscript, ast.Attribute)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def audit(source: str, module: str) -> list[tuple[str, str]]:
    """(name, what is wrong) for every rule `source` breaks; allow-listed names are reported too (the caller
    filters), so stale allow-list entries can be detected."""
    tree = ast.parse(source)
    problems: list[tuple[str, str]] = []
    module_containers: set[str] = set()
    imported_modules: set[str] = set()
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    for node in tree.body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        for target in targets:
            if isinstance(target, ast.Name) and target.id != "__all__" and _is_mutable_value(value):
                module_containers.add(target.id)
        if isinstance(node, ast.Import):
            imported_modules.update((a.asname or a.name).split(".")[0] for a in node.names)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for decorator in node.decorator_list:
                if _call_name(decorator) in ("cache", "lru_cache"):
                    problems.append(
                        (node.name, f"{module}:{node.lineno} module-level cache on {node.name}()")
                    )

    reads: list[tuple[str, str]] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            line = f"{module}:{getattr(child, 'lineno', '?')}"
            if isinstance(child, ast.Global):
                for name in child.names:
                    problems.append((name, f"{line} `global {name}`"))
            targets: list[ast.expr] = []
            if isinstance(child, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = child.targets if isinstance(child, ast.Assign) else [child.target]
            elif isinstance(child, ast.Delete):
                targets = child.targets
            for target in targets:
                root = _root_name(target)
                if isinstance(target, (ast.Subscript, ast.Attribute)) and root in module_containers:
                    problems.append((root, f"{line} module-level {root} mutated"))
                if function is not None and isinstance(target, ast.Attribute):
                    owner = target.value
                    is_class = (
                        isinstance(owner, ast.Name) and (owner.id == "cls" or owner.id in classes)
                    ) or (isinstance(owner, ast.Call) and _call_name(owner) == "type")
                    if is_class:
                        problems.append(
                            (target.attr, f"{line} class attribute {target.attr} assigned in {function}()")
                        )
                    if isinstance(owner, ast.Name) and owner.id in imported_modules:
                        problems.append(
                            (target.attr, f"{line} module attribute {owner.id}.{target.attr} assigned")
                        )
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute):
                root = _root_name(child.func.value)
                if child.func.attr in MUTATING_METHODS and root in module_containers:
                    problems.append((root, f"{line} module-level {root}.{child.func.attr}()"))
            if (
                isinstance(child, ast.Name)
                and child.id in module_containers
                and function not in {None, "__init__", *REGISTRY_FUNCTIONS}
            ):
                reads.append((child.id, f"{line} module-level {child.id} read in {function}() (per step?)"))
            if (
                isinstance(child, ast.Call)
                and _call_name(child) in REGISTRY_READERS
                and function not in {"__init__", *REGISTRY_FUNCTIONS}
            ):
                problems.append(
                    (
                        _call_name(child),
                        f"{line} registry {_call_name(child)}() read in {function}() (per step?)",
                    )
                )
            visit(child, inner)

    visit(tree, None)
    # A container the module mutates is a registry: only its accessors (and constructors) may read it.
    mutated = {name for name, _ in problems}
    # Keyed "read:<name>" so an allow-listed registry never excuses a per-step read of it.
    return problems + [(f"read:{name}", what) for name, what in reads if name in mutated]


def _relative(path: Path) -> str:
    return path.relative_to(ENGINE).as_posix()


def test_forward_path_has_no_module_level_mutable_state():
    assert len(FORWARD_PATH) > 40  # the globs found the engine
    found = []
    for path in FORWARD_PATH:
        for name, what in audit(path.read_text(), _relative(path)):
            if (_relative(path), name) not in ALLOWED:
                found.append(what)
    assert found == [], "module-level mutable state in the forward path:\n" + "\n".join(found)


def test_every_allow_list_entry_is_still_needed():
    """An allow-list entry whose state is gone (or moved) must be removed, not kept as a blanket pass."""
    used = set()
    for path in FORWARD_PATH:
        used.update((_relative(path), name) for name, _ in audit(path.read_text(), _relative(path)))
    assert set(ALLOWED) <= used, set(ALLOWED) - used


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("_MODE = None\ndef set_mode(m):\n    global _MODE\n    _MODE = m\n", "`global _MODE`"),
        (
            "_CACHE = {}\ndef rope(n):\n    _CACHE[n] = n\n    return _CACHE[n]\n",
            "module-level _CACHE mutated",
        ),
        ("_SEEN = []\ndef step(x):\n    _SEEN.append(x)\n", "module-level _SEEN.append()"),
        ("_C = dict()\ndef f(k):\n    return _C.setdefault(k, 1)\n", "module-level _C.setdefault()"),
        ("import functools\n@functools.lru_cache\ndef cos_sin(n):\n    return n\n", "module-level cache"),
        (
            "class Rope:\n    cache = None\n    def forward(self, x):\n        Rope.cache = x\n",
            "class attribute cache",
        ),
        ("class A:\n    def forward(self, x):\n        type(self).last = x\n", "class attribute last"),
        ("import topology\ndef forward(x):\n    topology.layout = x\n", "module attribute topology.layout"),
        (
            "from m import topology\ndef forward(x):\n    return topology.current()\n",
            "registry current() read",
        ),
        (
            "_BUF = {}\ndef get_buffer(g):\n    return _BUF.setdefault(g, 1)\ndef _spec(g):\n    return _BUF[g]\n",
            "module-level _BUF read in _spec()",
        ),
    ],
)
def test_the_audit_catches_each_kind_of_state(source, expected):
    assert any(expected in what for _, what in audit(source, "snippet.py")), audit(source, "snippet.py")


def test_the_audit_leaves_constants_and_instance_state_alone():
    source = (
        "TABLE = {'a': 1}\n"  # a constant mapping, never mutated
        "class Layer:\n"
        "    def __init__(self):\n"
        "        self.cache = {}\n"
        "        self.layout = topology.current()\n"  # construction-time read
        "    def forward(self, x):\n"
        "        self.cache[x] = TABLE['a']\n"  # instance state
        "        return self.cache\n"
    )
    assert audit(source, "snippet.py") == []


# ---- behaviour: two ForwardBatches with different modes alive at once ----------------------------------


class ModeRecordingDispatcher:
    """A real LocalDispatcher that records, per dispatch, the step mode it was given and the DeepEP kernels
    that mode selects (`deepep.pick_mode`, pure: importable without deep_ep)."""

    def __init__(self, inner, micro_batch: int, log: list):
        self.inner, self.micro_batch, self.log = inner, micro_batch, log

    def dispatch_start(self, hidden, topk_ids, topk_weights, *, is_prefill=None):
        from moefleet.engine.distributed.deepep import pick_mode

        self.log.append((self.micro_batch, is_prefill, pick_mode("auto", is_prefill, 7168)))
        return self.inner.dispatch_start(hidden, topk_ids, topk_weights, is_prefill=is_prefill)

    def dispatch_finish(self, pending):
        return self.inner.dispatch_finish(pending)

    def combine_start(self, expert_output, dispatched):
        return self.inner.combine_start(expert_output, dispatched)

    def combine_finish(self, pending):
        return self.inner.combine_finish(pending)


def test_two_batches_alive_at_once_dispatch_with_their_own_modes():
    """A prefill batch and a decode batch run interleaved stage by stage (the TBO schedule, both alive): each
    micro-batch's dispatches carry its own batch's mode, and each result equals that batch run alone."""
    from moefleet.engine.forward_batch import ForwardBatch, ForwardMode
    from moefleet.engine.layers.moe import MoE
    from moefleet.engine.loader import load_model
    from moefleet.engine.models.base import LayerState
    from moefleet.engine.tbo import schedule
    from support.tiny_models import tiny_model_dir

    model = load_model(tiny_model_dir("qwen3_norm_topk"))
    for layer in model.attention_layers():
        layer.kv_cache = torch.empty(0)  # attention within the step (no KV cache), as the warm-up runs
    log: list = []
    moe_layers = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoE)]
    assert moe_layers
    for mlp in moe_layers:
        mlp.dispatchers = [ModeRecordingDispatcher(mlp.dispatcher, m, log) for m in (0, 1)]
    prefill = ForwardBatch.prefill_without_cache([5, 3], "cpu")
    decode = ForwardBatch.prefill_without_cache([1, 1, 1], "cpu")  # one token per sequence: a decode step
    prefill.input_ids.copy_(torch.arange(3, 11))
    decode.input_ids.copy_(torch.tensor([4, 9, 12]))
    assert (prefill.mode, prefill.is_prefill, decode.mode, decode.is_prefill) == (
        ForwardMode.EXTEND,
        True,
        ForwardMode.DECODE,
        False,
    )
    with torch.inference_mode():
        decoder = model.model
        states = [
            LayerState(b.positions, decoder.embed_tokens(b.input_ids), b, micro_batch=i)
            for i, b in enumerate((prefill, decode))
        ]
        stages = [stage for layer in decoder.layers for stage in layer.stages()]
        for micro_batch, index in schedule(len(stages), lead=1):
            stages[index](states[micro_batch])
        interleaved = [decoder.norm(s.hidden) for s in states]
        assert {entry for entry in log} == {(0, True, "normal"), (1, False, "low_latency")}
        assert [m for m, _, _ in log] == [
            m for m, i in schedule(len(stages), 1) if stages[i].__name__ == "_dispatch"
        ]
        for mlp in moe_layers:  # alone, through micro-batch 0's dispatcher
            mlp.dispatcher = mlp.dispatchers[0]
        log.clear()
        alone = [model(b.input_ids, b.positions, b) for b in (prefill, decode)]
    assert log == [(0, True, "normal")] * len(moe_layers) + [(0, False, "low_latency")] * len(moe_layers)
    for got, want in zip(interleaved, alone, strict=True):
        torch.testing.assert_close(got, want)


def test_tbo_micro_batches_carry_the_steps_group_agreed_mode():
    """A mixed step's micro-batches (one all-decode) dispatch with the step's mode, and a group-agreed mode
    (a data-parallel step where another rank prefills) overrides what the local rows are."""
    from moefleet.engine.forward_batch import ForwardBatch, ForwardMode
    from moefleet.engine.tbo import plan_split, split_batch

    def build(query_lens, seq_lens, dp_is_prefill=None):
        return ForwardBatch.build(
            input_ids=[0] * sum(query_lens),
            positions=[p for q, s in zip(query_lens, seq_lens, strict=True) for p in range(s - q, s)],
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_tables=[[0, 1]] * len(query_lens),
            block_size=4,
            device="cpu",
            dp_is_prefill=dp_is_prefill,
        )

    mixed = build([6, 1, 1], [6, 7, 7])  # cost 21 | 7 + 7: the cut leaves one-token pieces in micro-batch 1
    first, second = split_batch(mixed, plan_split(mixed.query_lens, mixed.seq_lens))
    assert (first.mode, second.mode, second.query_lens) == (ForwardMode.EXTEND, ForwardMode.DECODE, [1, 1, 1])
    assert (mixed.is_prefill, first.is_prefill, second.is_prefill) == (True, True, True)
    agreed = build([1, 1], [5, 6], dp_is_prefill=True)  # local decode rows, another rank prefills
    assert [c.is_prefill for c in split_batch(agreed, plan_split([1, 1], [5, 6]))] == [True, True]
    alone = build([1, 1], [5, 6])
    assert [c.is_prefill for c in split_batch(alone, plan_split([1, 1], [5, 6]))] == [False, False]
