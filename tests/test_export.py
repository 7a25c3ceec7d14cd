"""The trained model as a model folder: RUN/final/ after a real run loads in plain transformers with the
checkpoint's outputs and in `treedistill eval`; `treedistill export --step N`; LoRA merged or adapter
only; the value head out of the top level, the earlier layout still read."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from treedistill.checkpoint import list_checkpoints, load_checkpoint
from treedistill.cli import main
from treedistill.errors import UsageError
from treedistill.models import load_policy
from treedistill.models.load import trained_model_folder
from treedistill.models.presets import TINY_FOLDER
from treedistill.models.value_head import FILENAME, SUBFOLDER, ValueHead, load_value_head, save_value_head

# Sizes that make a step take about a second on the tiny model.
SMALL = ["train_size=64", "test_size=8", "eval_problems=4", "eval_k=2", "eval_samples_logged=2",
         "max_new_tokens=24", "problems_per_step=2", "group_size=2"]
TEXTS = ["<|im_start|>user\n3 5 7 -> 22<|im_end|>\n<|im_start|>assistant\n<step>5*3=15 (15 7)</step>", "ok"]


def _cli(capsys, *args) -> dict:
    code = main([*args, "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out.strip().splitlines()[-1])


def _train(capsys, run, *extra) -> dict:
    flags = [flag for item in SMALL for flag in ("--set", item)]
    return _cli(capsys, "train", *flags, *extra, "--run-dir", str(run))


def _inputs(tokenizer):
    rows = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)  # right padding: plain transformers' default positions
        mask[i, :len(r)] = 1
    return ids, mask


def _hf_logits(folder, ids, mask):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)  # no project code
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _checkpoint_policy(ckpt):
    """The policy as training holds it: the tiny model with the checkpoint's weights."""
    saved = load_checkpoint(ckpt)
    policy = load_policy("tiny", device="cpu")
    policy.model.load_state_dict(saved["model"])
    policy.value_head.load_state_dict(saved["value_head"])
    return policy


