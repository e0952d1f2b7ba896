"""Verifiable rewards for GRPO: plain functions ``(prompt, completion, **columns) -> float``.

A reward scores one completion of one prompt. ``prompt`` is the user's last message (the question),
``completion`` the generated answer as text (special tokens removed, ``</s>`` not included), and
``columns`` the prompt record's other columns (``answer``, ``tool_name``, …), so a checker compares the
answer with the data's own reference. Rewards are given

* by name from the built-in set (`BUILTINS`): ``exact_answer``, ``numeric_answer``, ``regex_format``,
  ``tool_call``;
* as ``module:function`` in the config (``train.rewards: [mypkg.rewards:short_answer]``), imported when
  the run starts (a module that does not import stops the run before anything is written);
* as callables from a notebook or Python: ``mf.run(cfg, rewards={"correct": lambda prompt, completion,
  answer, **_: float(...)})``.

A reward that raises, or returns something that is not a finite number, stops the run with the prompt's
``file:line`` and the reward's name (`RewardError`): a silently zero reward would train on noise.

No torch here: the config and the data stage check rewards before any model loads.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mistral_fast.errors import ConfigError, MistralFastError

RewardFn = Callable[..., float]
"""``(prompt: str, completion: str, **columns) -> float``."""

NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*(?:\.\d+)?")
DEFAULT_PATTERN = r"-?\d+(\.\d+)?"  # regex_format's default: the completion is a bare number, nothing else


class RewardError(MistralFastError):
    """A reward function raised or returned a non-number: names the prompt's file:line and the reward."""


def _clean(text: str) -> str:
    return " ".join(str(text).split()).casefold().rstrip(".")


def exact_answer(prompt: str, completion: str, answer: Any, **_: Any) -> float:
    """1.0 when the completion is the ``answer`` column (case, surrounding spaces and a final full stop ignored)."""
    return float(_clean(completion) == _clean(answer))


def _number(text: str) -> float | None:
    found = NUMBER.findall(str(text))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_answer(prompt: str, completion: str, answer: Any, *, tolerance: float = 1e-6, **_: Any) -> float:
    """1.0 when the completion's last number is within ``tolerance`` (relative, at least absolute) of ``answer``.

    The last number, because answers such as ``7 km = 7000 m`` restate the question first.
    """
    got, want = _number(completion), _number(answer)
    if got is None or want is None:
        return 0.0
    return float(abs(got - want) <= tolerance * max(1.0, abs(want)))


def regex_format(prompt: str, completion: str, *, pattern: str = DEFAULT_PATTERN, **_: Any) -> float:
    """1.0 when the whole completion (stripped) matches ``pattern`` (``train.reward_pattern``)."""
    return float(re.fullmatch(pattern, completion.strip()) is not None)


def tool_call(prompt: str, completion: str, tool_name: Any, **_: Any) -> float:
    """1.0 for a JSON-valid v3 tool call (``[TOOL_CALLS][{"name": …, "arguments": {…}}]``) naming ``tool_name``.

    The text after ``[TOOL_CALLS]`` is parsed as JSON (the whole completion when the marker was decoded
    away as a special token): a list of calls or one call, each an object with a string ``name`` and an
    object ``arguments``. Any call naming ``tool_name`` scores 1.0; valid JSON that names another tool 0.0.
    """
    text = completion.split("[TOOL_CALLS]", 1)[-1].strip().removesuffix("</s>")
    try:
        calls = json.loads(text)
    except ValueError:
        return 0.0
    calls = calls if isinstance(calls, list) else [calls]
    ok = [c for c in calls if isinstance(c, dict) and isinstance(c.get("name"), str)]
    if not ok or len(ok) != len(calls) or not all(isinstance(c.get("arguments", {}), dict) for c in ok):
        return 0.0
    return float(any(c["name"] == str(tool_name) for c in ok))


BUILTINS: dict[str, RewardFn] = {
    "exact_answer": exact_answer,
    "numeric_answer": numeric_answer,
    "regex_format": regex_format,
    "tool_call": tool_call,
}
"""The built-in rewards by name (``train.rewards``)."""


