"""The checkpoint format: one self-describing file per point of a training trajectory.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)`` and never runs code (DESIGN.md section 4)::

    format            "sharpscope-checkpoint"
    format_version    FORMAT_VERSION (a newer file is refused with a clear message)
    sharpscope_version
    model_name        registry name; model_kwargs rebuilds it: create_model(model_name, **model_kwargs)
    model_kwargs      in_channels, num_classes, image_size and any extra factory arguments
    dataset           dataset registry name
    config            the full TrainConfig as a dict
    epoch, step       how far training got (epoch 0 = the initialisation)
    model_state       model.state_dict()
    optimizer_state   optimizer.state_dict() (SAM includes its base optimizer's state) or None
    scheduler_state   LR scheduler state or None
    grad_scaler_state fp16 GradScaler state (loss scale, growth tracker) or None (absent in older files)
    rng_state         {"torch": ByteTensor} (plus "cuda" for the CUDA device trained on) for exact resume
    metrics           the last finished epoch's metrics (train/test loss and accuracy, lr, seconds)
    position          only in a mid-epoch resume point ``last.pt``, else absent: where in epoch ``epoch + 1``
                      training stopped and the partial epoch's running sums, so a resume goes on bit for bit:
                      {"epoch", "batch" (batches taken), "steps_per_epoch", "world_size", "loss_sum" (float64,
                      sum of batch mean loss x batch size), "correct" (int64), "seen" (samples), "seconds"}

Files are written atomically (:func:`sharpscope.io.save_torch`). A plain ``state_dict`` saved by other code loads
too, given a model spec (``NAME[:key=value,...]`` or ``package.module:factory``).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sharpscope import __version__
from sharpscope.errors import SharpscopeError
from sharpscope.io import save_torch
from sharpscope.specs import call_factory, parse_spec

FORMAT = "sharpscope-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model plus everything needed to say what it is."""

    model: nn.Module  # built, weights loaded, on the requested device, in eval mode
    model_name: str  # registry name or "module:factory" spec
    model_kwargs: dict[str, Any]  # factory arguments
    dataset: str | None  # dataset it was trained on (None for a foreign state_dict without --dataset)
    config: dict[str, Any]  # the training config (empty for a foreign state_dict)
    epoch: int | None  # epoch reached (None if unknown)
    step: int | None  # optimizer steps taken (None if unknown)
    metrics: dict[str, Any]  # last-epoch metrics: train_loss, train_acc, test_loss, test_acc, ...
    path: Path  # where it was read from
    sha256: str  # content hash, recorded in results' provenance
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the whole file (optimizer state, RNG, ...)

    @property
    def run_name(self) -> str:
        """The run this checkpoint belongs to: its folder's name (``runs/sam/final.pt`` -> ``sam``)."""
        return self.path.resolve().parent.name

    @property
    def generalization_gap(self) -> float | None:
        """Test error minus train error (in [−1, 1]) from the stored metrics, or None if not recorded."""
        train_acc, test_acc = self.metrics.get("train_acc"), self.metrics.get("test_acc")
        if train_acc is None or test_acc is None:
            return None
        return float(train_acc) - float(test_acc)


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    model_name: str,
    model_kwargs: dict[str, Any],
    dataset: str,
    config: dict[str, Any],
    epoch: int,
    step: int,
    metrics: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    grad_scaler: torch.amp.GradScaler | None = None,
    position: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically. Tensors are saved from the CPU so the file loads anywhere.

    ``position`` marks a mid-epoch resume point (see the module docstring); its tensors are copied to the CPU.
    """
    state = {k: v.detach().to("cpu", copy=True) for k, v in _unwrap(model).state_dict().items()}
    rng_state = {"torch": torch.get_rng_state()}
    device = _model_device(model)
    if device is not None and device.type == "cuda":
        rng_state["cuda"] = torch.cuda.get_rng_state(device)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sharpscope_version": __version__,
        "model_name": model_name,
        "model_kwargs": dict(model_kwargs),
        "dataset": dataset,
        "config": dict(config),
        "epoch": int(epoch),
        "step": int(step),
        "model_state": state,
        "optimizer_state": optimizer.state_dict() if optimizer is not None else None,
        "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
        "grad_scaler_state": grad_scaler.state_dict() if grad_scaler is not None else None,
        "rng_state": rng_state,
        "metrics": dict(metrics or {}),
    }
    if position is not None:
        payload["position"] = {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v
                               for k, v in position.items()}
    return save_torch(payload, path)


def _model_device(model: nn.Module) -> torch.device | None:
    """The device of ``model``'s first parameter or buffer (None for a module without tensors)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return None


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers (their state_dict keys carry prefixes)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model