@pytest.mark.slow
def test_run_final_loads_in_transformers_and_eval_export_step(tmp_path, capsys):
    from transformers import AutoTokenizer

    run = tmp_path / "run"
    summary = _train(capsys, run, "--preset", "countdown-tiny-ppo", "--steps", "2", "--set", "checkpoint_every=1")
    final = run / "final"
    assert summary["final"] == str(final)
    assert [p.name for p in list_checkpoints(run)] == ["step-00000001", "step-00000002"]
    meta = json.loads((final / "treedistill.json").read_text())
    assert meta["compact_prompt"] is True and meta["trained"]["step"] == 2 and meta["trained"]["method"] == "ppo"
    # only the model's weights at the top level (loaders such as vLLM read every *.safetensors there)
    assert sorted(p.name for p in final.glob("*.safetensors")) == ["model.safetensors"]
    assert (final / SUBFOLDER / FILENAME).is_file() and (final / "chat_template.jinja").is_file()

    # plain transformers: the same logits as the policy of the newest checkpoint; the same tokenizer
    trained = _checkpoint_policy(run / "checkpoints" / "step-00000002")
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids, mask = _inputs(tokenizer)
    assert ids.tolist() == _inputs(trained.tokenizer)[0].tolist()
    messages = [{"role": "user", "content": "3 5 7 -> 22"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        trained.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        expected = trained.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(_hf_logits(final, ids, mask), expected, atol=0, rtol=0)
    # and not the untrained model's
    assert (_hf_logits(TINY_FOLDER, ids, mask) - expected).abs().max() > 1e-4
    # load_policy (the run folder itself too): the trained value head
    for source in (final, run):
        back = load_policy(source, device="cpu")
        assert back.compact_prompt is True
        for name, tensor in trained.value_head.state_dict().items():
            assert torch.equal(back.value_head.state_dict()[name], tensor), name

    # treedistill eval --model RUN/final and --model RUN: the same model, the same numbers
    flags = ["--split", "test", "--limit", "2", "--k", "2", "--max-new-tokens", "16"]
    by_folder = _cli(capsys, "eval", "--model", str(final), *flags)
    by_run = _cli(capsys, "eval", "--model", str(run), *flags)
    for key in ("accuracy", "format_rate", "mean_dense", "generated_tokens"):
        assert by_folder[key] == by_run[key], key

    # export --step 1: the first checkpoint's weights, not the final ones
    out = tmp_path / "step1"
    result = _cli(capsys, "export", str(run), "--step", "1", "--out", str(out))
    assert result["step"] == 1 and result["out"] == str(out) and result["lora"] is None
    assert "model.safetensors" in result["files"] and f"{SUBFOLDER}/{FILENAME}" in result["files"]
    first = load_checkpoint(run / "checkpoints" / "step-00000001")["model"]
    written = load_file(str(out / "model.safetensors"))
    for name, tensor in written.items():
        assert torch.equal(tensor, first[name]), name
    assert any(not torch.equal(t, load_file(str(final / "model.safetensors"))[n]) for n, t in written.items())
    # exporting again replaces the folder; a step that was not kept is refused with the kept ones
    assert _cli(capsys, "export", str(run), "--step", "1", "--out", str(out))["step"] == 1
    assert main(["export", str(run), "--step", "7", "--out", str(tmp_path / "x")]) == 2
    assert "complete: 1, 2" in capsys.readouterr().err


@pytest.mark.slow
def test_lora_run_final_is_merged_and_adapter_only_on_request(tmp_path, capsys):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    # a large learning rate, so that one step moves the adapter (LoRA B starts at zero); PPO, whose
    # advantages R - V(s_t) are not all zero when no sample is right (GRPO's group-normalised ones are)
    _train(capsys, run, "--preset", "countdown-tiny-ppo", "--steps", "1", "--set", "lora.r=4", "--set", "lr=1e-2")
    final = run / "final"
    assert not (final / "adapter_config.json").exists()  # merged: a plain model folder
    assert json.loads((final / "treedistill.json").read_text())["trained"]["lora"] == "merged"
    ids, mask = _inputs(load_policy(final, device="cpu", value_head=False).tokenizer)
    merged = _hf_logits(final, ids, mask)
    assert (merged - _hf_logits(TINY_FOLDER, ids, mask)).abs().max() > 1e-4

    adapter = tmp_path / "adapter"
    result = _cli(capsys, "export", str(run), "--out", str(adapter), "--adapter-only")
    assert result["lora"] == "adapter" and "adapter_model.safetensors" in result["files"]
    assert not (adapter / "model.safetensors").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_FOLDER), adapter)
    with torch.no_grad():
        unmerged = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(unmerged, merged, atol=1e-4, rtol=1e-4)
    # a run that trained all weights has no adapter to write
    _train(capsys, tmp_path / "full", "--preset", "countdown-tiny-grpo", "--steps", "1")
    assert main(["export", str(tmp_path / "full"), "--out", str(tmp_path / "y"), "--adapter-only"]) == 2
    assert "no adapter" in capsys.readouterr().err


def test_value_head_has_its_own_folder_and_the_earlier_layout_still_loads(tmp_path):
    torch.manual_seed(0)
    head = ValueHead(16)
    (tmp_path / "new").mkdir()
    path = save_value_head(head, tmp_path / "new")
    assert path == tmp_path / "new" / SUBFOLDER / FILENAME
    assert not list((tmp_path / "new").glob("*.safetensors"))
    (tmp_path / "old").mkdir()
    shutil.copy(path, tmp_path / "old" / FILENAME)  # the layout before value_head/
    hidden = torch.randn(3, 16)
    for folder in ("new", "old"):
        torch.testing.assert_close(load_value_head(tmp_path / folder, 16)(hidden), head(hidden), atol=0, rtol=0)
    # a whole model folder in the earlier layout: the shipped tiny model moved back
    old = tmp_path / "tiny-old"
    shutil.copytree(TINY_FOLDER, old)
    (old / SUBFOLDER / FILENAME).rename(old / FILENAME)
    (old / SUBFOLDER).rmdir()
    shipped, moved = load_policy("tiny", device="cpu"), load_policy(old, device="cpu")
    for name, tensor in shipped.value_head.state_dict().items():
        assert torch.equal(moved.value_head.state_dict()[name], tensor), name