@dataclass
class Reward:
    """A resolved reward: its name (the metric's), the function, and the record columns it needs."""

    name: str
    fn: RewardFn
    columns: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of a built-in (tolerance, pattern)

    def __call__(self, prompt: str, completion: str, where: str, columns: Mapping[str, Any]) -> float:
        """Score one completion; a raise or a non-number becomes a `RewardError` naming ``where`` and the reward."""
        kwargs = {**self._pass(columns), **self.options}
        try:
            value = self.fn(prompt, completion, **kwargs)
        except Exception as err:
            raise RewardError(
                f"{where}: reward {self.name!r} raised {type(err).__name__}: {err} (completion {completion!r:.80}) — "
                "fix the reward function"
            ) from err
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise RewardError(
                f"{where}: reward {self.name!r} returned {value!r:.60} ({type(value).__name__}), not a finite number "
                f"(completion {completion!r:.80}) — a reward must return a float"
            )
        return float(value)

    def _pass(self, columns: Mapping[str, Any]) -> dict[str, Any]:
        """The columns the function accepts: all of them with ``**columns``, else only its named parameters."""
        params = _parameters(self.fn)
        if params is None or any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return dict(columns)
        return {k: v for k, v in columns.items() if k in params}


def _parameters(fn: Callable[..., Any]) -> Mapping[str, inspect.Parameter] | None:
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        return None


def needed_columns(fn: Callable[..., Any]) -> tuple[str, ...]:
    """The record columns a reward function requires: its parameters after the first two, without a default."""
    params = _parameters(fn)
    if params is None:
        return ()
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    named = [p for p in params.values() if p.kind in (*positional, inspect.Parameter.KEYWORD_ONLY)]
    rest = named[2:] if len([p for p in named if p.kind in positional]) >= 2 else named
    return tuple(p.name for p in rest if p.default is p.empty)


def _import(spec: str) -> RewardFn:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(
            f"train.rewards: {spec!r} is neither a built-in ({sorted(BUILTINS)}) nor module:function — "
            "e.g. train.rewards=[numeric_answer] or [mypkg.rewards:short]"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise ConfigError(
            f"train.rewards: {spec!r}: module {module_name!r} does not import ({type(err).__name__}: {err}) — "
            "check the name and that its directory is on PYTHONPATH"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"train.rewards: {spec!r}: module {module_name!r} has no function {attr!r}")
    return fn


def resolve_rewards(specs: Sequence[str], *, tolerance: float = 1e-6, pattern: str = DEFAULT_PATTERN) -> list[Reward]:
    """Turn ``train.rewards`` entries into `Reward` objects (built-ins by name, ``module:function`` imported).

    Args:
        specs: the config's reward names.
        tolerance: ``numeric_answer``'s relative tolerance (``train.reward_tolerance``).
        pattern: ``regex_format``'s regular expression (``train.reward_pattern``).

    Raises:
        ConfigError: an unknown name, a module that does not import, or a missing function.
    """
    rewards = []
    for spec in specs:
        if spec in BUILTINS:
            fn = BUILTINS[spec]
            options = {"tolerance": tolerance} if spec == "numeric_answer" else {}
            options |= {"pattern": pattern} if spec == "regex_format" else {}
            rewards.append(Reward(spec, fn, needed_columns(fn), options))
        else:
            fn = _import(spec)
            rewards.append(Reward(spec.rpartition(":")[2], fn, needed_columns(fn)))
    return rewards


def rewards_from_callables(callables: Mapping[str, RewardFn] | Sequence[RewardFn]) -> list[Reward]:
    """`Reward` objects for callables given in a notebook (a dict names them; a list uses ``__name__``)."""
    items = (
        callables.items()
        if isinstance(callables, Mapping)
        else ((getattr(f, "__name__", "reward"), f) for f in callables)
    )
    rewards = []
    for name, fn in items:
        if isinstance(fn, str):
            rewards += resolve_rewards([fn])
            continue
        if not callable(fn):
            raise ConfigError(
                f"rewards[{name!r}] is {type(fn).__name__}, not a function (prompt, completion, **columns)"
            )
        rewards.append(Reward(str(name), fn, needed_columns(fn)))
    return rewards


def check_regex(pattern: str) -> None:
    """Refuse a ``train.reward_pattern`` that is not a valid regular expression.

    Raises:
        ConfigError: naming the field and Python's message.
    """
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"train.reward_pattern={pattern!r} is not a valid regular expression: {err}") from None
