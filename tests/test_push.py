"""``mmconvert push`` and ``--push-to`` against the local fake Hub (tests/fake_hub.py).

Every test talks HTTP to a loopback server through the real huggingface_hub client, with Xet
disabled (so large files take the Git LFS path: basic PUT and multipart) and HF_ENDPOINT set to
the fake. Nothing here reaches the live Hub.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from click.testing import CliRunner

from mmconvert.cli import main
from mmconvert.commands import push as cmd_push
from mmconvert.errors import HubAuthError
from mmconvert.publish.model_card import BEGIN, END
from tests.fake_hub import Account, FakeHub

WRITE = "hf_WriteTokenSecret_4f1c9a2b7e"  # distinctive, so a leak cannot hide
READ = "hf_ReadOnlySecret_88d0c3e1aa"
REPO = "alice/tiny-mm"
CHUNK = 256 << 10


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fresh fake Hub, and the client pointed at it: xet off, not offline, no saved login."""
    from huggingface_hub import constants

    with FakeHub({WRITE: Account("alice", orgs=("team",)), READ: Account("bob", role="read")},
                 multipart_threshold=1 << 20, chunk_size=CHUNK, lifetime=60) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        # huggingface_hub read these at import time (conftest sets HF_HUB_OFFLINE=1)
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agents.json"))
        yield fake


