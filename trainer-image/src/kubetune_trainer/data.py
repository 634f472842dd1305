"""Training data: JSON Lines (or Parquet, a row per line), validated line by line, tokenized, optionally
packed. Supervised fine-tuning reads three formats:

- alpaca: {"instruction": str, "input": str?, "output": str}; the prompt is the Alpaca template.
- chat:   {"messages": [{"role": "system|user|assistant|tool", "content": str}, ...]}, rendered with the
          tokenizer's chat template; or ShareGPT's {"conversations": [{"from": "human|gpt|...", "value":
          str}, ...], "system"?: str}, which is read as the same messages.
- text:   {"text": str}
For alpaca and chat only response (assistant) tokens count in the loss.

Preference objectives read two more (tokenized in kubetune_trainer.objectives.prefdata):

- preference: {"prompt", "chosen", "rejected"} (DPO, ORPO, SimPO), each text or a list of chat messages.
- kto:        {"prompt", "completion", "label": bool} (KTO: one completion, desirable or not).
Text throughout is used as it is; if any field is a message list the record is a chat: a text prompt
becomes one user message, a text response one assistant message, and a response that repeats the
prompt's messages first (UltraFeedback's layout) has them removed.

Labels are shifted per example here (``labels[t]`` is the token to predict after ``input_ids[t]``, or
-100), so a packed sequence never learns to predict one example's first token from the previous one.
Malformed lines stop the run with a BadData error naming the file and the line numbers, or are
skipped and counted when dataset.onBadLine is skip.
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from kubetune.api import registry as api_registry
from kubetune.api.constants import IGNORE_INDEX
from kubetune_trainer.errors import BadConfig, BadData

IGNORE = IGNORE_INDEX  # the label a loss skips (kubetune.api.constants)
MAX_REPORTED = 8  # bad lines named in one error message

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's speaker names (as LLaMA-Factory and axolotl read them) -> chat roles
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "observation": "tool", "tool": "tool", "function_response": "tool"}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # already shifted: labels[t] is predicted from input_ids[:t+1]
    position_ids: list[int] | None = None  # set for packed sequences

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataStats:
    lines: int = 0
    skipped_lines: int = 0
    dropped_examples: int = 0  # nothing left to learn after truncation
    truncated_examples: int = 0
    format: str = ""
    files: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# fetching


DATA_SUFFIXES = (".jsonl", ".parquet")


def resolve_files(uri: str, storage, work_dir: Path, log: Callable[[str], None] = print,
                  split: str = "train") -> list[tuple[str, Path]]:
    """(display name, local path) of every .jsonl or .parquet file a dataset URI names: a file or a
    prefix. ``split`` (train or validation) picks files from an hf:// dataset whose names mark splits."""
    from kubetune_trainer import storage as st

    if uri.startswith("hf://"):
        return _hf_dataset_files(uri, work_dir, log, split)
    local = st.local_path_of(uri)
    if local is not None:
        if local.is_file():
            return [(uri, local)]
        if local.is_dir():
            files = sorted(p for p in local.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES))
            if not files:
                raise BadData(f"{uri}: no .jsonl or .parquet files in this directory")
            return [(f"{uri.rstrip('/')}/{p.relative_to(local).as_posix()}", p) for p in files]
        raise BadData(f"{uri}: no such file or directory")
    dest = work_dir / "data" / uri.replace("://", "/").replace("/", "_")
    if uri.endswith(DATA_SUFFIXES):  # a single object: list only its key, not the folder it is in
        parent_uri, _, name = uri.rpartition("/")
        parent = st.open_location(parent_uri, storage)
        listed = st.list_objects(parent, name, log=log, where=uri)
        paths = st.download_tree(parent, dest, only=lambda k: k == name, log=log, listed=listed)
        return [(uri, paths[0])]
    loc = st.open_location(uri, storage)
    objs = st.list_objects(loc, log=log, where=uri)
    if not any(o.key.endswith(DATA_SUFFIXES) for o in objs):
        raise BadData(f"{uri}: no .jsonl or .parquet objects under this prefix")
    paths = st.download_tree(loc, dest, only=lambda k: k.endswith(DATA_SUFFIXES), log=log, listed=objs)
    return [(f"{uri.rstrip('/')}/{p.relative_to(dest).as_posix()}", p) for p in sorted(paths)]


