"""The ``ucp`` command line: inspect, verify, convert, export, import, validate.

Each subcommand parses its flags and calls a library function in ``ucp_plugin.tools`` with plain
values; no argparse namespace goes into the library. Exit codes: 0 ok, 1 problems found / not
loadable, 2 bad usage or an unreadable checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import UCPError


def _inspect(args) -> int:
    from ..tools.inspect import render, report
    r = report(args.path)
    print(json.dumps(r.to_json(), indent=1) if args.json else render(r))
    return 0


def _verify(args) -> int:
    from ..tools.verify import verify
    problems = verify(args.path, hashes=not args.no_hashes)
    for p in problems:
        print(p)
    print(f"{args.path}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def _convert(args) -> int:
    if args.to == "deepspeed":
        from ..tools.ds_ucp import to_deepspeed
        out = to_deepspeed(args.path, args.out, progress=sys.stderr.isatty())
        print(f"wrote DeepSpeed universal checkpoint {out} (resume with \"checkpoint\": {{\"load_universal\": true}})")
        return 0
    from ..dsfiles.native import is_native
    from ..format import MANIFEST
    if not os.path.isfile(os.path.join(args.path, MANIFEST)) and is_native(args.path):
        from ..tools.native_convert import convert_native
        out = convert_native(args.path, args.out, workers=args.workers, progress=sys.stderr.isatty())
        print(f"wrote universal checkpoint {out} from the native DeepSpeed checkpoint {args.path}")
        return 0
    from ..tools.convert import convert
    out = convert(args.path, args.out)
    print(f"wrote consolidated checkpoint {out}")
    return 0


def _size(text: str) -> int:
    """``5GB``, ``200MB``, ``512KB`` or a byte count."""
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
    text = text.strip().upper()
    try:
        for unit, scale in units.items():
            if text.endswith(unit):
                return int(float(text[:-2]) * scale)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 200MB, 1000000)") from None


def _export(args) -> int:
    if args.to == "hf":
        from ..tools.hf_export import export_hf
        out = export_hf(args.path, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                        config=args.config, progress=sys.stderr.isatty())
        print(f"wrote Hugging Face model {out} (AutoModelForCausalLM.from_pretrained)")
        return 0
    from ..tools.convert import export_weights
    out = export_weights(args.path, args.out, dtype=args.dtype)
    print(f"wrote {out}")
    return 0


def _import(args) -> int:
    from ..tools.hf_import import import_hf
    out = import_hf(args.hf_dir, args.out, args.family, progress=sys.stderr.isatty())
    print(f"wrote weights-only universal checkpoint {out} (family {args.family})")
    return 0


def _validate(args) -> int:
    from ..tools.validate import validate
    verdict = validate(args.path, tp=args.tp, pp=args.pp, dp=args.dp, ep=args.ep, zero_stage=args.zero_stage,
                       etp=args.etp)
    print(verdict.render())
    return 0 if verdict.ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ucp", description="Universal checkpoint tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("inspect", help="print what a checkpoint is")
    s.add_argument("path")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=_inspect)
    s = sub.add_parser("verify", help="check completeness, hashes, shapes, dtypes, coverage")
    s.add_argument("path")
    s.add_argument("--no-hashes", action="store_true", help="skip whole-file SHA-256 checks")
    s.set_defaults(fn=_verify)
    s = sub.add_parser("convert", help="rewrite in consolidated form (one safetensors file per atom), or as "
                                       "DeepSpeed's universal folder (--to deepspeed)")
    s.add_argument("path")
    s.add_argument("out")
    s.add_argument("--to", default="consolidated", choices=["consolidated", "deepspeed"],
                   help="deepspeed: a folder stock DeepSpeed resumes with checkpoint.load_universal")
    s.add_argument("--workers", type=int, default=1,
                   help="threads converting a native DeepSpeed checkpoint (PATH without ucp.json)")
    s.set_defaults(fn=_convert)
    s = sub.add_parser("export", help="write the model weights as one safetensors file, or as a Hugging Face "
                                      "transformers folder (--to hf)")
    s.add_argument("path")
    s.add_argument("out")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--to", default="safetensors", choices=["safetensors", "hf"],
                   help="safetensors: one file under the checkpoint's names; hf: config.json + model.safetensors")
    s.add_argument("--max-shard-size", type=_size, default="5GB",
                   help="--to hf: split the weights into files of at most this size (default 5GB)")
    s.add_argument("--config", default=None,
                   help="--to hf, for a checkpoint of an HF model (no family): its config.json")
    s.set_defaults(fn=_export)
    s = sub.add_parser("import", help="a Hugging Face transformers folder as a weights-only universal "
                                      "checkpoint the megatron-core adapter loads at any TP/PP/EP")
    s.add_argument("hf_dir")
    s.add_argument("out")
    s.add_argument("--family", required=True, choices=["gpt", "llama", "mixtral"])
    s.set_defaults(fn=_import)
    s = sub.add_parser("validate", help="can this checkpoint be loaded on a layout? (exit 0/1)")
    s.add_argument("path")
    for flag in ("tp", "pp", "dp", "ep"):
        s.add_argument(f"--{flag}", type=int, default=1)
    s.add_argument("--etp", type=int, default=None,
                   help="expert-tensor-parallel size of megatron-core's expert layers (default: TP)")
    s.add_argument("--zero-stage", type=int, default=None)
    s.set_defaults(fn=_validate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except UCPError as e:
        print(f"ucp {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `ucp inspect ... | head`: the reader left, which is not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
