"""Hugging Face Hub ids in offline mode: a model that is not in the local cache is named, with the setting that
forbids downloading it.

With ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) transformers reports a hub id it cannot find in the cache as
"We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the cached files":
neither the model nor the offline setting is named, and the first line suggests a network problem.
"""

from __future__ import annotations

import os

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
"""Environment variables that switch the Hub client (and transformers) to offline mode."""

_TRUE = ("1", "ON", "YES", "TRUE")


def offline_setting() -> str | None:
    """``NAME=VALUE`` of the variable that puts the Hub client offline, or None when it may download."""
    for name in OFFLINE_VARIABLES:
        value = os.environ.get(name, "")
        if value.strip().upper() in _TRUE:
            return f"{name}={value}"
    return None


def check_cached_when_offline(repo_id: str) -> None:
    """Refuse hub id ``repo_id`` in offline mode when its ``config.json`` is not in the local cache.

    Raises:
        FileNotFoundError: naming the model id, the offline setting and the cache folder.
    """
    setting = offline_setting()
    if setting is None:
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    raise FileNotFoundError(
        f"model {repo_id!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {setting} forbids "
        f"downloading it: download it once with the network on (huggingface-cli download {repo_id}), or give a "
        "local model folder"
    )


__all__ = ["OFFLINE_VARIABLES", "check_cached_when_offline", "offline_setting"]