def hub_dataset_parts(uri: str) -> tuple[str, str, str | None]:
    """(repository, path inside it or "", revision or None) of hf://org/name[/path][@revision]. A path
    needs the org/name form: the first two segments name the repository."""
    body, _, rev = uri[len("hf://"):].partition("@")
    parts = body.strip("/").split("/")
    return "/".join(parts[:2]), "/".join(parts[2:]), rev or None


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def hub_patterns(path: str) -> list[str]:
    """What to download for a path in a dataset repository: a file, a folder, or a glob
    (huggingface_hub's fnmatch: ``*`` also crosses folders)."""
    if not path:
        return [f"*{x}" for x in DATA_SUFFIXES]
    if _has_glob(path) or path.endswith(DATA_SUFFIXES):
        return [path]
    return [f"{path}/*{x}" for x in DATA_SUFFIXES]


def select_path(files: list[str], path: str) -> list[str]:
    """The data files a path names: the file itself, every file under a folder, or a glob's matches."""
    import fnmatch

    if _has_glob(path):
        return [f for f in files if fnmatch.fnmatchcase(f, path)]
    return [f for f in files if f == path or f.startswith(path.rstrip("/") + "/")]


def _hf_dataset_files(uri: str, work_dir: Path, log: Callable[[str], None], split: str) -> list[tuple[str, Path]]:
    repo, sub, rev = hub_dataset_parts(uri)
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo, repo_type="dataset", revision=rev, allow_patterns=hub_patterns(sub),
                                      cache_dir=str(work_dir / "hf")))
    except Exception as e:
        from kubetune_trainer.storage import hub_error

        raise hub_error(uri, e, BadData, "dataset") from None
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.name.endswith(DATA_SUFFIXES))
    base = f"hf://{repo}" + (f"@{rev}" if rev else "")
    if sub:
        # the path chose the files: no split picking (hf://org/name/data/train_sft-*.parquet)
        picked = select_path(files, sub)
        if not picked:
            raise BadData(f"{uri}: no .jsonl or .parquet files at {sub!r} in the dataset {repo}"
                          + (f" (it has {', '.join(files[:4])}{' ...' if len(files) > 4 else ''})" if files else ""))
        log(f"{uri}: reading {len(picked)} file(s): {', '.join(picked[:4])}" + (" ..." if len(picked) > 4 else ""))
        return [(f"{base}/{f}", path / f) for f in picked]
    if not files:
        raise BadData(f"{uri}: the dataset has no .jsonl or .parquet files")
    picked = pick_split(files, split)
    if len(picked) < len(files):
        log(f"{uri}: reading {len(picked)} of its {len(files)} files as the {split} split: {', '.join(picked[:4])}"
            + (" ..." if len(picked) > 4 else "") + f"; name others with a path: hf://{repo}/<path>")
    return [(f"{base}/{f}", path / f) for f in picked]


# A Hub dataset's split is in its file or folder names (the datasets library's convention):
# train.jsonl, data/train-00000-of-00001.parquet, validation/part-0.parquet.
SPLIT_NAMES = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"),
               "test": ("test", "testing", "eval", "evaluation")}


def _named(files: list[str], names: tuple[str, ...]) -> list[str]:
    rx = re.compile(r"(^|/)(" + "|".join(names) + r")([-._ 0-9/]|$)")
    return [f for f in files if rx.search(f.lower())]


