"""Megatron-LM integration against the real upstream files: megatron-core 0.19.2's wheel ships
``megatron/training`` (``checkpointing.py``, ``arguments.py``). The wheel is fetched once with pip into
``~/.cache/ucp_plugin/`` and unpacked into a temporary folder (never installed); the tests skip only if
pip cannot reach the package index.

(a) ``patches/apply_megatron_lm.py``: applies cleanly, twice is a no-op, reverts to the original bytes,
    the result compiles and forwards every argument, other versions and edited files are refused.
(b) ``flags.add_ucp_args`` through 0.19.2's own ``parse_args(extra_args_provider=...)``, in a subprocess
    with the unpacked wheel first on ``sys.path`` (see ``PARSE_SCRIPT`` for the two import shims).
(c) the bridge ``megatron_lm`` translating Megatron-LM's objects for the adapter (fakes, no processes).
"""
from __future__ import annotations

import argparse
import ast
import glob
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import types
import zipfile

import pytest

from ucp_plugin.errors import FormatError, UnsupportedError
from ucp_plugin.integrations.megatron_lm import checkpointing as megatron_lm
from ucp_plugin.integrations.megatron_lm.flags import FAMILIES, UcpOptions, add_ucp_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "patches", "apply_megatron_lm.py")
VERSION = "0.19.2"
CKPT = os.path.join("megatron", "training", "checkpointing.py")
INFO = os.path.join("megatron", "core", "package_info.py")
# pip's words when it cannot read the index ("from versions: none" for a package with 30 releases)
OFFLINE = re.compile(r"Failed to establish a new connection|Max retries exceeded|Temporary failure in "
                     r"name resolution|Network is unreachable|Connection refused|ConnectionError|"
                     r"Could not fetch URL|timed out|from versions: none", re.I)


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ucp_plugin")


def _wheel() -> str:
    """The cached megatron-core 0.19.2 wheel, downloaded with pip on first use."""
    cache = _cache_dir()
    pattern = os.path.join(cache, f"megatron_core-{VERSION}-*.whl")
    for path in glob.glob(pattern):
        if zipfile.is_zipfile(path):
            return path
        os.remove(path)  # a truncated download
    os.makedirs(cache, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--ignore-requires-python",
               "--retries", "2", "--timeout", "30", f"megatron-core=={VERSION}", "-d", cache]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    found = glob.glob(pattern)
    if out.returncode != 0 or not found:
        log = out.stdout + out.stderr
        if OFFLINE.search(log):
            pytest.skip(f"the package index is unreachable, cannot fetch megatron-core=={VERSION}: "
                        f"{log.strip().splitlines()[-1]}")
        pytest.fail(f"pip download megatron-core=={VERSION} failed:\n{log}")
    return found[0]


@pytest.fixture(scope="session")
def upstream(tmp_path_factory) -> str:
    """A pristine, unpacked copy of the wheel's ``megatron/`` (read-only by convention)."""
    root = str(tmp_path_factory.mktemp(f"megatron-core-{VERSION}"))
    with zipfile.ZipFile(_wheel()) as z:
        z.extractall(root, [n for n in z.namelist() if n.startswith("megatron/")])
    return root


@pytest.fixture
def tree(upstream, tmp_path) -> str:
    """A scratch Megatron-LM root holding the two files the patch tool reads."""
    for rel in (CKPT, INFO):
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        shutil.copy2(os.path.join(upstream, rel), tmp_path / rel)
    return str(tmp_path)


def _tool():
    """The tool as a module (``patches/`` is not a package)."""
    if "apply_megatron_lm" not in sys.modules:
        spec = importlib.util.spec_from_file_location("apply_megatron_lm", TOOL)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["apply_megatron_lm"]


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=60)


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# (a) the patch tool ----------------------------------------------------------------------------

def test_applies_cleanly_then_is_a_no_op_then_reverts(tree):
    target = os.path.join(tree, CKPT)
    original = _read(target)
    assert _cli(tree, "--check").returncode == 0 and _read(target) == original
    out = _cli(tree)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(": applied") == 2
    patched, mtime = _read(target), os.stat(target).st_mtime_ns
    assert patched != original
    compile(patched, target, "exec")
    again = _cli(tree)
    assert again.returncode == 0 and again.stdout.count("already applied") == 2
    assert _read(target) == patched and os.stat(target).st_mtime_ns == mtime  # not even rewritten
    assert _cli(tree, "--revert").returncode == 0 and _read(target) == original


