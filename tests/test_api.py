"""The public API's promises: light applier imports, planning leaves the model alone, the seed-style facade."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from invariant import assert_matches, random_request
from nets import build

import prunespec


def test_applying_a_stored_spec_never_loads_the_planner(tmp_path):
    model, inputs = build("fork")
    spec_path = tmp_path / "fork.prunespec.json"
    prunespec.plan(model, inputs, *random_request(model, inputs, 0, 0.3, "input")).save(spec_path)
    torch.save(model.state_dict(), tmp_path / "fork.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from nets import Fork
        import prunespec
        model = Fork().double().eval()
        model.load_state_dict(torch.load({str(tmp_path / "fork.pt")!r}, weights_only=True))
        spec = prunespec.load_spec({str(spec_path)!r})
        prunespec.prune(model, spec)
        prunespec.mock(Fork().double(), spec)
        loaded = sorted(m for m in sys.modules if m.startswith("prunespec"))
        print(loaded)
        assert not any(m.startswith("prunespec.planner") for m in loaded), loaded
        assert not any(m.split(".")[0] in ("jsonschema", "typer", "torchvision") for m in sys.modules), "heavy import"
        """
    )
    repo = Path(__file__).parent.parent
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=repo)
    assert result.returncode == 0, result.stderr
    assert "prunespec.applier" in result.stdout


def test_planning_leaves_the_model_as_it_was():
    model, inputs = build("depthwise")
    model.train()
    model.bn1.eval()
    handle = model.dw.register_forward_hook(lambda *a: None)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    params = {n: p for n, p in model.named_parameters()}
    prunespec.plan(model, inputs, *random_request(model, inputs, 0, 0.3, "both"))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # batch-norm statistics too
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(model.dw._forward_hooks) == [handle.id]
    from torch.nn.modules import module as torch_module

    assert not torch_module._global_forward_hooks and not torch_module._global_forward_pre_hooks
    assert all(p.requires_grad for p in model.parameters())


def test_pruning_manager_follows_the_seed_flow():
    model, inputs = build("residual")
    manager = prunespec.PruningManager(model)
    with pytest.raises(RuntimeError, match="compute"):
        manager.prune()
    manager.compute(inputs, pruned_inputs=[("head.weight", 2), ("a.weight", 4)])
    with torch.no_grad():
        expected = manager.get_mock_model()(*inputs)
        manager.prune()
        actual = model(*inputs)
    assert_matches(actual, expected)
    assert isinstance(manager.spec, prunespec.PruningSpec)


def test_a_spec_that_does_not_fit_changes_nothing():
    model, inputs = build("fork")
    other, _ = build("concat")
    spec = prunespec.plan(model, inputs, [("a.weight", 1)])
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(prunespec.SpecError, match="fingerprint"):
        prunespec.prune(other, spec)
    assert all(torch.equal(state[k], v) for k, v in other.state_dict().items())


def test_planning_runs_on_shapes_so_input_size_costs_nothing():
    """A 4096x4096 batch of 8 would need tens of GB as real activations; shapes alone are enough to plan."""
    import torchvision

    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.empty(8, 3, 4096, 4096, device="meta")
    spec = prunespec.plan(model, [x], [("layer2.0.conv1.weight", 3)])
    assert spec.inputs[0].shape == [8, 3, 4096, 4096]
    assert spec.layers["layer2.0.conv1"].input is not None


class _LooksAtValues(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 6, 1)
        self.b = torch.nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.a(x)
        if x.mean() > -1e9:  # data-dependent: meta and fake tensors cannot answer, so tracing falls back to real ones
            y = torch.relu(y)
        return self.b(y)


def _runs_when_planned(model: torch.nn.Module, tmp_path, monkeypatch) -> list[str]:
    """Plan `model` (a conv feeding a conv) with the invariant checked, and return the tracing runs it took."""
    from invariant import assert_invariant

    tracing = importlib.import_module("prunespec.planner.trace")  # the module, not the function of that name
    runs = []
    real_trace = tracing._trace

    def counted(model, inputs, run, *options):
        runs.append(run)
        return real_trace(model, inputs, run, *options)

    monkeypatch.setattr(tracing, "_trace", counted)
    torch.manual_seed(0)
    for layer in (model.a, model.b):
        layer.reset_parameters()
    x = [torch.randn(2, 3, 4, 4, dtype=torch.float64)]
    _, pruned, _ = assert_invariant(model.double().eval(), x, tmp_path, pruned_inputs=[("b.weight", 4)])
    assert pruned.a.out_channels == 5
    return runs


def test_data_dependent_models_fall_back_to_a_real_trace(tmp_path, monkeypatch):
    assert _runs_when_planned(_LooksAtValues(), tmp_path, monkeypatch)[:3] == ["meta", "fake", "real"]


class _MakesACpuTensor(_LooksAtValues):
    def forward(self, x):
        # A tensor made in forward on the CPU: meta activations cannot be combined with it, fake ones can.
        offset = torch.linspace(0, 1, x.shape[-1], dtype=x.dtype)
        return self.b(self.a(x) + offset)


def test_models_that_make_cpu_tensors_fall_back_to_fake_tensors(tmp_path, monkeypatch):
    assert _runs_when_planned(_MakesACpuTensor(), tmp_path, monkeypatch)[:2] == ["meta", "fake"]
