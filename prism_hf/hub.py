"""
Publishing drafts on the Hugging Face Hub.

`push_reply_dataset` publishes a replies dataset (`prism-hf data`) as a dataset repository with its card.

`push_draft` checks that a draft folder is a complete Hub repository (config, safetensors weights matching it, the
code files `trust_remote_code` runs, a model card with Hub metadata), refreshes the card from the recorded training
and benchmark numbers, and uploads the folder with `huggingface_hub` (`create_repo` + `upload_folder`). With
`dry_run=True` it stops before the network and reports exactly which files, with which sizes and digests, would go
up.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .model_card import card_metadata, record_benchmark, write_model_card

PACKAGE_DIR = Path(__file__).resolve().parent
# Metadata the card must carry for the Hub to index and link the draft.
REQUIRED_CARD_METADATA = ("base_model", "library_name", "license", "pipeline_tag", "tags")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.MULTILINE)


@dataclass(frozen=True)
class UploadFile:
    """One file of an upload: its path in the repository, size in bytes and SHA-256 of its content."""

    path: str
    size: int
    sha256: str


@dataclass
class UploadPlan:
    """What `push_draft` uploads (or, in a dry run, would upload)."""

    repo_id: str
    folder: Path
    files: list[UploadFile]
    skipped: list[str]
    card_metadata: dict[str, Any]
    commit_message: str
    private: bool = False
    revision: str | None = None
    endpoint: str | None = None
    commit_url: str | None = field(default=None, compare=False)

    def describe(self) -> str:
        """A listing of the upload: target repository, commit message, every file, card metadata."""
        total = sum(f.size for f in self.files)
        where = f"{self.endpoint or constants.ENDPOINT}/{self.repo_id}"
        lines = [
            f"repository: {where} (model, {'private' if self.private else 'public'}, "
            f"branch {self.revision or 'main'})",
            f"commit message: {self.commit_message}",
            f"files ({len(self.files)}, {total} bytes):",
            *(f"  {f.path:<28} {f.size:>12}  sha256:{f.sha256}" for f in self.files),
        ]
        if self.skipped:
            lines.append("not uploaded: " + ", ".join(self.skipped))
        lines.append("card metadata:")
        lines += [f"  {key}: {value}" for key, value in self.card_metadata.items() if value is not None]
        return "\n".join(lines)


def validate_draft_dir(draft_dir: str | Path, refresh_code: bool = False) -> None:
    """
    Raises a `ValueError` listing every problem that would make `draft_dir` a broken Hub repository: config,
    weights, the code files named in `auto_map` (and their relative imports), all current with the installed
    prism_hf. `refresh_code=True` first copies the installed package's code over stale copies.
    """
    draft_dir = Path(draft_dir)
    if not draft_dir.is_dir():
        raise ValueError(f"{draft_dir} is not a directory.")
    problems: list[str] = []
    config_path = draft_dir / "config.json"
    config: dict[str, Any] = {}
    if not config_path.is_file():
        problems.append("config.json is missing")
    else:
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            problems.append(f"config.json is not valid JSON ({error})")
    if config:
        if config.get("model_type") != "prism_draft":
            problems.append(f"config.json has model_type {config.get('model_type')!r}, expected 'prism_draft'")
        for key in ("verifier_model_type", "verifier_hidden_size", "verifier_vocab_size"):
            if config.get(key) is None:
                problems.append(f"config.json does not name the verifier ({key} is unset)")
        problems += _check_code_files(draft_dir, config.get("auto_map") or {}, refresh_code)
    pickles = sorted(p.name for p in draft_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        problems.append(f"pickle files are not published, save the draft with safetensors: {', '.join(pickles)}")
    if not (draft_dir / "model.safetensors").is_file() and not (draft_dir / "model.safetensors.index.json").is_file():
        problems.append("model.safetensors is missing")
    elif not problems:
        from .modeling_prism import PrismDraftModel

        try:  # refuses missing, unexpected, mis-shaped and truncated tensors, with their names
            PrismDraftModel.from_pretrained(draft_dir)
        except (OSError, ValueError) as error:
            problems.append(str(error))
    if problems:
        raise ValueError(f"{draft_dir} is not ready for the Hub:\n- " + "\n- ".join(problems))


def _check_code_files(draft_dir: Path, auto_map: dict[str, str], refresh_code: bool) -> list[str]:
    missing_classes = [name for name in ("AutoConfig", "AutoModel") if name not in auto_map]
    if missing_classes:
        return [
            f"config.json's auto_map lacks {', '.join(missing_classes)}: the draft would not load with "
            "trust_remote_code (save it with `save_pretrained` after `import prism_hf`)"
        ]
    problems = []
    pending = [reference.split(".")[0] + ".py" for reference in auto_map.values()]
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        local, current = draft_dir / name, PACKAGE_DIR / name
        if refresh_code and current.is_file() and (not local.is_file() or local.read_bytes() != current.read_bytes()):
            shutil.copyfile(current, local)
        if not local.is_file():
            problems.append(f"{name} is missing (trust_remote_code imports it)")
            continue
        if current.is_file() and local.read_bytes() != current.read_bytes():
            problems.append(f"{name} differs from the installed prism_hf's (pass refresh_code / --refresh-code)")
        pending += [f"{module}.py" for module in _RELATIVE_IMPORT.findall(local.read_text())]
    return problems


def check_model_card(draft_dir: str | Path) -> dict[str, Any]:
    """Returns the card's Hub metadata, or raises a `ValueError` naming what the Hub would miss."""
    path = Path(draft_dir) / "README.md"
    if not path.is_file():
        raise ValueError(f"{path} is missing: the Hub shows the model card from it.")
    return check_card_metadata(path, REQUIRED_CARD_METADATA)


