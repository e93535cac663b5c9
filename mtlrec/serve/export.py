"""Export a finished run as a self-contained folder: a TorchScript or ONNX graph plus what serving
needs to encode raw inputs and fuse the scores, and nothing from the training process.

Layout of ``OUT`` (default ``RUN_DIR/export-<format>``)::

    model.ts | model.onnx   graph: (cat int64 [B, F], seq int64 [B, L], num float32 [B, D])
                            -> (conditional [B, T], joint [B, T])
    encoder.json            fitted encoder state (vocabularies, numeric moments) + schema
    schema.json             features and tasks (also inside encoder.json; kept for readers)
    fusion.yaml             the ``serve:`` mapping used by ``mtlrec serve OUT``
    metadata.json           format, model, tasks, input/output names and shapes, versions, and
                            the parity check (max |exported - eager| on a random batch)

The graph takes the encoded tensors, not raw columns: encoding is pandas work (vocabulary lookup,
sequence splitting) that belongs beside the graph, and the saved encoder does it exactly as in
training. Batch is a dynamic axis. A feature kind the schema lacks is a zero-width tensor
(``seq`` is ``[B, 0]`` without sequence features); ONNX prunes inputs its graph never reads, so
``metadata.json`` lists the inputs actually present and a consumer feeds those by name.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

import mtlrec
from mtlrec.data.encoder import InputLayout
from mtlrec.data.table import TensorTable
from mtlrec.errors import ConfigError, MTLRecError, make_dir
from mtlrec.models import MTLModel
from mtlrec.serve.predictor import ARTIFACT_VERSION, FUSION_FILE, METADATA

FORMATS = ("torchscript", "onnx")
MODEL_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
ONNX_OPSET = 17
PARITY_ROWS = 64
PARITY_TOLERANCE = 1e-5
INPUTS = ("cat", "seq", "num")
OUTPUTS = ("conditional", "joint")


class ExportModule(nn.Module):
    """``(cat, seq, num) -> (conditional, joint)``: the model plus its probability head.

    Labels are not inputs; the model's forward never reads them, so a zero placeholder stands in
    for the ``TensorTable`` field (sized from ``num``, which exists even when it has 0 columns)."""

    def __init__(self, model: MTLModel) -> None:
        super().__init__()
        self.model = model
        self.num_tasks = model.num_tasks

    def forward(
        self, cat: torch.Tensor, seq: torch.Tensor, num: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        labels = num.new_zeros((num.shape[0], self.num_tasks))
        out = self.model(TensorTable(cat, seq, num, labels))
        return self.model.predict(out)


def example_inputs(
    layout: InputLayout, rows: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random but valid encoded inputs: each id inside its own field's block of the table, some
    sequence positions padded, standard-normal numerics."""
    gen = torch.Generator().manual_seed(seed)
    offsets, sizes = layout.field_offsets, layout.field_sizes

    def ids(field: int, shape: tuple[int, ...]) -> torch.Tensor:
        local = torch.randint(0, sizes[field], shape, generator=gen)
        return local + offsets[field]

    nc = layout.num_categorical
    cat = torch.zeros((rows, nc), dtype=torch.int64)
    for j in range(nc):
        cat[:, j] = ids(j, (rows,))
    parts = []
    for k, length in enumerate(layout.sequence_lengths):
        block = ids(nc + k, (rows, length))
        pad = torch.rand((rows, length), generator=gen) < 0.3
        parts.append(block.masked_fill(pad, 0))
    seq = torch.cat(parts, 1) if parts else torch.zeros((rows, 0), dtype=torch.int64)
    num = torch.randn((rows, layout.num_numeric), generator=gen)
    return cat, seq, num


