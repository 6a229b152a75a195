"""Decides up front whether a hub model id can be loaded here: from the local cache, or from a hub that answers.

Without this an offline machine spends most of a minute in download retries before the fallback is reached.
"""

import logging
import threading
import urllib.error
import urllib.request
from pathlib import Path

from core.errors import LoragError

log = logging.getLogger(__name__)

REACH_TIMEOUT_S = 2.0


def looks_like_hub_id(model: str) -> bool:
    """True when ``model`` is no existing path and reads as ``name`` or ``owner/name`` (a hub repo id)."""
    if Path(model).expanduser().exists():
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if model.startswith((".", "~", "/")):
        return False
    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def cached_snapshot(repo_id: str) -> Path | None:
    """The directory of ``repo_id``'s cached snapshot (it holds config.json), or None when it is not cached."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def hub_reachable(endpoint: str, *, timeout_s: float = REACH_TIMEOUT_S) -> bool:
    """True when ``endpoint`` answers an HTTP request (any status below 500) within ``timeout_s`` seconds.

    Proxies from the environment are honoured (urllib reads them). The request runs in a daemon thread so that
    a slow DNS lookup cannot hold the caller past the timeout either.
    """
    outcome: list[bool] = []  # written by the probe thread; read after ``done`` or the timeout
    done = threading.Event()

    def probe() -> None:
        request = urllib.request.Request(endpoint, method="HEAD")
        try:
            urllib.request.urlopen(request, timeout=timeout_s).close()
            outcome.append(True)
        except urllib.error.HTTPError as error:  # 4xx is the hub answering; 5xx is a gateway that cannot reach it
            outcome.append(error.code < 500)
        except (OSError, ValueError):  # refused, unresolvable, timed out, malformed endpoint
            outcome.append(False)
        finally:
            done.set()

    threading.Thread(target=probe, name="lorag-hub-probe", daemon=True).start()
    done.wait(timeout_s)
    return bool(outcome and outcome[0])


def locate_hub_model(repo_id: str, *, timeout_s: float = REACH_TIMEOUT_S) -> str:
    """What to load for the hub id ``repo_id``: the id itself when the hub answers (or offline mode is on and the
    model is cached), the cached snapshot directory when the hub does not answer, and an error in seconds otherwise.

    Raises:
        LoragError: the model is not in the local cache and the hub cannot be reached (offline mode is set
            with HF_HUB_OFFLINE, or no answer within ``timeout_s``).
    """
    from huggingface_hub import constants

    snapshot = cached_snapshot(repo_id)
    if constants.is_offline_mode():
        if snapshot is not None:
            return repo_id  # transformers reads the cache itself in offline mode
        why = "offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)"
    elif hub_reachable(constants.ENDPOINT, timeout_s=timeout_s):
        return repo_id
    elif snapshot is not None:
        log.warning("the hub (%s) does not answer: loading %r from its cached snapshot %s", constants.ENDPOINT,
                    repo_id, snapshot)
        return str(snapshot)
    else:
        why = f"the hub ({constants.ENDPOINT}) did not answer within {timeout_s:g} s"
    raise LoragError(
        f"generation model {repo_id!r} is not in the local hub cache ({constants.HF_HUB_CACHE}) and cannot be "
        f"downloaded: {why}",
        hint=f"Download it where the hub is reachable (hf download {repo_id}) or set generation.model "
        "to a local directory; if you meant a local directory, it does not exist: "
        f"{str(Path(repo_id).expanduser().resolve())!r}",
    )