def test_patch_files_are_plain_unified_diffs(tree):
    """``patch -p1`` / ``git apply`` give the same bytes as the tool (when git is installed)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    tool = _tool()
    patches = [os.path.join(tool.HERE, name) for name in tool.PATCHES]
    other = tree + "-git"
    shutil.copytree(tree, other)
    out = subprocess.run(["git", "apply", *patches], cwd=other, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    tool.run(tree)
    assert _read(os.path.join(other, CKPT)) == _read(os.path.join(tree, CKPT))


def _delegation(fn: ast.FunctionDef) -> ast.Call:
    """The call the patch puts first in ``fn``:
    ``if ...: from ucp_plugin.integrations import megatron_lm; return megatron_lm.<fn>(...)``."""
    first = fn.body[1]  # body[0] is the docstring
    assert isinstance(first, ast.If) and "universal_checkpoint" in ast.unparse(first.test)
    ret = first.body[-1]
    assert isinstance(ret, ast.Return) and ast.unparse(ret.value.func) == f"megatron_lm.{fn.name}"
    return ret.value


def test_patched_functions_forward_every_argument_to_the_bridge(tree):
    _tool().run(tree)
    module = ast.parse(_read(os.path.join(tree, CKPT)))
    functions = {n.name: n for n in module.body if isinstance(n, ast.FunctionDef)}
    for name in ("save_checkpoint", "load_checkpoint"):
        fn = functions[name]
        params = [a.arg for a in fn.args.args]
        call = _delegation(fn)
        forwarded = [ast.unparse(a) for a in call.args] + [k.arg for k in call.keywords]
        assert forwarded == params, name
        assert all(ast.unparse(k.value) == k.arg for k in call.keywords), name
        ours = inspect.signature(getattr(megatron_lm, name)).parameters
        assert list(ours) == params, f"megatron_lm.{name} must keep upstream's signature"
        defaults = dict(zip(params[len(params) - len(fn.args.defaults):], fn.args.defaults))
        for arg, node in defaults.items():
            assert ours[arg].default == ast.literal_eval(node), (name, arg)


def test_refuses_an_edited_file_and_writes_nothing(tree):
    target = os.path.join(tree, CKPT)
    text = _read(target).decode()
    anchor = ("falls back to mpu API)\n    \"\"\"\n    args = get_args()\n"
              "    load_dir = getattr(args, load_arg)\n")
    assert text.count(anchor) == 1  # load_checkpoint's first lines, inside the hunk's context
    edited = text.replace(anchor, anchor.replace("getattr(args, load_arg)", "args.load"))
    with open(target, "w") as f:
        f.write(edited)
    out = _cli(tree)
    assert out.returncode == 1
    assert target in out.stderr and "load_checkpoint.patch does not apply" in out.stderr
    assert "0.19.0 to 0.19.2" in out.stderr
    assert _read(target).decode() == edited  # the save hunk, which matched, was not written either


def test_refuses_another_version(tree):
    info = os.path.join(tree, INFO)
    text = _read(info).decode()
    with open(info, "w") as f:
        f.write(re.sub(r"^MINOR = 19$", "MINOR = 18", text, flags=re.M))
    out = _cli(tree)
    assert out.returncode == 1
    assert info in out.stderr and "0.18.2 is outside the supported range" in out.stderr
    assert "0.19.0 to 0.19.2" in out.stderr and "--any-version" in out.stderr
    assert _cli(tree, "--any-version").returncode == 0  # the text itself still matches


def test_refuses_a_root_without_megatron(tmp_path):
    out = _cli(str(tmp_path))
    assert out.returncode == 1 and "package_info.py: not found" in out.stderr


def test_flag_families_match_the_adapter():
    from ucp_plugin.models import FAMILIES as ADAPTER_FAMILIES

    assert FAMILIES == ADAPTER_FAMILIES


# (b) the flags through Megatron-LM 0.19.2's parse_args ------------------------------------------

PARSE_SCRIPT = r'''
import json, sys, types, importlib.machinery
wheel_root, repo, pristine = sys.argv[1:4]

# Shim 1: 0.19.2's megatron.core imports triton kernels at module level (MoE paged stash, ...); triton is
# not installed here. torch's compile stack is imported first so it records "no triton"; the stub only
# satisfies megatron's module-level imports (no kernel runs while parsing arguments).
import torch._dynamo, torch._inductor.codecache, torch._functorch.aot_autograd  # noqa: E401

class _Any:
    def __init__(self, *a, **k): pass
    def __call__(self, *a, **k):
        return a[0] if len(a) == 1 and callable(a[0]) and not k else _Any()
    def __getattr__(self, name): return _Any()
    def __getitem__(self, key): return _Any()

class _Stub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Any()

for name in ("triton", "triton.language", "triton.runtime", "triton.language.extra",
             "triton.language.extra.cuda"):
    stub = _Stub(name)
    stub.__path__, stub.__version__ = [], "0.0.0"
    stub.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    sys.modules[name] = stub
# Shim 2: 0.19.2 declares Python >= 3.12 and imports typing.override (3.12); backport it.
import typing, typing_extensions
typing.override = getattr(typing, "override", typing_extensions.override)

sys.path[:0] = [wheel_root, repo]
import megatron.core, megatron.training.arguments as arguments
from megatron.training import checkpointing
from ucp_plugin.integrations.megatron_lm import checkpointing as megatron_lm
from ucp_plugin.integrations.megatron_lm.flags import UcpOptions, add_ucp_args
assert arguments.__file__.startswith(wheel_root) and megatron.core.__file__.startswith(wheel_root)
result = {"unpatched_here": megatron_lm.unpatched_functions(checkpointing)}

def parse(argv, ignore_unknown):
    sys.argv = ["pretrain_gpt.py"] + argv
    args = arguments.parse_args(extra_args_provider=add_ucp_args, ignore_unknown_args=ignore_unknown)
    keys = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "save", "load",
            "universal_checkpoint", "universal_load_verify", "universal_model_family", "num_experts")
    return dict({k: getattr(args, k) for k in keys}, options=repr(UcpOptions.from_args(args)))

base = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--save", "X",
        "--load", "X"]
result["plain"] = parse(base, False)
result["ucp"] = parse(base + ["--universal-checkpoint"], False)
result["ucp_unknown"] = parse(base + ["--universal-checkpoint", "--no-universal-load-verify",
                                      "--num-experts", "4", "--not-a-megatron-flag", "1"], True)
result["family"] = parse(base + ["--universal-model-family", "llama"], False)

# The same flag against the unpatched upstream module is refused at parse time.
spec = importlib.util.spec_from_file_location("megatron.training._pristine_checkpointing", pristine)
original = importlib.util.module_from_spec(spec)
spec.loader.exec_module(original)
result["unpatched_pristine"] = megatron_lm.unpatched_functions(original)
sys.modules["megatron.training.checkpointing"] = original
import megatron.training
megatron.training.checkpointing = original
try:
    parse(base + ["--universal-checkpoint"], False)
    result["refused"] = None
except SystemExit as e:
    result["refused"] = e.code
print("RESULT " + json.dumps(result))
'''


@pytest.mark.slow
def test_flags_parse_with_megatron_lm_parse_args(upstream, tmp_path):
    """Megatron-LM 0.19.2's ``parse_args(extra_args_provider=add_ucp_args)`` on a patched copy of the
    wheel (about 15 s: importing 0.19.2's megatron.core)."""
    root = str(tmp_path / "megatron-lm")
    shutil.copytree(upstream, root)
    _tool().run(root)
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    script = tmp_path / "parse.py"
    script.write_text(PARSE_SCRIPT)
    out = subprocess.run([sys.executable, str(script), root, REPO, os.path.join(upstream, CKPT)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    r = json.loads(lines[0][len("RESULT "):])
    assert r["unpatched_here"] == [] and r["unpatched_pristine"] == ["save_checkpoint", "load_checkpoint"]
    assert r["plain"]["universal_checkpoint"] is False and r["plain"]["universal_load_verify"] is True
    ucp = r["ucp"]
    assert (ucp["tensor_model_parallel_size"], ucp["pipeline_model_parallel_size"]) == (2, 2)
    assert (ucp["save"], ucp["load"], ucp["universal_checkpoint"]) == ("X", "X", True)
    assert ucp["options"] == "UcpOptions(enabled=True, load_verify=True, family='gpt')"
    assert r["ucp_unknown"]["options"] == "UcpOptions(enabled=True, load_verify=False, family='mixtral')"
    assert r["family"]["options"] == "UcpOptions(enabled=False, load_verify=True, family='llama')"
    assert r["refused"] == 2
    assert "checkpointing.py: save_checkpoint and load_checkpoint not patched" in out.stderr
    assert "patches/apply_megatron_lm.py" in out.stderr


# (c) the bridge, with a fake adapter --------------------------------------------------------------

class _Scheduler:
    def __init__(self):
        self.loaded = None

    def state_dict(self):
        return {"num_steps": 7}

    def load_state_dict(self, state):
        self.loaded = state


class _Optimizer:
    reloaded = False

    def reload_model_params(self):
        self.reloaded = True


def _args(tmp_path, **kw) -> argparse.Namespace:
    args = add_ucp_args(argparse.ArgumentParser()).parse_args([])
    defaults = dict(universal_checkpoint=True, save=str(tmp_path / "ckpt"), load=str(tmp_path / "ckpt"),
                    finetune=False, no_save_optim=False, no_load_optim=False, fp16=False, bf16=True,
                    consumed_train_samples=64, skipped_train_samples=1, consumed_valid_samples=8,
                    pretrained_checkpoint=None, ckpt_step=None, async_save=False, num_experts=None)
    vars(args).update(defaults, **kw)
    return args


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """Megatron-LM's args, the adapter and the microbatch calculator, recorded."""
    calls = types.SimpleNamespace(save=[], load=[], microbatches=[], args=_args(tmp_path))
    adapter = types.ModuleType("ucp_plugin.megatron.checkpoint")

    def save_universal(model_chunks, optimizer, save_dir, tag, iteration, scheduler_state, extra_state,
                       **kw):
        calls.save.append(dict(locals()))
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        with open(os.path.join(save_dir, "latest"), "w") as f:
            f.write(tag)

    def load_universal(model_chunks, optimizer, load_dir, tag=None, **kw):
        calls.load.append(dict(locals()))
        saved = calls.save[-1]
        return dict(iteration=saved["iteration"], scheduler_state=saved["scheduler_state"],
                    extra_state=saved["extra_state"])

    adapter.save_universal, adapter.load_universal = save_universal, load_universal
    calculator = types.ModuleType("megatron.core.num_microbatches_calculator")
    calculator.update_num_microbatches = lambda consumed_samples, verbose: calls.microbatches.append(
        consumed_samples)
    monkeypatch.setitem(sys.modules, "ucp_plugin.megatron.checkpoint", adapter)
    monkeypatch.setitem(sys.modules, "megatron.core.num_microbatches_calculator", calculator)
    monkeypatch.setattr(megatron_lm, "megatron_args", lambda: calls.args)
    return calls


def test_bridge_save_then_load_round_trips_progress(fake):
    chunks, opt, sched = ["chunk0", "chunk1"], _Optimizer(), _Scheduler()
    assert megatron_lm.save_checkpoint(100, chunks, opt, sched, 1.5e12) is None
    s = fake.save[0]
    assert (s["model_chunks"], s["optimizer"], s["tag"], s["iteration"]) == (chunks, opt, "iter_0000100", 100)
    assert s["save_dir"] == fake.args.save and s["scheduler_state"] == {"num_steps": 7}
    assert s["kw"] == {"family": "gpt", "async_save": False}
    assert s["extra_state"] == {"consumed_train_samples": 64, "skipped_train_samples": 1,
                                "consumed_valid_samples": 8, "num_floating_point_operations_so_far": 1.5e12}
    vars(fake.args).update(consumed_train_samples=0, skipped_train_samples=0, consumed_valid_samples=0,
                           universal_load_verify=False)
    sched2 = _Scheduler()
    assert megatron_lm.load_checkpoint(chunks, opt, sched2) == (100, 1.5e12)
    ld = fake.load[0]
    assert (ld["optimizer"], ld["load_dir"], ld["tag"], ld["kw"]) == (opt, fake.args.load, None,
                                                                      {"verify": False})
    assert sched2.loaded == {"num_steps": 7} and not opt.reloaded
    assert (fake.args.consumed_train_samples, fake.args.consumed_valid_samples) == (64, 8)
    assert fake.microbatches == [64]


def test_bridge_async_save_is_asynchronous(fake):
    fake.args.async_save = True
    megatron_lm.save_checkpoint(4, ["c"], _Optimizer(), _Scheduler(), 0)
    assert fake.save[-1]["kw"] == {"family": "gpt", "async_save": True}


def test_bridge_finetune_and_no_load_optim_follow_megatron_lm(fake):
    megatron_lm.save_checkpoint(5, ["c"], _Optimizer(), _Scheduler(), 10)
    fake.args.no_load_optim = True
    opt, sched = _Optimizer(), _Scheduler()
    assert megatron_lm.load_checkpoint(["c"], opt, sched) == (5, 10)
    assert fake.load[-1]["optimizer"] is None and sched.loaded is None and opt.reloaded
    fake.args.no_load_optim, fake.args.finetune, fake.args.consumed_train_samples = False, True, 0
    assert megatron_lm.load_checkpoint(["c"], _Optimizer(), None) == (0, 10)
    assert fake.load[-1]["optimizer"] is None and fake.args.consumed_train_samples == 0


def test_bridge_load_without_a_checkpoint_starts_from_scratch(fake, tmp_path):
    fake.args.load = str(tmp_path / "empty")
    assert megatron_lm.load_checkpoint(["c"], None, None) == (0, 0) and not fake.load
    fake.args.load = None
    assert megatron_lm.load_checkpoint(["c"], None, None) == (0, 0)


def test_bridge_pretrained_checkpoint_and_ckpt_step(fake, tmp_path):
    fake.args.save = str(tmp_path / "pre")
    megatron_lm.save_checkpoint(3, ["c"], None, None, 0, release=True)
    assert fake.save[-1]["tag"] == "release" and fake.save[-1]["optimizer"] is None
    vars(fake.args).update(load=str(tmp_path / "nothing"), pretrained_checkpoint=fake.args.save, ckpt_step=3)
    assert megatron_lm.load_checkpoint(["c"], _Optimizer(), None) == (0, 0)
    assert fake.args.finetune and fake.load[-1]["load_dir"] == fake.args.save
    assert fake.load[-1]["tag"] == "iter_0000003"


def test_bridge_refusals_name_the_fix(fake, tmp_path):
    native = tmp_path / "native"
    native.mkdir()
    (native / megatron_lm.NATIVE_TRACKER).write_text("100")
    fake.args.load = str(native)
    with pytest.raises(FormatError, match="native checkpoint .* without --universal-checkpoint"):
        megatron_lm.load_checkpoint(["c"], None, None)
    vars(fake.args).update(load=str(tmp_path / "none"), pretrained_checkpoint=str(tmp_path / "none2"))
    with pytest.raises(FormatError, match="nor in --pretrained-checkpoint"):
        megatron_lm.load_checkpoint(["c"], None, None)
    with pytest.raises(UnsupportedError, match="non-persistent"):
        megatron_lm.save_checkpoint(1, ["c"], None, None, 0, non_persistent_ckpt=True)
    with pytest.raises(UnsupportedError, match="FSDP2"):
        megatron_lm.load_checkpoint(["c"], None, None, skip_load_to_model_and_opt=True)
    fake.args.save = None
    with pytest.raises(UnsupportedError, match="needs --save DIR"):
        megatron_lm.save_checkpoint(1, ["c"], None, None, 0)


def test_options_are_a_frozen_value_with_inferred_family():
    parse = add_ucp_args(argparse.ArgumentParser()).parse_args
    assert UcpOptions.from_args(parse([])) == UcpOptions(enabled=False, load_verify=True, family="gpt")
    swiglu = parse(["--universal-checkpoint", "--no-universal-load-verify"])
    swiglu.swiglu = True
    assert UcpOptions.from_args(swiglu) == UcpOptions(enabled=True, load_verify=False, family="llama")
    with pytest.raises(Exception):
        UcpOptions().family = "llama"
    with pytest.raises(ValueError, match="--universal-model-family"):
        UcpOptions(family="bert")
    with pytest.raises(ValueError, match="extra_args_provider"):
        UcpOptions.from_args(argparse.Namespace(save="x"))