def plan_upload(
    draft_dir: str | Path,
    repo_id: str,
    *,
    benchmark_results: str | Path | None = None,
    benchmark_strategy: str | None = None,
    base_model: str | None = None,
    license: str = "apache-2.0",
    refresh_card: bool = True,
    refresh_code: bool = False,
    commit_message: str | None = None,
    private: bool = False,
    revision: str | None = None,
    endpoint: str | None = None,
) -> UploadPlan:
    """
    Validates `draft_dir`, records `benchmark_results` (a `prism-hf bench` results.json) into it, rewrites its card
    (unless `refresh_card=False`, which only checks the existing card) and lists the files to upload. Writes only
    `benchmark_record.json`, `README.md` and, with `refresh_code`, the code files inside `draft_dir`.
    """
    _check_repo_id(repo_id)
    draft_dir = Path(draft_dir)
    validate_draft_dir(draft_dir, refresh_code=refresh_code)
    if benchmark_results is not None:
        record_benchmark(draft_dir, benchmark_results, benchmark_strategy)
    if refresh_card:
        missing = [name for name in ("training_args.json", "training_record.json") if not (draft_dir / name).is_file()]
        if missing:
            raise ValueError(
                f"{draft_dir} has no {' or '.join(missing)} (written by `prism-hf train`) to write the model card "
                "from: write README.md with Hub metadata yourself and pass refresh_card=False (`--keep-card`)."
            )
        write_model_card(draft_dir, repo_id=repo_id, base_model=base_model, license=license)
        metadata = card_metadata(draft_dir, base_model=base_model, license=license).to_dict()
    else:
        metadata = check_model_card(draft_dir)
    files, skipped = [], []
    for path in sorted(draft_dir.iterdir()):
        if path.name.startswith(".") or path.name == "__pycache__" or path.suffix == ".pyc":
            continue
        if not path.is_file():
            skipped.append(path.name + "/")
            continue
        files.append(UploadFile(path.name, path.stat().st_size, _sha256(path)))
    return UploadPlan(
        repo_id=repo_id,
        folder=draft_dir,
        files=files,
        skipped=skipped,
        card_metadata=metadata,
        commit_message=commit_message or f"Upload PRISM draft {draft_dir.name} with prism-hf",
        private=private,
        revision=revision,
        endpoint=endpoint,
    )


def push_draft(
    draft_dir: str | Path,
    repo_id: str,
    *,
    dry_run: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool = False,
    revision: str | None = None,
    **plan_kwargs: Any,
) -> UploadPlan:
    """
    Publishes a draft folder as the Hub model repository `repo_id` (`org/name`), creating it if needed.

    The token comes from `token`, else the usual places (`HF_TOKEN`, `hf auth login`); `endpoint` (else
    `HF_ENDPOINT`) selects the Hub. Keyword arguments of [`plan_upload`] (benchmark results, base model, license,
    card and code refresh, commit message) are accepted. Returns the plan, with `commit_url` set after an upload.
    """
    plan = plan_upload(draft_dir, repo_id, private=private, revision=revision, endpoint=endpoint, **plan_kwargs)
    if dry_run:
        return plan
    return _upload(plan, "model", token)