def pick_split(files: list[str], split: str) -> list[str]:
    """The files of one split: train (a repository's test split must not be trained on), or for
    validation its validation split, else its test split; all files when none is named so."""
    if split == "train":
        return _named(files, SPLIT_NAMES["train"]) or files
    if split == "test":
        return _named(files, SPLIT_NAMES["test"]) or files
    return _named(files, SPLIT_NAMES["validation"]) or _named(files, SPLIT_NAMES["test"]) or files


# ---------------------------------------------------------------------------------------------
# parsing and validation


SFT_FORMATS = api_registry.DATA_FORMATS["sft"]
# the keys that tell a format apart, in the order auto tries them (SFT's first, as before preference data)
FORMAT_KEYS = {"chat": (("messages",), ("conversations",)), "alpaca": (("instruction", "output"),),
               "text": (("text",),), "preference": (("prompt", "chosen", "rejected"),),
               "kto": (("prompt", "completion", "label"),)}
FORMAT_DATA = {f: kind for kind, fs in api_registry.DATA_FORMATS.items() for f in fs}  # format -> ObjectiveInfo.data


def detect_format(obj, formats: tuple[str, ...] = SFT_FORMATS) -> str | None:
    """The first of ``formats`` whose keys the record has. A UltraFeedback line has messages as well as
    prompt, chosen and rejected: SFT reads it as chat, a preference objective as preference."""
    if not isinstance(obj, dict):
        return None
    for fmt, key_sets in FORMAT_KEYS.items():
        if fmt in formats and any(all(k in obj for k in keys) for keys in key_sets):
            return fmt
    return None


def _undetected(obj, formats: tuple[str, ...]) -> str:
    if formats == SFT_FORMATS:  # SFT's message, word for word
        msg = ("cannot detect the format from the first line: expected keys "
               "instruction+output (alpaca), messages or conversations (chat) or text (text)")
    else:
        expected = " or ".join(f"{' or '.join('+'.join(k) for k in FORMAT_KEYS[f])} ({f})" for f in formats)
        msg = f"cannot detect the format from the first line: expected keys {expected}"
    other = detect_format(obj, tuple(FORMAT_KEYS))
    if other is not None and other not in formats:
        readers = api_registry.objective_names(data=FORMAT_DATA[other])
        msg += f"; it looks like {other} data, which objective {' or '.join(readers)} reads (spec.objective.type)"
    return msg


