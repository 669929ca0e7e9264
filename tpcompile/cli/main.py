"""``python -m tpcompile``: explain or write the tensor-parallel plan of a model file.

How a model file names its model (first match wins):
  --model NAME           any callable in the file: a function or a class (called with no
                         arguments, or with config_name=--config)
  build_model()          a function returning the nn.Module; it takes config_name=... when
                         --config is given
  example_inputs(batch, seq)   optional: inputs for a batch x seq step (default: token ids for
                         a model that starts with an Embedding, [batch, seq, features] otherwise)
The model is built on the meta device: no weights, no process group, no GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import TPCompileError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class ModelFileError(TPCompileError):
    """A model file that does not say how to build its model."""


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def load_module(path: str) -> Any:
    file = Path(path)
    if not file.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    sys.path.insert(0, str(Path.cwd()))
    spec = importlib.util.spec_from_file_location(f"_tpcompile_model_{file.stem}", file)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = mod  # type: ignore[union-attr]  # dataclasses look themselves up
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def builder(mod: Any, path: str, name: str | None) -> Callable[..., nn.Module]:
    if name:
        fn = getattr(mod, name, None)
        if not callable(fn):
            found = sorted(k for k, v in vars(mod).items() if callable(v) and not k.startswith("_")
                           and getattr(v, "__module__", None) == mod.__name__)
            raise ModelFileError(f"{path} has no callable named {name!r}; callables defined "
                                 f"there: {', '.join(found) or 'none'}")
        return fn
    if callable(getattr(mod, "build_model", None)):
        return mod.build_model
    raise ModelFileError(
        f"{path} does not say which model to build. Add a function\n\n"
        "    def build_model(config_name: str = \"default\") -> nn.Module: ...\n\n"
        "(and optionally example_inputs(batch, seq) -> tuple), or pass --model NAME to "
        "pick a function or class defined in the file.")


def hf_config_path(path: str) -> Path | None:
    """A Hugging Face config.json, or a folder holding one."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        return p
    if p.is_file() and p.suffix == ".json":
        return p.parent if p.name == "config.json" else p
    return None


def build_hf(path: Path, args: argparse.Namespace) -> tuple[nn.Module, tuple | None, str, dict]:
    """A causal LM from a local HF config, on the meta device (no weights are read)."""
    try:
        import transformers
    except ImportError as e:
        raise ModelFileError(f"{path} is a Hugging Face config: pip install 'tpcompile[hf]' "
                             "(transformers) to explain it") from e
    import json
    cfg_file = path / "config.json" if path.is_dir() else path
    data = json.loads(cfg_file.read_text())
    model_type = data.get("model_type")
    if model_type is None:
        raise ModelFileError(f"{cfg_file} has no model_type; is it a Hugging Face config?")
    config = transformers.AutoConfig.for_model(**data)
    config.use_cache = False
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model = model.to(DTYPES[args.dtype])
    ids = torch.zeros(args.batch, args.seq, dtype=torch.long, device="meta")
    return model, None, f"{cfg_file} ({model_type})", {"input_ids": ids}


def build(args: argparse.Namespace) -> tuple[nn.Module, tuple | None, str, dict | None]:
    hf = hf_config_path(args.model_file)
    if hf is not None:
        return build_hf(hf, args)
    mod = load_module(args.model_file)
    fn = builder(mod, args.model_file, args.model)
    kwargs = {"config_name": args.config} if args.config else {}
    if kwargs and "config_name" not in inspect.signature(fn).parameters:
        raise ModelFileError(f"--config {args.config} given, but {fn.__name__}() takes no "
                             "config_name argument")
    with torch.device("meta"):
        try:
            model = fn(**kwargs)
        except Exception as e:  # noqa: BLE001 - the user's builder; named, not a traceback
            call = f"{fn.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
            raise ModelFileError(f"{args.model_file}: {call} raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelFileError(f"{fn.__name__}() returned {type(model).__name__}, not an nn.Module")
    model = model.to(DTYPES[args.dtype])
    inputs = None
    make = getattr(mod, "example_inputs", None)
    if callable(make) and not args.model:
        with torch.device("meta"):
            inputs = tuple(make(args.batch, args.seq))
    label = f"{args.model_file}:{fn.__name__}" + (f"({args.config})" if args.config else "")
    return model, inputs, label, None


def _checkpointing(text: str) -> int | str:
    if text in ("none", "block"):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r}: use none, block or a number of blocks")


def cmd_explain(args: argparse.Namespace) -> str:
    from . import render as R
    from .explain import explain
    model, inputs, label, kwargs = build(args)
    e, c = explain(model, tp=args.tp, dp=args.dp, batch=args.batch, seq=args.seq,
                   sequence_parallel=not args.no_sp, example_inputs=inputs,
                   example_kwargs=kwargs, name=label, plan=args.plan, tracer=args.tracer,
                   device=args.device, checkpointing=args.checkpointing)
    if args.format == "json":
        return e.model_dump_json(indent=2) + "\n"
    if args.format == "dot":
        return R.dot(c, args.block)
    if args.format == "html":
        return R.page(e, c, args.block)
    from ..suggest.table import predicted
    return R.text(e) + predicted(e.predicted)


def _on_meta(fn: Callable[[int, int], Any]) -> Callable[[int, int], Any]:
    def make(batch: int, seq: int) -> Any:
        with torch.device("meta"):
            return fn(batch, seq)
    return make


