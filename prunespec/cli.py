"""The `prunespec` command line: `plan` writes a spec, `apply` turns a spec and a model into a pruned artifact,
`apply-checkpoint` prunes a checkpoint file without the model, and `show`, `diff` and `validate` review specs.

Start reading at the commands `plan_command` and `apply_command`; `main` is the entry point. The review commands
are thin wrappers around `prunespec.review`. Argument parsing for
shapes and channel lists lives in small plain functions (`parse_shape`, `parse_channel_request`) with examples.

Every expected failure (a bad spec, a bad request, a model that cannot be built, a missing file) is printed as one
`error: ...` line on stderr with exit status 1; `prunespec --debug ...` shows the traceback instead. Outputs are
written to a temporary file next to the target and renamed at the end, so a failed command leaves no partial file.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Optional

import click
import torch
import typer
import typer.core
from torch import nn
from torch.utils._pytree import tree_leaves

import prunespec
from prunespec import review
from prunespec.errors import PlanError, SpecError, naming_flags
from prunespec.export import SUFFIXES, ExportError, plain_call, run_onnx, write_model
from prunespec.models import ModelError, checkpoint_tensors, example_inputs, load_model, read_calibration
from prunespec.schemas import atomic_path
from prunespec.schemas.spec import change

DEFAULT_SHAPE = "1x3x224x224"
SHOWN_PROBLEMS = 10  # `validate` lists this many problems of a spec, then counts the rest


class CliError(ValueError):
    """A command-line argument that cannot be used; printed as one line."""


# Failures the user can fix; anything else is reported as unexpected (still one line, unless --debug).
EXPECTED_ERRORS = (CliError, ModelError, PlanError, SpecError, ExportError, OSError)


class _FlagsShowNoType:
    """typer's help prints a value type after each option, `<bool>` after a flag that takes no value; an empty
    metavar, printed in its place, leaves the flag bare."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class _Group(_FlagsShowNoType, typer.core.TyperGroup):
    pass


class _Command(_FlagsShowNoType, typer.core.TyperCommand):
    pass


app = typer.Typer(
    name="prunespec",
    cls=_Group,
    help="Compile channel-pruning requests into versioned spec files, and apply them without re-tracing.",
    no_args_is_help=True,
    add_completion=False,
    # Plain tracebacks under --debug: they are easier to paste into a bug report than rich's boxed ones.
    pretty_exceptions_enable=False,
)

_debug = False


def version_line() -> str:
    """What `prunespec --version` prints: the package version and the spec schema version it writes."""
    return f"prunespec {prunespec.__version__} (spec schema {prunespec.SCHEMA_VERSION})"


def _print_version(asked: bool) -> None:
    if asked:
        typer.echo(version_line())
        raise typer.Exit()


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback when a command fails.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Show the version and the spec schema it writes."
        ),
    ] = False,
) -> None:
    global _debug
    _debug = debug


