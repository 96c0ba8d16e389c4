"""``push``: publish a bundle folder on the Hugging Face Hub; what ``--push-to`` and
``--verify`` do after a converting command wrote its bundle.

A converting command gets export-verify-push in two lines::

    @click.command("to-gguf")
    @click.argument("ckpt", type=click.Path(path_type=Path))
    ...                      # its own options, incl. @source_options
    @push_options            # adds --push-to, --private, --create-pr, --token, --verify
    @user_errors
    def to_gguf_cmd(ckpt, ..., push: PushRequest) -> None:
        ...                  # write the bundle to `out`
        push_after_export(out, push)

``push_options`` (``commands/options.py``) hands the command one ``push`` argument instead
of five, and records the command's ``ckpt`` and read options so that ``--verify`` checks the
new bundle against the same checkpoint (:func:`mmconvert.api.verify`) before any upload.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mmconvert.commands.options import PushRequest, check_repo_id, echo_err, token_option
from mmconvert.publish.bundle_summary import VERIFY_JSON, VERIFY_MARKDOWN

if TYPE_CHECKING:  # huggingface_hub is imported only when a push actually happens
    from mmconvert.publish.hub import PushResult


def _user_errors(fn: Callable) -> Callable:
    """``cli.user_errors``, looked up at call time: cli.py imports every command module when it
    is imported, and converting commands import this module, so importing cli here would make
    the import order matter."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from mmconvert.cli import user_errors

        return user_errors(fn)(*args, **kwargs)

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
        code = run_verify(request.ckpt, Path(bundle), request.read)
        if code:
            echo(f"verify failed (exit {code}): {bundle} was not pushed" if request.repo
                 else f"verify failed (exit {code})")
            raise SystemExit(code)
    if request.repo is None:
        return None
    return push_and_report(Path(bundle), request.repo, token=request.token,
                           private=request.private, create_pr=request.create_pr, echo=echo)


def run_verify(ckpt: Path, bundle: Path, read: Sequence[tuple[str, Any]] = ()) -> int:
    """:func:`mmconvert.api.verify` of ``bundle`` against ``ckpt`` (``read``: the read options
    as (name, value) pairs), printed as ``mmconvert verify`` prints it, with its reports written
    into the bundle; the exit code ``verify`` would give (0 pass, 1 parity failure, 2 usage or
    input error, its one ``error:`` line printed)."""
    from mmconvert import api
    from mmconvert.cli import report_error
    from mmconvert.errors import MMConvertError
    from mmconvert.verify.report import terminal_report

    try:
        result = api.verify(ckpt, [bundle], markdown=bundle / VERIFY_MARKDOWN,
                            report_json=bundle / VERIFY_JSON, log=echo_err, warn=echo_err,
                            **dict(read))
    except (MMConvertError, OSError) as exc:
        return report_error(exc)
    click.echo(terminal_report(result))
    return 0 if result.passed else 1


def push_and_report(bundle: Path, repo: str, *, token: str | None = None, private: bool = False,
                    revision: str | None = None, create_pr: bool = False,
                    commit_message: str | None = None,
                    echo: Callable[[str], None] = click.echo) -> PushResult:
    """Push and print one summary line (progress notes go to stderr)."""
    from mmconvert import api
    from mmconvert.publish.hub import hub_endpoint

    result = api.push(bundle, repo, token=token, private=private, revision=revision,
                      create_pr=create_pr, commit_message=commit_message, log=echo_err)
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
@click.option("--repo", required=True, metavar="OWNER/NAME", callback=check_repo_id,
              help="Hub repo to push to; created when missing (not with --revision).")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps "
                                               "its visibility).")
@click.option("--revision", metavar="BRANCH", default=None,
              help="Push to this branch of an existing repo (created from main if missing).")
@click.option("--create-pr", is_flag=True,
              help="Open a pull request (against --revision, else main) instead of committing.")
@click.option("--commit-message", default=None, help="Commit title [default: Upload <kind> "
                                                     "bundle with mmconvert].")
@token_option("token")
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
