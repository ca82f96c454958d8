"""`prunespec apply SPEC MODEL -o model.onnx [--verify]`: the pruned model exported with torch's dynamo exporter.

A small CNN and a small random Llama (grouped-query attention, heads and MLP channels pruned) are written as ONNX
and run with onnxruntime here, independently of the command's own `--verify`, on inputs the command never saw; a
model whose forward branches on tensor values cannot be exported, which is one `error:` line, exit status 1, and no
file. The commands run in process (typer's CliRunner): an ONNX export costs seconds, a fresh interpreter more.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import prunespec
from invariant import rounding_bound
from test_cli import TINY, assert_ok, invoke

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

VERDICT = re.compile(
    r"^verify: ONNX \(onnxruntime, float32\) max \|onnx - mock\| = (\S+) \(relative (\S+)\), tolerance (\S+): ok$",
    re.MULTILINE,
)


def onnx_outputs(path: Path, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(out) for out in session.run(None, feeds)]


def matrix_shapes(path: Path) -> list[tuple[int, int]]:
    """The shapes of the graph's weight matrices, each as (smaller, larger): the exporter names and transposes the
    matrices of linear layers as it likes (``val_105`` for ``q_proj.weight``, transposed)."""
    return sorted(tuple(sorted(t.dims)) for t in onnx.load(str(path)).graph.initializer if len(t.dims) == 2)


def linear_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    return sorted(tuple(sorted(p.shape)) for p in model.parameters() if p.dim() == 2)


def test_a_pruned_cnn_exports_to_onnx_and_runs_as_the_mock_does(tmp_path: Path) -> None:
    from models_for_cli import tiny_net

    torch.manual_seed(0)
    model = tiny_net().eval()
    save_file(model.state_dict(), str(tmp_path / "weights.safetensors"))
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    spec = prunespec.plan(model, [x], pruned_inputs=[("3.weight", c) for c in (0, 1, 2)],
                          pruned_outputs=[("3.weight", 1)])  # fmt: skip
    spec.model = TINY
    spec.save(tmp_path / "tiny.prunespec.json")

    result = invoke("apply", "tiny.prunespec.json", TINY, "--weights", "weights.safetensors", "-o", "tiny.onnx",
                    "--verify", cwd=tmp_path)  # fmt: skip
    assert_ok(result)
    verdict = VERDICT.search(result.stdout)
    assert verdict, result.stdout
    assert float(verdict.group(2)) <= float(verdict.group(3))
    # the graph holds the pruned weights: 8 -> 7 output channels and 8 -> 5 input channels of the second convolution
    weights = {t.name: list(t.dims) for t in onnx.load(str(tmp_path / "tiny.onnx")).graph.initializer}
    assert weights["3.weight"] == [7, 5, 3, 3] and weights["7.weight"] == [4, 7]
    # on an input the command never saw, the file computes what the mock computes, within float32 rounding
    fresh = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    (actual,) = onnx_outputs(tmp_path / "tiny.onnx", [fresh])
    with torch.no_grad():
        expected = prunespec.mock(copy.deepcopy(model).double(), spec)(fresh.double())
    # each output sums 3*3*3 + 8*3*3 products and an 8-term mean; a few times that many float32 roundings
    bound = rounding_bound(torch.float32, 4 * (27 + 72 + 8), expected.abs().max().item() + 1)
    assert (actual.double() - expected).abs().max().item() <= bound


def test_a_pruned_llama_exports_to_onnx_and_runs_as_the_mock_does(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "llama")
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(1))
    # query head 0 (of group 0), key/value group 1 (query heads 2 and 3 with it), and a quarter of the MLP
    spec = prunespec.plan(
        model, [ids], pruned_heads=[("model.layers.0.self_attn", 0)],
        pruned_kv_heads=[("model.layers.0.self_attn", 1)],
        pruned_outputs=[("model.layers.0.mlp.up_proj.weight", c) for c in range(0, 48, 4)],
    )  # fmt: skip
    assert not spec.kept
    spec.model = "hf:llama"
    spec.save(tmp_path / "llama.prunespec.json")

    result = invoke("apply", "llama.prunespec.json", "hf:llama", "-o", "llama.onnx", "--verify", cwd=tmp_path)
    assert_ok(result)
    verdict = VERDICT.search(result.stdout)
    assert verdict, result.stdout
    pruned = prunespec.prune(copy.deepcopy(model), spec)
    assert pruned.model.layers[0].self_attn.q_proj.weight.shape == (8, 32)  # 1 of 4 heads of 8 channels is left
    assert matrix_shapes(tmp_path / "llama.onnx") == linear_shapes(pruned)  # the pruned matrices, and no others
    fresh = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(2))
    (actual, *_) = onnx_outputs(tmp_path / "llama.onnx", [fresh])
    with torch.no_grad():
        expected = prunespec.mock(copy.deepcopy(model).double(), spec)(fresh, use_cache=False).logits
    # sums over at most 48 products, a softmax, norms and the head: a few times that many float32 roundings
    bound = rounding_bound(torch.float32, 16 * 48, expected.abs().max().item() + 1)
    assert (actual.double() - expected).abs().max().item() <= bound


def test_a_model_that_cannot_be_exported_is_one_line_and_no_file(tmp_path: Path) -> None:
    from models_for_cli import tiny_net

    model = tiny_net().eval()
    spec = prunespec.plan(model, [torch.randn(1, 3, 16, 16)], pruned_inputs=[("3.weight", 0)])
    spec.save(tmp_path / "tiny.prunespec.json")
    # same layers as tiny_net, so the spec fits; its forward picks a branch by the sign of its output's sum
    result = invoke("apply", "tiny.prunespec.json", "models_for_cli:branches_on_values", "-o", "model.onnx",
                    cwd=tmp_path)  # fmt: skip
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "cannot export" in errors[0] and "data-dependent" in errors[0], errors[0]
    assert "\x1b[" not in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.prunespec.json"]
