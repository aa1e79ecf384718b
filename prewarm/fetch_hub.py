"""What the hub lists for a repo at a revision, and how asking it fails.

``HfApi.model_info`` gives the commit and each file's size and hashes (LFS sha256, or the git blob
id); a listed name that would land outside the destination refuses the whole revision. The hub
saying no is a HubError with a next step; not reaching it at all is ``Unreachable``, on which
fetch falls back to the files fetched before.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass

from prewarm.errors import PrewarmError
from prewarm.fetch_place import name_problem


@dataclass
class HubError(PrewarmError):
    """The hub said no, or could not be reached."""


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None  # LFS files
    blob_id: str | None  # git blob sha1, for the others


class Unreachable(Exception):
    """The hub could not be reached (connection refused, DNS, timeout)."""


def transport_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (
        ("httpx2", "TransportError"),
        ("httpx", "TransportError"),
        ("requests", "ConnectionError"),
        ("requests", "Timeout"),
    ):
        with contextlib.suppress(ImportError, AttributeError):  # whichever HTTP client this hub version uses
            errors.append(getattr(importlib.import_module(module), name))
    return tuple(errors)


def remote_files(repo_id: str, revision: str) -> tuple[str, list[RemoteFile]]:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = constants.ENDPOINT
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except GatedRepoError:
        raise HubError(
            f"{repo_id} is gated: you have not been granted access",
            hint="accept its terms on the hub, then set HF_TOKEN to a token of that account",
        ) from None
    except RevisionNotFoundError:
        raise HubError(
            f"revision {revision!r} not found in {repo_id}", hint="give a branch, tag or full commit hash that exists"
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"repository {repo_id} not found on {endpoint}", hint="check the name; if it is private, set HF_TOKEN"
        ) from None
    except OfflineModeIsEnabled as exc:
        raise Unreachable("HF_HUB_OFFLINE is set") from exc
    except transport_errors() as exc:
        raise Unreachable(f"cannot reach {endpoint}: {type(exc).__name__}") from exc
    except HfHubHTTPError as exc:
        raise HubError(
            f"the hub answered {exc.response.status_code} for {repo_id}",
            hint="try again later; if it persists, check HF_ENDPOINT and HF_TOKEN",
        ) from None
    siblings = info.siblings or []
    for s in siblings:
        if (reason := name_problem(s.rfilename)) is not None:
            raise HubError(
                f"{repo_id} lists a file name that would land outside the destination: {s.rfilename!r} ({reason})",
                hint="this revision cannot be fetched safely; report it to the repository's owner",
            )
    if not info.sha:
        raise HubError(
            f"the hub did not say which commit {revision!r} of {repo_id} is",
            hint="try again; check that HF_ENDPOINT is a Hugging Face hub",
        )
    files = [
        RemoteFile(s.rfilename, int(s.size or 0), s.lfs.sha256 if s.lfs else None, None if s.lfs else s.blob_id) for s in siblings
    ]
    return info.sha, files
