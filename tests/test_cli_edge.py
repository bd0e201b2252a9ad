"""Edge cases of the command line and of the TOML / dataclass configuration: what a user typing a wrong value,
key, file or flag sees. Every case here stops before a model is loaded, so the file runs in about a second."""
import json
import math
from pathlib import Path

import pytest

from minitrain import __version__
from minitrain.cli import build_parser, main
from minitrain.cli_train import _settings
from minitrain.config import ConfigError, LoRAConfig, ModelConfig, TrainConfig, build, load_toml


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "hi"}\n')
    return p


def run(argv, capsys):
    """(exit status, stdout, stderr) of ``minitrain ARGV``; argparse's exits count as a status too."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line_error(rc, err):
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (rc, err)
    return err


# ---- the top-level command ------------------------------------------------------------------------------

def test_version_prints_and_exits_zero(capsys):
    rc, out, _ = run(["--version"], capsys)
    assert rc == 0 and out.strip() == f"minitrain {__version__}"


@pytest.mark.parametrize("argv,message", [([], "required: command"), (["trian"], "invalid choice: 'trian'")])
def test_no_or_unknown_subcommand_is_a_usage_error(capsys, argv, message):
    rc, _, err = run(argv, capsys)
    assert rc == 2 and "usage: minitrain" in err and message in err, err


@pytest.mark.parametrize("command,shown", [("train", "(default: 0.0002)"), ("merge", "(default: bf16)"),
                                           ("demo", "(default: 400)"),
                                           ("chat", "--temperature TEMPERATURE 0 = greedy (default: 0.0)"),
                                           ("nf4-check", "(default: bf16)"), ("convert-gguf", "(default: bf16)")])
def test_help_of_every_subcommand_lists_defaults(capsys, command, shown):
    rc, out, _ = run([command, "--help"], capsys)
    assert rc == 0 and shown in " ".join(out.split()), out


def test_train_help_shows_list_and_optional_defaults(capsys):
    _, out, _ = run(["train", "--help"], capsys)
    text = " ".join(out.split())
    assert "(default: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)" in text
    assert "flag > file > default" in text


# ---- precedence: flag > file > default --------------------------------------------------------------------

def test_flag_beats_file_beats_default(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("packing = true\nlearning_rate = 1e-4\nmax_steps = 7\n[lora]\nr = 4\n")
    args = build_parser().parse_args(["train", "--config", str(cfg), "--no-packing", "--max-steps", "9", "--lora-r", "8"])
    sections, _, origins = _settings(args)
    m, lo, t = build(sections, origins)
    assert (t.packing, t.max_steps, lo.r) == (False, 9, 8)  # flags
    assert t.learning_rate == 1e-4  # the file
    assert (t.gradient_accumulation_steps, lo.lora_alpha, m.max_seq_length) == (4, 16.0, 2048)  # defaults
    args = build_parser().parse_args(["train", "--packing"])
    assert build(_settings(args)[0])[2].packing is True


def test_keep_mlp_layers_auto_from_a_flag_and_a_file(tmp_path):
    """keep_mlp_layers is a number or "auto" (an int | str field): both spellings pass the flag and the TOML file."""
    args = build_parser().parse_args(["train", "--keep-mlp-layers", "auto", "--max-memory-gib", "7.5"])
    t = build(_settings(args)[0])[2]
    assert (t.keep_mlp_layers, t.max_memory_gib) == ("auto", 7.5)
    assert build(_settings(build_parser().parse_args(["train", "--keep-mlp-layers", "3"]))[0])[2].keep_mlp_layers == 3
    cfg = tmp_path / "run.toml"
    cfg.write_text('keep_mlp_layers = "AUTO"\n')
    assert build(load_toml(cfg)[0])[2].keep_mlp_layers == "auto"
    cfg.write_text('keep_mlp_layers = "most"\n')
    with pytest.raises(ConfigError, match="keep_mlp_layers must be a whole number >= 0, 'auto' or None"):
        build(load_toml(cfg)[0])


def test_resume_from_checkpoint_flag_as_the_readme_spells_it():
    args = build_parser().parse_args(["train", "--resume-from-checkpoint", "latest"])
    assert args.resume == "latest"
    assert build_parser().parse_args(["train", "--resume"]).resume == "latest"
    assert build_parser().parse_args(["train", "--output-dir", "o"]).output == "o"


# ---- TOML files ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,message", [
    ("[lora]\nrank = 8\n", r"\[lora\]: unknown key 'rank' (did you mean 'r'?)"),
    ("lr = 1e-4\n", "unknown key 'lr' (did you mean 'learning_rate'?)"),
    ("[lora]\nlearning_rate = 1e-4\n", "[lora]: unknown key 'learning_rate' (it is a [train] setting"),
    ("[train.optimizer]\nbeta = 1\n", "[train]: unknown key 'optimizer'"),
    ("train = 3\n", "'train' must be a table ([train]"),
    ("data = 3\n", "'data' must be a path or a list of paths"),
    ('data = [{path = "a.jsonl"}]\n', "'data' must be a path or a list of paths"),
    ("output = 5\n", "'output' must be str (a path), got 5"),
    ('eval_data = "ev.jsonl"\n', "'eval_data' is not supported; hold out part of the data with eval_split"),
    ("max_steps = [1, 2]\n", "'max_steps' must be int, got [1, 2]"),
    ("[lora]\nr = 2.5\n", r"[lora]: 'r' must be int, got 2.5"),
    ("learning_rate = 1e-4\nmax_steps = \n", "not valid TOML: Invalid value (at line 2, column 13)"),
])
def test_toml_errors_name_file_and_key(tmp_path, text, message):
    p = tmp_path / "run.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_toml(p)
    assert str(e.value).startswith(str(p)) and message.replace("\\", "") in str(e.value), str(e.value)


def test_toml_that_cannot_be_read_names_the_file(tmp_path, monkeypatch):
    p = tmp_path / "run.toml"
    p.write_bytes(b"learning_rate = 1e-4\n# caf\xe9\n")  # Latin-1, not UTF-8
    with pytest.raises(ConfigError, match=r"run.toml: not valid TOML: not UTF-8 text \(byte 26\)"):
        load_toml(p)

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ConfigError, match=r"config file .*run.toml: cannot read it \(Permission denied\)"):
        load_toml(p)
    with pytest.raises(ConfigError, match=r"config file .* not found \(it is a directory\)"):
        load_toml(tmp_path)


def test_unreadable_config_through_the_cli_is_one_line(tmp_path, data, capsys):
    p = tmp_path / "run.toml"
    p.write_text("data = 3\n")
    err = one_line_error(*run(["train", "--model", "m", "--config", p], capsys)[::2])
    assert f"{p}: 'data' must be a path" in err


# ---- values out of range: caught before the model loads, naming where the value came from ------------------

@pytest.mark.parametrize("toml,flags,message", [
    ("learning_rate = -1.0\n", ["--learning-rate", "-1"], "learning_rate must be a finite number >= 0, got -1.0"),
    ("learning_rate = nan\n", ["--learning-rate", "nan"], "learning_rate must be a finite number >= 0, got nan"),
    ("gradient_accumulation_steps = 0\n", ["--gradient-accumulation-steps", "0"],
     "gradient_accumulation_steps must be >= 1, got 0"),
    ("[lora]\nr = 0\n", ["--r", "0"], "r must be a positive integer (the adapter rank), got 0"),
    ("[lora]\nlora_dropout = 1.0\n", ["--lora-dropout", "1"], "lora_dropout must be in [0, 1), got 1.0"),
    ("[lora]\ninit = \"xavier\"\n", ["--init", "xavier"], "init must be one of 'default', 'gaussian', 'zeros'"),
    ("eval_split = 1.5\n", ["--eval-split", "1.5"], "eval_split must be a fraction in [0, 1) or a whole example count"),
    ("eval_split = -0.1\n", ["--eval-split", "-0.1"], "eval_split must be a fraction in [0, 1)"),
    ("max_seq_length = 0\n", ["--max-seq-length", "0"], "max_seq_length must be >= 1, got 0"),
    ("dtype = \"int8\"\n", ["--dtype", "int8"], "dtype must be one of 'bf16', 'fp16', 'fp32', got 'int8'"),
    ("adam_beta2 = 1.0\n", ["--adam-beta2", "1"], "adam_beta2 must be in [0, 1), got 1.0"),
    ("max_grad_norm = -1.0\n", ["--max-grad-norm", "-1"], "max_grad_norm must be a finite number >= 0"),
    ("warmup_steps = -5\n", ["--warmup-steps", "-5"], "warmup_steps must be >= 0, got -5"),
    ("num_train_epochs = -1.0\nmax_steps = 5\n", ["--num-train-epochs", "-1"], "num_train_epochs must be a finite"),
])
def test_bad_values_name_file_or_flag(tmp_path, data, capsys, toml, flags, message):
    cfg = tmp_path / "run.toml"
    cfg.write_text(toml)
    base = ["train", "--model", tmp_path / "no_model", "--data", data, "--output", tmp_path / "out"]
    err = one_line_error(*run(base + ["--config", cfg], capsys)[::2])
    assert f"{cfg}: {message}" in err, err
    err = one_line_error(*run(base + flags, capsys)[::2])
    assert f"--{flags[0].lstrip('-')}: {message}" in err, err


def test_dataclasses_refuse_bad_values_in_python_too():
    for cls, kw in [(TrainConfig, dict(eval_split=2.5)), (TrainConfig, dict(learning_rate=math.inf)),
                    (TrainConfig, dict(adam_beta1=-0.1)), (TrainConfig, dict(save_steps=-1)),
                    (LoRAConfig, dict(r=-2)), (LoRAConfig, dict(lora_alpha=0)), (LoRAConfig, dict(target_modules=[])),
                    (ModelConfig, dict(max_seq_length=-1))]:
        with pytest.raises(ConfigError, match=next(iter(kw))):
            cls(**kw)
    assert TrainConfig(eval_split=3.0).eval_split == 3.0 and TrainConfig(eval_split=0.05).eval_split == 0.05
    assert LoRAConfig(init="zeros").init == "zeros" and ModelConfig(dtype="fp32").dtype == "fp32"


# ---- paths ---------------------------------------------------------------------------------------------------

def test_unknown_data_extension_is_refused_before_the_model_loads(tmp_path, capsys):
    bad = tmp_path / "train.parquet"
    bad.write_bytes(b"PAR1")
    err = one_line_error(*run(["train", "--model", tmp_path / "no_model", "--data", bad], capsys)[::2])
    assert f"{bad}: unknown file type '.parquet'; expected one of .jsonl" in err, err


def test_missing_model_is_a_clear_error(tmp_path, data, capsys):
    err = one_line_error(*run(["train", "--model", tmp_path / "no_model", "--data", data,
                               "--output", tmp_path / "out"], capsys)[::2])
    assert f"{tmp_path / 'no_model'} is not a directory" in err, err


def previous_run(out: Path) -> None:
    (out / "checkpoint-100").mkdir(parents=True)
    (out / "checkpoint-100" / "trainer_state.json").write_text(json.dumps({"step": 100}))
    (out / "adapter").mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (out / "notes.txt").write_text("mine")


def test_previous_run_in_output_dir_is_not_silently_overwritten(tmp_path, data, capsys):
    out = tmp_path / "out"
    previous_run(out)
    base = ["train", "--model", tmp_path / "no_model", "--data", data, "--output", out]
    err = one_line_error(*run(base, capsys)[::2])
    assert f"output directory {out} holds a previous run (adapter, checkpoint-100, metrics.jsonl)" in err, err
    assert "--resume" in err and "--overwrite-output-dir" in err
    assert (out / "checkpoint-100").is_dir() and (out / "metrics.jsonl").is_file()
    # --resume continues that run: past the check (to the missing model)
    err = one_line_error(*run(base + ["--resume"], capsys)[::2])
    assert "is not a directory" in err and (out / "checkpoint-100").is_dir()
    # --overwrite-output-dir deletes the run's outputs, and says so; other files stay
    rc, stdout, err = run(base + ["--overwrite-output-dir"], capsys)
    assert "is not a directory" in one_line_error(rc, err)
    assert "deleted the previous run's adapter, checkpoint-100, metrics.jsonl" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # a directory with only other files is not a previous run
    assert "is not a directory" in one_line_error(*run(base, capsys)[::2])


def test_output_that_is_a_file_is_refused(tmp_path, data, capsys):
    out = tmp_path / "out"
    out.write_text("x")
    err = one_line_error(*run(["train", "--model", tmp_path / "m", "--data", data, "--output", out], capsys)[::2])
    assert f"output directory {out} is a file, not a directory" in err
