"""`gpt-sovits-mlx download`: the PrimeSpeech voices, encoders and G2PW model from the Hugging Face Hub.

The files and where they go are those of dora-primespeech's own downloader (mofa-studio's
`models/model-manager/download_models.py`), so a model directory filled by either works with both:

- each voice's GPT, SoVITS and reference files (`voices/builtin.json`: paths inside the repository
  `MoYoYoTech/tone-models`) into `$PRIMESPEECH_MODEL_DIR/moyoyo/<same path>`;
- the encoders `chinese-hubert-base/` and `chinese-roberta-wwm-ext-large/` from the same repository,
  into `moyoyo/`;
- the g2pW polyphone model from `alextomcat/G2PWModel` into `G2PWModel/` (only the files
  `text.g2pw` reads).

Downloads go through huggingface_hub (optional extra `[download]`): its resumable transfers (a dropped
connection resumes with a Range request) and progress bars. Every file is then checked against the hash
the Hub reports for it (`paths-info`: the LFS sha256, or the git blob id of a small file); a file that
does not match is deleted and named. Files already present are hashed once and recorded as verified in
`<model dir>/.download-verified.json` (size and mtime), so a second run fetches nothing and re-reads
nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .voices import BUILTIN_FILE, MOFA_ALIASES, MOFA_CHARACTERS, resolve_model_dir

G2PW_REPO = "alextomcat/G2PWModel"  # dora-primespeech's downloader takes g2pW from here
ENCODER_FILES = (
    "chinese-hubert-base/config.json",
    "chinese-hubert-base/preprocessor_config.json",
    "chinese-hubert-base/pytorch_model.bin",
    "chinese-roberta-wwm-ext-large/config.json",
    "chinese-roberta-wwm-ext-large/pytorch_model.bin",
    "chinese-roberta-wwm-ext-large/tokenizer.json",
)
G2PW_FILES = ("g2pW.onnx", "config.py", "POLYPHONIC_CHARS.txt", "MONOPHONIC_CHARS.txt",
              "bopomofo_to_pinyin_wo_tune_dict.json", "char_bopomofo_dict.json")
RECORD_FILE = ".download-verified.json"
EXTRA_HINT = "pip install 'dora-primespeech-mlx[download]' (or pip install huggingface_hub)"


class DownloadError(Exception):
    """Anything that stops the download, with a message for the user."""


@dataclass(frozen=True)
class Wanted:
    """One file: where it is in its repository and where it goes under the model directory."""

    repo: str
    path: str  # inside the repository
    folder: str  # under the model directory: "moyoyo" or "G2PWModel"

    @property
    def key(self) -> str:
        return f"{self.folder}/{self.path}"


def builtin_table() -> tuple[str, list[dict]]:
    """(repository, voice entries) of `voices/builtin.json`, dora-primespeech's voice table."""
    data = json.loads(BUILTIN_FILE.read_text(encoding="utf-8"))
    return data["repository"], data["voices"]


def resolve_voices(names: str | None) -> list[str]:
    """Built-in voice ids for `--voices`: comma-separated, matched ignoring case and spaces; mofa-studio's
    character ids (`dnz`, `yfc`, …) work too; empty or "all" means every voice."""
    ids = [entry["id"] for entry in builtin_table()[1]]
    wanted = [n.strip() for n in (names or "").split(",") if n.strip()]
    if not wanted or [n.lower() for n in wanted] == ["all"]:
        return ids

    def key(name: str) -> str:
        return name.replace(" ", "").lower()

    table = {key(v): v for v in ids}
    for character, voice in MOFA_CHARACTERS.items():
        if voice:
            table.setdefault(character, voice)
    for alias, character in MOFA_ALIASES.items():
        if MOFA_CHARACTERS.get(character):
            table.setdefault(alias, MOFA_CHARACTERS[character])
    unknown = [n for n in wanted if key(n) not in table]
    if unknown:
        raise DownloadError(f"unknown voice(s) {', '.join(map(repr, unknown))}; known voices: {', '.join(ids)} "
                            "(or 'all'); pass them to --voices separated by commas")
    return list(dict.fromkeys(table[key(n)] for n in wanted))


def plan(voice_ids: list[str], encoders: bool = True, g2pw: bool = True) -> list[Wanted]:
    """The files to have, in order, without repeats."""
    repo, entries = builtin_table()
    by_id = {e["id"]: e for e in entries}
    paths = [by_id[v][k] for v in voice_ids for k in ("gpt_weights", "sovits_weights", "reference_audio")]
    if encoders:
        paths += ENCODER_FILES
    files = [Wanted(repo, p, "moyoyo") for p in dict.fromkeys(paths)]
    if g2pw:
        files += [Wanted(G2PW_REPO, p, "G2PWModel") for p in G2PW_FILES]
    return files


