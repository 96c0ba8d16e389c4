"""``push``: publish a bundle folder on the Hugging Face Hub; ``--push-to`` on converting commands.

A converting command gets export-verify-push in two lines::

    @click.command("to-gguf")
    @click.argument("ckpt", type=click.Path(path_type=Path))
    ...                      # its own options, incl. @source_options
    @push_options            # adds --push-to, --private, --create-pr, --token, --verify
    @user_errors
    def to_gguf_cmd(ckpt, ..., push: PushRequest) -> None:
        ...                  # write the bundle to `out`
        push_after_export(out, push)

``push_options`` hands the command one ``push`` argument instead of five, and records the
command's ``ckpt`` and source options so that ``--verify`` checks the new bundle against the
same checkpoint before anything is uploaded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mmconvert.publish.bundle_summary import VERIFY_JSON, VERIFY_MARKDOWN

if TYPE_CHECKING:  # huggingface_hub is imported only when a push actually happens
    from mmconvert.publish.hub import PushResult

TOKEN_HELP = ("Hugging Face token [default: HF_TOKEN, else the `hf auth login` token]. Prefer "
              "those: a token on the command line shows in shell history and `ps`.")
# source options of the converting commands, forwarded to `verify` as the same flags
_SOURCE_FLAGS = {"base": "--base", "projector": "--projector",
                 "projector_config": "--projector-config", "rope_layout": "--rope-layout"}


@dataclass(frozen=True)
class PushRequest:
    """What ``--push-to`` and friends asked for (``repo`` is None: only ``--verify``, if set)."""

    repo: str | None = None
    private: bool = False
    create_pr: bool = False
    token: str | None = None
    verify: bool = False
    ckpt: Path | None = None
    source_args: tuple[str, ...] = ()


def _user_errors(fn: Callable) -> Callable:
    """``cli.user_errors``, looked up at call time: cli.py imports every command module when it
    is imported, and converting commands import this module, so importing cli here would make
    the import order matter."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from mmconvert.cli import user_errors

        return user_errors(fn)(*args, **kwargs)

    return wrapper


def _check_repo_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if value is None:
        return None
    try:
        validate_repo_id(value)
    except HFValidationError as exc:
        raise click.BadParameter(str(exc).splitlines()[0]) from None
    if value.count("/") != 1:
        raise click.BadParameter(f"{value!r}: expected OWNER/NAME")
    return value


def _token_option(name: str) -> Callable:
    return click.option("--token", name, default=None, metavar="TOKEN", help=TOKEN_HELP)