def check_record(obj, fmt: str) -> str | None:
    """None when the record is valid for the format, else what is wrong with it."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if fmt == "alpaca":
        for k in ("instruction", "output"):
            if k not in obj:
                return f"missing field {k!r} (alpaca lines need instruction and output)"
            if not isinstance(obj[k], str):
                return f"field {k!r} must be a string, got {type(obj[k]).__name__}"
        if obj.get("input") is not None and not isinstance(obj["input"], str):
            return f"field 'input' must be a string, got {type(obj['input']).__name__}"
        if not obj["output"].strip():
            return "field 'output' is empty"
        return None
    if fmt == "chat":
        if "messages" not in obj and "conversations" in obj:
            return _check_sharegpt(obj)
        if "messages" not in obj:
            return ("missing field 'messages' (chat lines need a list of {role, content}, or ShareGPT "
                    "conversations of {from, value})")
        return _check_turns(obj["messages"], "messages", "role", "content", {r: r for r in ROLES}, "assistant message")
    if fmt == "text":
        if "text" not in obj:
            return "missing field 'text'"
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            return "field 'text' must be a non-empty string"
        return None
    if fmt in ("preference", "kto"):
        got = preference_record(obj, fmt)
        return got if isinstance(got, str) else None
    raise BadConfig(f"unknown dataset format {fmt!r}")


RESPONSES = {"preference": ("chosen", "rejected"), "kto": ("completion",)}


def preference_record(obj: dict, fmt: str) -> dict | str:
    """A preference or kto line as {prompt, <responses>[, label]}, all text or all chat messages (the
    prompt's messages removed from the front of each response); or what is wrong with it."""
    responses = RESPONSES[fmt]
    for k in ("prompt", *responses) + (("label",) if fmt == "kto" else ()):
        if k not in obj:
            return f"missing field {k!r} ({fmt} lines need {', '.join(FORMAT_KEYS[fmt][0])})"
    if fmt == "kto" and not isinstance(obj["label"], bool):
        return f"field 'label' must be true (desirable) or false (undesirable), got {obj['label']!r}"[:200]
    for k in ("prompt", *responses):
        v = obj[k]
        if not isinstance(v, (str, list)):
            return f"field {k!r} must be text or a list of chat messages {{role, content}}, got {type(v).__name__}"
        if isinstance(v, list) and not v and k != "prompt":
            return f"field {k!r} is an empty list (it needs the response's assistant message)"
        if isinstance(v, list) and (problem := _check_messages(v, k)):
            return problem
    out = {"label": obj["label"]} if fmt == "kto" else {}
    if all(isinstance(obj[k], str) for k in ("prompt", *responses)):
        for k in responses:
            if not obj[k].strip():
                return f"field {k!r} is empty"
        return {"prompt": obj["prompt"], **{k: obj[k] for k in responses}, **out}
    p = obj["prompt"]
    prompt = p if isinstance(p, list) else ([{"role": "user", "content": p}] if p else [])
    out["prompt"] = [{"role": m["role"], "content": m["content"]} for m in prompt]
    for k in responses:
        r = obj[k]
        msgs = [{"role": "assistant", "content": r}] if isinstance(r, str) else [
            {"role": m["role"], "content": m["content"]} for m in r]
        if prompt and msgs[:len(prompt)] == out["prompt"]:
            msgs = msgs[len(prompt):]
        if not msgs:
            return f"field {k!r} holds only the prompt's messages: no response"
        if msgs[0]["role"] != "assistant":
            return (f"field {k!r} must continue the prompt with an assistant message "
                    f"(its first message after the prompt has role {msgs[0]['role']!r})")
        if isinstance(r, str) and not r.strip():
            return f"field {k!r} is empty"
        out[k] = msgs
    return out


def _check_messages(turns: list, field: str) -> str | None:
    for i, m in enumerate(turns):
        if not isinstance(m, dict):
            return f"{field}[{i}] must be an object with role and content"
        if m.get("role") not in ROLES:
            return f"{field}[{i}].role must be one of {', '.join(ROLES)} (got {m.get('role')!r})"[:200]
        if not isinstance(m.get("content"), str):
            return f"{field}[{i}].content must be a string"
    return None


def _check_sharegpt(obj: dict) -> str | None:
    if obj.get("system") is not None and not isinstance(obj["system"], str):
        return "field 'system' must be a string"
    return _check_turns(obj["conversations"], "conversations", "from", "value", SHAREGPT_ROLES, "gpt (assistant) turn")


def _check_turns(turns, field: str, role_key: str, text_key: str, roles: dict[str, str], assistant: str) -> str | None:
    """A chat's turns, in either schema: ``roles`` maps its speaker names to chat roles."""
    if not isinstance(turns, list) or not turns:
        return f"field {field!r} must be a non-empty list"
    for i, m in enumerate(turns):
        if not isinstance(m, dict):
            return f"{field}[{i}] must be an object with {role_key} and {text_key}"
        if m.get(role_key) not in roles:
            return f"{field}[{i}].{role_key} must be one of {', '.join(roles)} (got {m.get(role_key)!r})"
        if not isinstance(m.get(text_key), str):
            return f"{field}[{i}].{text_key} must be a string"
    if not any(roles[m[role_key]] == "assistant" for m in turns):
        return f"no {assistant} (nothing to learn from)"
    return None


def as_messages(obj: dict) -> dict:
    """A valid chat record with ``messages``: ShareGPT conversations become role/content messages."""
    if "messages" in obj or "conversations" not in obj:
        return obj
    msgs = [{"role": "system", "content": obj["system"]}] if obj.get("system") else []
    msgs += [{"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in obj["conversations"]]
    return {"messages": msgs}


def as_record(obj: dict, fmt: str) -> dict:
    """A valid line as the tokenizer reads it."""
    if fmt == "chat":
        return as_messages(obj)
    if fmt in RESPONSES:
        return preference_record(obj, fmt)
    return obj


def read_records(files: list[tuple[str, Path]], fmt: str, on_bad_line: str, stats: DataStats,
                 formats: tuple[str, ...] = SFT_FORMATS) -> tuple[list[dict], str]:
    """Parse and validate every line (or Parquet row). Returns the records and the (detected) format.
    ``formats``: what the objective reads (Objective.formats()); auto detects among them."""
    if fmt != "auto" and fmt not in formats:
        raise BadConfig(f"dataset.format {fmt} is not a format this objective reads: "
                        + " or ".join(f"{f} ({'+'.join(FORMAT_KEYS[f][0])})" for f in formats))
    records: list[dict] = []
    bad: list[tuple[str, str, str]] = []
    bad_count = 0
    for name, path in files:
        stats.files.append(name)
        entries = _parquet_rows(name, path) if Path(path).suffix == ".parquet" else _json_lines(name, path)
        for where, obj, problem in entries:
            stats.lines += 1
            if problem is None:
                if fmt == "auto":
                    detected = detect_format(obj, formats)
                    if detected is None:
                        problem = _undetected(obj, formats)
                    else:
                        fmt = detected
                if problem is None:
                    problem = check_record(obj, fmt)
            if problem is not None:
                bad_count += 1
                if len(bad) < MAX_REPORTED:
                    bad.append((name, where, problem))
                continue
            records.append(as_record(obj, fmt))
    if bad_count and on_bad_line == "fail":
        raise BadData(_bad_message(bad, bad_count))
    if bad_count:
        stats.skipped_lines += bad_count
    if fmt == "auto":
        raise BadData(f"{', '.join(n for n, _ in files)}: no data lines")
    stats.format = fmt
    return records, fmt


def _json_lines(name: str, path: Path) -> Iterator[tuple[str, object, str | None]]:
    """("line N", the parsed object or None, what is wrong or None) per non-blank line."""
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise BadData(f"{name}: cannot open: {e.strerror or e}") from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"line {lineno}", None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
                continue
            if not line.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(line), None
            except json.JSONDecodeError as e:
                yield f"line {lineno}", None, f"invalid JSON ({e.msg} at column {e.colno})"


def _parquet_rows(name: str, path: Path) -> Iterator[tuple[str, object, str | None]]:
    """("row N", the row as a dict, None) per row, N from 1 as for lines; read a batch at a time."""
    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
    except ImportError:
        raise BadConfig(f"{name}: reading Parquet needs pyarrow, which this trainer image lacks") from None
    except Exception as e:  # not Parquet, truncated, unreadable
        raise BadData(f"{name}: not a readable Parquet file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    n = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            n += 1
            yield f"row {n}", row, None


def _bad_message(bad: list[tuple[str, str, str]], total: int) -> str:
    by_file: dict[str, list[str]] = {}
    for name, where, problem in bad:
        by_file.setdefault(name, []).append(f"{where}: {problem}")
    parts = [f"{name}: " + "; ".join(items) for name, items in by_file.items()]
    more = f" (and {total - len(bad)} more)" if total > len(bad) else ""
    lines_word = "line" if total == 1 else "lines"
    return (f"{total} malformed {lines_word}{more}: " + " | ".join(parts)
            + ". Fix them, or set spec.dataset.onBadLine: skip to drop and count them.")


# ---------------------------------------------------------------------------------------------
# tokenization


def _shifted(ids: list[int], learn: list[bool]) -> list[int]:
    """labels[t] = ids[t+1] where token t+1 is learned, else IGNORE."""
    return [ids[t + 1] if learn[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


class Tokenize:
    def __init__(self, tokenizer, fmt: str, max_len: int):
        self.tok = tokenizer
        self.fmt = fmt
        self.max_len = max_len
        self.eos = tokenizer.eos_token_id
        self.bos = tokenizer.bos_token_id
        if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
            raise BadConfig("dataset format chat needs a chat template, and the model's tokenizer has none "
                            "(tokenizer_config.json chat_template); use format alpaca or text, or a model with one")

    def _encode(self, text: str, bos: bool) -> list[int]:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return ([self.bos] if bos and self.bos is not None else []) + ids

    def __call__(self, rec: dict) -> tuple[list[int], list[bool]]:
        if self.fmt == "text":
            ids = self._encode(rec["text"], bos=True) + ([self.eos] if self.eos is not None else [])
            return ids, [True] * len(ids)
        if self.fmt == "alpaca":
            inp = rec.get("input") or ""
            prompt = (ALPACA_PROMPT if inp.strip() else ALPACA_PROMPT_NO_INPUT).format(instruction=rec["instruction"], input=inp)
            p = self._encode(prompt, bos=True)
            r = self._encode(rec["output"], bos=False) + ([self.eos] if self.eos is not None else [])
            return p + r, [False] * len(p) + [True] * len(r)
        return self._chat(rec["messages"])

    def _render(self, msgs, gen: bool) -> str:
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def _chat(self, msgs: list[dict]) -> tuple[list[int], list[bool]]:
        full = self._render(msgs, False)
        spans = []  # character spans of assistant turns in the rendered text
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = self._render(msgs[:i], True) if i else ""
            upto = self._render(msgs[: i + 1], False)
            if not full.startswith(upto) or not upto.startswith(before):
                raise BadConfig("the tokenizer's chat template does not render conversations incrementally, so "
                                "assistant turns cannot be told apart for response-only loss")
            spans.append((len(before), len(upto)))
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        learn = [any(s <= a < e for s, e in spans) for a, _ in offsets]
        return list(ids), learn

    def example(self, rec: dict, stats: DataStats) -> Example | None:
        ids, learn = self(rec)
        if len(ids) > self.max_len:
            ids, learn = ids[: self.max_len], learn[: self.max_len]
            stats.truncated_examples += 1
        labels = _shifted(ids, learn)
        if all(x == IGNORE for x in labels):
            stats.dropped_examples += 1
            return None
        return Example(ids, labels)


def tokenize_all(records: list[dict], tokenizer, fmt: str, max_len: int, stats: DataStats) -> list[Example]:
    t = Tokenize(tokenizer, fmt, max_len)
    out = []
    for r in records:
        ex = t.example(r, stats)
        if ex is not None:
            out.append(ex)
    return out


# ---------------------------------------------------------------------------------------------
# splitting, packing, batching


def split_validation(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic hold-out: the same seed always holds out the same examples."""
    train, val, _ = split_holdout(examples, fraction, None, seed)
    return train, val


def split_holdout(examples: list, validation: float | None, test: float | None, seed: int) -> tuple[list, list, list]:
    """(train, validation, test), each in the data's order. One shuffle of the indices, seeded: the test
    set is its first ceil(n * test), the validation set the next ceil(n * validation), so an example is
    in one split only and, without a test split, the validation set is the one it always was."""
    n = len(examples)
    n_test = max(1, int(math.ceil(n * test))) if test else 0
    n_val = max(1, int(math.ceil(n * validation))) if validation else 0
    if n_test + n_val >= n:
        held = " plus ".join(f"{name} {f}" for name, f in (("validationSplit", validation), ("testSplit", test)) if f)
        raise BadData(f"{held} leaves no training data ({n} examples)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    test_idx, val_idx = set(order[:n_test]), set(order[n_test:n_test + n_val])
    train = [e for i, e in enumerate(examples) if i not in test_idx and i not in val_idx]
    return train, [examples[i] for i in sorted(val_idx)], [examples[i] for i in sorted(test_idx)]


def pack(examples: list[Example], max_len: int) -> list[Example]:
    """Concatenate examples (in order) into sequences of at most max_len tokens. Position ids restart
    at each example, which is what keeps attention within an example (transformers builds a
    block-diagonal causal mask from them when no attention mask is passed)."""
    out: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for ex in examples:
        if ids and len(ids) + len(ex) > max_len:
            out.append(Example(ids, labels, pos))
            ids, labels, pos = [], [], []
        ids.extend(ex.input_ids)  # in place: concatenating copies each pack once per example
        labels.extend(ex.labels)
        pos.extend(range(len(ex)))
    if ids:
        out.append(Example(ids, labels, pos))
    return out


def collate(batch: list[Example], pad_id: int, pad_to: int | None = None):
    """Right-padded tensors. Packed batches carry position_ids and no attention mask; padding is a
    segment of its own whose labels are ignored."""
    import torch

    length = max(len(e) for e in batch)
    if pad_to:
        length = max(length, pad_to)
    packed = batch[0].position_ids is not None
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE, dtype=torch.long)
    out = {"input_ids": ids, "labels": labels}
    if packed:
        pos = torch.zeros((len(batch), length), dtype=torch.long)
        for i, e in enumerate(batch):
            n = len(e)
            pos[i, :n] = torch.tensor(e.position_ids)
            pos[i, n:] = torch.arange(length - n)
        out["position_ids"] = pos
    else:
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        out["attention_mask"] = mask
    for i, e in enumerate(batch):
        n = len(e)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        if not packed:
            mask[i, :n] = 1
    out["num_tokens"] = sum(len(e) for e in batch)
    return out


def void(e):
    """A copy of an example that adds nothing to the loss or the count, for a rank with no example
    of its own in a batch: SFT's with every label masked; a preference example marks itself."""
    if hasattr(e, "void"):
        return e.void()
    return Example(e.input_ids, [IGNORE] * len(e), e.position_ids)


class Schedule:
    """Which examples make up each micro batch, as a pure function of the micro-batch index.

    Micro batches run as one stream across epochs: epoch e is a permutation seeded with seed+e, and
    micro batch m of the stream is slice m % per_epoch of epoch m // per_epoch. An optimizer step s
    uses micro batches s*ga .. s*ga+ga-1, so the data position is restored exactly from the step.
    With several processes each global micro batch is split between the ranks; the epoch's last,
    partial one too, so no example is dropped and N processes see the data one process would.
    """

    def __init__(self, n: int, micro_batch: int, num_processes: int, rank: int, seed: int):
        self.n = n
        self.mb = micro_batch
        self.nproc = num_processes
        self.rank = rank
        self.seed = seed
        if n < 1:
            raise BadData("no training sequences are left after the validation split; add data")
        self.per_epoch = math.ceil(n / (micro_batch * num_processes))
        self._perm_epoch = -1
        self._perm: list[int] = []

    def _perm_for(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            import torch

            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(self.n, generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm

    def _chunk(self, m: int) -> list[int]:
        epoch, j = divmod(m, self.per_epoch)
        g = self.mb * self.nproc
        return self._perm_for(epoch)[j * g: (j + 1) * g]

    def indices(self, m: int) -> list[int]:
        """This rank's examples of micro batch m: empty for some ranks in an epoch's last, partial batch."""
        chunk = self._chunk(m)
        per = math.ceil(len(chunk) / self.nproc)
        return chunk[self.rank * per: (self.rank + 1) * per]

    def batch(self, m: int, examples: list[Example]) -> list[Example]:
        idx = self.indices(m)
        if idx:
            return [examples[i] for i in idx]
        # Every rank must still run the forward and backward (the gradient all-reduce waits for it):
        # one example that adds nothing to the loss or the count.
        return [void(examples[self._chunk(m)[0]])]

    def epoch_of(self, m: int) -> float:
        return m / self.per_epoch


def batches(examples: list[Example], batch_size: int) -> Iterator[list[Example]]:
    for i in range(0, len(examples), batch_size):
        yield examples[i: i + batch_size]