# ------------------------------------------------------------------------------ hashes


@dataclass(frozen=True)
class Expected:
    """What the Hub says a file is: its size and its LFS sha256 or, for a small file, its git blob id."""

    size: int
    kind: str  # "sha256" or "git-sha1"
    digest: str

    def tag(self) -> str:
        return f"{self.kind}:{self.digest}"


def file_digest(path: Path, kind: str) -> str:
    h = hashlib.sha256() if kind == "sha256" else hashlib.sha1()
    if kind == "git-sha1":
        h.update(b"blob %d\0" % path.stat().st_size)  # git hashes a header, then the content
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Record:
    """`<model dir>/.download-verified.json`: files verified before, by size and mtime."""

    def __init__(self, model_dir: Path, readonly: bool = False):
        self.path = model_dir / RECORD_FILE
        self.readonly = readonly  # a dry run writes nothing
        try:
            files = json.loads(self.path.read_text(encoding="utf-8")).get("files", {})
            self.files = files if isinstance(files, dict) else {}
        except (OSError, ValueError, AttributeError):
            self.files = {}

    def matches(self, key: str, local: Path, expected: Expected) -> bool:
        """Whether `local` holds exactly the Hub's bytes: from the record when the file is unchanged since
        it was verified, else by hashing it (and recording a match)."""
        try:
            st = local.stat()
        except OSError:
            return False
        if not local.is_file() or st.st_size != expected.size:
            return False
        entry = self.files.get(key)
        if entry == {"digest": expected.tag(), "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
            return True
        if file_digest(local, expected.kind) != expected.digest:
            return False
        self.remember(key, local, expected)
        return True

    def remember(self, key: str, local: Path, expected: Expected) -> None:
        st = local.stat()
        self.files[key] = {"digest": expected.tag(), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        self._save()

    def forget(self, key: str) -> None:
        if self.files.pop(key, None) is not None:
            self._save()

    def _save(self) -> None:
        if self.readonly:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"files": self.files}, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


# ------------------------------------------------------------------------------ the Hub


def _hub():
    try:
        import huggingface_hub
        from huggingface_hub import utils
    except ImportError as exc:
        raise DownloadError(f"gpt-sovits-mlx download needs huggingface_hub ({exc}); install it with "
                            f"{EXTRA_HINT}") from None
    return huggingface_hub, utils


def _network_errors(utils) -> tuple[type[BaseException], ...]:
    """What the client raises when the Hub cannot be reached or answers with an error: its own errors,
    OSError, and the base error of whichever HTTP library this huggingface_hub version uses."""
    errors: list[type[BaseException]] = [utils.HfHubHTTPError, OSError]
    for name, attr in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        module = sys.modules.get(name)
        if module is not None and isinstance(getattr(module, attr, None), type):
            errors.append(getattr(module, attr))
    return tuple(errors)


def _why(exc: BaseException, utils) -> str:
    if isinstance(exc, utils.RevisionNotFoundError):
        return "the revision does not exist there (pass a branch, tag or commit of the repository to --revision)"
    if isinstance(exc, utils.RepositoryNotFoundError):
        return "the repository was not found"
    if isinstance(exc, utils.HfHubHTTPError) and getattr(exc, "response", None) is not None:
        return f"the Hub answered HTTP {exc.response.status_code}"
    # hf_hub_download wraps a failed HEAD call (ValueError, LocalEntryNotFoundError): name the cause
    cause = exc.__cause__ if isinstance(exc, (ValueError, utils.LocalEntryNotFoundError)) and exc.__cause__ else exc
    return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else 'no details'}"


def _expected_files(api, repo: str, revision: str, paths: list[str]) -> tuple[str, dict[str, Expected]]:
    """(commit, {path: Expected}) of `paths` at `revision`; paths the repository lacks are left out."""
    commit = api.model_info(repo, revision=revision).sha or revision  # a mirror may leave out the sha
    found: dict[str, Expected] = {}
    for info in api.get_paths_info(repo, paths, revision=commit):
        if not hasattr(info, "blob_id"):
            continue  # a folder
        lfs = info.lfs
        if lfs is not None:
            sha = lfs["sha256"] if isinstance(lfs, dict) else lfs.sha256
            found[info.path] = Expected(int(info.size), "sha256", sha)
        else:
            found[info.path] = Expected(int(info.size), "git-sha1", info.blob_id)
    return commit, found


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # unreachable


