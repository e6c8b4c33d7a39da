"""The one place that reaches the network: a Hugging Face Hub id that is not in the local cache is downloaded
(config, tokenizer, generation config, chat template and safetensors weights only) when the network allows.

What went wrong is told apart, as users need to act on it differently: the hub is off (HF_HUB_OFFLINE=1), the
hub is unreachable (no network, a proxy, a timeout), or the hub does not know the id (or it is gated/private).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

# What a model folder needs; never other weight formats (.bin, .pt, .gguf, .onnx) nor the repo's extras.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt"]


def _offline() -> bool:
    """HF_HUB_OFFLINE, as huggingface_hub read it at import or as the environment says now."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or now


def cached_snapshot(model_id: str) -> str | None:
    """The folder of model_id's snapshot in the local HF cache, or None (never reaches the network)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (several error kinds), or not a valid id
        return None


def download_model(model_id: str) -> str:
    """The local folder of an HF Hub model: from the cache, else downloaded. ValueError saying why not."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    folder = cached_snapshot(model_id)
    if folder is not None:
        return folder
    where = f"model {model_id!r} is neither a local file or folder nor in the local Hugging Face cache"
    if _offline():
        raise ValueError(f"{where}, and the hub is switched off (HF_HUB_OFFLINE=1): unset it to download the "
                         "model, or pass a local path")
    logger.info("downloading %s from the Hugging Face Hub", model_id)
    try:
        return snapshot_download(model_id, allow_patterns=ALLOW_PATTERNS)
    except HFValidationError as e:
        raise ValueError(f"{where}, and it is not a valid Hugging Face model id ({e})") from None
    except GatedRepoError:
        raise ValueError(f"{where}; the hub says it is gated: accept its terms on huggingface.co and set HF_TOKEN"
                         ) from None
    except RepositoryNotFoundError:
        raise ValueError(f"{where}, and the Hugging Face Hub does not know it (a typo, or a private model: set "
                         "HF_TOKEN)") from None
    except RevisionNotFoundError as e:
        raise ValueError(f"{where}, and the hub has no such revision ({e})") from None
    except Exception as e:  # noqa: BLE001 - connection errors come wrapped in several kinds
        cause = e.__cause__ or e.__context__
        detail = f"{type(cause).__name__}: {cause}" if cause is not None else f"{type(e).__name__}"
        raise ValueError(f"{where}, and the Hugging Face Hub is unreachable ({detail}): check the network or "
                         "proxy (HTTPS_PROXY), or pass a local path") from None