def export_run(
    run_dir: str | Path,
    fmt: str,
    out: str | Path | None = None,
    fusion_file: str | Path | None = None,
) -> Path:
    """Write the export folder for ``run_dir``; returns its path. Raises MTLRecError on a bad
    argument or when the exported graph does not reproduce the eager model."""
    from mtlrec.serve.config import load_serve_config
    from mtlrec.train.run import load_run

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    run = Path(run_dir)
    config, encoder, model = load_run(run)
    serve_cfg = load_serve_config(fusion_file, encoder.schema)  # checked before any work
    target = Path(out) if out is not None else run / f"export-{fmt}"
    if target.resolve() == run.resolve():
        raise MTLRecError(f"{target}: the export folder must not be the run directory itself")
    if target.exists() and not target.is_dir():
        raise MTLRecError(f"{target}: exists and is not a directory")
    make_dir(target, "--out")

    module = ExportModule(model).eval()
    layout = encoder.layout()
    trace_inputs = example_inputs(layout, rows=4, seed=0)
    model_path = target / MODEL_FILES[fmt]
    with torch.no_grad(), _quiet():
        if fmt == "torchscript":
            traced = torch.jit.trace(module, trace_inputs, check_trace=False)
            torch.jit.save(traced, str(model_path))
        else:
            _export_onnx(module, trace_inputs, model_path)

    # Parity: a fresh load of the written file against the eager model on other random rows.
    from mtlrec.serve.predictor import load_onnx, load_torchscript

    check = example_inputs(layout, rows=PARITY_ROWS, seed=1)
    batch = TensorTable(*check, torch.zeros((PARITY_ROWS, model.num_tasks)))
    predict = load_torchscript(model_path) if fmt == "torchscript" else load_onnx(model_path)
    got = predict(batch)
    with torch.no_grad():
        want = module(*check)
    diff = max(float((torch.from_numpy(g) - w).abs().max()) for g, w in zip(got, want))
    if not diff <= PARITY_TOLERANCE:
        raise MTLRecError(
            f"{model_path}: exported graph differs from the eager model by {diff:.3g} "
            f"(> {PARITY_TOLERANCE:g}); not writing metadata"
        )

    encoder.save(target / "encoder.json")
    encoder.schema.save(target / "schema.json")
    (target / FUSION_FILE).write_text(yaml.safe_dump(serve_cfg.to_dict(), sort_keys=False))
    metadata = _metadata(fmt, model_path, config, model, layout, run, diff)
    (target / METADATA).write_text(json.dumps(metadata, indent=2))
    return target


def _export_onnx(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> None:
    try:
        import onnx  # noqa: F401  (the exporter needs it; fail with a useful message)
    except ImportError as exc:
        raise MTLRecError("ONNX export needs onnx: pip install 'mtlrec[serve]'") from exc
    # The TorchScript-based exporter: it needs no extra package (the dynamo one needs
    # onnxscript) and handles these models' dynamic batch axis and zero-width inputs.
    torch.onnx.export(
        module,
        inputs,
        str(path),
        dynamo=False,
        input_names=list(INPUTS),
        output_names=list(OUTPUTS),
        dynamic_axes={name: {0: "batch"} for name in INPUTS + OUTPUTS},
        opset_version=ONNX_OPSET,
    )


def _metadata(
    fmt: str,
    model_path: Path,
    config: dict[str, Any],
    model: MTLModel,
    layout: InputLayout,
    run: Path,
    diff: float,
) -> dict[str, Any]:
    widths = {
        "cat": layout.num_categorical,
        "seq": sum(layout.sequence_lengths),
        "num": layout.num_numeric,
    }
    dtypes = {"cat": "int64", "seq": "int64", "num": "float32"}
    present = list(INPUTS)
    if fmt == "onnx":
        import onnx

        graph = onnx.load(str(model_path), load_external_data=False).graph
        present = [i.name for i in graph.input]
    model_cfg = dict(config.get("model") or {})
    return {
        "artifact_version": ARTIFACT_VERSION,
        "format": fmt,
        "model_file": model_path.name,
        "model": model_cfg.pop("name", model.name),
        "model_options": model_cfg,
        "training_only_features": list(model.training_only_features()),
        "tasks": [
            {"name": t.name, "type": t.type, "depends_on": t.depends_on} for t in model.schema.tasks
        ],
        "inputs": [{"name": n, "dtype": dtypes[n], "shape": ["batch", widths[n]]} for n in present],
        "outputs": [
            {"name": n, "dtype": "float32", "shape": ["batch", model.num_tasks]} for n in OUTPUTS
        ],
        "onnx_opset": ONNX_OPSET if fmt == "onnx" else None,
        "parity": {"rows": PARITY_ROWS, "max_abs_diff": diff, "tolerance": PARITY_TOLERANCE},
        "mtlrec_version": mtlrec.__version__,
        "torch_version": torch.__version__,
        "source_run": str(run.resolve()),
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


@contextlib.contextmanager
def _quiet():
    """torch.jit.trace / the legacy ONNX exporter warn about their deprecation and about
    ``.tolist()`` on constant buffers (the task graph, fixed per model): expected, not news."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