def test_run_folder_without_final_says_how_to_write_one(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("method: grpo\n")
    with pytest.raises(UsageError, match="treedistill export"):
        trained_model_folder(tmp_path)
    assert trained_model_folder(TINY_FOLDER) == TINY_FOLDER  # a model folder is itself
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "complete checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Export loses nothing: only folders it wrote are replaced, damaged checkpoints and failed writes end
# in one line (exit 2) or a fallback, never a traceback or a half folder.


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A finished run with complete checkpoints of steps 1 and 2 (copy it before damaging it)."""
    run = tmp_path_factory.mktemp("export") / "run"
    flags = [flag for item in SMALL for flag in ("--set", item)]
    assert main(["train", "--preset", "countdown-tiny-grpo", *flags, "--set", "checkpoint_every=1", "--steps", "2",
                 "--run-dir", str(run)]) == 0
    return run


def _one_line_error(capsys, code, *fragments) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _tree(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def test_export_replaces_only_a_folder_it_wrote(two_steps, tmp_path, capsys):
    theirs = tmp_path / "d"  # a folder that merely holds a config.json is not export's to replace
    (theirs / "data").mkdir(parents=True)
    (theirs / "config.json").write_text("{}")
    (theirs / "notes.txt").write_text("precious")
    before = _tree(theirs)
    _one_line_error(capsys, main(["export", str(two_steps), "--out", str(theirs)]),
                    "treedistill did not write", "notes.txt")
    assert _tree(theirs) == before
    ours = tmp_path / "ours"
    for _ in range(2):  # written, then replaced: it is export's own
        assert main(["export", str(two_steps), "--out", str(ours)]) == 0
    (ours / "notes.txt").write_text("added by hand")  # from now on it holds a file export did not write
    _one_line_error(capsys, main(["export", str(two_steps), "--out", str(ours)]), "notes.txt")
    assert (ours / "notes.txt").read_text() == "added by hand" and (ours / "model.safetensors").is_file()


@pytest.mark.parametrize("damage", ["truncated model.pt", "empty marker"])
def test_export_falls_back_past_a_damaged_newest_checkpoint(two_steps, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(two_steps, run)
    newest = run / "checkpoints" / "step-00000002"
    if damage == "empty marker":
        (newest / "complete").write_bytes(b"")
    else:
        (newest / "model.pt").write_bytes((newest / "model.pt").read_bytes()[:1000])
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "warning: skipping checkpoint step-00000002" in err and "Traceback" not in err
    assert json.loads((tmp_path / "out" / "treedistill.json").read_text())["trained"]["step"] == 1
    # the damaged step asked for by name, or as a checkpoint folder: one line
    for source, step in ((run, ["--step", "2"]), (newest, [])):
        _one_line_error(capsys, main(["export", str(source), *step, "--out", str(tmp_path / "two")]),
                        "step-00000002")
    assert not (tmp_path / "two").exists()


@pytest.mark.parametrize("failure", ["full disk", "read-only disk", "under a file"])
def test_export_write_failures_are_one_line_and_leave_no_half_folder(two_steps, tmp_path, capsys, disks, failure):
    if failure == "under a file":
        (tmp_path / "afile").write_text("x")
        out, expected = tmp_path / "afile" / "sub", "which is a file"
    else:
        disk = disks.new("2m")  # the model alone takes 4 MB
        out = disk / "models" / "out"
        expected = "No space left on device (the disk mounted at" if failure == "full disk" else "Read-only file system"
        if failure == "read-only disk":
            disks.remount(disk, "ro")
    line = _one_line_error(capsys, main(["export", str(two_steps), "--out", str(out)]), expected, str(out))
    assert len(line) < 400
    parent = out.parent.parent  # nothing left beside the file, nor on the disk (models/ was made for the export)
    assert sorted(p.name for p in parent.iterdir()) == (["afile"] if failure == "under a file" else [])