def _cli(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


@pytest.fixture(scope="session")
def st_bundle(example_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "st"
    assert _cli("to-safetensors", str(example_ckpt), "-o", str(out)).exit_code == 0
    return out


@pytest.fixture(scope="session")
def gguf_bundle(example_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "gguf"
    result = _cli("to-gguf", str(example_ckpt), "-o", str(out), "--outtype", "f16",
                  "--outtype", "q8_0")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def hf_bundle(example_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "hf"
    assert _cli("to-hf", str(example_ckpt), "-o", str(out)).exit_code == 0
    return out


def _push(bundle: Path, *extra: str, token: str | None = WRITE, repo: str = REPO):
    args = ["push", str(bundle), "--repo", repo, *extra]
    return _cli(*args, env={"HF_TOKEN": token} if token else None)


def _card(hub: FakeHub, revision: str = "main", repo: str = REPO) -> str:
    return hub.file(repo, "README.md", revision).decode("utf-8")


# -- files arrive ----------------------------------------------------------------------------
def test_push_creates_repo_and_every_file_arrives_byte_identical(hub, st_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(st_bundle, bundle)
    large = os.urandom(5 * CHUNK + 12345)  # above the 1 MiB multipart threshold: 6 parts
    (bundle / "extra").mkdir()
    (bundle / "extra" / "large.bin").write_bytes(large)

    result = _push(bundle, "--private")
    assert result.exit_code == 0, result.output
    assert f"/{REPO} (commit " in result.stdout
    assert hub.repos[REPO].private

    stored = hub.files(REPO)
    local = {p.relative_to(bundle).as_posix(): p.read_bytes()
             for p in bundle.rglob("*") if p.is_file()}
    del local["README.md"]  # the bundle's own card: push uploads one made for the repo
    for path, data in local.items():
        assert stored[path].data == data, path
    assert stored["model.safetensors"].lfs and stored["extra/large.bin"].lfs
    assert not stored["mmconvert.json"].lfs  # small text: inline in the commit
    parts = hub.calls("PUT", r"^/_storage/[0-9a-f]+/part/\d+$")
    assert len(parts) == -(-len(large) // CHUNK)  # large.bin, one PUT per part
    assert len(hub.calls("PUT", r"^/_storage/[0-9a-f]+$")) == 1  # model.safetensors, basic
    assert "README.md" in stored


def test_repush_uploads_nothing_and_resumes_after_interruption(hub, st_bundle):
    # an earlier push died after uploading the weights, before its commit
    hub.lfs[_sha256(st_bundle / "model.safetensors")] = (st_bundle / "model.safetensors").read_bytes()
    first = _push(st_bundle)
    assert first.exit_code == 0, first.output
    assert not hub.calls("PUT", r"^/_storage/")  # the object was already there: not re-sent
    assert hub.file(REPO, "model.safetensors") == (st_bundle / "model.safetensors").read_bytes()

    head = hub.repos[REPO].refs["main"]
    again = _push(st_bundle)
    assert again.exit_code == 0, again.output
    assert "nothing to commit" in again.stdout
    assert hub.repos[REPO].refs["main"] == head
    assert not hub.calls("PUT", r"^/_storage/")


def test_revision_branch_and_pull_request(hub, st_bundle):
    hub.add_repo(REPO)
    on_branch = _push(st_bundle, "--revision", "dev", "--private")
    assert on_branch.exit_code == 0, on_branch.output
    assert "already exists and is public" in on_branch.stderr
    assert "created branch dev" in on_branch.stderr
    assert "model.safetensors" in hub.files(REPO, "dev")
    assert "model.safetensors" not in hub.files(REPO, "main")

    pr = _push(st_bundle, "--create-pr", "--commit-message", "Add the bundle")
    assert pr.exit_code == 0, pr.output
    assert "opened pull request" in pr.stdout and "/discussions/1" in pr.stdout
    assert hub.file(REPO, "model.safetensors", "refs/pr/1") == \
        (st_bundle / "model.safetensors").read_bytes()
    assert "model.safetensors" not in hub.files(REPO, "main")
    assert hub.repos[REPO].commits[hub.repos[REPO].refs["refs/pr/1"]].summary == "Add the bundle"


# -- the model card --------------------------------------------------------------------------
def test_card_front_matter_parses_with_model_card(hub, st_bundle, gguf_bundle):
    from huggingface_hub import ModelCard

    assert _push(st_bundle).exit_code == 0
    card = ModelCard(_card(hub))
    assert card.data.base_model == "Qwen/Qwen3-0.6B"
    assert card.data.base_model_relation == "finetune"
    assert card.data.library_name == "safetensors"
    assert card.data.pipeline_tag == "text-generation"
    assert {"multimodal", "qwen3", "mmconvert"} <= set(card.data.tags)
    assert "| `m1` | 48 | 64 | `<\\|multimodal\\|>` (id 387) |" in card.text
    assert "| `model.safetensors` |" in card.text

    result = _push(gguf_bundle, repo="alice/tiny-mm-GGUF")
    assert result.exit_code == 0, result.output
    card = ModelCard(_card(hub, repo="alice/tiny-mm-GGUF"))
    assert card.data.base_model_relation == "quantized"
    assert card.data.library_name == "gguf"
    assert "gguf" in card.data.tags
    text_files = {p.name for p in gguf_bundle.glob("*.gguf")}
    q8 = next(n for n in text_files if "Q8_0" in n)
    assert any(line.startswith(f"| `{q8}` |") and line.endswith(" Q8_0 |")
               for line in card.text.splitlines())
    # the example's head_dim (16) is not transformers' GGUF default: the card says so instead
    # of a from_pretrained(gguf_file=...) that fails (tests/test_model_card.py checks both)
    assert "mmconvert run" in card.text and "transformers cannot load this text GGUF" in card.text


def test_existing_user_card_survives_repush(hub, st_bundle, tmp_path):
    user = ("---\nlicense: mit\ntags:\n- mine\nbase_model_relation: adapter\n---\n"
            "# Tiny MM\n\nMy own words about this model.\n")
    hub.add_repo(REPO, {"README.md": user.encode()})
    assert _push(st_bundle).exit_code == 0
    card = _card(hub)
    assert "# Tiny MM\n\nMy own words about this model.\n" in card
    meta, _ = _front_matter(card)
    assert meta["license"] == "mit"
    assert meta["tags"][0] == "mine" and "mmconvert" in meta["tags"]
    assert meta["base_model_relation"] == "finetune"  # a key mmconvert owns, refreshed

    # the user adds text after our section on the Hub; a new bundle with a verify report
    edited = card.replace(END, END + "\n\n## Citation\n\nPlease cite us.")
    hub.add_repo(REPO, {"README.md": edited.encode()})
    bundle = tmp_path / "bundle"
    shutil.copytree(st_bundle, bundle)
    (bundle / "verify-report.md").write_text("### Logit parity\n\n| bundle | result |\n"
                                            "|---|---|\n| st | pass |\n", encoding="utf-8")
    assert _push(bundle).exit_code == 0
    card = _card(hub)
    assert card.count(BEGIN) == 1 and card.count(END) == 1
    assert "My own words about this model." in card and "Please cite us." in card
    assert card.index("Please cite us.") > card.index(END)
    assert "## Logit parity" in card and "| st | pass |" in card


def test_hf_bundle_card_is_regenerated_not_duplicated(hub, hf_bundle):
    result = _push(hf_bundle)
    assert result.exit_code == 0, result.output
    card = _card(hub)
    assert card.count("## Modalities") == 1  # the writer's own card was not kept beside ours
    meta, _ = _front_matter(card)
    assert meta["library_name"] == "transformers" and "custom_code" in meta["tags"]
    assert "trust_remote_code=True" in card


# -- the token stays secret ------------------------------------------------------------------
def test_token_never_in_output_or_logs(hub, st_bundle, caplog, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_DEBUG", True)  # huggingface_hub logs a curl per request
    monkeypatch.setattr(logging.getLogger("huggingface_hub"), "propagate", True)
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    ok = _push(st_bundle)
    bad = _push(st_bundle, token=WRITE + "x")
    assert ok.exit_code == 0 and bad.exit_code == 2
    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert "curl" in logs and "Request" in logs  # debug logging really was on
    sent = {r.authorization for r in hub.requests}
    assert f"Bearer {WRITE}" in sent  # the token did go to the Hub, in the header only
    for text in (ok.stdout, ok.stderr, bad.stdout, bad.stderr, logs):
        assert WRITE not in text


def test_token_not_in_exception_chain(hub, st_bundle):
    from mmconvert.publish.hub import push_bundle

    for token in (WRITE + "x", WRITE + "\nInjected: 1"):
        with pytest.raises(HubAuthError) as info:
            push_bundle(st_bundle, REPO, token=token)
        text = "".join(traceback.format_exception(info.value))
        assert WRITE not in text, text


def test_token_not_in_debug_output_of_a_real_process(hub, st_bundle, tmp_path):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": WRITE,
           "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_VERBOSITY": "debug", "HF_DEBUG": "1"}
    proc = subprocess.run([sys.executable, "-m", "mmconvert", "push", str(st_bundle),
                           "--repo", REPO], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "curl" in proc.stderr  # huggingface_hub's debug log went to stderr
    assert WRITE not in proc.stdout + proc.stderr


# -- errors: one line, exit 2 ----------------------------------------------------------------
def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    # one error line, cause first and short; details (the Hub's own words) on indented lines
    assert lines[0].startswith("error: ") and len(lines[0]) <= 200, result.stderr
    assert all(line.startswith("  ") for line in lines[1:]), result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_not_logged_in(hub, st_bundle):
    _one_line_error(_push(st_bundle, token=None), "not logged in", "hf auth login")
    assert not hub.requests


def test_rejected_token_401(hub, st_bundle):
    _one_line_error(_push(st_bundle, token="hf_unknown"), "rejected the token", "401")


def test_read_only_token_and_foreign_namespace_403(hub, st_bundle):
    _one_line_error(_push(st_bundle, token=READ), "read-only")
    _one_line_error(_push(st_bundle, repo="someone-else/model"), "403", "may not write")
    assert not hub.calls("POST", "/commit/")


def test_missing_repo_with_revision(hub, st_bundle):
    _one_line_error(_push(st_bundle, "--revision", "dev"), "does not exist", "--revision")
    assert REPO not in hub.repos


def test_network_down(hub, st_bundle, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", closed)
    _one_line_error(_push(st_bundle), "cannot reach", closed)


def test_offline_mode(hub, st_bundle, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _one_line_error(_push(st_bundle), "HF_HUB_OFFLINE is set")
    assert not hub.requests


def test_repo_card_with_broken_front_matter(hub, st_bundle):
    hub.add_repo(REPO, {"README.md": b"---\nlicense: [mit\n---\nbody\n"})
    _one_line_error(_push(st_bundle), "not valid YAML", "fix it on the Hub")
    assert not hub.calls("POST", "/commit/")


def test_folder_that_is_not_a_bundle(hub, example_ckpt, tmp_path):
    _one_line_error(_push(example_ckpt), "not an mmconvert bundle")
    _one_line_error(_push(tmp_path / "missing"), "no such folder")
    assert not hub.requests


# -- --push-to on converting commands --------------------------------------------------------
@pytest.mark.parametrize("command,probe", [("to-safetensors", "model.safetensors"),
                                           ("to-hf", "multimodal_projector/model.safetensors"),
                                           ("to-gguf", "mmconvert.json")])
def test_converting_commands_push_to(hub, example_ckpt, tmp_path, command, probe):
    out = tmp_path / "bundle"
    result = _cli(command, str(example_ckpt), "-o", str(out), "--push-to", REPO,
                  env={"HF_TOKEN": WRITE})
    assert result.exit_code == 0, result.output
    assert hub.file(REPO, probe) == (out / probe).read_bytes()
    for gguf in out.glob("*.gguf"):
        assert hub.file(REPO, gguf.name) == gguf.read_bytes()


@pytest.mark.parametrize("verdict", [0, 1])
def test_push_to_with_verify_pushes_only_a_passing_bundle(hub, example_ckpt, tmp_path,
                                                          monkeypatch, verdict):
    calls = []

    def fake_verify(ckpt, bundle, source_args=()):
        calls.append((ckpt, bundle, tuple(source_args)))
        return verdict

    monkeypatch.setattr(cmd_push, "run_verify", fake_verify)
    out = tmp_path / "st"
    result = _cli("to-safetensors", str(example_ckpt), "-o", str(out), "--push-to", REPO,
                  "--verify", env={"HF_TOKEN": WRITE})
    assert calls == [(example_ckpt, out, ())]
    assert result.exit_code == verdict
    assert (REPO in hub.repos) == (verdict == 0)


def test_push_options_need_push_to(hub, example_ckpt, tmp_path):
    result = CliRunner().invoke(main, ["to-safetensors", str(example_ckpt), "-o",
                                       str(tmp_path / "st"), "--private"])
    assert result.exit_code == 2 and "need --push-to" in result.output


@pytest.mark.slow
def test_push_to_with_real_verify_puts_the_parity_table_on_the_card(hub, example_ckpt, tmp_path):
    out = tmp_path / "st"
    result = _cli("to-safetensors", str(example_ckpt), "-o", str(out), "--push-to", REPO,
                  "--verify", env={"HF_TOKEN": WRITE})
    assert result.exit_code == 0, result.output
    assert hub.file(REPO, "verify-report.md") == (out / "verify-report.md").read_bytes()
    assert "## Logit parity" in _card(hub) and "| pass |" in _card(hub)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _front_matter(card: str) -> tuple[dict, str]:
    from mmconvert.publish.model_card import split_front_matter

    return split_front_matter(card)
