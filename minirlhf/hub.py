"""Where models, tokenizers and datasets come from: a local path as it is, anything else from the Hugging Face Hub
(huggingface_hub's cache; HF_HUB_OFFLINE=1 never touches the network). A name that looks like a path (a leading ".",
"/" or "~", two "/" or a file suffix) and does not exist is a one-line error at once, as is a Hub failure.
"""

from pathlib import Path


def local_or_hub(name: str, patterns: list[str], revision: str | None = None, repo_type: str = "model") -> Path:
    """The local file or folder `name`, or the folder of a Hub snapshot; ValueError (one line) if neither."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    looks_local = Path(name).suffix in (".json", ".jsonl", ".parquet", ".toml", ".safetensors")
    if looks_local or str(name).startswith((".", "/", "~")) or str(name).count("/") > 1:
        raise ValueError(f"{name}: no such file or folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(str(name), repo_type=repo_type, revision=revision, allow_patterns=patterns))
    except (HFValidationError, OSError) as e:  # offline, unknown repo, bad id: huggingface_hub's errors are OSErrors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{name}: no such local file or folder, and not found on the Hugging Face Hub "
                         f"({type(e).__name__}: {reason})") from None
