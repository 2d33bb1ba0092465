"""The ``mmfm`` command: one subcommand per stage (``mmfm <stage> --help``).

Commands that report numbers accept ``--json`` and then print exactly one JSON object as their last
line of standard output, for scripts and the workflow.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path


def _toy_r10(args: argparse.Namespace) -> int:
    from mmfm.toy import r10

    cfg = r10.R10Config(seed=args.seed, iters=args.iters, n_eval=args.n_eval, steps=args.steps, batch=args.batch)
    rows = r10.run(cfg, progress=not args.json)
    paths = r10.write_outputs(rows, cfg, Path(args.out))
    checks = r10.claims(rows)
    if args.json:
        print(json.dumps({"rows": rows, "claims": checks, "files": {k: str(v) for k, v in paths.items()}}))
    else:
        print(r10.format_table(rows))
        for setting, c in checks.items():
            print(f"{setting}: Len(GMM/mode) is {100 * c['len_reduction_vs_gauss_indep']:.1f}% below "
                  f"Gaussian/independent; paper's claims {'hold' if c['holds'] else 'DO NOT hold'}")
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _fit_gmm(args: argparse.Namespace) -> int:
    from mmfm.gmm.fit import fit_cls_gmm

    result, sidecar = fit_cls_gmm(
        args.input, args.k, args.out, init=args.init, max_iter=args.max_iter, tol=args.tol,
        reg_covar=args.reg_covar, seed=args.seed, device=args.device, dtype=args.precision,
        init_sample=args.init_sample, kmeans_iter=args.kmeans_iter, column=args.column, stream=args.stream,
        plot=not args.no_plot, progress=not args.json, rows=args.rows)
    summary = {"out": args.out, "k": args.k, "rows": sidecar["data"]["rows"], "dim": sidecar["data"]["dim"],
               "n_iter": result.n_iter, "converged": result.converged, "final_loglik": result.final_loglik,
               "reseeded": sidecar["fit"]["reseeded_total"], "collapsed": result.collapsed,
               "backend": result.backend, "seconds_per_iter": result.seconds_per_iter}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {args.out} (K = {args.k}, {summary['rows']} rows x {summary['dim']}): "
              f"{result.n_iter} iterations, {'converged' if result.converged else 'NOT converged'}, "
              f"mean log-likelihood {result.final_loglik:.6g}, {summary['reseeded']} re-seeded, "
              f"{result.collapsed} collapsed, {result.seconds_per_iter:.3g} s/iteration on {result.backend}")
    return 0


def _spatial_stats(args: argparse.Namespace) -> int:
    from mmfm.gmm.spatial import spatial_stats

    meta = spatial_stats(args.shards, args.gmm, args.out, flip=args.flip, covariance=args.covariance,
                         rows=args.rows, device=args.device, progress=not args.json, rows_from=args.rows_from)
    line = {k: meta[k] for k in ("rows", "modes_touched", "k", "flip", "covariance")}
    print(json.dumps({"out": args.out, **line}) if args.json else
          f"wrote {args.out}: {line['rows']} rows into {line['modes_touched']} of {line['k']} modes")
    return 0


def _spatial_reduce(args: argparse.Namespace) -> int:
    from mmfm.gmm.spatial import spatial_reduce

    side = spatial_reduce(args.partials, args.out, weights=args.weights, min_variance=args.min_variance,
                          block_modes=args.block_modes, progress=not args.json)
    line = {k: side[k] for k in ("k", "samples", "empty_modes", "floored_variances", "covariance")}
    print(json.dumps({"out": args.out, **line}) if args.json else
          f"wrote {args.out}: K = {line['k']}, {line['samples']} samples, {line['empty_modes']} empty modes "
          f"(given the global mean/variance), {line['covariance']} variances")
    return 0


def _import_gmm(args: argparse.Namespace) -> int:
    from mmfm.gmm.released import import_released

    meta = import_released(args.pickle, args.out, allow_pickle=args.allow_pickle, channels=args.channels)
    print(f"wrote {args.out}: {meta['kind']}, K = {meta['k']}")
    return 0


def _export_digits(args: argparse.Namespace) -> int:
    from mmfm.data.digits import export_digits

    info = export_digits(args.out)
    print(json.dumps(info) if args.json else f"wrote {info['images']} images in {info['classes']} classes to {args.out}")
    return 0


def _report_bench(result: dict, as_json: bool) -> int:
    """A bench's figures, one per line unless ``--json``; the JSON object is always the last line."""
    if not as_json:
        for key, value in result.items():
            print(f"{key:>26}: {value}")
    print(json.dumps(result))
    return 0


def _bench_gmm(args: argparse.Namespace) -> int:
    from mmfm.bench.gmm import bench_gmm

    if args.imagenet_scale:
        result = bench_gmm(n=1_281_167, d=768, k=8192, iters=args.iters, seed=args.seed, device=args.device,
                           sklearn=False, repeats=1)
    else:
        result = bench_gmm(n=args.n, d=args.d, k=args.k, iters=args.iters, seed=args.seed, device=args.device,
                           repeats=args.repeats)
    return _report_bench(result, args.json)


def _bench_encode(args: argparse.Namespace) -> int:
    from mmfm.bench.encode import bench_encode

    result = bench_encode(encoder=args.encoder, encoder_path=args.encoder_path, n=args.images,
                          batch_size=args.batch_size, workers=args.workers, device=args.device, seed=args.seed)
    return _report_bench(result, args.json)


def _import_checkpoint(args: argparse.Namespace) -> int:
    from mmfm.train.released import import_released_checkpoint

    meta = import_released_checkpoint(args.checkpoint, args.out, preset=args.preset, entry=args.entry,
                                      num_classes=args.num_classes, conditioning=args.conditioning)
    line = {k: meta.get(k) for k in ("preset", "conditioning", "num_classes", "in_channels", "num_tokens",
                                     "time_convention", "entry", "num_parameters")}
    print(json.dumps({"out": args.out, **line}) if args.json else
          f"wrote {args.out}: {line['preset']}, {line['conditioning']} conditioning, "
          f"{line['num_parameters']:,} parameters, {line['time_convention']} time convention (from '{line['entry']}')")
    return 0


def _fid(args: argparse.Namespace) -> int:
    from mmfm.io import write_json
    from mmfm.metrics.inception import fid_from_samples

    res = fid_from_samples(args.samples, args.ref, weights=args.weights, batch_size=args.batch_size,
                           device=args.device, progress=not args.json)
    line = {"fid": res["fid"], "n": res["n"], "samples": args.samples, "reference": args.ref}
    if args.out:
        write_json(args.out, line)
    print(json.dumps(line) if args.json else f"FID {line['fid']:.4f} over {line['n']} samples against {args.ref}")
    return 0