def read_checkpoint_file(path: str | Path) -> tuple[dict[str, Any], str]:
    """Load a checkpoint file safely (``weights_only=True``) and return (payload, sha256).

    Raises SharpscopeError with one line for: a missing file, a folder, a truncated or corrupted file, a file
    that carries pickled code or objects, and a sharpscope file of a newer format version.
    """
    path = Path(path)
    if not path.exists():
        raise SharpscopeError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        raise SharpscopeError(f"{str(path)!r} is a folder; give a checkpoint file such as {path}/final.pt")
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    if not data:
        raise SharpscopeError(f"checkpoint {str(path)!r} is empty (0 bytes): an interrupted copy? re-create it")
    _check_zip_crcs(data, path)
    if _is_text(data):
        raise SharpscopeError(f"checkpoint {str(path)!r} is {_not_a_checkpoint(data, '')}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        # an opcode the safe unpickler does not know means damaged bytes, not a pickled object
        damaged = "Unsupported operand" in str(exc)
        if not damaged and ("Weights only load failed" in str(exc) or "Unsupported global" in str(exc)):
            raise SharpscopeError(
                f"checkpoint {str(path)!r} holds pickled Python objects, not just tensors; sharpscope refuses to "
                "load it because unpickling can run code. Re-save it as a plain state_dict "
                "(torch.save(model.state_dict(), path)) with code you trust"
            ) from None
        raise SharpscopeError(f"checkpoint {str(path)!r} is {_not_a_checkpoint(data, first)}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file makes torch's reader fail in many ways (even assert)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise SharpscopeError(
            f"checkpoint {str(path)!r} is truncated or corrupted and cannot be read ({first})"
        ) from None
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        version = payload.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise SharpscopeError(
                f"checkpoint {str(path)!r} has format version {version}, newer than this sharpscope "
                f"({__version__}) reads (<= {FORMAT_VERSION}); upgrade sharpscope"
            )
    return payload, sha256


def _is_text(data: bytes) -> bool:
    """Whether the file starts like text (JSON, CSV, YAML): torch files start with a zip or pickle header."""
    head = data[:256]
    return bool(head.strip()) and all(32 <= b < 127 or b in (9, 10, 13) for b in head)


def _not_a_checkpoint(data: bytes, reason: str) -> str:
    """What a file torch's safe loader refused is, for the error line. torch's own text is kept only when it
    says nothing about ``weights_only``: its advice to retry with ``weights_only=False`` would run pickled code."""
    if _is_text(data):
        if data.lstrip()[:1] in (b"{", b"["):
            return "a JSON file, not a checkpoint; give a .pt file such as RUN/final.pt (config.json describes the run)"
        return "a text file, not a checkpoint; give a .pt file written by torch.save, such as RUN/final.pt"
    if "weights_only" in reason or not reason:
        return "corrupted or not a PyTorch file"
    return f"corrupted or not a PyTorch file ({reason})"


def _check_zip_crcs(data: bytes, path: Path) -> None:
    """Refuse a zip-format torch file whose members fail their CRC-32 (torch's reader does not check them) or
    have damaged headers.

    Without this a flipped bit in the tensor data loads silently as a different model. Files that Python's
    zipfile cannot parse (legacy torch format, damaged directory) are left to ``torch.load`` to judge.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - not a zip file python can read
        return
    try:
        with archive:
            bad = archive.testzip()
    except Exception as exc:  # noqa: BLE001 - a damaged member header: a corrupted file
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise SharpscopeError(
            f"checkpoint {str(path)!r} is truncated or corrupted and cannot be read ({first})"
        ) from None
    if bad is not None:
        raise SharpscopeError(
            f"checkpoint {str(path)!r} is corrupted: its part {bad!r} fails its CRC or header check (a damaged "
            "disk or an incomplete copy?); copy it again or re-create it"
        )


def load_checkpoint(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    model_spec: str | None = None,
    dataset: str | None = None,
) -> Checkpoint:
    """Load a checkpoint and rebuild its model with no other input.

    Args:
        path: a sharpscope checkpoint, or a foreign file holding a plain ``state_dict`` (possibly under a
            ``"state_dict"``/``"model"``/``"model_state_dict"`` key).
        device: where to put the model.
        model_spec: required for foreign files: ``NAME[:key=value,...]`` (a registry model; ``in_channels``,
            ``num_classes`` and ``image_size`` default to ``dataset``'s) or ``package.module:factory`` (a
            callable returning the ``nn.Module``, called with the ``key=value`` arguments after a second colon).
        dataset: dataset name for foreign files (fills the model's input shape and is recorded).
    """
    path = Path(path)
    payload, sha256 = read_checkpoint_file(path)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        try:
            model_name = payload["model_name"]
            model_kwargs = dict(payload["model_kwargs"])
            state = payload["model_state"]
        except KeyError as exc:
            raise SharpscopeError(f"checkpoint {str(path)!r} is missing its {exc.args[0]!r} entry; re-create it") from None
        except (TypeError, ValueError):  # model_kwargs that is not a mapping: a hand-edited or foreign file
            raise SharpscopeError(
                f"checkpoint {str(path)!r} has a malformed 'model_kwargs' entry (expected a dict of the model's "
                f"arguments, got {type(payload['model_kwargs']).__name__}); re-create it"
            ) from None
        if model_spec is not None:
            model_name, model_kwargs = _parse_model_spec(model_spec, dataset or payload.get("dataset"))
        model = _build_model(model_name, model_kwargs)
        meta = payload
    else:
        state = _find_state_dict(payload, path)
        if model_spec is None:
            raise SharpscopeError(
                f"{str(path)!r} is a plain state_dict, not a sharpscope checkpoint; say which model it is with "
                "--model NAME (e.g. resnet20) or --model package.module:factory"
            )
        model_name, model_kwargs = _parse_model_spec(model_spec, dataset)
        model = _build_model(model_name, model_kwargs)
        meta = {"dataset": dataset, "config": {}, "epoch": None, "step": None, "metrics": {}}
    _load_state(model, state, path, model_name)
    model.to(device).eval()
    return Checkpoint(
        model=model,
        model_name=model_name,
        model_kwargs=model_kwargs,
        dataset=meta.get("dataset"),
        config=dict(meta.get("config") or {}),
        epoch=meta.get("epoch"),
        step=meta.get("step"),
        metrics=dict(meta.get("metrics") or {}),
        path=path,
        sha256=sha256,
        raw=meta,
    )


def _find_state_dict(payload: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(payload, dict):
        for key in ("state_dict", "model_state_dict", "model_state", "model"):
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
        if payload and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()):
            return payload
    raise SharpscopeError(
        f"{str(path)!r} is neither a sharpscope checkpoint nor a state_dict (a dict of parameter names to tensors)"
    )


def _parse_model_spec(spec: str, dataset: str | None) -> tuple[str, dict[str, Any]]:
    """``resnet20``, ``mlp:hidden=256``, ``mypkg.nets:make_net`` or ``mypkg.nets:make_net:width=2``."""
    name, kwargs = parse_spec(spec)
    if ":" not in name and dataset is not None:
        from sharpscope.data import dataset_info

        info = dataset_info(dataset)
        kwargs = {"in_channels": info.in_channels, "num_classes": info.num_classes,
                  "image_size": info.image_size, **kwargs}
    return name, kwargs


def _build_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    if ":" in name:
        model = call_factory(name, kwargs)
        if not isinstance(model, nn.Module):
            raise SharpscopeError(f"model factory {name!r} returned {type(model).__name__}, not an nn.Module")
        return model
    from sharpscope.models import create_model

    missing = [k for k in ("in_channels", "num_classes", "image_size") if k not in kwargs]
    if missing:
        raise SharpscopeError(
            f"model {name!r} needs {', '.join(missing)}: pass --dataset so they come from the data, or "
            f"give them as {name}:in_channels=1,num_classes=10,image_size=28"
        )
    return create_model(name, **kwargs)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path, model_name: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        details = []
        if mismatched:
            details.append(f"shape mismatch {mismatched[0]}" + (f" (+{len(mismatched) - 1} more)" if len(mismatched) > 1 else ""))
        if missing:
            details.append(f"missing {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
        if unexpected:
            details.append(f"unexpected {unexpected[0]}" + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
        raise SharpscopeError(
            f"checkpoint {str(path)!r} does not fit model {model_name!r}: {'; '.join(details)}. "
            "Is it for another architecture? pass the right --model"
        )
    model.load_state_dict(state)
