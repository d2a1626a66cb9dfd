"""Hub ids ("google/gemma-3-270m") as conversion sources, through huggingface_hub's own cache.

    >>> folder, info = resolve("google/gemma-3-270m", offline=True)   # doctest: +SKIP
    >>> sorted(info)                                                    # doctest: +SKIP
    ['commit', 'repo_id', 'revision']

Only the files the converter reads are fetched (MODEL_FILES), or the one GGUF file of a GGUF-only
repo. With `offline` (or HF_HUB_OFFLINE=1) nothing goes over the network: the snapshot must be
in the local cache already. huggingface_hub is the optional extra `blobstore-runtime[hub]`.
"""
from __future__ import annotations

import re
from pathlib import Path

from .problems import ConversionError

# The files blob-pack convert reads from a Hugging Face model folder (sources.py, tokenizer.py).
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
               "special_tokens_map.json"]
# "org/name" as the Hub spells repo ids; a path such as ./x/y or /x/y never matches.
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
HUB_EXTRA = "pip install 'blobstore-runtime[hub]'"


def is_repo_id(text: str) -> bool:
    """Whether `text` has the form of a Hub model id.

    >>> is_repo_id("google/gemma-3-270m"), is_repo_id("./models/gemma"), is_repo_id("model.gguf")
    (True, False, False)
    """
    return REPO_ID.fullmatch(text) is not None


def resolve(repo_id: str, *, revision: str | None = None, offline: bool = False,
            gguf_file: str | None = None) -> tuple[Path, dict]:
    """(local path to convert, provenance {"repo_id", "revision", "commit"}) for a Hub id.

    The path is the snapshot folder of a safetensors repo, or the chosen .gguf file: `gguf_file`,
    else the repo's only one (several are an error listing them).

    >>> resolve("unsloth/gemma-3-270m-it-GGUF", gguf_file="gemma-3-270m-it-Q8_0.gguf")[0].name   # doctest: +SKIP
    'gemma-3-270m-it-Q8_0.gguf'
    """
    hub = _import_hub(repo_id)
    local_only = bool(offline or hub.constants.HF_HUB_OFFLINE)
    where = _Where(hub, repo_id, revision, local_only)
    folder = where.snapshot(MODEL_FILES) if gguf_file is None else None
    if folder is not None and not any(folder.glob("*.safetensors")):
        gguf_file = _only_gguf(where, folder)
    if gguf_file is not None:
        folder = where.snapshot([gguf_file])
        path = folder / gguf_file
        if not path.is_file():
            raise ConversionError(f"{where}: no file {gguf_file!r} in the repo")
    else:
        path = folder
        if not (folder / "config.json").is_file():
            raise ConversionError(f"{where}: not a model repo blob-pack can convert (no config.json with "
                                  f"safetensors weights, no .gguf file)")
    return path, {"repo_id": repo_id, "revision": revision or "main", "commit": folder.name}


def _import_hub(repo_id: str):
    try:
        import huggingface_hub
        import huggingface_hub.constants  # noqa: F401  (submodules: the package imports them lazily)
        import huggingface_hub.utils  # noqa: F401
    except ImportError:
        raise ConversionError(f"{repo_id}: no such local file or folder; to read it as a Hugging Face Hub id, "
                              f"install the hub extra: {HUB_EXTRA}") from None
    return huggingface_hub


def _only_gguf(where: "_Where", folder: Path) -> str | None:
    """The repo's one .gguf file, None when it has none; several need --gguf-file."""
    names = where.gguf_names(folder)
    if len(names) > 1:
        listed = "\n".join(f"  {name}" for name in names)
        raise ConversionError(f"{where}: the repo holds {len(names)} GGUF files; choose one with "
                              f"--gguf-file NAME:\n{listed}")
    return names[0] if names else None


class _Where:
    """One repo at one revision, and how to reach it: the error messages name all three."""

    def __init__(self, hub, repo_id: str, revision: str | None, local_only: bool):
        self.hub, self.repo_id, self.revision, self.local_only = hub, repo_id, revision, local_only

    def __str__(self) -> str:
        return self.repo_id + (f" (revision {self.revision})" if self.revision else "")

    def snapshot(self, patterns: list[str]) -> Path:
        """The local snapshot folder holding the files matching `patterns` (downloaded unless offline)."""
        errors = self.hub.utils
        try:
            return Path(self.hub.snapshot_download(self.repo_id, revision=self.revision, allow_patterns=patterns,
                                                   local_files_only=self.local_only))
        except errors.GatedRepoError:
            raise ConversionError(f"{self}: a gated repo; accept its licence on huggingface.co and log in "
                                  f"(`hf auth login`)") from None
        except errors.RepositoryNotFoundError:
            raise ConversionError(f"{self}: no local file or folder of that name, and no such model repo on the "
                                  f"Hugging Face Hub (a dataset or Space id? a private repo needs `hf auth login`)"
                                  ) from None
        except errors.RevisionNotFoundError:
            raise ConversionError(f"{self}: the repo has no revision {self.revision!r}") from None
        except errors.HFValidationError as error:
            raise ConversionError(f"{self.repo_id}: not a valid Hub id ({error})") from None
        except errors.LocalEntryNotFoundError:
            raise ConversionError(self._not_cached()) from None

    def gguf_names(self, folder: Path) -> list[str]:
        """The .gguf files of the repo: as listed by the Hub, or those in the cached snapshot offline."""
        if self.local_only:
            return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.gguf"))
        files = self.hub.HfApi().list_repo_files(self.repo_id, revision=folder.name)
        return sorted(name for name in files if name.endswith(".gguf"))

    def _not_cached(self) -> str:
        cache = self.hub.constants.HF_HUB_CACHE
        if self.local_only:
            return (f"{self}: not in the local Hugging Face cache ({cache}) and downloads are off "
                    f"(--offline or HF_HUB_OFFLINE=1), nor a local file or folder; run once without them to "
                    f"download it, or give the path of a local folder or .gguf file")
        return (f"{self}: the Hugging Face Hub could not be reached and the local cache ({cache}) has no "
                f"snapshot of it; check the connection, or give a local folder or .gguf file")
