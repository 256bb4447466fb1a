"""push and pull with the real huggingface_hub client over HTTP: against tests/hub_server.py
(the write API, LFS uploads, private repos, errors) and, for pulls, against olah serving the
real git commits that server writes (tests/olah_server.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import run_cli, tree
from hub_server import HubServer


@pytest.fixture
def hub(tmp_path):
    with HubServer() as server:
        server.env = {"HF_ENDPOINT": server.url, "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
                      "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
                      "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": "hf_secret_test_token",
                      "CWD": str(tmp_path)}
        yield server


def _run(env, *args, token=True):
    e = {**os.environ, **env}
    if not token:
        e.pop("HF_TOKEN")
        e["HF_TOKEN_PATH"] = "/nonexistent/token"
    return subprocess.run([sys.executable, "-m", "loratool", *map(str, args)],
                          capture_output=True, text=True, env=e, cwd=env["CWD"])


def test_push_then_pull_round_trip_with_card(hub, tmp_path, peft_dir):
    res = _run(hub.env, "push", peft_dir, "me/adapter", "--private", "--json")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["commit_url"].startswith(hub.url) and "hf_secret" not in res.stdout + res.stderr
    assert hub.repos["me/adapter"].private
    assert [m for m, p, _ in hub.log if m == "PUT"]  # the weights went through LFS
    res = _run(hub.env, "pull", "me/adapter", "-o", tmp_path / "back", "--json")
    assert res.returncode == 0, res.stderr
    back = tmp_path / "back"
    for name, data in tree(peft_dir).items():
        if name != "README.md":
            assert (back / name).read_bytes() == data, name  # bytes identical
    card = (back / "README.md").read_text()
    assert "base_model_relation: adapter" not in card or "base_model:" in card
    assert "library_name: peft" in card and "- lora" in card and "- loratool" in card
    # a private repo is invisible without a token
    res = _run(hub.env, "pull", "me/adapter", "-o", tmp_path / "anon", token=False)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr


def test_merged_model_card_branch_and_second_push(hub, tmp_path):
    from loratool.verbs.demo import build_pair

    base, _, adapter = build_pair(tmp_path / "w")
    assert run_cli("merge", base, adapter, "-o", tmp_path / "merged").rc == 0
    res = _run(hub.env, "push", tmp_path / "merged", "me/merged", "--revision", "v1",
               "--message", "first")
    assert res.returncode == 0, res.stderr
    card = hub.repos["me/merged"].commits[hub.repos["me/merged"].refs["v1"]]["README.md"].decode()
    assert "Merged by loratool" in card and str(adapter) in card
    assert "base_model:" not in card  # a local base path is not a Hub id
    assert "main" in hub.repos["me/merged"].refs
    first = hub.repos["me/merged"].refs["v1"]
    (tmp_path / "merged" / "extra.json").write_text("{}")
    res = _run(hub.env, "push", tmp_path / "merged", "me/merged", "--revision", "v1")
    assert res.returncode == 0, res.stderr
    second = hub.repos["me/merged"].refs["v1"]
    assert second != first and "extra.json" in hub.repos["me/merged"].commits[second]
    assert not any(".partial" in n for n in hub.repos["me/merged"].commits[second])


def test_hub_errors_are_one_line_and_never_show_the_token(hub, tmp_path, peft_dir):
    for args, needle in ((["pull", "me/nothing"], "no such repository"),
                         (["push", peft_dir, "me/x"], "token")):
        res = _run(hub.env, *args, token=args[0] == "pull")
        assert res.returncode == 1, res
        assert res.stderr.count("\n") == 1 and needle in res.stderr, res.stderr
        assert "hf_secret" not in res.stderr
    env = {**hub.env, "HF_ENDPOINT": "http://127.0.0.1:9"}
    res = _run(env, "pull", "me/adapter")
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr


def test_pull_refuses_names_escaping_the_folder(hub, tmp_path):
    hub.add("me/evil", tmp_path)  # an empty commit to start from
    sha = hub._commit("me/evil", "main", {"../escape.json": b"{}", "config.json": b"{}"}, "x")
    assert sha
    res = _run(hub.env, "pull", "me/evil", "-o", tmp_path / "o")
    assert res.returncode == 1 and "outside the target folder" in res.stderr, res.stderr
    assert not (tmp_path / "escape.json").exists()


def test_pull_offline_from_a_warm_cache(hub, tmp_path, peft_dir):
    assert _run(hub.env, "push", peft_dir, "me/adapter").returncode == 0
    res = _run(hub.env, "pull", "me/adapter")
    assert res.returncode == 0, res.stderr
    path = res.stdout.strip()
    offline = {**hub.env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    res = _run(offline, "pull", "me/adapter")
    assert res.returncode == 0 and res.stdout.strip() == path, res.stderr
    res = _run(offline, "inspect", "me/adapter", "--json")
    assert json.loads(res.stdout)["kind"] == "adapter"


# ------------------------------------------------------------------ pull through olah

from olah_server import Olah, olah_cli  # noqa: E402

needs_olah = pytest.mark.skipif(olah_cli() is None, reason="olah not installed (.ci/run makes "
                                                           ".ci-olah)")


@pytest.fixture
def mirrored(tmp_path):
    """Our write server keeping real git commits, and olah serving them back."""
    mirror = tmp_path / "mirror"
    with HubServer(git_root=mirror) as writer, Olah(mirror, tmp_path) as olah_url:
        base = {"HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_OFFLINE": "0",
                "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_TOKEN": "hf_secret_test_token", "CWD": str(tmp_path)}
        yield {**base, "HF_ENDPOINT": writer.url}, {**base, "HF_ENDPOINT": olah_url}


@needs_olah
def test_push_then_pull_through_olah(mirrored, tmp_path, peft_dir):
    write, read = mirrored
    assert _run(write, "push", peft_dir, "acme/adapter", "--message", "v1").returncode == 0
    res = _run(read, "pull", "acme/adapter", "-o", tmp_path / "a", "--json")
    assert res.returncode == 0, res.stderr
    for name, data in tree(peft_dir).items():
        if name != "README.md":
            assert (tmp_path / "a" / name).read_bytes() == data, name
    assert "library_name: peft" in (tmp_path / "a" / "README.md").read_text()
    # a branch, and a second push that updates it
    assert _run(write, "push", peft_dir, "acme/adapter", "--revision", "exp").returncode == 0
    (tmp_path / "more").mkdir()
    import shutil

    shutil.copytree(peft_dir, tmp_path / "more", dirs_exist_ok=True)
    (tmp_path / "more" / "notes.txt").write_text("second push")
    assert _run(write, "push", tmp_path / "more", "acme/adapter", "--revision",
                "exp").returncode == 0
    res = _run(read, "pull", "acme/adapter", "--revision", "exp", "-o", tmp_path / "b")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "b" / "notes.txt").read_text() == "second push"
    res = _run(read, "pull", "acme/adapter", "-o", tmp_path / "c")
    assert res.returncode == 0 and not (tmp_path / "c" / "notes.txt").exists()
    # what olah serves loratool reads directly, as a Hub id
    res = _run(read, "inspect", "acme/adapter@exp", "--json")
    assert json.loads(res.stdout)["kind"] == "adapter"
    for spec in ("acme/missing", "acme/adapter@no-such-branch"):
        res = _run(read, "pull", spec, "-o", tmp_path / "x")
        assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
        assert not (tmp_path / "x").exists()


def test_create_pr_and_no_permission(hub, tmp_path, peft_dir):
    assert _run(hub.env, "push", peft_dir, "me/adapter").returncode == 0
    res = _run(hub.env, "push", peft_dir, "me/adapter", "--create-pr", "--message", "proposal")
    assert res.returncode == 0, res.stderr
    assert "/discussions/1" in res.stdout and "refs/pr/1" in hub.repos["me/adapter"].refs
    hub.forbid = True  # the server now answers writes with 403
    res = _run(hub.env, "push", peft_dir, "me/adapter")
    assert res.returncode == 1 and "no permission" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and "hf_secret" not in res.stderr


def test_card_metadata_for_hub_bases(tmp_path, peft_dir):
    import shutil

    import torch

    from loratool.io.writer import CheckpointWriter
    from loratool.verbs.hub import model_card

    with CheckpointWriter(tmp_path / "merged", metadata={
            "loratool": "merge", "loratool.base": "acme/base-model",
            "loratool.adapters": json.dumps([{"adapter": "acme/style", "weight": 0.5}])}) as w:
        w.add("w", torch.zeros(2))
    card = model_card(tmp_path / "merged")
    assert "base_model: acme/base-model" in card and "base_model_relation: merge" in card
    assert "`acme/style` × 0.5" in card
    shutil.copytree(peft_dir, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "acme/llama@v2"
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    card = model_card(tmp_path / "ad")
    assert "base_model: acme/llama\n" in card and "base_model_relation: adapter" in card
    assert "`v2`" in card and "- loratool" in card


def test_push_refuses_links_out_of_the_folder_and_temporary_files(hub, tmp_path, peft_dir):
    import shutil

    d = tmp_path / "ad"
    shutil.copytree(peft_dir, d)
    (d / "notes.tmp").write_text("x")
    (d / "draft.json~").write_text("x")
    res = _run(hub.env, "push", d, "me/ad")
    assert res.returncode == 0, res.stderr
    files = hub.repos["me/ad"].commits[hub.repos["me/ad"].refs["main"]]
    assert "notes.tmp" not in files and "draft.json~" not in files
    (tmp_path / "secret.txt").write_text("do not upload")
    (d / "link.json").symlink_to(tmp_path / "secret.txt")
    res = _run(hub.env, "push", d, "me/ad")
    assert res.returncode == 1 and "outside the folder" in res.stderr, res.stderr
    res = _run(hub.env, "push", d, "bad id!")
    assert res.returncode == 1 and "internal error" not in res.stderr, res.stderr


def test_cards_name_only_hub_bases_and_the_right_class(tmp_path):
    """A local base never becomes base_model (not in the adapter's card, not when pushed); the
    loading snippet uses the class of the base's task; a hostile name cannot add keys."""
    import torch
    import yaml
    from conftest import finetuned
    from transformers import BertConfig, BertModel

    from loratool.verbs.hub import model_card

    torch.manual_seed(0)
    base = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, vocab_size=50)).eval()
    base.save_pretrained(tmp_path / "base")
    finetuned(base).save_pretrained(tmp_path / "tuned")
    res = run_cli("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "ad")
    assert res.rc == 0, res.err
    card = (tmp_path / "ad" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in front and front["library_name"] == "peft"
    assert "from transformers import AutoModel\n" in card and "AutoModel.from_pretrained(" in card
    assert "AutoModelForCausalLM" not in card
    pushed = yaml.safe_load(model_card(tmp_path / "ad").split("---")[1])
    assert "base_model" not in pushed and "base_model_relation" not in pushed

    from loratool.formats import peft
    from loratool.model.adapter import LoraAdapter, LoraModule

    for name, hub in (("acme/llama@v2", "acme/llama"),
                      ("evil\nlibrary_name: evil\n", None), ("x/y\nimport os", None)):
        ad = LoraAdapter(base_model=name, task_type="CAUSAL_LM")
        ad.add(LoraModule("q", torch.zeros(2, 4), torch.zeros(4, 2), 2.0))
        card = peft.model_card(ad, {"lora_alpha": 2, "use_rslora": False, "use_dora": False},
                               "note")
        front = yaml.safe_load(card.split("---")[1])
        assert front.get("base_model") == hub and front["library_name"] == "peft"
        assert set(front) <= {"base_model", "base_model_relation", "library_name", "tags"}
        assert "import os" not in card and "evil" not in card
        if hub:
            assert f'AutoModelForCausalLM.from_pretrained("{hub}", revision="v2")' in card
