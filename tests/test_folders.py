"""Hugging Face model folders, file to file: `prune_folder` writes a pruned folder from a sharded one, and the result
loads with `load_pruned` (and with plain `from_pretrained` when the config describes it) and equals the mock.

The folders are small random configurations (`scripts/families.py`) saved by `save_pretrained` in shards of 20 kB,
planned in float64 with heads, key/value groups, MLP channels, the hidden width (through norms) and a dropped block
at once. Bad input is refused with one line, leaving the input as it was and no output behind.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from invariant import TOLERANCE, random_request, tensors
from test_blocks import droppable
from test_cli import REPO
from test_heads import greedy, random_heads
from test_hidden import stream_request

import prunespec
from prunespec.applier import checkpoint, folder
from scripts.families import FAMILIES

transformers = pytest.importorskip("transformers")

FOLDER_FAMILIES = ["llama", "qwen2", "gemma", "phi3", "gpt2", "bert", "hf-vit"]
GENERATES = {"llama", "gemma", "gpt2"}  # greedy generation costs a second or two a family: grouped-query, tied
MLP_WEIGHTS = ("up_proj", "gate_up_proj", "c_fc", "fc1", "intermediate.dense")


def plan_everything(model, inputs, family: str):
    """Heads and key/value heads and MLP channels of the last block, a quarter of the stream through the norms, and
    the first block dropped (where the family has droppable blocks: BERT's are post-norm, so not residual)."""
    blocks = droppable(model, inputs)
    last = f"{blocks[-1]}." if blocks else ""
    heads, kv_heads = random_heads(model, inputs, seed=len(family))
    _, outputs = random_request(model, inputs, 5, 0.2, "output")
    mlp = [(w, c) for w, c in outputs if w.startswith(last) and any(f".{n}.weight" in w for n in MLP_WEIGHTS)]
    return prunespec.plan(
        model, inputs, pruned_outputs=stream_request(model, inputs, family, 5) + mlp,
        pruned_heads=[(m, h) for m, h in heads if m.startswith(last)] or None,
        pruned_kv_heads=[(m, h) for m, h in kv_heads if m.startswith(last)] or None,
        pruned_blocks=blocks[:1] or None, through_norms=True,
    )  # fmt: skip


def save(model, path: Path) -> None:
    """The model in 20 kB shards, with the files a model folder also holds."""
    model.save_pretrained(path, max_shard_size="20KB")
    (path / "tokenizer.json").write_text('{"model": {"type": "BPE"}}\n')
    (path / "docs").mkdir()
    (path / "docs" / "README.md").write_text("# A model\n")
    (path / "pytorch_model.bin").write_bytes(b"pickled weights of the unpruned model")
    (path / ".cache").mkdir()
    (path / ".cache" / "download.metadata").write_text("etag\n")


def contents(path: Path) -> dict[str, str]:
    """Every file under `path` by relative name, with a hash of its bytes."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}  # fmt: skip


def data_size(header: dict[str, checkpoint.StoredTensor]) -> int:
    return sum(t.end - t.start for t in header.values())


def assert_equals_mock(loaded, model, spec, inputs, causal_lm: bool) -> None:
    mock = prunespec.mock(model, spec)
    with torch.no_grad():
        expected, actual = mock(*inputs), loaded(*inputs)
        scale = max(t.abs().max().item() for t in tensors(expected))
        for a, e in zip(tensors(actual), tensors(expected), strict=True):
            assert (a - e).abs().max().item() <= TOLERANCE * max(1.0, scale)
        if causal_lm:
            assert torch.equal(greedy(loaded, inputs[0], 8)[0], greedy(mock, inputs[0], 8)[0])


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A llama, its inputs, its sharded folder, and a spec planned with heads, MLP, the hidden width and a block."""
    model, inputs = FAMILIES["llama"].build()
    spec = plan_everything(model, inputs, "llama")
    path = tmp_path_factory.mktemp("llama") / "in"
    save(model, path)
    return model, inputs, path, spec


@pytest.mark.parametrize("family", FOLDER_FAMILIES)
def test_a_pruned_folder_loads_exactly_the_pruned_model(family, tmp_path):
    model, inputs = FAMILIES[family].build()
    spec = plan_everything(model, inputs, family)
    assert spec.summary.parameters_after < spec.summary.parameters_before
    source, target = tmp_path / "in", tmp_path / "out"
    save(model, source)
    before = contents(source)
    written = prunespec.prune_folder(spec, source, target)

    assert contents(source) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # nothing left beside the output
    files = contents(target)
    generation = ["generation_config.json"] if (source / "generation_config.json").exists() else []
    assert written.copied == sorted(["docs/README.md", "tokenizer.json", *generation])
    for name in written.copied:
        assert files[name] == before[name]
    assert sorted(written.left_out) == [".cache/download.metadata", "pytorch_model.bin"]
    assert "pytorch_model.bin" not in files and ".cache/download.metadata" not in files
    assert prunespec.load_spec(target / "prunespec.json") == spec

    # Sharded again, at most as large as the largest input shard unless one tensor is larger.
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert len(written.shards) > 1 and sorted(set(index["weight_map"].values())) == written.shards
    headers = {name: checkpoint.read_header(target / name)[0] for name in written.shards}
    assert index["metadata"]["total_size"] == sum(data_size(header) for header in headers.values())
    assert index["metadata"]["total_parameters"] == spec.summary.parameters_after
    largest = max(data_size(checkpoint.read_header(p)[0]) for p in source.glob("*.safetensors"))
    for name, header in headers.items():
        assert len(header) == 1 or data_size(header) <= largest
        assert all(index["weight_map"][key] == name for key in header)
    config = json.loads((target / "config.json").read_text())
    unpruned = json.loads((source / "config.json").read_text())
    assert {k: v for k, v in config.items() if unpruned.get(k) != v} == {
        folder._attribute_map(unpruned).get(key, key): after for key, (_, after) in spec.config.items()
    }

    loaded = prunespec.load_pruned(target)
    assert not loaded.training
    assert all(t.dtype == torch.float64 for t in loaded.state_dict().values() if t.is_floating_point())
    for alias, first in spec.tied.items():  # tied input and output embeddings come out tied
        assert loaded.get_parameter(alias) is loaded.get_parameter(first)
    assert sum(p.numel() for p in loaded.parameters()) == spec.summary.parameters_after
    assert_equals_mock(loaded, model, spec, inputs, family in GENERATES)


def test_tied_embeddings_are_stored_once_as_in_the_input(tmp_path):
    model, inputs = FAMILIES["gpt2"].build()
    spec = prunespec.plan(model, inputs, pruned_outputs=stream_request(model, inputs, "gpt2", 1), through_norms=True)
    assert spec.tied == {"lm_head.weight": "transformer.wte.weight"}
    save(model, tmp_path / "in")
    prunespec.prune_folder(spec, tmp_path / "in", tmp_path / "out")
    stored = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "transformer.wte.weight" in stored and "lm_head.weight" not in stored


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "hf-vit"])
def test_a_folder_with_a_block_dropped_loads_with_from_pretrained(family, tmp_path):
    model, inputs = FAMILIES[family].build()
    spec = prunespec.plan(model, inputs, pruned_blocks=droppable(model, inputs)[:1])
    assert spec.config["num_hidden_layers"] == (2, 1)
    save(model, tmp_path / "in")
    prunespec.prune_folder(spec, tmp_path / "in", tmp_path / "out")
    causal = FAMILIES[family].causal_lm
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForImageClassification
    plain, info = auto.from_pretrained(tmp_path / "out", dtype=torch.float64, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert plain.config.num_hidden_layers == 1
    assert_equals_mock(plain, model, spec, inputs, FAMILIES[family].causal_lm)
    assert_equals_mock(prunespec.load_pruned(tmp_path / "out"), model, spec, inputs, causal_lm=False)
    if family == "hf-vit":  # stored under the names the input uses, which transformers 5 renames when it loads
        names = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
        assert "vit.encoder.layer.0.attention.attention.query.weight" in names


def test_a_bfloat16_folder_stays_bfloat16_and_loads_in_any_dtype(llama_folder, tmp_path):
    model, inputs, _, spec = llama_folder  # planned in float64
    rounded = copy.deepcopy(model)
    for parameter in rounded.parameters():
        parameter.data = parameter.data.to(torch.bfloat16).double()
    save(copy.deepcopy(rounded).to(torch.bfloat16), tmp_path / "in")
    written = prunespec.prune_folder(spec, tmp_path / "in", tmp_path / "out")
    stored = [t for shard in written.shards for t in checkpoint.read_header(tmp_path / "out" / shard)[0].values()]
    assert {t.dtype for t in stored} == {torch.bfloat16}
    assert all(t.dtype == torch.bfloat16 for t in prunespec.load_pruned(tmp_path / "out").parameters())
    # bfloat16 values are float64 values too: loaded in float64 the pruned model equals the mock of those values.
    loaded = prunespec.load_pruned(tmp_path / "out", torch_dtype="float64")
    assert_equals_mock(loaded, rounded, spec, inputs, causal_lm=False)


def test_single_file_stays_single_and_shards_follow_max_shard_size(llama_folder, tmp_path):
    model, inputs, _, spec = llama_folder
    model.save_pretrained(tmp_path / "in")
    assert (tmp_path / "in" / "model.safetensors").is_file()
    one = prunespec.prune_folder(spec, tmp_path / "in", tmp_path / "one")
    assert one.shards == ["model.safetensors"] and not (tmp_path / "one" / "model.safetensors.index.json").exists()
    many = prunespec.prune_folder(spec, tmp_path / "in", tmp_path / "many", max_shard_size="30kB")
    assert len(many.shards) > 2 and many.total_size == one.total_size
    for shard in many.shards:
        header = checkpoint.read_header(tmp_path / "many" / shard)[0]
        assert len(header) == 1 or data_size(header) <= 30_000
    for path in (tmp_path / "one", tmp_path / "many"):
        assert_equals_mock(prunespec.load_pruned(path), model, spec, inputs, causal_lm=False)


def test_a_checkpoint_file_loses_the_dropped_block_and_renames_the_ones_after(llama_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    model, _, _, spec = llama_folder
    assert [block.module for block in spec.dropped_blocks] == ["model.layers.0"]
    save_file(model.state_dict(), tmp_path / "dense.safetensors")
    checkpoint.prune_checkpoint(spec, tmp_path / "dense.safetensors", tmp_path / "pruned.safetensors")
    written = load_file(tmp_path / "pruned.safetensors")
    expected = prunespec.prune(copy.deepcopy(model), spec).state_dict()
    assert sorted(written) == sorted(expected)
    assert all(torch.equal(written[key], value) for key, value in expected.items())


LOAD_IN_A_FRESH_PROCESS = textwrap.dedent(
    """
    import sys, torch
    import prunespec
    model = prunespec.load_pruned(sys.argv[1])
    with torch.no_grad():
        torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
    print(sorted(name for name in sys.modules if name.startswith("prunespec")))
    """
)


def test_load_pruned_needs_no_planner_and_unpickles_nothing(llama_folder, tmp_path):
    model, inputs, source, spec = llama_folder
    prunespec.prune_folder(spec, source, tmp_path / "out")
    torch.save(inputs[0], tmp_path / "ids.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, tmp_path / "out", tmp_path / "ids.pt", "logits.pt"]
    ran = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert ran.returncode == 0, ran.stderr
    loaded_modules = eval(ran.stdout.strip().splitlines()[-1])
    assert "prunespec.planner" not in loaded_modules and "prunespec.applier.folder" in loaded_modules
    with torch.no_grad():
        expected = prunespec.mock(model, spec)(*inputs).logits
    assert (torch.load(tmp_path / "logits.pt") - expected).abs().max().item() <= TOLERANCE * expected.abs().max().item()


# ---------------------------------------------------------------------------------------------- bad input


def _remove(*names):
    def damage(path: Path) -> None:
        for name in names:
            for p in path.glob(name):
                p.unlink()

    return damage


def _edit_json(name, edit):
    def damage(path: Path) -> None:
        data = json.loads((path / name).read_text())
        edit(data)
        (path / name).write_text(json.dumps(data))

    return damage


def _truncate(path: Path) -> None:
    shard = path / "model-00002-of-00014.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])


def _another_model(path: Path) -> None:
    shutil.rmtree(path)
    model, _ = FAMILIES["qwen2"].build()
    save(model, path)


def _move_a_tensor(data) -> None:
    data["weight_map"]["model.norm.weight"] = "model-00001-of-00014.safetensors"


BAD_FOLDERS = {
    "no config.json": (_remove("config.json"), r"in: no config.json, so not a Hugging Face model folder$"),
    "no weights": (
        _remove("*.safetensors", "*.index.json"),
        r"no model.safetensors or model.safetensors.index.json, so no weights to prune "
        r"\(it has pytorch_model.bin: prunespec reads safetensors only\)$",
    ),
    "a shard missing": (
        _remove("model-00003-of-00014.safetensors"),
        r"index.json: names 1 shard\(s\) that are missing, e.g. 'model-00003-of-00014.safetensors'$",
    ),
    "a shard truncated": (
        _truncate,
        r"model-00002-of-00014.safetensors: the file is truncated: tensor '.*' ends at byte \d+ but the file has \d+$",
    ),
    "the index misplaces a tensor": (
        _edit_json("model.safetensors.index.json", _move_a_tensor),
        r"holds tensor 'model.norm.weight', which model.safetensors.index.json places in "
        r"'model-00001-of-00014.safetensors'$",
    ),
    "another model": (
        _another_model,
        r"in: fingerprint: the spec was planned for LlamaForCausalLM \(21 tensors\); the checkpoint has 6 more \(first: "
        r"the spec does not list tensor '.*'\)$",
    ),
    "a config value other than planned": (
        _edit_json("config.json", lambda c: c.update(num_hidden_layers=3)),
        r"config.json: num_hidden_layers is 3 but the spec was planned with 2$",
    ),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_a_bad_folder_is_refused_in_one_line_and_nothing_is_written(case, llama_folder, tmp_path):
    _, _, source, spec = llama_folder
    damage, message = BAD_FOLDERS[case]
    shutil.copytree(source, tmp_path / "in")
    damage(tmp_path / "in")
    before = contents(tmp_path / "in")
    with pytest.raises(prunespec.SpecError, match=message) as refused:
        prunespec.prune_folder(spec, tmp_path / "in", tmp_path / "out")
    assert "\n" not in str(refused.value)
    assert contents(tmp_path / "in") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_an_existing_target_is_refused_unless_overwritten(llama_folder, tmp_path):
    _, _, source, spec = llama_folder
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(prunespec.SpecError, match=r"out: exists already; give another folder, or overwrite it$"):
        prunespec.prune_folder(spec, source, tmp_path / "out")
    assert contents(tmp_path / "out") == {"mine.txt": hashlib.sha256(b"keep me").hexdigest()}
    for inside in (source, source / "pruned", source.parent):
        with pytest.raises(prunespec.SpecError, match="can be neither the input folder nor inside it, nor hold it"):
            prunespec.prune_folder(spec, source, inside, overwrite=True)
    with pytest.raises(prunespec.SpecError, match=r"no/out: its parent folder does not exist$"):
        prunespec.prune_folder(spec, source, tmp_path / "no" / "out")
    prunespec.prune_folder(spec, source, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "mine.txt").exists() and (tmp_path / "out" / "prunespec.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _full_disk_after(writes: int):
    """A stand-in for a write that finds the disk full once `writes` writes have gone through."""
    done = []

    def write(*args):
        if len(done) == writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done.append(args)

    return write


@pytest.mark.parametrize("where", ["tensor", "copy"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_a_full_disk_leaves_no_half_written_folder(where, existing, llama_folder, tmp_path, monkeypatch):
    """The disk fills up while a shard's tensors are written, or while the other files are copied: simulated by
    making `checkpoint._write` (which writes each tensor's bytes) or `shutil.copyfile` raise ENOSPC."""
    _, _, source, spec = llama_folder
    if existing:
        prunespec.prune_folder(spec, source, tmp_path / "out")
    before = contents(tmp_path)
    if where == "tensor":
        monkeypatch.setattr(checkpoint, "_write", _full_disk_after(5))
    else:
        monkeypatch.setattr(folder.shutil, "copyfile", _full_disk_after(1))
    with pytest.raises(prunespec.SpecError, match=r"out: cannot write the pruned folder \(No space left on device\); "
                                                  r"it needs about \d+ bytes of tensors, and nothing was written$"):
        prunespec.prune_folder(spec, source, tmp_path / "out", overwrite=True)
    assert contents(tmp_path) == before  # the old output, if any, is whole; nothing else appeared


def test_an_interrupted_run_leaves_no_half_written_folder(llama_folder, tmp_path, monkeypatch):
    _, _, source, spec = llama_folder

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_write", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prunespec.prune_folder(spec, source, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_load_pruned_refuses_a_folder_it_cannot_rebuild_in_one_line(llama_folder, tmp_path):
    _, _, source, spec = llama_folder
    with pytest.raises(prunespec.SpecError, match=r"in: no prunespec.json, so not a folder written by prunespec"):
        prunespec.load_pruned(source)
    prunespec.prune_folder(spec, source, tmp_path / "out")
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "out", other)
    model, inputs, _, _ = llama_folder
    prunespec.plan(model, inputs, pruned_blocks=["model.layers.1"]).save(other / "prunespec.json")
    with pytest.raises(prunespec.SpecError) as refused:
        prunespec.load_pruned(other)
    assert str(refused.value).startswith(f"{other}: the shards do not fit prunespec.json: ")
    assert "\n" not in str(refused.value)
    _edit_json("config.json", lambda c: c.update(num_hidden_layers=2))(tmp_path / "out")
    with pytest.raises(prunespec.SpecError, match=r"config.json: num_hidden_layers is 2 but prunespec.json gives 1$"):
        prunespec.load_pruned(tmp_path / "out")


@pytest.mark.parametrize("fast", [True, False], ids=["kernel-copies-numpy-gathers", "plain-reads-torch-gathers"])
def test_a_checkpoint_is_the_same_however_its_tensors_are_copied(fast, llama_folder, tmp_path, monkeypatch):
    """Tensors left whole or cut to their first rows are copied file to file by the kernel, gathers go through numpy
    where it is installed; without either (`fast` off) the bytes written are the same: the pruned state dict."""
    from safetensors.torch import load_file, save_file

    model, inputs, _, _ = llama_folder
    up = model.model.layers[-1].mlp.up_proj.weight
    spec = prunespec.plan(  # the last MLP channels of the last block (row cuts), and a few of the first (gathers)
        model, inputs, pruned_outputs=[("model.layers.1.mlp.up_proj.weight", c) for c in range(len(up) // 2, len(up))]
        + [("model.layers.0.mlp.up_proj.weight", c) for c in (1, 4, 5)]
    )  # fmt: skip
    copies = []
    if fast:
        kernel_copy = os.copy_file_range
        monkeypatch.setattr(os, "copy_file_range", lambda *args: copies.append(args) or kernel_copy(*args))
    else:
        monkeypatch.setattr(checkpoint, "_numpy", None)
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    save_file(model.state_dict(), tmp_path / "dense.safetensors")
    checkpoint.prune_checkpoint(spec, tmp_path / "dense.safetensors", tmp_path / "pruned.safetensors")
    written = load_file(tmp_path / "pruned.safetensors")
    expected = prunespec.prune(copy.deepcopy(model), spec).state_dict()
    assert sorted(written) == sorted(expected)
    assert all(torch.equal(written[key], value) for key, value in expected.items())
    assert not fast or len(copies) >= len(expected) - 4  # all but the gathered MLP of block 0 and block 1's down_proj