def plan_dataset_upload(
    dataset_dir: str | Path,
    repo_id: str,
    *,
    base_model: str | None = None,
    license: str = "apache-2.0",
    commit_message: str | None = None,
    private: bool = False,
    revision: str | None = None,
    endpoint: str | None = None,
) -> UploadPlan:
    """
    Checks a replies dataset folder (written by `prism-hf data`), writes its dataset card and lists the files to
    upload: the card, `manifest.json`, `shards.jsonl` and every finished shard. A folder with a shard still being
    written (`.partial`) is refused: finish or resume the run first.
    """
    from .model_card import write_dataset_card
    from .training.replies import DATA_DIR, MANIFEST_FILE, SHARD_LOG_FILE, reply_shards

    _check_repo_id(repo_id)
    dataset_dir = Path(dataset_dir)
    shards = reply_shards(dataset_dir)
    partial = sorted(p.name for p in (dataset_dir / DATA_DIR).glob("*.partial"))
    if partial:
        raise ValueError(
            f"{dataset_dir} has shards still being written or interrupted ({', '.join(partial)}): let `prism-hf data` "
            "finish or resume it before publishing."
        )
    write_dataset_card(dataset_dir, repo_id=repo_id, base_model=base_model, license=license)
    paths = [dataset_dir / "README.md", dataset_dir / MANIFEST_FILE]
    if (dataset_dir / SHARD_LOG_FILE).is_file():
        paths.append(dataset_dir / SHARD_LOG_FILE)
    paths += shards
    files = [UploadFile(p.relative_to(dataset_dir).as_posix(), p.stat().st_size, _sha256(p)) for p in paths]
    return UploadPlan(
        repo_id=repo_id,
        folder=dataset_dir,
        files=files,
        skipped=[],
        card_metadata=check_card_metadata(dataset_dir / "README.md", ("license", "tags", "configs")),
        commit_message=commit_message or f"Upload replies dataset {dataset_dir.name} with prism-hf",
        private=private,
        revision=revision,
        endpoint=endpoint,
    )


def push_reply_dataset(
    dataset_dir: str | Path,
    repo_id: str,
    *,
    dry_run: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool = False,
    revision: str | None = None,
    **plan_kwargs: Any,
) -> UploadPlan:
    """
    Publishes a replies dataset as the Hub dataset repository `repo_id`, creating it if needed; `datasets`
    then loads it with `load_dataset(repo_id)`. Token and endpoint as in [`push_draft`].
    """
    plan = plan_dataset_upload(
        dataset_dir, repo_id, private=private, revision=revision, endpoint=endpoint, **plan_kwargs
    )
    if dry_run:
        return plan
    return _upload(plan, "dataset", token)


def check_card_metadata(path: Path, required: tuple[str, ...]) -> dict[str, Any]:
    """The card's YAML metadata; a `ValueError` naming the keys the Hub needs and the card lacks."""
    from huggingface_hub import RepoCard

    metadata = RepoCard.load(path).data.to_dict()
    missing = [key for key in required if not metadata.get(key)]
    if missing:
        raise ValueError(f"{path} lacks Hub metadata: {', '.join(missing)}.")
    return metadata


def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"Invalid repo id {repo_id!r}: {error}") from None
    if repo_id.count("/") != 1:
        raise ValueError(f"Pass the repo id as 'org/name' (the namespace is not guessed), got {repo_id!r}.")


def _upload(plan: UploadPlan, repo_type: str, token: str | None) -> UploadPlan:
    """Creates the repository (and branch) if needed and uploads exactly the plan's files in one commit."""
    if token is None and get_token() is None:
        raise ValueError(
            "No Hugging Face token found: run `hf auth login`, set HF_TOKEN, or pass token=... (--token)."
        )
    api = HfApi(endpoint=plan.endpoint, token=token)
    api.create_repo(plan.repo_id, repo_type=repo_type, private=plan.private, exist_ok=True)
    if plan.revision is not None and plan.revision != "main":
        api.create_branch(plan.repo_id, repo_type=repo_type, branch=plan.revision, exist_ok=True)
    commit = api.upload_folder(
        repo_id=plan.repo_id,
        repo_type=repo_type,
        folder_path=plan.folder,
        allow_patterns=[glob.escape(f.path) for f in plan.files],
        commit_message=plan.commit_message,
        revision=plan.revision,
    )
    plan.commit_url = commit.commit_url
    return plan


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