def _features_or_stats(path: str):
    """``(mu, sigma, n)`` of a stats ``.npz`` (mu / sigma) or of a ``.npy`` feature array ``(n, D)``."""
    import numpy as np

    from mmfm.metrics.frechet import FeatureStats, load_stats

    if path.endswith(".npy"):
        feats = np.load(path, mmap_mode="r", allow_pickle=False)
        if feats.ndim != 2:
            raise ValueError(f"{path}: expected features of shape (n, D), got {feats.shape}")
        st = FeatureStats(feats.shape[1]).update(feats)
        return st.mu, st.sigma, st.n
    st = load_stats(path)
    return st.mu, st.sigma, st.meta.get("n")


def _fd(args: argparse.Namespace) -> int:
    from mmfm.metrics.frechet import frechet_distance

    mu_a, s_a, n_a = _features_or_stats(args.a)
    mu_b, s_b, n_b = _features_or_stats(args.b)
    line = {"fd": frechet_distance(mu_a, s_a, mu_b, s_b), "a": args.a, "b": args.b, "n_a": n_a, "n_b": n_b}
    print(json.dumps(line) if args.json else f"Frechet distance {line['fd']:.6g}")
    return 0


def _ref_stats(args: argparse.Namespace) -> int:
    from mmfm.metrics.inception import ref_stats_from_folder

    res = ref_stats_from_folder(args.images, args.out, size=args.size, weights=args.weights,
                                batch_size=args.batch_size, device=args.device, num_workers=args.workers,
                                progress=not args.json)
    line = {"out": args.out, "n": res["n"]}
    print(json.dumps(line) if args.json else f"wrote {args.out}: Inception statistics of {res['n']} images")
    return 0


def _launch(args: argparse.Namespace):
    """The :class:`mmfm.launch.Launch` of a distributed command's flags."""
    from mmfm.devices import job_threads
    from mmfm.launch import Launch

    return Launch(nproc=args.nproc, nnodes=args.nnodes, node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint,
                  rdzv_id=args.rdzv_id, rdzv_timeout=args.rdzv_timeout, stop_timeout=args.stop_timeout,
                  threads=args.threads or job_threads(), srun=args.srun)


def _worker_argv(args: argparse.Namespace) -> list[str]:
    """The command line a worker runs: this one (torchrun's parser refuses the prefix ``--n``)."""
    return ["--num-samples" if a == "--n" else "--num-samples=" + a[4:] if a.startswith("--n=") else a
            for a in args.argv]


def _device_type(args: argparse.Namespace) -> str:
    from mmfm.devices import resolve

    return resolve(args.device, allow_cpu_fallback=args.allow_cpu_fallback)


def _bind(args: argparse.Namespace, device_type: str):
    """This process's device, and (a worker of our launcher) SIGTERM should the launcher die."""
    import os
    import signal

    from mmfm import devices
    from mmfm.launch import WORKER_ENV, is_worker

    if is_worker() and os.environ.get(WORKER_ENV, "").isdigit():
        devices.set_parent_death_signal(signal.SIGTERM, parent=int(os.environ[WORKER_ENV]))
    elif not is_worker() and args.threads:
        import torch

        torch.set_num_threads(devices.threads_per_process(args.threads, 1))
    return devices.bind(device_type, args.device)


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def _sample(args: argparse.Namespace) -> int:
    from mmfm import launch
    from mmfm.devices import process_group
    from mmfm.sample import sample_run

    spec = _launch(args)
    device_type = _device_type(args)
    if not launch.is_worker() and (spec.world_size > 1 or spec.srun):
        launch.check_devices(spec, device_type)
        return launch.run(spec, _worker_argv(args), gpus=device_type == "cuda")
    device = _bind(args, device_type)
    args.device = str(device)
    with process_group(device):
        # the tokenizer, normalization and source the export records, each flag given overriding them
        encoder = {"name": args.encoder, "path": args.encoder_path, "image_size": args.image_size,
                   "patch_size": args.patch_size, "pool": args.pool, "precision": args.precision,
                   "decoder": args.decoder}
        res = sample_run(args.model, args.out, encoder=encoder, source=args.source, n=args.n, seed=args.seed,
                         steps=args.steps, method=args.method, shift=args.shift, end=args.end, guide=args.guide,
                         guidance_scale=args.guidance_scale, guidance_interval=tuple(args.guidance_interval),
                         cfg_scale=args.cfg_scale, norm=args.norm_stats,
                         batch_size=args.batch_size, device=device, grid=args.grid, progress=not args.json,
                         precision=args.network_precision, gm_substeps=args.gm_substeps, gm_order=args.gm_order,
                         gm_guidance_scale=args.gm_guidance_scale, gm_orthogonal=args.gm_orthogonal,
                         gm_guidance_interval=tuple(args.gm_guidance_interval), gm2_coefs=tuple(args.gm2_coefs),
                         dfm_ratio=args.dfm_ratio, dfm_starts=args.dfm_starts)
    if _rank() == 0:
        print(json.dumps(res) if args.json else f"wrote {res['n']} samples to {args.out}")
    return 0


def _bench_train(args: argparse.Namespace) -> int:
    from mmfm.bench.train import bench_train

    result = bench_train(preset=args.preset, batch=args.batch, steps=args.steps, warmup=args.warmup,
                         in_channels=args.channels, num_tokens=args.tokens, device=args.device, compile=args.compile,
                         conditioning=args.conditioning, modes=args.modes, accumulation=args.accumulation,
                         method=args.method)
    return _report_bench(result, args.json)


def _bench_stream(args: argparse.Namespace) -> int:
    from mmfm.bench.stream import bench_stream

    result = bench_stream(args.shards, rows=args.rows, side=args.side, token_dim=args.channels, cls_dim=args.cls_dim,
                          batch=args.batch, buffer_rows=args.buffer_rows, batches=args.batches, preset=args.preset,
                          gpu=args.gpu, mfu=args.mfu, seed=args.seed)
    return _report_bench(result, args.json)


def _bench_checkpoint(args: argparse.Namespace) -> int:
    from mmfm.bench.checkpoint import bench_checkpoint

    result = bench_checkpoint(preset=args.preset, out_dir=args.out_dir, in_channels=args.channels,
                              num_tokens=args.tokens, seed=args.seed, keep=args.keep)
    return _report_bench(result, args.json)


def _check(args: argparse.Namespace) -> int:
    from mmfm.check import check, format_report

    options = f"--configfile {args.configfile}" if args.configfile else None
    report = check(args.results, quick=args.quick, options=options)
    print(format_report(report, options))
    if args.json:
        print(json.dumps(report.to_json()))
    return 0 if report.ok else 1


