"""Load something to score with: a run directory (eager PyTorch) or an export folder.

Whatever the source, a :class:`Predictor` takes encoded tensors and returns numpy
``(conditional, joint)`` arrays ``[B, T]``, so the HTTP layer does not care whether it serves the
training checkpoint, a TorchScript graph or an ONNX graph under onnxruntime.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mtlrec.data.encoder import Encoder
from mtlrec.data.table import TensorTable
from mtlrec.errors import MTLRecError, first_line

ARTIFACT_VERSION = 1
METADATA = "metadata.json"
FUSION_FILE = "fusion.yaml"

Predict = Callable[[TensorTable], tuple[np.ndarray, np.ndarray]]


@dataclass
class Predictor:
    """A loaded model with the encoder it was trained with."""

    encoder: Encoder
    model_name: str
    source: str  # "run", "torchscript" or "onnx"
    predict: Predict
    path: Path
    fusion_file: Path | None = None  # an export folder carries its fusion config
    training_only: tuple[str, ...] = ()  # features the model reads in training only


def load_predictor(path: str | Path) -> Predictor:
    """A run directory (``model.pt``) or an export folder (``metadata.json``)."""
    path = Path(path)
    if not path.is_dir():
        raise MTLRecError(f"{path}: not a directory (expected a run or an export folder)")
    if (path / METADATA).exists():
        pred = _load_export(path)
    else:
        from mtlrec.train.run import load_run

        config, encoder, model = load_run(path)
        pred = Predictor(
            encoder,
            config["model"]["name"],
            "run",
            eager_predict(model),
            path,
            training_only=model.training_only_features(),
        )
    return pred


def eager_predict(model: torch.nn.Module) -> Predict:
    model.eval()

    def run(batch: TensorTable) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            cond, joint = model.predict(model(batch))
        return cond.numpy(), joint.numpy()

    return run


def read_metadata(folder: Path) -> dict:
    try:
        meta = json.loads((folder / METADATA).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MTLRecError(f"{folder / METADATA}: cannot read export metadata ({exc})") from exc
    if meta.get("artifact_version") != ARTIFACT_VERSION or meta.get("format") not in (
        "torchscript",
        "onnx",
    ):
        raise MTLRecError(
            f"{folder / METADATA}: not an mtlrec export (artifact_version "
            f"{meta.get('artifact_version')!r}, format {meta.get('format')!r})"
        )
    return meta


def _load_export(folder: Path) -> Predictor:
    meta = read_metadata(folder)
    encoder = Encoder.load(folder / "encoder.json")
    model_file = folder / meta["model_file"]
    if not model_file.exists():
        raise MTLRecError(f"{model_file}: missing from the export folder")
    fmt = meta["format"]
    predict = load_torchscript(model_file) if fmt == "torchscript" else load_onnx(model_file)
    fusion = folder / FUSION_FILE
    return Predictor(
        encoder,
        meta["model"],
        fmt,
        predict,
        folder,
        fusion if fusion.exists() else None,
        tuple(meta.get("training_only_features", ())),  # exports before this key: none
    )


def load_torchscript(path: Path) -> Predict:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError, OSError) as exc:  # truncated or not TorchScript
            raise MTLRecError(
                f"{path}: cannot load the TorchScript graph ({first_line(exc)}); export again"
            ) from exc
    module.eval()

    def run(batch: TensorTable) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            cond, joint = module(batch.cat, batch.seq, batch.num)
        return cond.numpy(), joint.numpy()

    return run


def onnx_session(path: Path, threads: int = 0):
    """An onnxruntime CPU session; ``threads`` 0 leaves onnxruntime's default."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MTLRecError(
            "serving an ONNX export needs onnxruntime: pip install 'mtlrec[serve]'"
        ) from exc
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's InvalidProtobuf, Fail... (no common base class)
        raise MTLRecError(
            f"{path}: cannot load the ONNX graph ({first_line(exc)}); export again"
        ) from exc


def load_onnx(path: Path) -> Predict:
    session = onnx_session(path, threads=torch.get_num_threads())
    # Inputs the graph does not read (e.g. ``seq`` without sequence features) are pruned by the
    # exporter, so feed exactly the inputs the session declares.
    wanted = [i.name for i in session.get_inputs()]

    def run(batch: TensorTable) -> tuple[np.ndarray, np.ndarray]:
        feed = {"cat": batch.cat.numpy(), "seq": batch.seq.numpy(), "num": batch.num.numpy()}
        cond, joint = session.run(["conditional", "joint"], {k: feed[k] for k in wanted})
        return cond, joint

    return run
