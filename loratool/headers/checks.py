"""Everything read from a file is checked before it is used, with limits.

JSON of any depth, integers of any length, strings that are not valid UTF-8, values of the
wrong type, regular expressions that would take exponential time, archives that would
inflate to gigabytes: each becomes one line that names the file and what is wrong, never an
internal error, a hang or a memory blow-up.
"""

from __future__ import annotations

import json
import math
import time
import zipfile
from pathlib import Path
from typing import Callable, TypeGuard

import regex

from ..errors import FormatError

REGEX_SECONDS = 0.25  # one pattern against one module name
MAX_PICKLE_BYTES = 256 * 2**20  # data.pkl of a real checkpoint is KBs: it holds no tensor data


def parse_json(text: str | bytes, where: str | Path, what: str = "the file") -> object:
    """``json.loads`` whose every failure (syntax, depth, a 5000-digit number, bad UTF-8, a
    lone surrogate) is a FormatError naming ``where``."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        data = json.loads(text)
    except RecursionError as e:
        raise FormatError(f"{where}: {what} is nested too deeply to be real: the file is "
                          "damaged or hostile") from e
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, integer digit limit
        raise FormatError(f"{where}: {what} is not valid JSON ({str(e).splitlines()[0][:120]})"
                          ": the file is damaged or not what it seems") from e
    check_text(data, where, what)
    return data


def depth(data: object) -> int:
    """How deeply lists and objects nest in parsed JSON (a scalar: 0)."""
    top, stack = 0, [(data, 0)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, dict):
            stack.extend((v, d + 1) for v in x.values())
        elif isinstance(x, list):
            stack.extend((v, d + 1) for v in x)
        else:
            top = max(top, d)
            continue
        top = max(top, d + 1)
    return top


def check_text(data: object, where: str | Path, what: str) -> None:
    """Every string (keys included) in parsed JSON must be valid UTF-8: JSON's ``\\ud800``
    escapes can smuggle in lone surrogates that no file name or terminal can take."""
    stack = [data]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            _utf8(x, where, what)
        elif isinstance(x, dict):
            for k, v in x.items():
                _utf8(k, where, what)
                stack.append(v)
        elif isinstance(x, list):
            stack.extend(x)


def _utf8(s: str, where: str | Path, what: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FormatError(f"{where}: {what} holds a string that is not valid UTF-8 "
                          f"({s.encode('utf-8', 'backslashreplace').decode()[:60]!r})") from e


# --------------------------------------------------------------------------- typed fields

def _is_str(v: object) -> TypeGuard[str]:
    return isinstance(v, str)


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_str_list(v: object) -> TypeGuard[list[str]]:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


KINDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "str": (_is_str, "a string"),
    "int": (_is_int, "an integer"),
    "positive int": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "number": (_is_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str list": (_is_str_list, "a list of strings"),
    "str or str list": (lambda v: _is_str(v) or _is_str_list(v),
                        "a string or a list of strings"),
    "numbers by name": (lambda v: isinstance(v, dict) and all(_is_number(x)
                                                              for x in v.values()),
                        "an object of finite numbers"),
    "positive ints by name": (lambda v: isinstance(v, dict) and all(
        _is_int(x) and x > 0 for x in v.values()), "an object of positive integers"),
}

# adapter_config.json: the keys loratool reads, and what they must be (null is allowed)
ADAPTER_CONFIG = {"peft_type": "str", "task_type": "str", "base_model_name_or_path": "str",
                  "revision": "str", "r": "positive int", "lora_alpha": "number",
                  "target_modules": "str or str list", "modules_to_save": "str list",
                  "rank_pattern": "positive ints by name", "alpha_pattern": "numbers by name",
                  "use_rslora": "bool", "use_dora": "bool", "fan_in_fan_out": "bool",
                  "lora_bias": "bool", "bias": "str", "ensure_weight_tying": "bool"}
# the same keys mean other things for PEFT's other tuners (OFT's r may be 0, AdaLoRA's
# rank_pattern holds masks): their readers check what they use
ADAPTER_CONFIG_ANY = {"peft_type": "str", "task_type": "str", "base_model_name_or_path": "str",
                      "revision": "str", "target_modules": "str or str list",
                      "modules_to_save": "str list", "fan_in_fan_out": "bool"}


# config.json: the keys loratool reads from a model's config
MODEL_CONFIG = {"model_type": "str", "architectures": "str list",
                "tie_word_embeddings": "bool", "num_hidden_layers": "positive int",
                "num_attention_heads": "positive int", "num_key_value_heads": "positive int",
                "hidden_size": "positive int", "vocab_size": "positive int",
                "type_vocab_size": "int", "head_dim": "positive int"}


def check_fields(cfg: dict[str, object], schema: dict[str, str], where: str | Path) -> None:
    """Each known key is null or of its kind; unknown keys are left alone."""
    for key, kind in schema.items():
        v = cfg.get(key)
        ok, want = KINDS[kind]
        if v is not None and not ok(v):
            raise FormatError(f"{where}: {key} must be {want}, not {json.dumps(v)[:60]}")

# --------------------------------------------------------------------------- regexes


_SPENT: dict[str, float] = {}  # seconds each pattern has taken so far in this process


def pattern_match(pattern: str, name: str, where: object) -> bool:
    """PEFT's rule for rank_pattern/alpha_pattern keys, ``(.*\\.)?(key)$`` matched against a
    module name (see :func:`limited_match`)."""
    return limited_match(rf"(.*\.)?({pattern})$", pattern, name, f"{where}: pattern")


def limited_match(expression: str, pattern: str, name: str, what: str) -> bool:
    """``expression`` (built around a user's ``pattern``) matched from the start of ``name``,
    on an engine with a time limit: a pathological pattern such as ``(a|a)+$`` is refused
    instead of taking exponential time, per name and over all names; an invalid one in one
    line. ``what`` starts those lines (where the pattern came from)."""

    spent = _SPENT.get(pattern, 0.0)
    start = time.perf_counter()
    try:
        hit = regex.match(expression, name, timeout=REGEX_SECONDS) is not None
    except regex.error as e:
        raise FormatError(f"{what} {pattern!r} is not a valid regular expression "
                          f"({e})") from e
    except TimeoutError:
        spent = math.inf
        hit = False
    spent += time.perf_counter() - start
    _SPENT[pattern] = spent
    if spent > 4 * REGEX_SECONDS:
        raise FormatError(f"{what} {pattern!r} takes too long to match module names "
                          f"like {name!r} (catastrophic backtracking); write it without nested "
                          "repetition")
    return hit


# --------------------------------------------------------------------------- archives

def check_zip(path: Path) -> None:
    """A PyTorch zip checkpoint stores tensor data uncompressed beside a small pickle: refuse
    one whose pickle, or whose total, would inflate far beyond the file before reading it."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # torch.load gives its own message for a damaged archive
    size = path.stat().st_size
    for i in infos:
        if i.filename.endswith("data.pkl") and i.file_size > MAX_PICKLE_BYTES:
            raise FormatError(f"{path}: its pickle would inflate to {i.file_size:,} bytes (a "
                              "real checkpoint's is small): refused as a zip bomb")
    total = sum(i.file_size for i in infos)
    if total > 2 * size + MAX_PICKLE_BYTES:
        raise FormatError(f"{path}: would inflate to {total:,} bytes from {size:,}: refused "
                          "as a zip bomb (PyTorch stores tensors uncompressed)")
