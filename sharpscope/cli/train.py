"""``sharpscope train``: a thin shell over :func:`sharpscope.train.train`."""

from __future__ import annotations

import contextlib
import os

import click
from click.core import ParameterSource

from sharpscope.cli.options import MAX_SEED, OutDir, device_option, resolve_device, show_progress


def _parse_model(value: str) -> tuple[str, dict]:
    """``convnet``, ``mlp:hidden=256`` or ``mypkg.nets:make_net[:width=2]`` -> (name, kwargs)."""
    from sharpscope.errors import UsageError
    from sharpscope.models import list_models
    from sharpscope.specs import is_factory_spec, parse_spec

    try:
        if is_factory_spec(value) and value.split(":")[0] in list_models():  # mlp:hidden is a registry name
            raise UsageError(value)
        return parse_spec(value)
    except UsageError:
        raise click.BadParameter(f"expected NAME[:key=value,...] like mlp:hidden=256 or package.module:factory"
                                 f"[:key=value,...], got {value!r}", param_hint="--model") from None


def _parse_resume_every(ctx, param, value: str):
    from sharpscope.errors import SharpscopeError
    from sharpscope.train.config import ResumeEvery

    try:
        return ResumeEvery.parse(value)
    except SharpscopeError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """``torch.set_num_threads(threads)`` for the block, restored after (the CLI also runs inside other
    processes: the report's stages, notebooks, tests)."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: Options that only mean something for SAM/ASAM: given with --optimizer sgd they are refused.
SAM_ONLY = ("rho", "p", "eta", "rho_schedule", "m", "sam_every", "sync_perturbation")


@click.command(context_settings={"show_default": True})
@click.option("--dataset", default="digits", metavar="NAME",
              help="digits (bundled), synthetic, fashion-mnist, mnist, cifar10, cifar100, svhn; or your own data "
                   "as package.module:factory[:k=v,...], a function returning a sharpscope.data.ImageDataset "
                   "(uint8 images, int64 labels, mean/std, augmentation name; see its docstring) or, for any "
                   "other data (tokens, tables, dicts of tensors), a sharpscope.train.BatchData of train/test "
                   "batches used as they are (--batch-size, --train-samples, augmentation do not apply).")
@click.option("--model", default="convnet", metavar="NAME[:k=v,...]",
              help="mlp, convnet, resnet20/32/56(-noshort), wrn16-8, wrn28-10, factory arguments after ':'; or your "
                   "own architecture as package.module:factory[:k=v,...] (a function returning the nn.Module, "
                   "called with the k=v arguments; the current folder is importable). Checkpoints record it, so "
                   "analyses need no --model.")
@click.option("--loss", default=None, metavar="MODULE:FACTORY[:k=v,...]",
              help="The training loss as package.module:factory[:k=v,...], a callable returning loss_fn(outputs, "
                   "targets) or a sharpscope.batches.BatchLoss (a loss class is its own factory: torch.nn:MSELoss) "
                   "[default: cross-entropy]. Recorded in the checkpoints (config.loss) for the analyses.")
@click.option("--optimizer", type=click.Choice(["sgd", "sam", "asam"]), default="sgd",
              help="sgd, SAM (Foret et al. 2021) or adaptive SAM (Kwon et al. 2021).")
@click.option("--base-optimizer", type=click.Choice(["sgd", "adam", "adamw"]), default="sgd",
              help="The optimizer that takes the steps: alone with --optimizer sgd (so --optimizer sgd "
                   "--base-optimizer adamw trains with AdamW), or wrapped by SAM/ASAM.")
@click.option("--lr", type=float, default=0.1, help="Peak learning rate (cosine schedule).")
@click.option("--momentum", type=float, default=0.9, help="SGD momentum.")
@click.option("--weight-decay", type=float, default=1e-4, help="Weight decay of the base optimizer.")
@click.option("--rho", type=float, default=0.05, help="SAM/ASAM radius (ASAM usually 0.5-2).")
@click.option("--p", "p", type=float, default=2.0, help="SAM norm p >= 1 (2 = the paper; inf = sign).")
@click.option("--eta", type=float, default=0.01, help="ASAM's offset in T = |w| + eta (Kwon et al. 2021).")
@click.option("--rho-schedule", type=click.Choice(["constant", "lr"]), default="constant",
              help="SAM/ASAM radius over training: constant, or lr: rho * lr_t / --lr (GSAM, Zhuang et al. 2022).")
@click.option("--m", "--micro-batch-size", "m", type=click.IntRange(min=1), default=None,
              help="m-sharpness: micro-batch size with its own perturbation [default: the whole batch]. "
                   "Under torchrun use --micro-batch-size (torchrun takes --m for an abbreviation of its own "
                   "options).")
@click.option("--sam-every", type=click.IntRange(min=1), default=1, help="SAM step every k steps.")
@click.option("--sync-perturbation", is_flag=True,
              help="Under torchrun: perturb with the gradient averaged over ranks (m = global batch) instead of "
                   "each rank's own (m = per-rank batch, the SAM paper's setting).")
@click.option("--epochs", type=click.IntRange(min=1), default=10, help="Training epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, help="Training batch size.")
@click.option("--train-samples", type=click.IntRange(min=1), default=None,
              help="Train on the first N samples of the training split (the order analyses use) "
                   "[default: all of it].")
@click.option("--warmup-epochs", type=click.FloatRange(min=0), default=0.0, help="Linear LR warm-up.")
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.0)
@click.option("--no-augment", is_flag=True, help="Turn off the dataset's standard augmentation.")
@click.option("--max-grad-norm", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Clip the (SAM) gradient's global norm.")
@click.option("--seed", type=click.IntRange(min=0, max=MAX_SEED), default=0,
              help="Seed for init, shuffling, augmentation.")
@click.option("--save-every", type=click.IntRange(min=0), default=1,
              help="Write a trajectory checkpoint every k epochs (0: final.pt only).")
@click.option("--resume-every", default="3min", metavar="TIME|Nsteps|epoch", callback=_parse_resume_every,
              help="Also rewrite the resume point last.pt this often in the middle of an epoch: a time (3min, "
                   "90s, 1h), a step count (500steps) or 'epoch' (epoch ends only). A killed run loses at most "
                   "this much work; rerunning the command resumes it bit-identically. Under torchrun: epoch ends "
                   "only.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              help="auto = bf16 autocast on CUDA, fp32 on CPU; fp16 = float16 autocast with a GradScaler "
                   "(dynamic loss scaling, one update per step).")
@click.option("--channels-last/--no-channels-last", "channels_last", default=None,
              help="Store conv activations and kernels channels-last [default: on for conv nets on CUDA only]. On "
                   "the CPU it makes a ConvNet SGD or SAM step 23-30% faster, an m-SAM step (--m) ~2% slower (README, "
                   "Train), with other rounding than the default layout: runs are bit-identical to runs with the same "
                   "setting.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Folder with the dataset files.")
@click.option("--download", is_flag=True, help="Fetch cifar10/cifar100/svhn/mnist/fashion-mnist if missing.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads (torch.set_num_threads) [default: torch's]. Runs are bit-identical for the same "
                   "seed, device and thread count; config.json records the count.")
@device_option
@click.option("--out", required=True, type=OutDir(), help="Run folder (resumed if it holds an unfinished run).")
@click.option("--overwrite", is_flag=True, help="Replace a finished or different run in --out.")
@click.pass_context
def command(ctx, dataset, model, loss, optimizer, base_optimizer, lr, momentum, weight_decay, rho, p, eta, rho_schedule, m,
            sam_every, sync_perturbation, epochs, batch_size, train_samples, warmup_epochs, label_smoothing,
            no_augment, max_grad_norm, seed, save_every, resume_every, precision, channels_last, compile_, data_dir,
            download, threads, device, out, overwrite):
    """Train with SGD, SAM or ASAM and write checkpoints along the trajectory.

    \b
    Examples:
      sharpscope train --optimizer sgd --out runs/sgd
      sharpscope train --optimizer sam --rho 0.05 --out runs/sam
      sharpscope train --dataset fashion-mnist --model convnet --optimizer sam --epochs 10 --out runs/fm-sam
      sharpscope train --optimizer sam --m 16 --base-optimizer adamw --lr 1e-3 --out runs/msam
      sharpscope train --optimizer sam --rho-schedule lr --precision fp16 --device cuda --out runs/gsam-fp16
      torchrun --nproc_per_node=2 -m sharpscope train --optimizer sam --micro-batch-size 16 --out runs/ddp
      sharpscope train --model mynets:make_net:width=2 --dataset mydata:load --out runs/mine
      sharpscope train --model mypkg.nets:mlp --dataset mypkg.data:tables --loss torch.nn:MSELoss --out runs/reg

    Writes config.json, metrics.jsonl, ckpt-epochNNN.pt (every --save-every epochs, from the initialisation)
    and final.pt into --out. Rerunning the same command after an interruption resumes the run where its last
    resume point was written (--resume-every, in the middle of an epoch too), bit-identically.
    """
    from sharpscope import distributed
    from sharpscope.data import load_dataset
    from sharpscope.data import list_datasets
    from sharpscope.errors import unknown_name_error
    from sharpscope.models import list_models
    from sharpscope.specs import import_factory, is_factory_spec, parse_spec
    from sharpscope.train import TrainConfig, train
    from sharpscope.train.config import optimizer_label

    model_name, model_kwargs = _parse_model(model)
    if is_factory_spec(dataset):
        import_factory(parse_spec(dataset, what="dataset")[0], what="dataset")  # import errors before any work
    elif dataset not in list_datasets():
        raise unknown_name_error("dataset", dataset, list_datasets())
    if loss is not None:
        if not is_factory_spec(loss):
            raise click.BadParameter(f"expected package.module:factory[:key=value,...] like torch.nn:MSELoss, got "
                                     f"{loss!r}", param_hint="--loss")
        import_factory(parse_spec(loss, what="loss")[0], what="loss")
        if label_smoothing:
            raise click.BadParameter("--label-smoothing is cross-entropy's; with --loss give it to your loss "
                                     "(e.g. torch.nn:CrossEntropyLoss:label_smoothing=0.1)",
                                     param_hint="--label-smoothing")
    if is_factory_spec(model_name):
        import_factory(model_name)
    elif model_name not in list_models():
        raise unknown_name_error("model", model_name, list_models())
    if p != p or p < 1:
        raise click.BadParameter(f"p must be >= 1 (2 or inf), got {p}", param_hint="--p")
    for name, value in (("--lr", lr), ("--rho", rho)):
        if not value > 0 or value == float("inf"):
            raise click.BadParameter(f"must be a positive number, got {value}", param_hint=name)
    for name, value in (("--momentum", momentum), ("--weight-decay", weight_decay), ("--eta", eta)):
        if not value >= 0 or value == float("inf"):
            raise click.BadParameter(f"must be a number >= 0, got {value}", param_hint=name)
    if m is not None and m > batch_size:
        raise click.BadParameter(f"the micro-batch size must be <= --batch-size {batch_size}, got {m}",
                                 param_hint=["--m", "--micro-batch-size"])
    if optimizer == "sgd":
        given = [f"--{name.replace('_', '-')}" for name in SAM_ONLY
                 if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)]
        if given:
            raise click.BadParameter(f"{' and '.join(given)} only affect SAM's perturbation, which --optimizer sgd "
                                     "does not take; use --optimizer sam (or asam), or drop them",
                                     param_hint=given[0])
    cpus = os.cpu_count() or 1
    if threads is not None and threads > cpus:
        # more threads than CPUs only makes them wait for each other (and 5000 of them exhaust the process)
        raise click.BadParameter(f"this machine has {cpus} CPU(s); use at most {cpus} threads, got {threads}",
                                 param_hint="--threads")
    config = TrainConfig(
        dataset=dataset, model=model_name, model_kwargs=model_kwargs, optimizer=optimizer,
        base_optimizer=base_optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay, rho=rho, p=p, eta=eta,
        rho_schedule=rho_schedule, m=m, sam_every=sam_every, sync_perturbation=sync_perturbation, epochs=epochs,
        batch_size=batch_size, train_samples=train_samples, warmup_epochs=warmup_epochs,
        label_smoothing=label_smoothing, loss=loss, augment=not no_augment, max_grad_norm=max_grad_norm, seed=seed,
        save_every=save_every, precision=precision, channels_last=channels_last, compile=compile_, data_dir=data_dir,
    )
    if download and not is_factory_spec(dataset):
        load_dataset(dataset, data_dir=data_dir, download=True)
    with _torch_threads(threads):
        result = train(config, out_dir=out, device=resolve_device(device), overwrite=overwrite,
                       progress=show_progress(ctx), resume_every=resume_every)
    if not distributed.info().is_main:  # under torchrun: rank 0 speaks for the job
        return
    last = result.metrics[-1]
    if last["test_acc"] is None:  # a loss without accuracy (regression, language modelling)
        reached = f"test loss {last['test_loss']:.4g} (train {last['train_loss']:.4g})"
    else:
        train_acc = "" if last["train_acc"] is None else f" (train {last['train_acc']:.2%})"
        reached = f"test accuracy {last['test_acc']:.2%}{train_acc}"
    click.echo(f"{optimizer_label(optimizer, base_optimizer)} {model_name} on {dataset}: {reached} "
               f"after {last['epoch']} epochs")
    click.echo(f"wrote {out}/final.pt, {len(result.checkpoints) - 1} trajectory checkpoints, "
               f"{out}/metrics.jsonl, {out}/config.json")
