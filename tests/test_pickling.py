"""Every error survives pickling whole: a Dask worker or a process pool hands it back
with its type, message and fields, or the flow would see an unpickling error instead.

The classes are found by introspection, so a new error type is covered the day it is added.
"""

from __future__ import annotations

import inspect
import io
import pickle
from typing import Any

import cloudpickle
import pytest

import prefect_gpt_image._client  # noqa: F401  (defines an error of its own)
from prefect_gpt_image import errors
from prefect_gpt_image._charges import Charges
from prefect_gpt_image.errors import GptImageError
from prefect_gpt_image.models import PromptFailure, RunReport

REPORT = RunReport(
    failures=[PromptFailure(prompt="a lost lynx", error="gone", error_type="X", stage="generate")],
    generated=2,
    cost_usd=0.06,
)
SAMPLES: dict[str, Any] = {
    "status_code": 503,
    "retry_after": 2.5,
    "retryable": True,
    "report": REPORT,
}
"""A value for each constructor argument an error type takes besides its message."""
TASK_FIELDS: dict[str, Any] = {"charges": Charges(calls=3, usd=0.12, possibly_usd=0.17)}
"""What the client sets on an error where it reads the answer."""


def plain_dumps(obj: object) -> bytes:
    """`pickle.dumps` as in a process where nothing registered picklers of its own: importing
    Dask's `distributed` registers tblib's for every exception class defined by then, which
    would hide a class that cannot pickle itself."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer)
    pickler.dispatch_table = {}
    pickler.dump(obj)
    return buffer.getvalue()


def error_types() -> list[type[GptImageError]]:
    """Every error class of `errors`, and every subclass of the base anywhere in the package."""
    found: dict[str, type[GptImageError]] = {
        name: cls
        for name, cls in vars(errors).items()
        if isinstance(cls, type) and issubclass(cls, BaseException)
    }
    pending = [GptImageError]
    while pending:
        cls = pending.pop()
        if cls.__module__.startswith("prefect_gpt_image"):
            found.setdefault(f"{cls.__module__}.{cls.__qualname__}", cls)
        pending.extend(cls.__subclasses__())
    return sorted(set(found.values()), key=lambda cls: cls.__qualname__)


def build(cls: type[GptImageError]) -> GptImageError:
    """An instance with every constructor argument given, and the fields the task sets."""
    own_init = cls.__init__ is not BaseException.__init__
    # After `self` and the message; *args and **kwargs need nothing.
    parameters = [
        p
        for p in list(inspect.signature(cls.__init__).parameters.values())[2:]
        if own_init and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    missing = [p.name for p in parameters if p.name not in SAMPLES]
    assert not missing, f"add a sample for {cls.__name__}'s {missing} to SAMPLES"
    positional = [SAMPLES[p.name] for p in parameters if p.kind == p.POSITIONAL_OR_KEYWORD]
    keywords = {p.name: SAMPLES[p.name] for p in parameters if p.kind == p.KEYWORD_ONLY}
    error = cls(
        f"{cls.__name__}: something went wrong, and here is what to do.", *positional, **keywords
    )
    for field, value in TASK_FIELDS.items():
        if hasattr(error, field):
            setattr(error, field, value)
    return error


def test_every_error_type_is_found() -> None:
    names = {cls.__name__ for cls in error_types()}
    assert {"GptImageError", "ServerError", "StorageError", "RunFailedError"} <= names
    assert "_TransientDownloadError" in names


@pytest.mark.parametrize("cls", error_types(), ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("dumps", [plain_dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_error_round_trips_with_its_message_and_fields(
    cls: type[GptImageError], dumps: Any
) -> None:
    error = build(cls)

    copy = pickle.loads(dumps(error))

    assert type(copy) is cls
    assert str(copy) == str(error) and copy.args == error.args
    assert vars(copy) == vars(error)
    for field in ("retryable", "drops_route", "stops_run", "billed", *TASK_FIELDS, *SAMPLES):
        assert getattr(copy, field, None) == getattr(error, field, None), field
    assert pickle.loads(plain_dumps(copy)).args == error.args  # and again


def test_an_error_keeps_its_notes_through_pickling() -> None:
    error = errors.ServerError("502 from the gateway", status_code=502, retry_after=None)
    error.add_note("on the second attempt")
    assert pickle.loads(plain_dumps(error)).__notes__ == ["on the second attempt"]
