"""The algorithms' contract with the trainer: poseloop.policy.algos.Trainer is all an algorithm module uses of it.

Read from the source (no model): every attribute an algorithm reads of its trainer is a member of the
Trainer protocol, none is set, no algorithm imports the trainer module, and PolicyTrainer provides every
operation of the protocol with the protocol's parameters. tests/test_policy.py checks a built trainer
against the protocol at run time (isinstance).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from poseloop.policy.algos import Algorithm, Trainer
from poseloop.policy.trainer import PolicyTrainer

ALGOS = Path(__file__).resolve().parents[2] / "poseloop" / "policy" / "algos"


def contract() -> set[str]:
    """The Trainer protocol's members: its annotated attributes and its methods."""
    methods = {n for n, v in vars(Trainer).items() if inspect.isfunction(v) and not n.startswith("_")}
    return set(Trainer.__annotations__) | methods


def trainer_uses(source: str) -> list[tuple[str, bool, int]]:
    """(attribute, whether it is assigned, line) of every `self.trainer.x`, or `t.x` where t is `self.trainer` or
    a parameter named `trainer`, in the functions of `source`."""
    def is_self_trainer(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "trainer" and isinstance(node.value, ast.Name)
                and node.value.id == "self")

    uses = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        names = {a.arg for a in [*fn.args.args, *fn.args.kwonlyargs] if a.arg == "trainer"}
        names |= {t.id for node in ast.walk(fn) if isinstance(node, ast.Assign) and is_self_trainer(node.value)
                  for t in node.targets if isinstance(t, ast.Name)}
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and (
                    is_self_trainer(node.value) or (isinstance(node.value, ast.Name) and node.value.id in names)):
                uses.append((node.attr, isinstance(node.ctx, (ast.Store, ast.Del)), node.lineno))
    return uses


def test_every_algorithm_uses_only_the_trainer_protocol() -> None:
    allowed = contract()
    seen: set[str] = set()
    files = sorted(ALGOS.glob("*.py"))
    assert {f.stem for f in files} >= {"ddpo", "d3po", "refl", "draft", "rlcm"}
    for path in files:
        source = path.read_text()
        imported = {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import) for a in n.names}
        assert "poseloop.policy.trainer" not in imported, f"{path.name} imports the trainer module; use poseloop.policy.algos.Trainer"
        for attr, stored, line in trainer_uses(source):
            assert attr in allowed, f"{path.name}:{line} uses trainer.{attr}, which is not in poseloop.policy.algos.Trainer"
            assert not stored, f"{path.name}:{line} sets trainer.{attr}; an algorithm only reads its trainer"
            seen.add(attr)
    # The scan sees the algorithms' calls (an empty scan would pass anything).
    assert {"sample_groups", "rescore", "epoch_items", "optimizer_step", "gather", "choose_steps"} <= seen


def test_the_scan_catches_a_private_call_and_an_assignment() -> None:
    source = ("class X(Algorithm):\n"
              "    def epoch(self, epoch):\n"
              "        t = self.trainer\n"
              "        t._rescore(1)\n"
              "        self.trainer.first_ratio = 0.0\n"
              "        return {'n': t.cfg.train.epochs}\n")
    uses = trainer_uses(source)
    assert ("_rescore", False, 4) in uses and ("first_ratio", True, 5) in uses and ("cfg", False, 6) in uses
    assert "_rescore" not in contract() and "first_ratio" not in contract()


def test_the_trainer_provides_the_protocol_with_its_parameters() -> None:
    for name in sorted(contract() - set(Trainer.__annotations__)):
        ours, declared = inspect.signature(getattr(PolicyTrainer, name)), inspect.signature(getattr(Trainer, name))
        assert list(ours.parameters) == list(declared.parameters), name
        assert [p.default for p in ours.parameters.values()] == [p.default for p in declared.parameters.values()], name
    # No forwarding of unknown names to the algorithm: a typo is an AttributeError.
    assert "__getattr__" not in vars(PolicyTrainer)
    assert inspect.signature(Algorithm.__init__).parameters["trainer"].annotation in ("Trainer", Trainer)