def download(model_dir: Path, files: list[Wanted], revision: str = "main", dry_run: bool = False,
             out=print) -> list[str]:
    """Fetch `files` into `model_dir`; returns the problems (empty: everything is there and verified).

    `revision` applies to the voices' repository; g2pW comes from its repository's main branch. A
    network or Hub error stops the run (raised as DownloadError after the files fetched so far were
    verified and recorded); a checksum mismatch deletes that file and the run goes on.
    """
    hub, utils = _hub()
    network = _network_errors(utils)
    api = hub.HfApi()
    record = Record(model_dir, readonly=dry_run)
    problems: list[str] = []
    to_fetch: list[tuple[Wanted, Expected, Path]] = []
    for repo in dict.fromkeys(f.repo for f in files):
        mine = [f for f in files if f.repo == repo]
        rev = revision if repo != G2PW_REPO else "main"
        try:
            commit, expected = _expected_files(api, repo, rev, [f.path for f in mine])
        except network as exc:
            raise DownloadError(f"cannot read {repo}@{rev} from {api.endpoint}: {_why(exc, utils)}; "
                                "check the connection (HF_ENDPOINT, proxy) and run the command again") from None
        out(f"{repo}@{rev} (commit {commit[:12]}) -> {model_dir / mine[0].folder}")
        for f in mine:
            local = model_dir / f.folder / f.path
            exp = expected.get(f.path)
            if exp is None:
                problems.append(f"{f.repo} has no file {f.path!r} at {rev}; {local} cannot be fetched")
                out(f"  missing  {f.path} (not in the repository)")
                continue
            if record.matches(f.key, local, exp):
                out(f"  ok       {f.path} ({_size(exp.size)}, present and verified)")
                continue
            out(f"  {'replace' if local.exists() else 'fetch':<8} {f.path} ({_size(exp.size)})")
            to_fetch.append((f, exp, local))
        if dry_run:
            continue
        for f, exp, local in [t for t in to_fetch if t[0].repo == repo]:
            try:
                hub.hf_hub_download(repo, f.path, revision=commit, local_dir=model_dir / f.folder,
                                    force_download=local.exists())
            except network + (ValueError,) as exc:
                raise DownloadError(f"downloading {f.path} from {repo} ({api.endpoint}) failed: "
                                    f"{_why(exc, utils)}. Files fetched before it are kept and verified; run "
                                    "the command again to fetch the rest") from None
            got = file_digest(local, exp.kind)
            if got != exp.digest:
                local.unlink(missing_ok=True)
                record.forget(f.key)
                problems.append(f"checksum mismatch for {local} ({repo}/{f.path}): the Hub says {exp.kind} "
                                f"{exp.digest}, the downloaded file has {got}; deleted it, run the command again")
                continue
            record.remember(f.key, local, exp)
    total = sum(e.size for _, e, _ in to_fetch)
    if dry_run:
        out(f"dry run: {len(to_fetch)} file(s), {_size(total)}, would be fetched; nothing was written")
    elif not problems:
        out(f"done: {len(to_fetch)} file(s) fetched ({_size(total)}); all {len(files)} present and verified "
            f"under {model_dir}")
    return problems


# ------------------------------------------------------------------------------ command line


def add_parser(sub) -> None:
    """The `download` subcommand on `gpt-sovits-mlx`'s subparsers."""
    p = sub.add_parser("download", help="fetch the voices, encoders and G2PW model from the Hugging Face Hub")
    p.add_argument("--model-dir", default=os.environ.get("PRIMESPEECH_MODEL_DIR"),
                   help="default: $PRIMESPEECH_MODEL_DIR, else ~/.dora/models/primespeech")
    p.add_argument("--voices", default=None,
                   help="comma-separated voice ids, e.g. Doubao,Maple (default: all 15)")
    p.add_argument("--no-encoders", action="store_true", help="skip chinese-hubert-base and chinese-roberta")
    p.add_argument("--no-g2pw", action="store_true", help=f"skip the G2PW polyphone model ({G2PW_REPO})")
    p.add_argument("--revision", default="main", help="branch, tag or commit of the voices' repository")
    p.add_argument("--dry-run", action="store_true", help="list what would be fetched; write nothing")
    p.set_defaults(func=cmd_download)


def cmd_download(args: argparse.Namespace) -> int:
    for name in ("httpx2", "httpx"):  # one INFO line per request otherwise; the progress bars say enough
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        if not args.revision.strip():
            raise DownloadError("--revision is empty; pass a branch, tag or commit (default: main)")
        files = plan(resolve_voices(args.voices), encoders=not args.no_encoders, g2pw=not args.no_g2pw)
        model_dir = resolve_model_dir(args.model_dir)
        if not args.dry_run:
            model_dir.mkdir(parents=True, exist_ok=True)
        problems = download(model_dir, files, revision=args.revision.strip(), dry_run=args.dry_run)
    except (DownloadError, OSError) as exc:  # OSError: the model directory or a file cannot be written
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0