# ---------------------------------------------------------------------------------------------- argument parsing


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse an input shape written as sizes joined by 'x'.

    >>> parse_shape("1x3x224x224")
    (1, 3, 224, 224)
    >>> parse_shape("1x3xfoo")
    Traceback (most recent call last):
    ...
    prunespec.cli.CliError: --input-shape '1x3xfoo': expected positive sizes joined by 'x', like '1x3x224x224'
    """
    parts = text.strip().lower().split("x")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise CliError(f"--input-shape {text!r}: expected positive sizes joined by 'x', like '{DEFAULT_SHAPE}'")
    return tuple(int(p) for p in parts)


def parse_channels(text: str) -> list[int]:
    """Parse a channel list: comma-separated channels and ascending ranges, in the order given.

    >>> parse_channels("0-3,9,17")
    [0, 1, 2, 3, 9, 17]
    >>> parse_channels("7-3")
    Traceback (most recent call last):
    ...
    ValueError: range '7-3' must go upwards, like '3-7'
    """
    channels: list[int] = []
    for part in text.split(","):
        start, dash, stop = part.strip().partition("-")
        if not start.isdigit() or (dash and not stop.isdigit()):
            raise ValueError(f"{part.strip()!r} is not a channel or a range like '3-7'")
        lo = int(start)
        hi = int(stop) if dash else lo
        if hi < lo:
            raise ValueError(f"range {part.strip()!r} must go upwards, like '{hi}-{lo}'")
        channels.extend(range(lo, hi + 1))
    return channels


def parse_channel_request(text: str, option: str = "--prune-input", form: str | None = None) -> list[tuple[str, int]]:
    """Parse `PARAM:CH[,CH...]` (or `MODULE:H[,H...]` for heads) into (name, index) pairs.

    >>> parse_channel_request("layer2.0.conv1.weight:3,9-10")
    [('layer2.0.conv1.weight', 3), ('layer2.0.conv1.weight', 9), ('layer2.0.conv1.weight', 10)]
    >>> parse_channel_request("conv1.weight")
    Traceback (most recent call last):
    ...
    prunespec.cli.CliError: --prune-input 'conv1.weight': expected PARAM:CH[,CH...] like 'layer1.0.conv1.weight:0-7,12'
    """
    # Parameter names contain dots but never colons, so the last colon separates the channels.
    name, colon, channels = text.rpartition(":")
    name = name.strip()
    if not colon or not name or not channels.strip():
        form = form or "PARAM:CH[,CH...] like 'layer1.0.conv1.weight:0-7,12'"
        raise CliError(f"{option} {text!r}: expected {form}")
    try:
        return [(name, c) for c in parse_channels(channels)]
    except ValueError as e:
        raise CliError(f"{option} {text!r}: {e}") from None


def _requests(texts: list[str] | None, option: str, form: str | None = None) -> list[tuple[str, int]]:
    """All pairs of a repeated option, without duplicates, in the order given."""
    pairs: list[tuple[str, int]] = []
    for text in texts or []:
        pairs.extend(parse_channel_request(text, option, form))
    return list(dict.fromkeys(pairs))


def planning_inputs(network: nn.Module, model: str, shapes, dtype: torch.dtype | None) -> list[torch.Tensor]:
    """The example inputs `plan` traces with: the given shapes and dtype, else the model's own default input
    (token ids, pixel values), else a random image batch of `DEFAULT_SHAPE`."""
    generator = torch.Generator().manual_seed(0)
    if shapes is None:
        found = example_inputs(network, model)
        if found is not None and dtype is None:
            return found
        shapes = [tuple(t.shape) for t in found] if found is not None else [parse_shape(DEFAULT_SHAPE)]
    dtype = dtype or torch.float32
    if dtype.is_floating_point:
        return [torch.randn(shape, generator=generator, dtype=dtype) for shape in shapes]
    high = getattr(getattr(network, "config", None), "vocab_size", None) or 2  # token ids within the vocabulary
    return [torch.randint(0, high, shape, generator=generator, dtype=dtype) for shape in shapes]


# ---------------------------------------------------------------------------------------------- commands


# Arguments that `plan` and `apply` share.
ModelArgument = Annotated[str, typer.Argument(metavar="MODEL", help="'torchvision:NAME' or 'package.module:callable'.")]
WeightsOption = Annotated[
    Optional[Path], typer.Option("--weights", metavar="CKPT", help="State dict to load (.pt, .pth or .safetensors).")
]


def _choosing(*names: str, **options):
    """An option of `plan` that steers the importance criterion; `plan --help` lists them together."""
    return typer.Option(*names, rich_help_panel="Choosing channels", **options)


@app.command("plan")
def plan_command(
    model: ModelArgument,
    output: Annotated[Path, typer.Option("--output", "-o", metavar="SPEC", help="Where to write the spec (JSON).")],
    input_shape: Annotated[
        Optional[list[str]],
        typer.Option(
            "--input-shape",
            metavar="SHAPE",
            help=f"Shape of one network input; repeat per input (default {DEFAULT_SHAPE}).",
        ),
    ] = None,
    weights: WeightsOption = None,
    prune_input: Annotated[
        Optional[list[str]],
        typer.Option(
            "--prune-input", metavar="PARAM:CH[,CH...]", help="Input channels of a consumer to remove; repeatable."
        ),
    ] = None,
    prune_output: Annotated[
        Optional[list[str]],
        typer.Option(
            "--prune-output", metavar="PARAM:CH[,CH...]", help="Output channels of a producer to remove; repeatable."
        ),
    ] = None,
    constrained: Annotated[
        bool, typer.Option("--constrained", help="Remove extra channels so that no activation gather is needed.")
    ] = False,
    reorder: Annotated[
        bool, typer.Option("--reorder/--no-reorder", help="Permute channels so that gathers become slices.")
    ] = True,
    strict: Annotated[
        bool, typer.Option("--strict", help="Fail instead of keeping requested channels the planner cannot remove.")
    ] = False,
    criterion: Annotated[
        Optional[str],
        _choosing(
            "--criterion",
            metavar="l1|l2|lamp|fpgm|hrank|random",
            help="Choose the channels to prune by this importance criterion (with --amount or a --target-*).",
        ),
    ] = None,
    amount: Annotated[
        Optional[float],
        _choosing("--amount", metavar="F", help="Fraction of channels to prune, e.g. 0.3."),
    ] = None,
    side: Annotated[
        str,
        _choosing(
            "--side",
            metavar="input|output",
            help="input: choose per consumer (suits unconstrained); output: per segment of producers (suits "
            "--constrained).",
        ),
    ] = "input",
    scope: Annotated[
        str,
        _choosing(
            "--scope",
            metavar="local|global",
            help="local: prune the amount in every layer; global: rank channels across layers.",
        ),
    ] = "local",
    round_to: Annotated[
        int,
        _choosing(
            "--round-to", metavar="N", help="Keep channel counts at multiples of N (hardware runs such shapes faster)."
        ),
    ] = 1,
    exclude: Annotated[
        Optional[list[str]],
        _choosing(
            "--exclude", metavar="GLOB", help="Leave layers whose weight or module name matches untouched; repeatable."
        ),
    ] = None,
    include_io: Annotated[
        bool,
        _choosing("--include-io", help="Also choose in layers that read the model input or write its output."),
    ] = False,
    target_macs: Annotated[
        Optional[float],
        _choosing(
            "--target-macs", metavar="F", help="Search the amount that keeps this fraction of the dense MACs, e.g. 0.5."
        ),
    ] = None,
    target_params: Annotated[
        Optional[float],
        _choosing(
            "--target-params", metavar="F", help="Search the amount that keeps this fraction of the dense parameters."
        ),
    ] = None,
    calibration: Annotated[
        Optional[Path],
        _choosing(
            "--calibration",
            metavar="FILE",
            help="Input batches for hrank (.pt or .safetensors); default: the random example input.",
        ),
    ] = None,
    zeroed: Annotated[
        bool,
        _choosing("--zeroed", help="Also prune channels whose weights are all zero."),
    ] = False,
    seed: Annotated[int, _choosing("--seed", help="Seed of --criterion random.")] = 0,
    unit: Annotated[
        str,
        _choosing(
            "--unit",
            metavar="channels|heads|kv_heads|blocks",
            help="What the criterion chooses: channels, attention heads, key/value heads, or residual blocks "
            "(criteria for heads: l1, l2, fpgm, lamp, output, random; for blocks: influence, random).",
        ),
    ] = "channels",
    prune_heads: Annotated[
        Optional[list[str]],
        typer.Option(
            "--prune-heads", metavar="MODULE:H[,H...]", help="Attention heads of an attention module to remove."
        ),
    ] = None,
    prune_kv_heads: Annotated[
        Optional[list[str]],
        typer.Option(
            "--prune-kv-heads",
            metavar="MODULE:G[,G...]",
            help="Key/value heads to remove, each with its group of query heads.",
        ),
    ] = None,
    drop_blocks: Annotated[
        Optional[list[str]],
        typer.Option("--drop-blocks", metavar="MODULE[,MODULE]", help="Residual blocks to drop; repeatable."),
    ] = None,
    through_norms: Annotated[
        bool,
        typer.Option(
            "--through-norms",
            help="Let channels that norms normalise together go (a transformer's hidden width); the pruned norms "
            "take their statistics over the channels they keep.",
        ),
    ] = False,
    uniform: Annotated[
        bool,
        typer.Option(
            "--uniform", help="Require a plan the model's config can describe (from_pretrained loads the result)."
        ),
    ] = False,
    input_dtype: Annotated[
        Optional[str],
        typer.Option(
            "--input-dtype", metavar="DTYPE", help="dtype of the --input-shape inputs, e.g. int64 for token ids."
        ),
    ] = None,
) -> None:
    """Trace MODEL and write a pruning spec.

    Name channels, heads or blocks to remove (--prune-input, --prune-output, --prune-heads, --prune-kv-heads,
    --drop-blocks), let a --criterion choose them, or both. With none, the channels whose weights are all zero are
    pruned. An hf: model is planned from its config alone, on the meta device, with token ids or pixel values for
    input (--input-shape and --input-dtype override them).
    """
    with _reporting_errors(), naming_flags():
        shapes = [parse_shape(s) for s in input_shape] if input_shape else None
        dtype = _dtype(input_dtype) if input_dtype is not None else None
        pruned_inputs = _requests(prune_input, "--prune-input")
        pruned_outputs = _requests(prune_output, "--prune-output")
        pruned_heads = _requests(prune_heads, "--prune-heads", "MODULE:H[,H...] like 'model.layers.3.self_attn:0,5'")
        pruned_kv_heads = _requests(prune_kv_heads, "--prune-kv-heads", "MODULE:G[,G...] like 'model.layers.3.self_attn:1'")
        pruned_blocks = [b.strip() for text in drop_blocks or [] for b in text.split(",") if b.strip()]
        choosing = _choosing_options(criterion, amount, target_macs, target_params, calibration)
        _check_output_folder(output)

        # A Hugging Face folder is planned on meta, from its config alone, unless the criterion runs the model.
        runs_model = zeroed or criterion in ("hrank", "output", "influence")
        network = load_model(model, weights, meta=model.startswith("hf:") and not runs_model)
        inputs = planning_inputs(network, model, shapes, dtype)
        tensors = checkpoint_tensors(model.removeprefix("hf:")) if model.startswith("hf:") and not runs_model else None

        notes: list[str] = []
        if choosing:
            batches = read_calibration(calibration) if calibration else None
            selection = prunespec.select(
                network, inputs, criterion=criterion, amount=amount, side=side, scope=scope, round_to=round_to,
                exclude=exclude or (), include_io=include_io, zeroed=zeroed, target_macs=target_macs,
                target_params=target_params, constrained=constrained, reorder=reorder, calibration=batches,
                progress=_progress_bar(f"{criterion} on the calibration inputs") if runs_model else None, seed=seed,
                report=lambda line: typer.echo(line, err=True), unit=unit, through_norms=through_norms,
                weights=tensors,
            )  # fmt: skip
            pruned_inputs = list(dict.fromkeys([*pruned_inputs, *selection.pruned_inputs]))
            pruned_outputs = list(dict.fromkeys([*pruned_outputs, *selection.pruned_outputs]))
            pruned_heads = list(dict.fromkeys([*pruned_heads, *selection.pruned_heads]))
            pruned_kv_heads = list(dict.fromkeys([*pruned_kv_heads, *selection.pruned_kv_heads]))
            pruned_blocks = list(dict.fromkeys([*pruned_blocks, *selection.pruned_blocks]))
            notes = selection.notes
        elif zeroed:
            raise CliError("--zeroed adds all-zero channels to a --criterion choice; without one, name no channels")
        # Nothing named (all None): the planner looks for weight channels that training already zeroed out.
        named = bool(pruned_inputs or pruned_outputs or pruned_heads or pruned_kv_heads or pruned_blocks or choosing)
        if not named and any(p.is_meta for p in network.parameters()):
            raise CliError("name channels, heads or blocks to remove, or a --criterion: finding all-zero channels "
                           "reads every weight of an hf: model")  # fmt: skip
        spec = prunespec.plan(
            network,
            inputs,
            pruned_inputs=pruned_inputs if named else None,
            pruned_outputs=pruned_outputs if named else None,
            pruned_heads=pruned_heads or None,
            pruned_kv_heads=pruned_kv_heads or None,
            pruned_blocks=pruned_blocks or None,
            constrained=constrained,
            reorder=reorder,
            strict=strict,
            through_norms=through_norms,
            uniform=uniform,
        )
        spec.model = model
        spec.save(output)
        asked = asked_channels(bool(prune_input or prune_output or prune_heads or prune_kv_heads or drop_blocks),
                               criterion, zeroed)  # fmt: skip
        typer.echo(describe_plan(spec, output, asked))
        if choosing:
            typer.echo(describe_selection(criterion, side, scope, notes, spec, round_to))


def _choosing_options(criterion, amount, target_macs, target_params, calibration) -> bool:
    """Whether a criterion chooses channels; fails on options that make no sense without one or together."""
    if criterion is None:
        given = [name for name, value in (("--amount", amount), ("--target-macs", target_macs),
                 ("--target-params", target_params), ("--calibration", calibration)) if value is not None]  # fmt: skip
        if given:
            raise CliError(f"{given[0]} needs --criterion (one of l1, l2, lamp, fpgm, hrank, random)")
        return False
    targets = [t for t in (target_macs, target_params) if t is not None]
    if amount is None and not targets:
        raise CliError("--criterion needs --amount F (a fraction such as 0.3) or --target-macs F / --target-params F")
    if amount is not None and targets:
        raise CliError("give --amount or a --target-macs/--target-params budget, not both")
    if calibration is not None and criterion != "hrank":
        raise CliError(f"--calibration feeds feature maps to --criterion hrank; {criterion} reads only weights")
    return True


def _progress_bar(label: str):
    def wrap(batches: list):
        with typer.progressbar(batches, label=label, file=sys.stderr) as bar:
            yield from bar

    return wrap


@app.command("apply")
def apply_command(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="A spec written by 'prunespec plan'.")],
    model: ModelArgument,
    output: Annotated[
        Path, typer.Option("--output", "-o", metavar="OUT", help=f"Output file: {', '.join(SUFFIXES)}.")
    ],
    weights: WeightsOption = None,
    mock: Annotated[
        bool, typer.Option("--mock", help="Build the mock model (original shapes, pruned channels zeroed).")
    ] = False,
    verify: Annotated[
        bool, typer.Option("--verify", help="Check in float64 that the pruned model matches the mock.")
    ] = False,
    tolerance: Annotated[
        float,
        typer.Option(
            "--tolerance",
            metavar="FLOAT",
            help="Largest difference --verify accepts, relative to the largest output value where that exceeds 1 "
            "(random deep models reach outputs of 1e9 and more, whose last digits move with the summation order).",
        ),
    ] = 1e-9,
    fold: Annotated[
        bool,
        typer.Option(
            "--fold-norms",
            help="For inference: fold the batch norms the spec lists into the layers before them (the state dict "
            "loses their keys).",
        ),
    ] = False,
    channels_last: Annotated[
        bool,
        typer.Option(
            "--channels-last",
            help="For inference on CPU: channels-last memory, with the costly channel gathers folded into the "
            "weights as zero columns (.pt2 output only).",
        ),
    ] = False,
) -> None:
    """Apply SPEC to MODEL and write the result: an exported program (.pt2), an ONNX graph (.onnx) or a state
    dict. With --verify an ONNX file is also run with onnxruntime and compared with the mock."""
    with _reporting_errors():
        suffix = output.suffix.lower()
        if suffix not in SUFFIXES:
            raise CliError(f"output {str(output)!r}: unsupported file type; use one of {', '.join(SUFFIXES)}")
        if mock and suffix == ".safetensors":
            raise CliError(
                "--mock with a .safetensors output would save the original tensor shapes; "
                "write the mock as .pt2, or drop --mock to save the pruned state dict"
            )
        if mock and (fold or channels_last):
            flag = "--fold-norms" if fold else "--channels-last"
            raise CliError(f"--mock keeps the model's layers as they are; drop {flag}, or --mock")
        if channels_last and suffix != ".pt2":
            raise CliError(
                "--channels-last widens some weights, so the state dict would not fit build_pruned; write a .pt2, "
                "or drop --channels-last and call prunespec.to_channels_last after loading the state dict"
            )
        _check_output_folder(output)

        spec = prunespec.load_spec(spec_path)
        network = load_model(model, weights)
        tokens = getattr(getattr(network, "config", None), "vocab_size", None)  # token ids below it, for inputs
        original = copy.deepcopy(network) if verify else None
        result = prunespec.mock(network, spec) if mock else prunespec.prune(network, spec, fold_norms=fold)
        if channels_last:
            result = prunespec.to_channels_last(result)

        if original is not None:
            # Verify on separate copies: the output keeps its own dtype, and a failure writes nothing. Norms are
            # folded in float64 too, so that the check sees the plan, not the rounding of folded float32 weights.
            pruned = prunespec.prune(copy.deepcopy(original), spec).double()
            pruned = prunespec.fold_norms(pruned, spec) if fold else pruned
            difference, scale = _max_difference(
                pruned=prunespec.to_channels_last(pruned) if channels_last else pruned,
                mocked=prunespec.mock(original, spec),
                inputs=spec_inputs(spec, torch.float64, tokens),
            )
            relative = difference / max(1.0, scale)
            ok = relative <= tolerance  # False for NaN
            typer.echo(
                f"verify: max |pruned - mock| = {difference:.1e} (relative {relative:.1e} of max(1, output scale "
                f"{scale:.3g})), tolerance {tolerance:g}: {'ok' if ok else 'FAILED'}"
            )
            if not ok:
                raise CliError(
                    f"the pruned model differs from the mock by {relative:.1e} of max(1, output scale {scale:.3g}), "
                    f"more than --tolerance {tolerance:g}; nothing was written"
                )

        inputs = spec_inputs(spec, tokens=tokens)
        write_model(result, inputs, output, say=lambda line: typer.echo(line, err=True))
        if verify and suffix == ".onnx":
            typer.echo(verify_onnx(output, original, spec, inputs, tolerance))
        folded = f", {len(spec.norm_folds)} batch norms folded" if fold else ""
        layout = ", channels-last" if channels_last else ""
        typer.echo(f"wrote {output} ({'mock' if mock else 'pruned'} model{folded}{layout})")


@app.command("apply-checkpoint")
def apply_checkpoint_command(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="A spec written by 'prunespec plan'.")],
    checkpoint: Annotated[
        str,
        typer.Argument(
            metavar="IN", help="The unpruned checkpoint: a .safetensors file, or a Hugging Face folder as hf:PATH."
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", metavar="OUT", help="The pruned checkpoint: a .safetensors file, or a model folder."
        ),
    ],
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output folder (once the new one is complete).")
    ] = False,
) -> None:
    """Prune a checkpoint directly, one tensor at a time, without building the model.

    A Hugging Face folder (hf:PATH, or a folder with config.json) becomes a complete model folder: pruned shards
    with their index, the config with the pruned sizes where a config can say them, every other file copied, and
    the spec as prunespec.json. Load it with transformers' from_pretrained (when the spec's config describes the
    pruned model) or with prunespec.load_pruned.
    """
    with _reporting_errors():
        source = Path(checkpoint.removeprefix("hf:"))
        spec = prunespec.load_spec(spec_path)
        if checkpoint.startswith("hf:") or source.is_dir():
            if output.suffix.lower() == ".safetensors":
                raise CliError(f"-o {str(output)!r}: a model folder is written into a folder, not a .safetensors file")
            if output.exists() and not overwrite:
                raise CliError(f"-o {str(output)!r} exists already; give another folder, or --overwrite to replace it")
            result = prunespec.prune_folder(spec, source, output, overwrite=overwrite)
            typer.echo(f"wrote {output} (pruned model folder: {describe_folder(result)})")
            return
        for path, role in ((source, "IN"), (output, "-o")):
            if path.suffix.lower() != ".safetensors":
                raise CliError(f"{role} {str(path)!r}: apply-checkpoint reads and writes .safetensors files, "
                               "or model folders (hf:PATH)")  # fmt: skip
        _check_output_folder(output)
        if not source.is_file():
            raise CliError(f"checkpoint {str(source)!r} does not exist")
        from prunespec.applier.checkpoint import prune_checkpoint

        prune_checkpoint(spec, source, output)
        typer.echo(f"wrote {output} (pruned checkpoint)")


def describe_folder(result) -> str:
    """What `prune_folder` wrote, in a few words."""
    words = f"{len(result.shards)} shard(s), {result.total_size / 2**20:,.1f} MiB of weights, {len(result.copied)} files copied"
    if result.left_out:
        words += f"; left out {', '.join(result.left_out[:3])}{' and more' if len(result.left_out) > 3 else ''}"
    return words


SpecArgument = Annotated[Path, typer.Argument(metavar="SPEC", help="A spec written by 'prunespec plan'.")]
FormatOption = Annotated[str, typer.Option("--format", "-f", metavar="FORMAT", help="text, markdown or json.")]


@app.command("show")
def show_command(
    spec_path: SpecArgument,
    fmt: Annotated[
        str, typer.Option("--format", "-f", metavar="FORMAT", help="text, markdown, json or html.")
    ] = "text",
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", metavar="FILE", help="Write to FILE instead of stdout.")
    ] = None,
) -> None:
    """Summarise SPEC: each touched layer's channels and sizes before -> after, its subselection, and totals.

    --format html writes a self-contained page (inline CSS and SVG, nothing from the network) for a CI artifact:
    a chart of each layer's channels and MACs before and after, the kept channels and why, the gathers and slices.
    Example: prunespec show model.prunespec.json -f html -o report.html

    Also fit to be a git 'textconv' for *.prunespec.json files (see the README).
    """
    with _reporting_errors():
        if fmt not in review.SHOW_FORMATS:
            raise CliError(f"--format {fmt!r}: use one of {', '.join(review.SHOW_FORMATS)}")
        report = review.render_show(prunespec.load_spec(spec_path), fmt)
        if output is None:
            sys.stdout.write(report)
            return
        with atomic_path(output) as tmp:
            tmp.write_text(report if report.endswith("\n") else report + "\n", encoding="utf-8")
        typer.echo(f"wrote {output}", err=True)


@app.command("diff")
def diff_command(
    paths: Annotated[list[str], typer.Argument(metavar="OLD NEW", help="Two spec files.")],
    fmt: FormatOption = "text",
    full: Annotated[
        bool, typer.Option("--full", help="List every index and tensor, not the first runs of each and a count.")
    ] = False,
) -> None:
    """Compare two specs by what they do to the model. Exit status 0: equal, 1: they differ, 2: trouble (as diff).

    The first line is the verdict: same, differ, or planned for different models (and which).
    Then the changed totals, and one line per changed layer and group of its tensors that keep the same indices.
    Long index lists show their first runs and a count (--full: all). Markdown is cut to fit a GitHub comment.

    Run by git as an external diff driver (seven arguments), it prints the comparison and exits 0, as git expects.
    """
    with _reporting_errors(status=2):
        _check_format(fmt)
        from_git = review.git_diff_arguments(paths)
        if from_git is None and len(paths) != 2:
            raise CliError(f"diff takes two spec files, OLD and NEW; got {len(paths)} arguments")
        old_path, new_path = from_git or paths
        if from_git and "/dev/null" in (old_path, new_path):  # git: the file was added or deleted
            added = old_path == "/dev/null"
            typer.echo(f"{paths[0]}: spec file {'added' if added else 'deleted'}")
            sys.stdout.write(review.render_show(prunespec.load_spec(new_path if added else old_path), fmt))
            return
        result = review.diff_specs(prunespec.load_spec(old_path), prunespec.load_spec(new_path))
        shown = (paths[0], paths[0]) if from_git else (old_path, new_path)
        sys.stdout.write(review.render_diff(result, fmt, shown, full=full))
    if not result.equal and not from_git:
        raise typer.Exit(1)


@app.command("validate")
def validate_command(
    spec_path: SpecArgument,
    model: Annotated[
        Optional[str], typer.Option("--model", metavar="MODEL", help="Also check the spec against this model.")
    ] = None,
    weights: WeightsOption = None,
) -> None:
    """Check SPEC against the JSON Schema and, with --model, against the model and by running the pruned model once
    on the meta device (shapes only); report every problem found."""
    with _reporting_errors():
        if weights is not None and model is None:
            raise CliError("--weights needs --model: the weights are loaded into that model")
        found = spec_problems(spec_path.read_bytes(), str(spec_path))
        checked = ["JSON Schema"]
        if not found and model is not None:
            from prunespec.applier.validate import problems

            spec = prunespec.load_spec(spec_path)
            network = load_model(model, weights)
            found = problems(network, spec)
            checked.append(f"model {model}")
            if not found:  # only a spec that fits the model can prune it for the forward pass
                failure, unchecked = forward_problem(network, spec)
                found += [failure] if failure else []
                if unchecked:
                    typer.echo(f"{spec_path}: note: the forward pass was not checked: {unchecked}")
                else:
                    checked.append("forward pass")
        for problem in found[:SHOWN_PROBLEMS]:
            typer.echo(f"{spec_path}: {problem}")
        if len(found) > SHOWN_PROBLEMS:
            typer.echo(f"{spec_path}: … and {len(found) - SHOWN_PROBLEMS} more")
        if found:
            _fail(f"{spec_path}: {len(found)} problem(s)")
        typer.echo(f"{spec_path}: valid ({', '.join(checked)})")


@app.command("schema")
def schema_command() -> None:
    """Print the JSON Schema of spec files."""
    from prunespec.schemas import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=2, sort_keys=False) + "\n")


# Every command gets the help of `_Command`; set here, after all of them are defined.
for _registered in app.registered_commands:
    _registered.cls = _Command


def main() -> None:
    """Entry point of the `prunespec` script and of `python -m prunespec`."""
    app()


# ---------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _reporting_errors(status: int = 1) -> Iterator[None]:
    """Turn a failure into one `error:` line and exit `status`, unless --debug asks for the traceback."""
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except EXPECTED_ERRORS as e:
        if _debug:
            raise
        _fail(_message(e), status)
    except Exception as e:
        if _debug:
            raise
        message = f"unexpected {type(e).__name__}: {_first_line(e)} (run 'prunespec --debug ...' for the traceback)"
        _fail(message, status)


def _message(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    # Messages are written as one line, but a library may still wrap one; keep stderr to a single line.
    return " ".join(str(error).split())


def _fail(message: str, status: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(status)


def _check_format(fmt: str) -> None:
    if fmt not in review.FORMATS:
        raise CliError(f"--format {fmt!r}: use one of {', '.join(review.FORMATS)}")


def spec_problems(data: bytes, source: str) -> list[str]:
    """Every problem of a spec file on its own: not JSON, each JSON Schema violation, or what `load_spec` refuses.

    The JSON Schema check lists all violations at once; the reader's own checks (versions, index runs) follow
    only when the schema holds, since they stop at the first problem.
    """
    import jsonschema

    from prunespec.schemas import json_schema, load_spec_bytes

    try:
        data_json = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"not a JSON file: {e}"]
    validator = jsonschema.Draft202012Validator(json_schema())
    found = [
        f"{'/'.join(str(p) for p in error.absolute_path) or '(top level)'}: {error.message[:200]}"
        for error in sorted(validator.iter_errors(data_json), key=lambda e: list(map(str, e.absolute_path)))
    ]
    if not found:
        try:
            load_spec_bytes(data, source)
        except SpecError as e:
            found.append(str(e))
    return found


def forward_problem(network: nn.Module, spec: prunespec.PruningSpec) -> tuple[str | None, str | None]:
    """Run `network` pruned by `spec` once, on inputs of the spec's shapes: (what fails, or None; why the forward pass
    could not be tried, or None).

    It runs on the meta device, on shapes only, at no computing cost. `network` is moved there and pruned with
    `build_pruned`: do not use it afterwards. The unpruned model runs first, because a forward that cannot run on
    meta (it makes tensors on another device, or looks at values) says nothing about the spec.
    """
    if not spec.inputs:
        return None, "the spec records no example inputs"
    try:
        inputs = [torch.empty(info.shape, dtype=_dtype(info.dtype), device="meta") for info in spec.inputs]
    except SpecError as e:
        return str(e), None
    shapes = ", ".join("x".join(map(str, info.shape)) for info in spec.inputs)
    model = network.to("meta").eval()
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as e:  # whatever the model's own forward raises: it is the answer, not a bug here
        return None, f"the unpruned model does not run on the meta device ({type(e).__name__}: {_first_line(e)})"
    running: list[tuple[str, tuple]] = []  # (name, arguments) of each module whose forward has begun and not ended

    def began(name: str) -> Callable[[nn.Module, tuple], None]:
        return lambda module, args: running.append((name, args))  # None: the arguments stay as they are

    def ended(module: nn.Module, args: tuple, output: object) -> None:  # None: the output stays as it is
        running.pop()

    for name, module in model.named_modules():
        module.register_forward_pre_hook(began(name))
        module.register_forward_hook(ended)
    # The subselection indices are made on the CPU (see `build_pruned`); meta inputs need them on meta.
    pruned = prunespec.build_pruned(model, spec).to("meta")
    try:
        with torch.no_grad():
            pruned(*inputs)
    except Exception as e:  # as above
        where = ""
        if running and running[-1][0]:  # the innermost module that was running failed
            name, args = running[-1]
            given = f", called with shape {list(args[0].shape)}" if args and isinstance(args[0], torch.Tensor) else ""
            where = f" in layer {name!r}{given}"
        failure = f"the pruned model fails{where}: {type(e).__name__}: {_first_line(e)}"
        return f"forward pass on inputs {shapes}: {failure}", None
    return None, None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _check_output_folder(output: Path) -> None:
    """Fail before any slow work when the output cannot be written where asked."""
    folder = output.parent
    if not folder.is_dir():
        raise CliError(f"output folder {str(folder)!r} does not exist")
    if output.is_dir():
        raise CliError(f"output {str(output)!r} is a folder; name a file")


def spec_inputs(
    spec: prunespec.PruningSpec, float_dtype: torch.dtype | None = None, tokens: int | None = None
) -> list[torch.Tensor]:
    """Seeded random inputs with the spec's shapes and dtypes; `float_dtype` overrides floating dtypes. Integer
    inputs are token ids below `tokens` (a model's vocabulary size), or zeros, valid for any table size."""
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for info in spec.inputs:
        dtype = _dtype(info.dtype)
        if dtype.is_floating_point or dtype.is_complex:
            dtype = float_dtype if float_dtype is not None and dtype.is_floating_point else dtype
            inputs.append(torch.randn(info.shape, generator=generator, dtype=dtype))
        elif tokens and dtype != torch.bool:
            inputs.append(torch.randint(0, tokens, info.shape, generator=generator, dtype=dtype))
        else:
            inputs.append(torch.zeros(info.shape, dtype=dtype))
    return inputs


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise SpecError(f"spec input dtype {name!r} is not a torch dtype (like 'float32')")
    return dtype


def _max_difference(pruned: nn.Module, mocked: nn.Module, inputs: list[torch.Tensor]) -> tuple[float, float]:
    """The largest absolute difference between the outputs of the two models, run in float64, and the largest
    absolute value of the mock's outputs (the output scale)."""
    with torch.no_grad():
        pruned_out = tree_leaves(pruned.double().eval()(*inputs))
        mocked_out = tree_leaves(mocked.double().eval()(*inputs))
    if len(pruned_out) != len(mocked_out):
        raise CliError(f"the pruned model returns {len(pruned_out)} outputs, the mock {len(mocked_out)}")
    largest, scale = 0.0, 0.0
    for i, (p, m) in enumerate(zip(pruned_out, mocked_out)):
        if not isinstance(p, torch.Tensor) or not isinstance(m, torch.Tensor):
            continue
        if p.shape != m.shape:
            raise CliError(f"output {i}: the pruned model gives shape {list(p.shape)}, the mock {list(m.shape)}")
        if p.numel():
            largest = max(largest, (p.double() - m.double()).abs().max().item())
            scale = max(scale, m.double().abs().max().item())
    return largest, scale


# How far the ONNX graph, run in float32 by onnxruntime, may be from the mock computed in float64, relative to the
# output scale: 2**10 float32 roundings (each within eps of the scale). A float32 forward rounds every sum, and a
# layer's rounding carries on through the layers after it; a channel pruned wrongly moves the output by far more.
ONNX_TOLERANCE = 2**10 * torch.finfo(torch.float32).eps


def verify_onnx(path: Path, original: nn.Module, spec: prunespec.PruningSpec, inputs: list[torch.Tensor],
                tolerance: float) -> str:  # fmt: skip
    """Run the ONNX file on `inputs` and compare it with the mock of `original` in float64; the verdict line, or
    `CliError` (the file is removed: it does not compute what it should)."""
    mocked = prunespec.mock(copy.deepcopy(original).double(), spec).eval()
    exact = [t.double() if t.is_floating_point() else t for t in inputs]
    with torch.no_grad():
        outputs = tree_leaves(mocked(*exact, **plain_call(original)))
    expected = [t for t in outputs if isinstance(t, torch.Tensor)]
    actual = run_onnx(path, inputs)
    scale = max((t.abs().max().item() for t in expected if t.numel()), default=1.0)
    difference = max(
        ((a.double() - e).abs().max().item() for a, e in zip(actual, expected) if e.numel()), default=0.0
    )
    allowed = max(tolerance, ONNX_TOLERANCE)
    relative = difference / max(1.0, scale)
    if len(actual) < len(expected) or not relative <= allowed:
        path.unlink(missing_ok=True)
        raise CliError(f"the ONNX graph differs from the mock by {relative:.1e} of the output scale {scale:.3g} "
                       f"(more than {allowed:.2g}); the file was removed")  # fmt: skip
    return (
        f"verify: ONNX (onnxruntime, float32) max |onnx - mock| = {difference:.1e} (relative {relative:.1e}), "
        f"tolerance {allowed:.2g}: ok"
    )


def describe_plan(spec: prunespec.PruningSpec, output: Path, asked: str = "named channels") -> str:
    """The short report `plan` prints: where the spec went and what it removes. `asked` says where the channels
    came from (see `asked_channels`)."""
    s = spec.summary
    request = spec.request
    mode = "constrained" if request.constrained else "unconstrained"
    mode += ", reordered" if request.reorder else ", not reordered"
    lines = [
        f"wrote {output}",
        f"  mode:                     {mode}",
        f"  channels:                 {asked}",
        f"  parameters:               {change(s.parameters_before, s.parameters_after)}",
        f"  MACs:                     {change(s.macs_before, s.macs_after)}",
        f"  layers touched:           {len(spec.layers)}",
        f"  activation subselections: {s.subselections}",
    ]
    for title, section in review.unit_lines(spec):
        lines += [f"  {title}:", *(f"    {line}" for line in section)]
    if spec.kept:
        lines.append(f"  kept {len(spec.kept)} group(s) of the {asked}:")
        lines.extend(f"    {review.kept_words(k)} kept: {k.reason}" for k in spec.kept)
    return "\n".join(lines)


def asked_channels(named: bool, criterion: str | None, zeroed: bool) -> str:
    """Where the channels a plan removes came from, for `describe_plan`.

    >>> asked_channels(True, None, False), asked_channels(False, "l2", True), asked_channels(False, None, False)
    ('named channels', 'channels chosen by l2 and all-zero channels', 'all-zero channels (none were named)')
    """
    if not named and criterion is None:
        return "all-zero channels (none were named)"
    sources = ["named channels"] if named else []
    sources += [f"channels chosen by {criterion}"] if criterion else []
    sources += ["all-zero channels"] if zeroed else []
    return " and ".join(sources)


def describe_selection(criterion: str, side: str, scope: str, notes: list[str], spec, round_to: int) -> str:
    """What the criterion chose and left out, and where channel counts missed --round-to."""
    from prunespec.planner.select import rounding_misses

    lines = [f"  chosen by {criterion}, {side} side, {scope} scope"]
    lines += [f"  {note}" for note in notes]
    misses = rounding_misses(spec, round_to)
    if misses:
        shown = ", ".join(misses[:6]) + (f" (and {len(misses) - 6} more)" if len(misses) > 6 else "")
        lines.append(f"  {len(misses)} weight axes are not multiples of {round_to} (the mode decides them): {shown}")
    return "\n".join(lines)
