"""The pruning spec's file format: msgspec Structs, the committed JSON Schema, reading and writing.

This package imports only msgspec and the standard library, so a deployment that applies stored specs never pulls
in the planner. Start reading at `spec.PruningSpec`.
"""

from prunespec.schemas.spec import (
    KNOWN_VERSIONS,
    SCHEMA_PATH,
    SCHEMA_VERSION,
    ChannelRequest,
    IndexRuns,
    InputInfo,
    KeptChannels,
    LayerSpec,
    NormFold,
    PruningSpec,
    Request,
    Subselection,
    Summary,
    atomic_path,
    canonical_json,
    decode_runs,
    encode_runs,
    json_schema,
    load_spec,
    load_spec_bytes,
    parse_runs,
    well_formed_runs,
    write_atomic,
)

__all__ = [
    "KNOWN_VERSIONS",
    "SCHEMA_PATH",
    "SCHEMA_VERSION",
    "ChannelRequest",
    "IndexRuns",
    "InputInfo",
    "KeptChannels",
    "LayerSpec",
    "NormFold",
    "PruningSpec",
    "Request",
    "Subselection",
    "Summary",
    "atomic_path",
    "canonical_json",
    "decode_runs",
    "encode_runs",
    "json_schema",
    "load_spec",
    "load_spec_bytes",
    "parse_runs",
    "well_formed_runs",
    "write_atomic",
]