def push_options(fn: Callable) -> Callable:
    """Add ``--push-to OWNER/NAME``, ``--private``, ``--create-pr``, ``--token`` and ``--verify``
    to a converting command; it receives them as one ``push: PushRequest`` keyword."""

    @functools.wraps(fn)
    def wrapper(*args: Any, push_to: str | None, push_private: bool, push_create_pr: bool,
                push_token: str | None, push_verify: bool, **kwargs: Any) -> Any:
        source_args: list[str] = []
        for key, flag in _SOURCE_FLAGS.items():
            if kwargs.get(key) is not None:
                source_args += [flag, str(kwargs[key])]
        request = PushRequest(push_to, push_private, push_create_pr, push_token, push_verify,
                              kwargs.get("ckpt"), tuple(source_args))
        if push_to is None and (push_private or push_create_pr or push_token):
            raise click.UsageError("--private, --create-pr and --token need --push-to")
        return fn(*args, push=request, **kwargs)

    options = [
        click.option("--push-to", "push_to", metavar="OWNER/NAME", default=None,
                     callback=_check_repo_id,
                     help="After writing, push the bundle to this Hub repo (created if missing)."),
        click.option("--private", "push_private", is_flag=True,
                     help="With --push-to: create the repo private."),
        click.option("--create-pr", "push_create_pr", is_flag=True,
                     help="With --push-to: open a pull request instead of committing to main."),
        _token_option("push_token"),
        click.option("--verify", "push_verify", is_flag=True,
                     help=f"Verify the bundle against CKPT (writes {VERIFY_MARKDOWN} and "
                          f"{VERIFY_JSON} into it, shown on the model card); nothing is pushed "
                          "if it fails."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def push_after_export(bundle: Path, request: PushRequest | None, *,
                      echo: Callable[[str], None] = click.echo) -> PushResult | None:
    """Run after a converting command wrote ``bundle``: verify when asked (exit with verify's
    code on failure, before any upload), then push when ``--push-to`` was given."""
    if request is None:
        return None
    if request.verify:
        if request.ckpt is None:
            raise click.UsageError("--verify needs the command's CKPT argument")
        code = run_verify(request.ckpt, Path(bundle), request.source_args)
        if code:
            echo(f"verify failed (exit {code}): {bundle} was not pushed" if request.repo
                 else f"verify failed (exit {code})")
            raise SystemExit(code)
    if request.repo is None:
        return None
    return push_and_report(Path(bundle), request.repo, token=request.token,
                           private=request.private, create_pr=request.create_pr, echo=echo)


def run_verify(ckpt: Path, bundle: Path, source_args: Sequence[str] = ()) -> int:
    """``mmconvert verify CKPT BUNDLE --markdown ... --report-json ...`` in this process; its
    exit code (0 pass, 1 parity failure, 2 usage or input error)."""
    from mmconvert.cli import main

    args = ["verify", str(ckpt), str(bundle), *source_args,
            "--markdown", str(bundle / VERIFY_MARKDOWN), "--report-json", str(bundle / VERIFY_JSON)]
    try:
        result = main.main(args=args, prog_name="mmconvert", standalone_mode=False)
    except SystemExit as exc:  # the command's own sys.exit (user_errors, verdicts)
        return exc.code if isinstance(exc.code, int) else 1
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return result if isinstance(result, int) else 0


def push_and_report(bundle: Path, repo: str, *, token: str | None = None, private: bool = False,
                    revision: str | None = None, create_pr: bool = False,
                    commit_message: str | None = None,
                    echo: Callable[[str], None] = click.echo) -> PushResult:
    """Push and print one summary line (progress notes go to stderr)."""
    from mmconvert.publish.hub import hub_endpoint, push_bundle

    result = push_bundle(bundle, repo, token=token, private=private, revision=revision,
                         create_pr=create_pr, commit_message=commit_message,
                         log=lambda msg: click.echo(msg, err=True))
    where = f"{hub_endpoint()}/{repo}" + (f" ({revision})" if revision else "")
    if not result.changed:
        echo(f"{where} already has these {result.files} files; nothing to commit")
    elif result.pr_url:
        echo(f"opened pull request {result.pr_url} with {result.files} files")
    else:
        echo(f"pushed {result.files} files to {where} (commit {result.commit_oid[:10]})")
    return result


@click.command("push")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--repo", required=True, metavar="OWNER/NAME", callback=_check_repo_id,
              help="Hub repo to push to; created when missing (not with --revision).")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps "
                                               "its visibility).")
@click.option("--revision", metavar="BRANCH", default=None,
              help="Push to this branch of an existing repo (created from main if missing).")
@click.option("--create-pr", is_flag=True,
              help="Open a pull request (against --revision, else main) instead of committing.")
@click.option("--commit-message", default=None, help="Commit title [default: Upload <kind> "
                                                     "bundle with mmconvert].")
@_token_option("token")
@_user_errors
def push_cmd(bundle: Path, repo: str, private: bool, revision: str | None, create_pr: bool,
             commit_message: str | None, token: str | None) -> None:
    """Upload a bundle folder (written by to-hf, to-safetensors or to-gguf) to the Hugging Face
    Hub in one commit, with a model card generated from its mmconvert.json. Text you wrote in the
    repo's README.md is kept; only the section between the mmconvert markers is refreshed.

    \b
    Example:
      mmconvert push out/gguf --repo me/my-model-GGUF --private
    """
    push_and_report(bundle, repo, token=token, private=private, revision=revision,
                    create_pr=create_pr, commit_message=commit_message)


COMMANDS = [push_cmd]