def cmd_suggest(args: argparse.Namespace) -> str:
    """The ranked meshes for ``--gpus`` GPUs (``tpcompile.suggest``), as a table or JSON."""
    from ..suggest import suggest, table
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(args.dtype, args.dtype)
    hf = hf_config_path(args.model_file)
    make: Callable[[int, int], Any] | None = None
    if hf is not None:
        model: Any = hf / "config.json" if hf.is_dir() else hf
        label = str(model)
    else:
        mod = load_module(args.model_file)
        fn = builder(mod, args.model_file, args.model)
        with torch.device("meta"):
            model = fn(**({"config_name": args.config} if args.config else {}))
        label = f"{args.model_file}:{fn.__name__}" + (f"({args.config})" if args.config else "")
        given = getattr(mod, "example_inputs", None)
        if callable(given) and not args.model:
            make = _on_meta(given)
    out = suggest(model, args.gpus, gpus_per_node=args.per_node, device=args.device,
                  global_batch=args.batch, seq_len=args.seq, dtype=dtype, optimizer=args.optimizer,
                  activation_checkpointing=args.checkpointing, example_inputs=make)
    if args.format == "json":
        import json
        return json.dumps([s.model_dump(mode="json") for s in out], indent=1) + "\n"
    title = (f"tpcompile suggest: {label} on {args.gpus} x {args.device} ({args.per_node} per "
             f"node), global batch {args.batch} x {args.seq}, {dtype}, {args.optimizer}, "
             f"checkpointing {args.checkpointing}")
    return table(out, title=title, top=args.top)


def cmd_plan(args: argparse.Namespace) -> str:
    from ..planning.build import plan
    from ..planning.files import dumps
    model, inputs, _, kwargs = build(args)
    p = plan(model, tp=args.tp, sequence_parallel=not args.no_sp, example_inputs=inputs,
             example_kwargs=kwargs, on_indivisible=args.on_indivisible, tracer=args.tracer)
    if args.output and args.output.endswith(".json"):
        return dumps(p, "json")
    return f"# written by: python -m tpcompile {' '.join(args.argv)}\n" + dumps(p, "yaml")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tpcompile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name, helptext in (("explain", "what tensor parallelism would do to the model"),
                           ("plan", "write the detected plan (YAML, or JSON for -o *.json)")):
        p = sub.add_parser(name, help=helptext, description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("model_file", help="a Python file that builds the model, or a Hugging "
                       "Face config.json (or a folder holding one)")
        p.add_argument("--tracer", choices=("auto", "export", "fx"), default="auto",
                       help="front end: torch.export, then fx if it fails (default auto)")
        p.add_argument("--model", help="callable in the file that builds the model")
        p.add_argument("--config", help="passed to the builder as config_name=")
        p.add_argument("--tp", type=positive, default=8, help="tensor-parallel degree (default 8)")
        p.add_argument("--no-sp", action="store_true", help="without sequence parallel")
        p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
        p.add_argument("-o", "--output", help="write here instead of stdout")
        if name == "explain":
            p.add_argument("--dp", type=positive, default=1, help="data-parallel (FSDP) degree")
            p.add_argument("--batch", type=positive, default=1, help="batch per dp rank (default 1)")
            p.add_argument("--seq", type=positive, default=2048, help="sequence length (default 2048)")
            p.add_argument("--format", choices=("text", "json", "dot", "html"), default="text")
            p.add_argument("--block", help="dot/html: the block to draw (default: the first)")
            p.add_argument("--plan", help="explain this plan file instead of the detected plan")
            p.add_argument("--device", default="h100-80gb", help="device preset (or preset "
                           "file) for the predicted memory and step time (default h100-80gb)")
            p.add_argument("--checkpointing", type=_checkpointing, default="none",
                           help="activation checkpointing the prediction assumes: none, block "
                           "(every block) or a number of blocks (default none)")
        else:
            p.add_argument("--on-indivisible", choices=("error", "replicate"), default="error")
    p = sub.add_parser("suggest", help="how to split the model over N GPUs: the mesh, sequence "
                       "parallelism and checkpointing, ranked by predicted step time",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_file", help="a Python file that builds the model, or a Hugging Face "
                   "config.json (or a folder holding one)")
    p.add_argument("--model", help="callable in the file that builds the model")
    p.add_argument("--config", help="passed to the builder as config_name=")
    p.add_argument("--gpus", type=positive, required=True, help="GPUs in the job (world size)")
    p.add_argument("--per-node", type=positive, default=8, help="GPUs per node (default 8)")
    p.add_argument("--device", default="h100-80gb", help="device preset: h100-80gb, a100-80gb, "
                   "a100-40gb, b200, cpu-gloo, or a preset file from tpcompile.calibrate()")
    p.add_argument("--batch", type=positive, required=True, help="global batch, in sequences")
    p.add_argument("--seq", type=positive, required=True, help="sequence length")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--optimizer", choices=("adamw", "adam", "sgd", "sgd_momentum", "adafactor"),
                   default="adamw")
    p.add_argument("--checkpointing", choices=("auto", "none", "block"), default="auto")
    p.add_argument("--top", type=positive, default=10, help="feasible rows to print (default 10)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("-o", "--output", help="write here instead of stdout")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    args.argv = argv
    if args.command == "plan":
        args.batch, args.seq = 2, 2 * args.tp
    commands = {"explain": cmd_explain, "plan": cmd_plan, "suggest": cmd_suggest}
    t0 = time.perf_counter()
    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)  # we report it
    try:
        out = commands[args.command](args)
    except TPCompileError as e:
        print(f"tpcompile: error: {e}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(out)
        print(f"wrote {args.output} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    else:
        sys.stdout.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