def _report(args: argparse.Namespace) -> int:
    """``mmfm report``: summary.json and the results page from whatever the workflow has written so far."""
    from mmfm import page, report
    from mmfm.plan import load

    root = Path(args.directory)
    configfile = Path(args.configfile) if args.configfile else load.default_configfile(root)
    config, _ = load.validate(load.read_configfile(configfile), root)
    if args.results is not None:
        config["results_dir"] = args.results
    summary, files = report.summarize_config(config, root, strict=False)
    notes = {} if args.no_decode else page.draw_gallery(files, config, args.device, strict=False)
    out = page.write(summary, files, strict=False, notes=notes)
    missing = summary["missing"]
    print(f"{out}: {len(summary['runs'])} runs" + (f"; {len(missing)} expected file(s) missing or unreadable "
                                                   "(listed on the page)" if missing else "") + f"; {files['summary']}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    """``mmfm plan``: the table, what does not fit, the total disk and GPU-hours (last two lines); with
    ``--json`` the plan as one JSON object after them; with ``--strict`` exit 1 when a job does not fit."""
    import yaml

    from mmfm.plan import DEFAULT_MFU, build_plan, gpu, mfu_from, parse_size, render

    kind = gpu(args.gpu)
    if args.mfu is not None and args.mfu_from is not None:
        raise ValueError("--mfu and --mfu-from: give one of them")
    mfu, source = (args.mfu, "--mfu") if args.mfu is not None else (DEFAULT_MFU, "the default")
    if args.mfu_from is not None:
        mfu, source = mfu_from(args.mfu_from)
    disk = parse_size(args.disk, "--disk") if args.disk is not None else None
    overrides = {}
    for item in args.config or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--config: expected KEY=VALUE (as snakemake's --config), got {item!r}")
        overrides[key] = yaml.safe_load(value)
    plan = build_plan(args.configfile, gpu=kind, mfu=mfu, mfu_source=source, root=args.directory,
                      profile=args.profile, disk=disk, cache=None if args.no_cache else "default",
                      overrides=overrides)
    for line in render(plan):
        print(line)
    if args.json:
        print(json.dumps(plan.as_dict()))
    return 1 if args.strict and not plan.fits else 0


def _read_config(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{path}: no such config file")
    try:
        cfg = yaml.safe_load(p.read_text())  # JSON is YAML too
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML/JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a mapping of training settings")
    return cfg.get("train", cfg) if isinstance(cfg.get("train"), dict) else cfg


def _train(args: argparse.Namespace) -> int:
    """``mmfm train``: the launcher (several processes or nodes) or one trainer process.

    The run folder is locked for the trainer's whole life (:mod:`mmfm.train.lock`): by the launcher of a
    one-node run (its workers know from the environment), else by rank 0 after the rendezvous, so a
    rendezvous that fails writes nothing into the folder."""
    from mmfm import launch
    from mmfm.devices import process_group
    from mmfm.train.config import TrainConfig
    from mmfm.train.lock import RunFolderLocked, RunLock, held_by_parent
    from mmfm.train.loop import NonFiniteLoss, TrainingInterrupted, train

    cfg = TrainConfig.from_dict(_read_config(args.config))
    if cfg.data_fingerprint is None:  # what the run trains on: changed data does not resume it
        from mmfm.data.fingerprint import inputs_fingerprint

        cfg = dataclasses.replace(cfg, data_fingerprint=inputs_fingerprint(args.shards, cfg.gmm, cfg.cls_gmm))
    spec = _launch(args)
    device_type = _device_type(args)
    try:
        if not launch.is_worker() and (spec.world_size > 1 or spec.srun):
            launch.check_devices(spec, device_type)
            if spec.nnodes > 1:  # rank 0 locks, after the nodes met
                return launch.run(spec, _worker_argv(args), gpus=device_type == "cuda")
            with RunLock(args.out) as lock:
                return launch.run(spec, _worker_argv(args), env=lock.env(), gpus=device_type == "cuda")
        device = _bind(args, device_type)
        with process_group(device), _trainer_lock(args.out, held_by_parent(args.out)):
            _check_run_folder(Path(args.out), cfg, args.fresh_if_changed)
            if _rank() == 0:
                _prepare_run_folder(Path(args.out), cfg, args.fresh_if_changed)
            _barrier()  # no rank looks for checkpoints while rank 0 may be clearing them
            res = train(cfg, args.shards, args.out, resume=not args.no_resume,
                        progress=not args.json or not sys.stderr.isatty(),  # a log: plain progress lines
                        max_steps=args.max_steps, device=device)
    except RunFolderLocked as err:
        print(f"mmfm train: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        print(f"mmfm train: {stop}", file=sys.stderr)
        return stop.exit_code
    except NonFiniteLoss as err:
        print(f"mmfm train: error: {err}", file=sys.stderr)
        return 3
    line = {k: (str(v) if isinstance(v, Path) else v) for k, v in res.items() if k != "losses"}
    line["final_loss"] = res["losses"][-1] if res["losses"] else None
    text = (json.dumps(line) if args.json else
            f"{'finished' if res['done'] else 'stopped'} at step {res['step']}: checkpoint {res['checkpoint']}"
            + (f", EMA weights {res['ema']}" if res["ema"] else ""))
    sys.stdout.write(text + "\n")  # one write: the lines of several ranks on one pipe do not interleave
    sys.stdout.flush()
    return 0


@contextlib.contextmanager
def _trainer_lock(out: str, held: bool):
    """The run-folder lock of a trainer that is not covered by its launcher's: taken by rank 0, and its
    outcome shared with every rank, so a refused lock stops all of them with the holder named."""
    import torch.distributed as dist

    from mmfm.train.lock import RunFolderLocked, RunLock

    lock, refused = None, None
    if not held and _rank() == 0:
        try:
            lock = RunLock(out).acquire()
        except RunFolderLocked as err:
            refused = err
    if dist.is_initialized():
        outcome = [refused is not None, None if refused is None else refused.holder]
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] and refused is None:
            refused = RunFolderLocked(out, outcome[1])
    if refused is not None:
        raise refused
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


#: The train rule's log of every attempt in the run folder (workflow/scripts/train.py appends to it).
RUN_LOG = "train.log"


def _check_run_folder(out: Path, cfg, fresh_if_changed: bool) -> None:
    """Every rank, before anything is written: a run folder whose latest checkpoint has other settings (the
    data's fingerprint included) is an error naming them, unless ``fresh_if_changed``."""
    from mmfm.train.checkpoint import checkpoint_config, latest_checkpoint

    latest = latest_checkpoint(out) if out.is_dir() and not fresh_if_changed else None
    diff = cfg.changed_settings(checkpoint_config(latest)) if latest is not None else {}
    if diff:
        raise ValueError(f"{latest}: was written with other settings ("
                         + "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(diff.items()))
                         + "); pass --fresh-if-changed to start afresh (the earlier run is kept aside) or use "
                         "another --out")


def _prepare_run_folder(out: Path, cfg, fresh_if_changed: bool) -> None:
    """Under the lock, rank 0: with ``fresh_if_changed``, a run folder whose latest checkpoint has other
    settings (the data's fingerprint included) is moved aside to ``RUN.prev-<timestamp>`` (all but the lock
    file) and the run starts afresh; then record the settings of this run in ``train.yaml``."""
    import datetime
    import shutil

    import yaml

    from mmfm.io import atomic_path
    from mmfm.train.checkpoint import checkpoint_config, latest_checkpoint
    from mmfm.train.lock import LOCK_NAME

    latest = latest_checkpoint(out) if out.is_dir() else None
    if latest is not None:
        changed = sorted(cfg.changed_settings(checkpoint_config(latest)))
        if changed and fresh_if_changed:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            aside, n = out.with_name(f"{out.name}.prev-{stamp}"), 1
            while aside.exists():  # two fresh starts within a second
                n += 1
                aside = out.with_name(f"{out.name}.prev-{stamp}-{n}")
            print(f"mmfm train: {latest} was trained with other settings ({', '.join(changed)}): starting afresh; "
                  f"the earlier run is kept in {aside} (delete it when you no longer need it)", file=sys.stderr)
            aside.mkdir()
            for p in out.iterdir():
                if p.name == RUN_LOG:  # the workflow's log of every attempt: it goes on in this folder
                    shutil.copy2(p, aside / p.name)
                elif p.name != LOCK_NAME:
                    p.rename(aside / p.name)
        elif not changed:
            print(f"mmfm train: resuming from {latest}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "train.yaml") as tmp:
        Path(tmp).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _nfe_curve(args: argparse.Namespace) -> int:
    from mmfm.train.evaluate import nfe_curve

    rows = nfe_curve(args.model, args.shards, args.out, source=args.source, nfes=tuple(args.nfe), n=args.n,
                     seed=args.seed, shift=args.shift, rows=args.rows, device=args.device)
    print(json.dumps({"out": args.out, "curve": rows}) if args.json else
          "\n".join(f"NFE {r['nfe']:>4}: FD {r['fd']:.5g}" for r in rows))
    return 0


def _tokenizer(args: argparse.Namespace):
    from mmfm.encoders import load_tokenizer

    pixels = {"patch_size": args.patch_size, "pool": args.pool} if args.encoder == "pixels" else {}
    return load_tokenizer(args.encoder, args.encoder_path, image_size=args.image_size, device=args.device,
                          precision=args.precision, decoder=getattr(args, "decoder", None),
                          **{k: v for k, v in pixels.items() if v is not None})


def _encode(args: argparse.Namespace) -> int:
    from mmfm.data.encode import encode_folder
    from mmfm.encoders.normalization import load_norm_stats

    norm = load_norm_stats(args.norm_stats) if args.norm_stats else None
    meta = encode_folder(
        args.images, args.out, _tokenizer(args), shard=args.shard, num_shards=args.num_shards, flip=args.flip,
        norm=norm, dtype=args.dtype, batch_size=args.batch_size, num_workers=args.workers, device=args.device,
        on_bad_image=args.on_bad_image, min_side=args.min_side,
        row_group_rows=args.row_group_rows, progress=not args.json)
    line = {"out": args.out, "skipped": meta.get("skipped", False), "rows": meta["rows"],
            "bad_images": meta["bad_images"]["count"], "encoder": meta["encoder"], "grid": meta["grid"],
            "token_dim": meta["token_dim"], "cls_dim": meta["cls_dim"], "normalization": meta["normalization"]}
    print(json.dumps(line) if args.json else
          f"{'kept complete' if line['skipped'] else 'wrote'} {args.out}: {line['rows']} rows, "
          f"{line['bad_images']} bad images skipped")
    return 0


def _norm_stats(args: argparse.Namespace) -> int:
    from mmfm.data.encode import compute_norm_stats
    from mmfm.io import read_header

    compute_norm_stats(args.images, args.out, _tokenizer(args), num_images=args.num_images, seed=args.seed,
                       flip=not args.no_flip, keep_mean=args.keep_mean, batch_size=args.batch_size,
                       num_workers=args.workers, device=args.device, on_bad_image=args.on_bad_image,
                       progress=not args.json)
    meta = read_header(args.out)[1]
    line = {"out": args.out, "grids": meta["grids"], "mean_kept": meta["mean_kept"],
            "skipped_images": len(meta["skipped_images"])}
    print(json.dumps(line) if args.json else f"wrote {args.out} from {line['grids']} token grids")
    return 0


def launch_args(p: argparse.ArgumentParser) -> None:
    """The flags of a distributed command (mmfm.launch): processes, nodes, rendezvous, signals, threads."""
    g = p.add_argument_group("processes and nodes (torchrun's flags; see mmfm.launch)")
    g.add_argument("--nproc", type=int, default=1, help="processes on each node, one per GPU (default: 1)")
    g.add_argument("--nnodes", type=int, default=1, help="nodes, one agent each (default: 1)")
    g.add_argument("--node-rank", type=int, default=None,
                   help="this node's rank 0..NNODES-1 (static rendezvous; default: c10d assigns it)")
    g.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT where the nodes meet (the first node)")
    g.add_argument("--rdzv-id", default=None, help="rendezvous id, the same on every node (c10d)")
    g.add_argument("--rdzv-timeout", type=int, default=600, help="seconds for every node to arrive (default: 600)")
    g.add_argument("--stop-timeout", type=int, default=3600,
                   help="seconds the launcher waits for the workers after a stop signal before it kills them")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads of this node's job, shared by its processes (default: OMP_NUM_THREADS)")
    g.add_argument("--srun", action="store_true",
                   help="inside a SLURM allocation: start the --nnodes agents with srun (rendezvous at this host)")
    g.add_argument("--allow-cpu-fallback", action="store_true",
                   help="run on the CPU with a warning when --device cuda is unusable (instead of an error)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmfm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    toy = sub.add_parser("toy", help="the paper's toy experiments").add_subparsers(
        dest="toy", required=True, metavar="experiment")
    r10 = toy.add_parser("r10", help="R^10 Compact/Spread table: Len and W2^2 for three source/coupling settings",
                         description="Train Gaussian/independent, GMM/independent and GMM/mode flows on the "
                                     "Compact and Spread targets in R^10; print Len and exact W2^2 beside the "
                                     "paper's numbers; write JSON, CSV and a plot.")
    r10.add_argument("--out", default="results/toy_r10", help="output folder (default: %(default)s)")
    r10.add_argument("--seed", type=int, default=0)
    r10.add_argument("--iters", type=int, default=3000, help="training steps per setting (default: %(default)s)")
    r10.add_argument("--batch", type=int, default=512)
    r10.add_argument("--n-eval", type=int, default=3000, help="samples for Len and W2^2 (default: %(default)s)")
    r10.add_argument("--steps", type=int, default=100, help="midpoint steps of the evaluation ODE")
    r10.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    r10.set_defaults(func=_toy_r10)

    fit = sub.add_parser("fit-gmm", help="fit the diagonal Gaussian mixture on CLS descriptors",
                         description="Fit a diagonal K-component Gaussian mixture by EM (numpy on CPU, CuPy on "
                                     "GPU) to the `cls` column of Parquet shards or to a .npy array; write "
                                     "OUT (.safetensors), OUT's .json sidecar and OUT_weights.png.")
    fit.add_argument("--input", required=True, help="Parquet shard file, folder or glob; or a .npy (rows, D) array")
    fit.add_argument("--k", type=int, required=True, help="number of components (the paper: 8192)")
    fit.add_argument("--out", required=True, help="output .safetensors path")
    fit.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    fit.add_argument("--init", default="k-means++", choices=["k-means++", "kmeans", "from-data", "random"])
    fit.add_argument("--max-iter", type=int, default=100)
    fit.add_argument("--tol", type=float, default=1e-3, help="stop when the mean log-likelihood gains less")
    fit.add_argument("--reg-covar", type=float, default=1e-6, help="added to every variance")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--precision", default="float32", choices=["float32", "float64"],
                     help="compute dtype of the matrix products (statistics are always float64)")
    fit.add_argument("--init-sample", type=int, default=None, help="rows k-means sees (default: all)")
    fit.add_argument("--kmeans-iter", type=int, default=10, help="Lloyd iterations for --init kmeans")
    fit.add_argument("--column", default="cls", help="Parquet column (default: %(default)s)")
    fit.add_argument("--rows", default="all", choices=["all", "originals"],
                     help="originals: only the rows whose flip is false (the release fitted the images alone)")
    fit.add_argument("--stream", action="store_true", help="read Parquet shards at every pass instead of "
                                                           "loading the column into memory")
    fit.add_argument("--no-plot", action="store_true", help="skip OUT_weights.png")
    fit.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    fit.set_defaults(func=_fit_gmm)

    st = sub.add_parser("spatial-stats", help="per-mode partial sums of the token latents of shards (map)",
                        description="Assign every row of the shards to its CLS mode (hard) and write float64 "
                                    "partial sums (count, sum, sum of squares) of the token grids per mode.")
    st.add_argument("--shards", required=True, nargs="+", help="shard file(s), folder or glob")
    st.add_argument("--gmm", required=True, help="the CLS GMM (.safetensors from fit-gmm)")
    st.add_argument("--out", required=True, help="output partial .safetensors")
    st.add_argument("--flip", action="store_true", help="also add each latent grid mirrored along its width")
    st.add_argument("--rows-from", default="all", choices=["all", "originals"],
                    help="originals: skip the stored mirrors (with --flip: the release's statistics)")
    st.add_argument("--covariance", default="spherical", choices=["spherical", "diag"])
    st.add_argument("--rows", type=int, default=256, help="rows read at a time")
    st.add_argument("--device", default="cpu", help="device of the CLS assignment")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_spatial_stats)

    red = sub.add_parser("spatial-reduce", help="sum partial files into the spatial GMM (reduce)",
                         description="Sum any number of spatial-stats partials (any order) into the spatial GMM: "
                                     "weights, means (K, N, D), variances (spherical or diag), counts.")
    red.add_argument("--partials", required=True, nargs="+", help="partial file(s), folder or glob")
    red.add_argument("--out", required=True, help="output .safetensors")
    red.add_argument("--weights", default="cls", choices=["cls", "counts"],
                     help="mixture weights: the CLS GMM's (as released) or the assignment counts")
    red.add_argument("--min-variance", type=float, default=1e-8)
    red.add_argument("--block-modes", type=int, default=None, help="modes summed at a time (memory bound)")
    red.add_argument("--json", action="store_true")
    red.set_defaults(func=_spatial_reduce)

    imp = sub.add_parser("import-gmm", help="convert a released scikit-learn GMM pickle (executes pickle!)",
                         description="Read a released MM-FM GMM pickle (CLS or spatial) and write our safetensors "
                                     "+ JSON. Unpickling executes code from the file: --allow-pickle is required.")
    imp.add_argument("--pickle", required=True, help="the released .pkl")
    imp.add_argument("--out", required=True, help="output .safetensors")
    imp.add_argument("--allow-pickle", action="store_true", help="I trust this file; unpickle it")
    imp.add_argument("--channels", type=int, default=768, help="encoder width of a spatial GMM (default: 768)")
    imp.set_defaults(func=_import_gmm)

    def tokenizer_args(p, images: bool = True):
        if images:
            p.add_argument("--images", required=True, help="class folder: one subfolder of images per class")
            p.add_argument("--workers", type=int, default=0, help="DataLoader processes decoding images")
            p.add_argument("--on-bad-image", default="skip", choices=["skip", "fail"],
                           help="skip (log and count) or stop at unreadable / too small images")
        p.add_argument("--encoder", default="pixels", choices=["pixels", "dinov2", "siglip2", "mae"])
        p.add_argument("--encoder-path", default=None,
                       help="transformers encoder: a local folder, or a hub id already in the HF cache")
        p.add_argument("--image-size", type=int, default=None,
                       help="ADM center-crop size (default: 8 for pixels, 256 otherwise)")
        p.add_argument("--patch-size", type=int, default=None, help="pixels: patch side (default 2)")
        p.add_argument("--pool", type=int, default=None, help="pixels: descriptor grid side (default 2)")
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--device", default="cpu")
        p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                       help="bf16: the encoder under bf16 autocast")
        p.add_argument("--json", action="store_true", help="print one JSON object as the last line")

    enc = sub.add_parser("encode", help="encode (a shard of) an image folder into a Parquet latent shard",
                         description="Images -> ADM center crop -> tokenizer -> (normalized) tokens and "
                                     "descriptor, one Parquet shard per call.")
    tokenizer_args(enc)
    enc.add_argument("--out", required=True, help="output .parquet shard")
    enc.add_argument("--shard", type=int, default=0, help="which shard of the folder's sorted images")
    enc.add_argument("--num-shards", type=int, default=1)
    enc.add_argument("--flip", action="store_true", help="also store each image's horizontal mirror")
    enc.add_argument("--norm-stats", default=None, help="normalize tokens with these statistics "
                     "(.safetensors from norm-stats, or RAE's stat.pt)")
    enc.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="token storage")
    enc.add_argument("--min-side", type=int, default=0,
                     help="images whose short side is below this are bad images (default: upsample, as ADM)")
    enc.add_argument("--row-group-rows", type=int, default=256)
    enc.set_defaults(func=_encode)

    ns = sub.add_parser("norm-stats", help="per-position token statistics for latent normalization",
                        description="Welford (float64) over a seeded sample of the folder's images.")
    tokenizer_args(ns)
    ns.add_argument("--out", required=True, help="output .safetensors")
    ns.add_argument("--num-images", type=int, default=50000)
    ns.add_argument("--seed", type=int, default=0)
    ns.add_argument("--no-flip", action="store_true", help="leave out the mirrored images")
    ns.add_argument("--keep-mean", action="store_true",
                    help="store the mean too (RAE's and MM-FM's default is variance-only)")
    ns.set_defaults(func=_norm_stats)

    ick = sub.add_parser("import-checkpoint", help="convert a released RAE / MM-FM DiTDH checkpoint to safetensors",
                         description="Reads the .pt with torch.load(weights_only=True), takes its EMA weights, "
                                     "infers the architecture and writes .safetensors + .json; sampling wraps it "
                                     "into the paper's time convention.")
    ick.add_argument("--checkpoint", required=True, help="the released .pt")
    ick.add_argument("--out", required=True, help="output .safetensors")
    ick.add_argument("--preset", default=None, help="assert the DiTDH preset (default: inferred)")
    ick.add_argument("--entry", default="ema", choices=["ema", "model"], help="weights to take (default: ema)")
    ick.add_argument("--num-classes", type=int, default=None, help="assert the classes or modes K")
    ick.add_argument("--conditioning", default=None, choices=["none", "class", "mode"],
                     help="when the file name and config do not tell (an unconditional MM-FM network "
                          "carries an unused K-row label table)")
    ick.add_argument("--json", action="store_true")
    ick.set_defaults(func=_import_checkpoint)

    tr = sub.add_parser("train", help="train one run (flow matching over latent shards; resumable)",
                        description="Resumes from the latest checkpoint in --out. SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) checkpoint "
                                    "and exit with 128 + signal; a non-finite loss exits 3, keeping the last good "
                                    "checkpoint.")
    tr.add_argument("--config", required=True, help="YAML/JSON training settings (a run's `train` section)")
    tr.add_argument("--shards", required=True, nargs="+", help="Parquet shard file(s), folder or glob")
    tr.add_argument("--out", required=True, help="run folder: checkpoints, metrics.csv, ema.safetensors")
    tr.add_argument("--max-steps", type=int, default=None, help="steps in this call (time-boxed jobs)")
    tr.add_argument("--no-resume", action="store_true", help="start fresh even if checkpoints exist")
    tr.add_argument("--fresh-if-changed", action="store_true",
                    help="empty the run folder when its latest checkpoint has other settings (the workflow's "
                         "choice); without it such a folder is an error")
    tr.add_argument("--device", default=None,
                    help="cuda (required: an error if unusable), cpu, or auto (default: cuda if usable)")
    launch_args(tr)
    tr.add_argument("--json", action="store_true")
    tr.set_defaults(func=_train)

    nc = sub.add_parser("nfe-curve", help="Frechet distance to the data (latent space) against Euler steps",
                        description="Samples of an exported model at each NFE, same seeds, against the first "
                                    "--rows token grids of the shards.")
    nc.add_argument("--model", required=True, help="velocity network .safetensors (train's ema.safetensors)")
    nc.add_argument("--shards", required=True, nargs="+")
    nc.add_argument("--out", required=True, help="output CSV (step, nfe, fd)")
    nc.add_argument("--source", default="gaussian", help="'gaussian' or the spatial GMM .safetensors")
    nc.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    nc.add_argument("--n", type=int, default=1024, help="samples per point")
    nc.add_argument("--rows", type=int, default=4096, help="data rows for the reference statistics")
    nc.add_argument("--seed", type=int, default=0)
    nc.add_argument("--shift", type=float, default=1.0)
    nc.add_argument("--device", default="cpu")
    nc.add_argument("--json", action="store_true")
    nc.set_defaults(func=_nfe_curve)

    smp = sub.add_parser("sample", help="samples of an exported velocity network, decoded to ADM .npz",
                         description="Per-sample seeds: the set does not depend on batching or processes. An export "
                                     "of `mmfm train` records its tokenizer, normalization and source: --model alone "
                                     "suffices, and the tokenizer and source flags given override the record (an "
                                     "imported or older export needs them). Every shape is checked before sampling.")
    tokenizer_args(smp, images=False)
    smp.set_defaults(encoder=None, precision=None)  # not given: the export's record
    smp.add_argument("--model", required=True, help="velocity network .safetensors (import-checkpoint or train)")
    smp.add_argument("--out", required=True, help="output .npz (arr_0 uint8 NHWC; arr_1 labels if class-cond.)")
    smp.add_argument("--source", default=None, help="'gaussian' or a GMM .safetensors (spatial GMM); default: the "
                     "one the export records, else gaussian")
    smp.add_argument("--n", "--num-samples", dest="n", type=int, default=64, help="samples in the set")
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--steps", type=int, default=50)
    smp.add_argument("--method", default="euler", choices=["euler", "heun", "midpoint", "dopri5", "gm-ode", "gm-sde",
                                                            "flowmap", "flowmap-restart", "dfm-euler"],
                     help="ODE solver; gm-ode / gm-sde sample a GMFlow export's mixture, flowmap / flowmap-restart "
                          "a DMF export's flow map, dfm-euler a DFM export's stages (--steps network calls)")
    smp.add_argument("--shift", type=float, default=1.0, help="time shift of the grid")
    smp.add_argument("--end", type=float, default=1.0, help="last time of the grid (RAE: 0.999 before shift)")
    smp.add_argument("--guide", default=None, help="autoguidance: the guide network .safetensors")
    smp.add_argument("--guidance-scale", type=float, default=1.0)
    smp.add_argument("--guidance-interval", type=float, nargs=2, default=(0.0, 1.0))
    smp.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance (class models)")
    smp.add_argument("--norm-stats", default=None, help="undo this latent normalization before decoding "
                     "(default: the one the export records)")
    smp.add_argument("--decoder", default=None, help="RAE decoder checkpoint (transformers tokenizers)")
    smp.add_argument("--grid", default=None, help="also write a PNG grid of the first 64 samples")
    smp.add_argument("--network-precision", default="fp32", choices=["fp32", "bf16"],
                     help="run the velocity networks under bf16 autocast (the ODE state stays fp32)")
    gmg = smp.add_argument_group("GMFlow samplers (--method gm-ode / gm-sde)")
    gmg.add_argument("--gm-substeps", type=int, default=None,
                     help="GM-ODE sub-steps per network call (default: max(2, ceil(128 / steps)), 8 at 4 and 6)")
    gmg.add_argument("--gm-order", type=int, default=2, choices=[1, 2])
    gmg.add_argument("--gm-guidance-scale", type=float, default=0.0,
                     help="probabilistic guidance against --guide, in [0, 1) (0: off)")
    gmg.add_argument("--gm-orthogonal", type=float, default=1.0)
    gmg.add_argument("--gm-guidance-interval", type=float, nargs=2, default=(0.0, 1.0))
    gmg.add_argument("--gm2-coefs", type=float, nargs=2, default=(0.005, 1.0))
    dfg = smp.add_argument_group("DFM sampler (--method dfm-euler)")
    dfg.add_argument("--dfm-ratio", type=float, default=4.0,
                     help="steps per stage in the proportion ratio^(S-1-s), coarse first (4: 40 + 10 of 50)")
    dfg.add_argument("--dfm-starts", type=float, nargs="+", default=None,
                     help="S - 1 thresholds: the time stage s reaches before stage s + 1 starts (default 0.9 each)")
    launch_args(smp)
    smp.set_defaults(func=_sample)

    weights_help = ("pytorch-fid's FID Inception weights (default: $TORCH_HOME/hub/checkpoints/"
                    "pt_inception-2015-12-05-6726825d.pth; never downloaded)")
    fid = sub.add_parser("fid", help="FID of a sample .npz against reference mu/sigma (pytorch-fid's Inception)",
                         description="ADM's VIRTUAL_imagenet256_labeled.npz works as the reference as is.")
    fid.add_argument("--samples", required=True, help="ADM .npz (arr_0 uint8 NHWC) or .npy of images")
    fid.add_argument("--ref", required=True, help=".npz with mu and sigma")
    fid.add_argument("--weights", default=None, help=weights_help)
    fid.add_argument("--batch-size", type=int, default=50)
    fid.add_argument("--device", default=None)
    fid.add_argument("--out", default=None, help="also write the result as JSON here")
    fid.add_argument("--json", action="store_true")
    fid.set_defaults(func=_fid)

    fd = sub.add_parser("fd", help="Frechet distance between two feature sets or statistics files",
                        description="Each side: a .npy of features (n, D) or an .npz with mu and sigma.")
    fd.add_argument("--a", required=True)
    fd.add_argument("--b", required=True)
    fd.add_argument("--json", action="store_true")
    fd.set_defaults(func=_fd)

    rs = sub.add_parser("ref-stats", help="Inception mu/sigma of an image folder (a custom FID reference)")
    rs.add_argument("--images", required=True, help="folder of images (searched recursively)")
    rs.add_argument("--out", required=True, help="output .npz (mu, sigma)")
    rs.add_argument("--size", type=int, default=256, help="ADM center-crop size (default: 256)")
    rs.add_argument("--weights", default=None, help=weights_help)
    rs.add_argument("--batch-size", type=int, default=50)
    rs.add_argument("--workers", type=int, default=0)
    rs.add_argument("--device", default=None)
    rs.add_argument("--json", action="store_true")
    rs.set_defaults(func=_ref_stats)

    dig = sub.add_parser("export-digits", help="write scikit-learn's bundled digits as a PNG class folder",
                         description="The offline demo data: 1,797 8x8 digits in ten class folders, as PNG.")
    dig.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    dig.add_argument("--json", action="store_true")
    dig.set_defaults(func=_export_digits)

    bench = sub.add_parser("bench", help="measurements against named anchors").add_subparsers(
        dest="bench", required=True, metavar="target")
    bg = bench.add_parser("gmm", help="our EM vs scikit-learn GaussianMixture(diag), same start and iterations",
                          description="Time our EM and scikit-learn's on the same float32 data, initial parameters "
                                      "and iteration count; print one JSON object as the last line.")
    bg.add_argument("--n", type=int, default=50000)
    bg.add_argument("--d", type=int, default=64)
    bg.add_argument("--k", type=int, default=256)
    bg.add_argument("--iters", type=int, default=10)
    bg.add_argument("--seed", type=int, default=0)
    bg.add_argument("--repeats", type=int, default=3, help="timed runs per side; the fastest is reported")
    bg.add_argument("--device", default="cpu")
    bg.add_argument("--imagenet-scale", action="store_true",
                    help="ours only, at N = 1.28M, D = 768, K = 8192 (synthetic; meant for a GPU)")
    bg.add_argument("--json", action="store_true", help="print only the JSON line")
    bg.set_defaults(func=_bench_gmm)

    be = bench.add_parser("encode", help="encode throughput end to end vs the encoder alone; shard reads vs .npy",
                          description="On synthetic ~500x375 JPEGs in a temporary folder; the default encoder is "
                                      "a random DINOv2-with-registers ViT-S/14 at 224 px.")
    be.add_argument("--encoder", default="dinov2", choices=["pixels", "dinov2", "siglip2", "mae"])
    be.add_argument("--encoder-path", default=None, help="weights folder (default for dinov2: a random ViT-S/14)")
    be.add_argument("--images", type=int, default=128)
    be.add_argument("--batch-size", type=int, default=32)
    be.add_argument("--workers", type=int, default=1, help="DataLoader processes")
    be.add_argument("--device", default="cpu")
    be.add_argument("--seed", type=int, default=0)
    be.add_argument("--json", action="store_true", help="print only the JSON line")
    be.set_defaults(func=_bench_encode)

    bt = bench.add_parser("train", help="training steps/s, samples/s, counted FLOPs per sample and MFU (GPU)",
                          description="The training loop's own optimizer step (coupling, bf16 autocast on CUDA, "
                                      "fused AdamW, EMA) of a DiTDH preset on synthetic latents; counts the host "
                                      "syncs per step and, with --compile, the graph breaks.")
    bt.add_argument("--preset", default="ditdh-s", help="ditdh-s, -b, -l, -xl, -demo, -tiny (default: %(default)s)")
    bt.add_argument("--batch", type=int, default=8, help="micro-batch (default: %(default)s)")
    bt.add_argument("--steps", type=int, default=5, help="timed steps")
    bt.add_argument("--warmup", type=int, default=2)
    bt.add_argument("--channels", type=int, default=768, help="latent token width")
    bt.add_argument("--tokens", type=int, default=256, help="latent tokens (a square)")
    bt.add_argument("--device", default=None, help="default: cuda if available")
    bt.add_argument("--compile", action="store_true", help="torch.compile the network")
    bt.add_argument("--conditioning", default="none", choices=["none", "class", "mode"],
                    help="none (Gaussian source), class (1000 labels) or mode (GMM source, mode coupling)")
    bt.add_argument("--modes", type=int, default=64, help="GMM modes for --conditioning mode (default: %(default)s)")
    bt.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    bt.add_argument("--method", default="fm", choices=["fm", "gmflow", "dmf", "dfm"],
                    help="gmflow: GMFlow's step; dmf: the DMF fine-tune's step (JVP, and the central difference as "
                         "fd); each with the fm step of the same preset measured beside it")
    bt.add_argument("--json", action="store_true", help="print only the JSON line")
    bt.set_defaults(func=_bench_train)

    bs = bench.add_parser("stream", help="rows/s of one rank's shuffled shard stream vs what its GPU consumes",
                          description="The training loop's shard stream (shuffled, buffered, read ahead in a "
                                      "thread) over --shards or synthetic shards of the preset's geometry, beside "
                                      "the rows/s one GPU trains on at --mfu.")
    bs.add_argument("--shards", default=None, help="a folder, file or glob of shards (default: synthetic)")
    bs.add_argument("--rows", type=int, default=4096, help="synthetic rows (default: %(default)s)")
    bs.add_argument("--side", type=int, default=16, help="synthetic token grid side (default: %(default)s)")
    bs.add_argument("--channels", type=int, default=768, help="synthetic token width (default: %(default)s)")
    bs.add_argument("--cls-dim", type=int, default=768, help="synthetic CLS width (default: %(default)s)")
    bs.add_argument("--batch", type=int, default=128, help="rows per rank and step (XL: 1024 / 8 GPUs)")
    bs.add_argument("--buffer-rows", type=int, default=4096, help="shuffle buffer (train.buffer_rows)")
    bs.add_argument("--batches", type=int, default=16, help="timed batches")
    bs.add_argument("--preset", default="ditdh-xl", help="the DiTDH the GPU trains (default: %(default)s)")
    bs.add_argument("--gpu", default="h100-80gb", help="a100-40gb, a100-80gb, h100-80gb, h200")
    bs.add_argument("--mfu", type=float, default=0.4, help="the GPU's model FLOPs utilization (default: 0.4)")
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--json", action="store_true", help="print only the JSON line")
    bs.set_defaults(func=_bench_stream)

    bc = bench.add_parser("checkpoint", help="seconds and bytes of a training checkpoint (the stop-signal lead time)",
                          description="Write and read back the checkpoint a run of the preset writes on a stop "
                                      "signal (model, EMA, AdamW, ...), beside a plain sequential write of the same "
                                      "bytes; recommends SLURM's --signal lead time.")
    bc.add_argument("--preset", default="ditdh-xl", help="DiTDH preset (default: %(default)s)")
    bc.add_argument("--out-dir", default=None,
                    help="where to write (default: the current directory; use the runs' filesystem)")
    bc.add_argument("--channels", type=int, default=768, help="latent token width")
    bc.add_argument("--tokens", type=int, default=256, help="latent tokens")
    bc.add_argument("--seed", type=int, default=0)
    bc.add_argument("--keep", action="store_true", help="keep the files")
    bc.add_argument("--json", action="store_true", help="print only the JSON line")
    bc.set_defaults(func=_bench_checkpoint)

    from mmfm.plan.gpus import DEFAULT_GPU, GPUS

    pl = sub.add_parser("plan", help="jobs, bytes, memory, FLOPs and GPU-hours of a config's DAG, before it runs",
                        description="For every rule of the config's DAG: its jobs, the bytes they write, the peak "
                                    "host memory per job, the GPU memory per rank (traced on fake tensors), FLOPs "
                                    "and GPU-hours at an MFU; flags every job whose needs exceed its resources. "
                                    "Needs no artifact: missing ones are notes (docs/plan.md).")
    pl.add_argument("--configfile", default=None, help="the workflow config (default: config.yaml, as snakemake)")
    pl.add_argument("--config", nargs="+", default=None, metavar="KEY=VALUE",
                    help="override config keys as snakemake's --config does (YAML values, mappings merged)")
    pl.add_argument("--gpu", default=DEFAULT_GPU, metavar="KIND",
                    help=f"GPU kind: {', '.join(GPUS)} (default: %(default)s)")
    pl.add_argument("--mfu", type=float, default=None, help="model FLOPs utilization for the hours (default: 0.4)")
    pl.add_argument("--mfu-from", default=None, metavar="FILE",
                    help="the MFU measured by `mmfm bench train --json` (its output saved to FILE)")
    pl.add_argument("--profile", default=None,
                    help="Snakemake profile whose retries and stop-signal lead apply (default: profiles/slurm)")
    pl.add_argument("--directory", default=".", help="working directory of the workflow (relative config paths)")
    pl.add_argument("--disk", default=None, help="space for results/, e.g. 2TB (default: free space here)")
    pl.add_argument("--no-cache", action="store_true", help="trace again (traces are cached in ~/.cache/mmfm/plan)")
    pl.add_argument("--strict", action="store_true", help="exit 1 when a job (or the disk) does not fit")
    pl.add_argument("--json", action="store_true", help="also print the plan as one JSON object, the last line")
    pl.set_defaults(func=_plan)

    ck = sub.add_parser("check", help="verify every artifact of a results folder; print the command that rebuilds "
                                      "the bad ones",
                        description="Reads every shard (Parquet page checksums, metadata, row counts), safetensors "
                                    "file (header against size, sidecar, GMM and export metadata against the "
                                    "tensors), checkpoint and sample .npz of RESULTS; prints each bad file "
                                    "(path: reason) and the one snakemake command that recreates them and "
                                    "everything after them. Exit status 1 when a file is bad.")
    ck.add_argument("results", nargs="?", default="results", help="the results folder (default: %(default)s)")
    ck.add_argument("--configfile", default=None, help="the run's --configfile, put into the printed command")
    ck.add_argument("--quick", action="store_true", help="headers and sizes only (no Parquet page or .npz reads)")
    ck.add_argument("--json", action="store_true", help="also print the findings as one JSON object, the last line")
    ck.set_defaults(func=_check)

    rp = sub.add_parser("report", help="write summary.json and the results page (index.html) from what exists",
                        description="Builds RESULTS/summary.json and RESULTS/index.html, the page the report rule "
                                    "writes, from whatever the workflow has written so far: runs still training or "
                                    "failed are listed as missing, and nothing missing stops the page.")
    rp.add_argument("results", nargs="?", default=None, help="the results folder (default: the config's results_dir)")
    rp.add_argument("--configfile", default=None, help="the workflow config (default: config.yaml, as snakemake)")
    rp.add_argument("--directory", default=".", help="the working directory the config's paths are relative to")
    rp.add_argument("--device", default="cpu", help="where the data and mode-mean grids are decoded")
    rp.add_argument("--no-decode", action="store_true", help="skip the decoded grids (data, mode means)")
    rp.set_defaults(func=_report)
    return parser


def _enable_faulthandler() -> None:
    """A fatal signal (SIGSEGV, SIGBUS, SIGABRT, ...) still writes every thread's traceback to standard error:
    the job's log in the workflow, and that of each worker started by ``mmfm train`` / ``mmfm sample``."""
    import faulthandler

    if faulthandler.is_enabled():
        return
    for f in (sys.stderr, sys.__stderr__):
        try:
            faulthandler.enable(file=f)
            return
        except (AttributeError, ValueError, OSError):  # no file descriptor (a captured stream)
            continue


def main(argv: list[str] | None = None) -> int:
    _enable_faulthandler()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what `train --nproc` and `sample --nproc` relaunch under torchrun
    try:
        return args.func(args)
    except ValueError as err:  # bad input: one clear line, no traceback
        print(f"mmfm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
